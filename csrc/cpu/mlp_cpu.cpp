// CPU entries of fastmlp::mlp, mlp_inference and mlp_backward: a whole MLP
// (an activation after every layer but the last, ReLU by default, and an
// optional one after the last) forward in one call, and its backward in one
// call. Each entry checks its arguments, chooses a CPU path (paths/rule.h:
// forced, measured, or the rule's) and runs it: layered (paths/layered.h),
// row-blocked (paths/rowblock.h) or aten (aten/aten_engine.h).
//
// Why one op for the whole network: at the tutorial's batch 64 the GEMMs of
// a training step take ~1.1 ms, and per-layer autograd adds a node per layer,
// gradient tensors accumulated and zeroed by separate passes and bookkeeping
// around each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "activation_kinds.h"
#include "aten/aten_engine.h"
#include "checks.h"
#include "cpu/paths/grad_request.h"
#include "cpu/paths/layered.h"
#include "cpu/paths/rowblock.h"
#include "cpu/paths/rule.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the paths this file runs

// The widths of an MLP as the path rule reads them: in_features, then
// each layer's out_features.
std::vector<int64_t> mlp_widths(const std::vector<at::Tensor>& w) {
  std::vector<int64_t> widths{w[0].size(1)};
  for (const auto& t : w) widths.push_back(t.size(0));
  return widths;
}

// mlp's `hidden` (schemas.cpp), uninitialised: one (M, out_l) tensor per
// layer that saves something for backward.
std::vector<at::Tensor> empty_hidden(int64_t M,
                                     const std::vector<at::Tensor>& w,
                                     const MlpActivations& act,
                                     const at::TensorOptions& options) {
  std::vector<at::Tensor> hidden;
  for (size_t l = 0; l < act.hidden_count(w.size()); ++l) {
    hidden.push_back(at::empty({M, w[l].size(0)}, options));
  }
  return hidden;
}

// The checked, contiguous arguments of mlp and mlp_inference.
struct MlpArgs {
  MlpActivations act;
  at::Tensor x2;
  std::vector<at::Tensor> w, b;  // b: undefined tensors without biases
  bool has_bias = false;
};

MlpArgs mlp_args(const at::Tensor& x, at::TensorList weights,
                 at::TensorList biases, c10::string_view activation,
                 c10::string_view output_activation, double negative_slope,
                 const char* op) {
  MlpArgs a;
  a.act =
      parse_mlp_activations(activation, output_activation, negative_slope, op);
  check_mlp_args(x, weights, biases);
  a.x2 = as_rows(x);
  a.has_bias = !biases.empty();
  for (size_t l = 0; l < weights.size(); ++l) {
    a.w.push_back(weights[l].contiguous());
    a.b.push_back(biases.empty() ? at::Tensor() : biases[l].contiguous());
  }
  return a;
}

// The arithmetic of an MLP's forward over M rows (2 M in out per layer).
double forward_flops(int64_t M, const std::vector<at::Tensor>& w) {
  double flops = 0;
  for (const auto& t : w) flops += 2.0 * M * t.size(0) * t.size(1);
  return flops;
}

// mlp's forward on `path`: the output (M x out_features) and what backward
// reads (mlp's `hidden`; nothing in inference).
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_on(CpuPath path,
                                                               const MlpArgs& a,
                                                               MlpPhase phase) {
  const bool inference = phase == MlpPhase::kInference;
  if (path == CpuPath::kAten) {
    return mlp_aten(a.x2, a.w, a.has_bias ? a.b : std::vector<at::Tensor>(),
                    a.act, /*save_hidden=*/!inference);
  }
  const int64_t M = a.x2.size(0);
  const std::vector<at::Tensor> hidden =
      inference ? std::vector<at::Tensor>()
                : empty_hidden(M, a.w, a.act, a.x2.options());
  at::Tensor out = at::empty({M, a.w.back().size(0)}, a.x2.options());
  if (M == 0) return {out, hidden};
  if (path == CpuPath::kRowBlocked) {
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, a.x2.scalar_type(), "mlp_rowblock", [&] {
          rowblock_forward<scalar_t>(a.x2, a.w, a.b, a.act, hidden, out);
        });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, a.x2.scalar_type(), "mlp_cpu",
        [&] { layered_forward<scalar_t>(a.x2, a.w, a.b, a.act, hidden, out); });
  }
  return {out, hidden};
}

// mlp's forward on the path chosen for it (run_on_cpu_path: forced,
// measured, or the rule's and then measured), viewed as x's leading
// dimensions.
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward(const at::Tensor& x,
                                                            const MlpArgs& a,
                                                            MlpPhase phase) {
  const int64_t M = a.x2.size(0);
  auto [out, hidden] = run_on_cpu_path(
      M, mlp_widths(a.w), a.x2.scalar_type(), phase, forward_flops(M, a.w),
      [&](CpuPath path) { return mlp_forward_on(path, a, phase); });
  return {out.view(with_last(x.sizes(), a.w.back().size(0))), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, c10::string_view output_activation,
    double negative_slope) {
  const MlpArgs a = mlp_args(x, weights, biases, activation, output_activation,
                             negative_slope, "fastmlp.mlp: ");
  return mlp_forward(x, a, MlpPhase::kTrainForward);
}

// mlp's output only: nothing saved for backward (no_grad, inference_mode).
at::Tensor mlp_inference_cpu(const at::Tensor& x, at::TensorList weights,
                             at::TensorList biases, c10::string_view activation,
                             c10::string_view output_activation,
                             double negative_slope) {
  const MlpArgs a = mlp_args(x, weights, biases, activation, output_activation,
                             negative_slope, "fastmlp.mlp_inference: ");
  return std::get<0>(mlp_forward(x, a, MlpPhase::kInference));
}

// What mlp_backward computes (GradRequest, paths/grad_request.h) from its
// output_mask.
GradRequest parse_mask(const std::vector<bool>& mask, size_t L) {
  GradRequest m;
  m.grad_x = mask[0];
  const bool has_bias = mask.size() == 1 + 2 * L;
  for (size_t l = 0; l < L; ++l) {
    m.weight.push_back(mask[1 + l]);
    m.bias.push_back(has_bias && mask[1 + L + l]);
  }
  m.lowest = L;
  for (size_t l = L; l-- > 0;) {
    if (m.weight[l] || m.bias[l]) m.lowest = l;
  }
  if (m.grad_x) m.lowest = 0;
  return m;
}

using MlpGrads =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The checked, contiguous arguments of mlp_backward.
struct MlpBackwardArgs {
  MlpActivations act;
  std::vector<bool> mask;
  GradRequest m;
  at::Tensor gy2, x2;  // x2: defined where the first weight's gradient is asked
  std::vector<at::Tensor> w, h;
};

// mlp_backward on the layered or row-blocked path: grad_x (M x K, or empty
// when not asked), grad_w and grad_b (empty where not asked). One tensor per
// output, also for those not asked for: outputs of an op must not alias
// each other.
MlpGrads mlp_backward_native(CpuPath path, const MlpBackwardArgs& a) {
  const size_t L = a.w.size();
  const GradRequest& m = a.m;
  const at::TensorOptions options = a.gy2.options();
  const int64_t M = a.gy2.size(0), K = a.w[0].size(1);
  const auto empty = [&] { return at::empty({0}, options); };
  const bool has_bias = a.mask.size() == 1 + 2 * L;
  std::vector<at::Tensor> grad_w, grad_b;
  for (size_t l = 0; l < L; ++l) {
    grad_w.push_back(m.weight[l] ? at::empty(a.w[l].sizes(), options)
                                 : empty());
    if (has_bias) {
      grad_b.push_back(m.bias[l] ? at::empty({a.w[l].size(0)}, options)
                                 : empty());
    }
  }
  at::Tensor grad_x = m.grad_x ? at::empty({M, K}, options) : empty();
  if (M == 0) {
    // No rows: every gradient is an empty sum.
    grad_x.zero_();
    for (auto& t : grad_w) t.zero_();
    for (auto& t : grad_b) t.zero_();
  } else if (m.lowest < L && path == CpuPath::kRowBlocked) {
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, a.gy2.scalar_type(), "mlp_backward_rowblock", [&] {
          rowblock_backward<scalar_t>(a.gy2, a.x2, a.w, a.h, a.act, m, grad_x,
                                      grad_w, grad_b);
        });
  } else if (m.lowest < L) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, a.gy2.scalar_type(), "mlp_backward_cpu", [&] {
          layered_backward<scalar_t>(a.gy2, a.x2, a.w, a.h, a.act, m, grad_x,
                                     grad_w, grad_b);
        });
  }
  return {grad_x, grad_w, grad_b};
}

MlpGrads mlp_backward_cpu(const at::Tensor& grad_y,
                          const std::optional<at::Tensor>& x,
                          at::TensorList weights, at::TensorList hidden,
                          const c10::List<bool>& output_mask_list,
                          c10::string_view activation,
                          c10::string_view output_activation,
                          double negative_slope) {
  MlpBackwardArgs a;
  a.mask = output_mask_list.vec();
  a.act = parse_mlp_activations(activation, output_activation, negative_slope,
                                "fastmlp.mlp_backward: ");
  check_mlp_backward_args(grad_y, x, weights, hidden, a.mask, a.act);
  const size_t L = weights.size();
  a.m = parse_mask(a.mask, L);
  a.gy2 = as_rows(grad_y);
  for (size_t l = 0; l < L; ++l) {
    a.w.push_back(weights[l].contiguous());
    if (l < hidden.size()) a.h.push_back(hidden[l].contiguous());
  }
  if (a.m.weight[0]) a.x2 = as_rows(*x);
  const int64_t M = a.gy2.size(0);
  const auto on_path = [&](CpuPath path) -> MlpGrads {
    if (path == CpuPath::kAten) {
      const std::optional<at::Tensor> input =
          a.x2.defined() ? std::optional<at::Tensor>(a.x2) : x;
      return mlp_backward_aten(a.gy2, input, a.w, a.h, a.mask, a.act);
    }
    return mlp_backward_native(path, a);
  };
  MlpGrads grads =
      M == 0 || a.m.lowest == L
          ? on_path(CpuPath::kLayered)  // nothing to compute but zeros
          : run_on_cpu_path(M, mlp_widths(a.w), grad_y.scalar_type(),
                            MlpPhase::kBackward, 2 * forward_flops(M, a.w),
                            on_path);
  at::Tensor& grad_x = std::get<0>(grads);
  if (a.m.grad_x)
    grad_x = grad_x.view(with_last(grad_y.sizes(), a.w[0].size(1)));
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp", &mlp_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("mlp_inference", &mlp_inference_cpu);
}

}  // namespace fastmlp

// CPU kernels of fastmlp::mlp and fastmlp::mlp_backward: a whole MLP
// (an activation after every layer but the last, ReLU by default, and an
// optional one after the last) forward in one call, and its backward in one
// call.
//
// Why one op for the whole network: at the tutorial's batch 64 the GEMMs of
// a training step take ~1.1 ms, and per-layer autograd adds a node per layer,
// gradient tensors accumulated and zeroed by separate passes and bookkeeping
// around each. Here forward is the fused Linear+ReLU block of every hidden
// layer (the same one linear_relu and mlp_sgd_step run; another activation
// is another epilogue of that block, activation_epilogues.h) and one addmm for
// the last layer (or the block again, with the output activation); backward is
// mlp_sgd_step's layer backward (mlp_blocks.h) with an epilogue that writes
// each thread's rows of the weight gradient straight into the tensor autograd
// hands to .grad, instead of updating the weights.
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
#include "cpu/kernels/activation_epilogues.h"
#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/mlp_blocks.h"
#include "cpu/paths/rowblock.h"
#include "cpu/paths/rule.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the building blocks of this file

// mlp's layered forward into out. `hidden`: what backward reads (mlp), or
// empty (inference: nothing is kept).
template <typename scalar_t>
void mlp_forward_impl(const at::Tensor& x2, const std::vector<at::Tensor>& w,
                      const std::vector<at::Tensor>& b,
                      const MlpActivations& act,
                      const std::vector<at::Tensor>& hidden, at::Tensor& out) {
  const size_t L = w.size();
  const int64_t M = x2.size(0);
  const bool inference = hidden.empty();
  Workspace& ws = Workspace::for_this_thread();
  // A layer that saves its output computes the activation in place in
  // hidden[l]; one that saves its pre-activation z (hidden[l]) writes act(z)
  // to a temporary, the next layer's input. Temporaries alternate between
  // two buffers (a layer's input is the other one), so that, in inference,
  // at most two layers' activations are alive at once, as in eager PyTorch;
  // a pre-activation nobody keeps goes to a third.
  const bool in_place = act.hidden_saves_output();
  int64_t widest = 0;
  for (const auto& t : w) widest = std::max(widest, t.size(0));
  at::Tensor pair[2], pre;
  if (inference || !in_place) {
    pair[0] = ws.next({M * widest}, x2.options());
    pair[1] = ws.next({M * widest}, x2.options());
  }
  if (inference && !in_place) pre = ws.next({M * widest}, x2.options());
  const auto rows_of = [M](const at::Tensor& buffer, int64_t n) {
    return buffer.narrow(0, 0, M * n).view({M, n});
  };
  at::Tensor h = x2;
  with_activation_rows<scalar_t>(
      act.hidden, act.negative_slope, [&](const auto& epilogue) {
        for (size_t l = 0; l + 1 < L; ++l) {
          const int64_t n = w[l].size(0);
          at::Tensor z = !inference ? hidden[l]
                         : in_place ? rows_of(pair[l % 2], n)
                                    : rows_of(pre, n);
          at::Tensor a = in_place ? z : rows_of(pair[l % 2], n);
          linear_act_forward_impl<scalar_t>(h, w[l], b[l], z, a, epilogue);
          h = a;
        }
      });
  if (act.output == Activation::kNone) {
    // The last layer has no epilogue to fuse: one library-threaded GEMM, the
    // bias folded in (rounded once, as F.linear).
    if (b[L - 1].defined()) {
      at::addmm_out(out, b[L - 1], h, w[L - 1].t());
    } else {
      at::mm_out(out, h, w[L - 1].t());
    }
    return;
  }
  // With an output activation the last layer is a block like the others,
  // saving its pre-activation in hidden[L - 1] (in inference: in the buffer
  // its input is not in).
  at::Tensor z =
      inference ? rows_of(pair[(L - 1) % 2], w[L - 1].size(0)) : hidden[L - 1];
  with_activation_rows<scalar_t>(act.output, act.negative_slope,
                                 [&](const auto& epilogue) {
                                   linear_act_forward_impl<scalar_t>(
                                       h, w[L - 1], b[L - 1], z, out, epilogue);
                                 });
}

// The widths of an MLP as the engine rule reads them: in_features, then
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
        at::kBFloat16, at::kHalf, a.x2.scalar_type(), "mlp_cpu", [&] {
          mlp_forward_impl<scalar_t>(a.x2, a.w, a.b, a.act, hidden, out);
        });
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

// What mlp_backward computes (GradRequest, paths/rowblock.h) from its
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

template <typename scalar_t>
void mlp_backward_impl(const at::Tensor& gy2, const at::Tensor& x2,
                       const std::vector<at::Tensor>& w,
                       const std::vector<at::Tensor>& hidden,
                       const MlpActivations& act, const GradRequest& m,
                       at::Tensor& grad_x, std::vector<at::Tensor>& grad_w,
                       std::vector<at::Tensor>& grad_b) {
  const size_t L = w.size();
  Workspace& ws = Workspace::for_this_thread();
  const bool saves_output = act.hidden_saves_output();
  // The gradient reaching layer l's output, as parts to be summed; at the
  // top it is grad_y itself, which layer_backward only reads.
  at::Tensor g_parts = gy2.unsqueeze(0);
  for (size_t l = L; l-- > m.lowest;) {
    const bool need_w = m.weight[l];
    // Layer l's input, for its weight gradient: x, or the layer below's
    // output, recomputed when that layer saved its pre-activation.
    at::Tensor input = l == 0 ? x2 : hidden[l - 1];
    if (need_w && l > 0 && !saves_output) {
      input = ws.next(hidden[l - 1].sizes(), hidden[l - 1].options());
      with_activation_rows<scalar_t>(
          act.hidden, act.negative_slope, [&](const auto& epilogue) {
            apply_rows<scalar_t>(hidden[l - 1], input, epilogue);
          });
    }
    // What the layer's activation saved: hidden[l] below the top (its output
    // or pre-activation, see MlpActivations); at the top, the pre-activation
    // when there is an output activation, else nothing (no mask).
    const bool top = l + 1 == L;
    const Activation kind = top ? act.output : act.hidden;
    const at::Tensor saved =
        kind == Activation::kNone ? at::Tensor() : hidden[l];
    // The top's gradient through the output activation goes to a buffer of
    // ours: the gradient reaching it is the caller's grad_y.
    const at::Tensor g_dst = top && saved.defined()
                                 ? ws.next(gy2.sizes(), gy2.options())
                                 : at::Tensor();
    scalar_t* gb = m.bias[l] ? grad_b[l].data_ptr<scalar_t>() : nullptr;
    at::Tensor& gw = grad_w[l];
    const auto epilogue = [&](int64_t n0, int64_t rows,
                              const at::Tensor& g_cols,
                              const math_t<scalar_t>* bias_grad) {
      if (need_w) {
        at::Tensor gw_rows = gw.narrow(0, n0, rows);
        mm_on_this_thread<scalar_t>(gw_rows, g_cols.t(), input);
      }
      if (bias_grad != nullptr) {
        for (int64_t i = 0; i < rows; ++i) {
          gb[n0 + i] = static_cast<scalar_t>(bias_grad[i]);
        }
      }
    };
    with_activation_deriv<scalar_t>(
        kind, !top && saves_output, act.negative_slope, [&](const auto& deriv) {
          g_parts = layer_backward<scalar_t>(
              g_parts, saved, w[l], l > m.lowest || m.grad_x, m.bias[l],
              split_gemms_by_thread<scalar_t>(), ws, epilogue, deriv, g_dst);
        });
  }
  if (m.grad_x) {
    // grad_x is the sum of layer 0's parts, added in part order.
    const int64_t M = grad_x.size(0), K = grad_x.size(1);
    std::vector<const scalar_t*> parts;
    for (int64_t p = 0; p < g_parts.size(0); ++p) {
      parts.push_back(g_parts.data_ptr<scalar_t>() + p * M * K);
    }
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, K, block_per_thread(K, kColumnAlign),
                     [&](int64_t c0, int64_t c1) {
                       combine_grad_block<scalar_t>(parts, nullptr, out, M, K,
                                                    c0, c1, nullptr);
                     });
  }
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
          mlp_backward_impl<scalar_t>(a.gy2, a.x2, a.w, a.h, a.act, m, grad_x,
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

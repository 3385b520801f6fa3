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
// is another epilogue of that block, activations.h) and one addmm for the
// last layer (or the block again, with the output activation); backward is
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

#include "activation.h"
#include "checks.h"
#include "cpu/activations.h"
#include "cpu/cpu_kernels.h"
#include "cpu/engine_rule.h"
#include "cpu/mlp_blocks.h"
#include "cpu/mlp_rowblock.h"

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

// mlp's forward into out on the path the rule picks, saving what backward
// reads into `hidden` (mlp), or nothing (inference: hidden empty).
void mlp_forward(const at::Tensor& x2, const std::vector<at::Tensor>& w,
                 const std::vector<at::Tensor>& b, const MlpActivations& act,
                 const std::vector<at::Tensor>& hidden, at::Tensor& out,
                 MlpPhase phase) {
  const int64_t M = x2.size(0);
  // Asked even for no rows, so that an impossible forced path always raises.
  const CpuPath path =
      choose_cpu_path(M, mlp_widths(w), x2.scalar_type(), phase).path;
  if (M == 0) return;
  if (path == CpuPath::kRowBlocked) {
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, x2.scalar_type(), "mlp_rowblock",
        [&] { rowblock_forward<scalar_t>(x2, w, b, act, hidden, out); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x2.scalar_type(), "mlp_cpu",
      [&] { mlp_forward_impl<scalar_t>(x2, w, b, act, hidden, out); });
}

// The checked, contiguous arguments of mlp and mlp_inference.
struct MlpArgs {
  MlpActivations act;
  at::Tensor x2;
  std::vector<at::Tensor> w, b;
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
  for (size_t l = 0; l < weights.size(); ++l) {
    a.w.push_back(weights[l].contiguous());
    a.b.push_back(biases.empty() ? at::Tensor() : biases[l].contiguous());
  }
  return a;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, c10::string_view output_activation,
    double negative_slope) {
  MlpArgs a = mlp_args(x, weights, biases, activation, output_activation,
                       negative_slope, "fastmlp.mlp: ");
  const size_t L = a.w.size();
  const int64_t M = a.x2.size(0);
  const std::vector<at::Tensor> hidden =
      empty_hidden(M, a.w, a.act, x.options());
  at::Tensor out = at::empty({M, a.w[L - 1].size(0)}, x.options());
  mlp_forward(a.x2, a.w, a.b, a.act, hidden, out, MlpPhase::kTrainForward);
  return {out.view(with_last(x.sizes(), a.w[L - 1].size(0))), hidden};
}

// mlp's output only: nothing saved for backward (no_grad, inference_mode).
at::Tensor mlp_inference_cpu(const at::Tensor& x, at::TensorList weights,
                             at::TensorList biases, c10::string_view activation,
                             c10::string_view output_activation,
                             double negative_slope) {
  MlpArgs a = mlp_args(x, weights, biases, activation, output_activation,
                       negative_slope, "fastmlp.mlp_inference: ");
  const size_t L = a.w.size();
  at::Tensor out = at::empty({a.x2.size(0), a.w[L - 1].size(0)}, x.options());
  mlp_forward(a.x2, a.w, a.b, a.act, {}, out, MlpPhase::kInference);
  return out.view(with_last(x.sizes(), a.w[L - 1].size(0)));
}

// What mlp_backward computes (GradRequest, mlp_rowblock.h) from its
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

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                 at::TensorList weights, at::TensorList hidden,
                 const c10::List<bool>& output_mask_list,
                 c10::string_view activation,
                 c10::string_view output_activation, double negative_slope) {
  const std::vector<bool> output_mask = output_mask_list.vec();
  const MlpActivations act = parse_mlp_activations(
      activation, output_activation, negative_slope, "fastmlp.mlp_backward: ");
  check_mlp_backward_args(grad_y, x, weights, hidden, output_mask, act);
  const size_t L = weights.size();
  const GradRequest m = parse_mask(output_mask, L);
  const bool has_bias = output_mask.size() == 1 + 2 * L;
  const at::Tensor gy2 = as_rows(grad_y);
  const int64_t M = gy2.size(0);
  // One tensor per output, also for those not asked for (empty): outputs of
  // an op must not alias each other.
  const auto empty = [&] { return at::empty({0}, grad_y.options()); };
  std::vector<at::Tensor> w(L), h, grad_w, grad_b;
  for (size_t l = 0; l < L; ++l) {
    w[l] = weights[l].contiguous();
    if (l < hidden.size()) h.push_back(hidden[l].contiguous());
    grad_w.push_back(m.weight[l] ? at::empty(w[l].sizes(), grad_y.options())
                                 : empty());
    if (has_bias) {
      grad_b.push_back(m.bias[l] ? at::empty({w[l].size(0)}, grad_y.options())
                                 : empty());
    }
  }
  const int64_t K = w[0].size(1);
  at::Tensor grad_x = m.grad_x ? at::empty({M, K}, grad_y.options()) : empty();
  const at::Tensor x2 = m.weight[0] ? as_rows(*x) : at::Tensor();
  if (M == 0) {
    // No rows: every gradient is an empty sum.
    grad_x.zero_();
    for (auto& t : grad_w) t.zero_();
    for (auto& t : grad_b) t.zero_();
  } else if (m.lowest < L &&
             choose_cpu_path(M, mlp_widths(w), grad_y.scalar_type(),
                             MlpPhase::kBackward)
                     .path == CpuPath::kRowBlocked) {
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, grad_y.scalar_type(), "mlp_backward_rowblock", [&] {
          rowblock_backward<scalar_t>(gy2, x2, w, h, act, m, grad_x, grad_w,
                                      grad_b);
        });
  } else if (m.lowest < L) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, grad_y.scalar_type(), "mlp_backward_cpu",
        [&] {
          mlp_backward_impl<scalar_t>(gy2, x2, w, h, act, m, grad_x, grad_w,
                                      grad_b);
        });
  }
  if (m.grad_x) {
    grad_x = grad_x.view(with_last(grad_y.sizes(), K));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp", &mlp_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("mlp_inference", &mlp_inference_cpu);
}

}  // namespace fastmlp

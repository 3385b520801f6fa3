// The layered path of the whole-MLP ops on CPU: layer by layer over the
// whole batch, each layer's GEMM split over threads by output features. Best
// where the layers are wide, whose GEMMs are compute-bound (paths/rule.h);
// every floating dtype, float16 included.
//
// Forward is the fused Linear+ReLU block of every hidden layer (the same one
// linear_relu and mlp_sgd_step run; another activation is another epilogue of
// that block, activation_epilogues.h) and one addmm for the last layer (or
// the block again, with the output activation); backward is mlp_sgd_step's
// layer backward (mlp_blocks.h) with an epilogue that writes each thread's
// rows of the weight gradient straight into the tensor autograd hands to
// .grad, instead of updating the weights.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "activation_kinds.h"
#include "cpu/kernels/activation_epilogues.h"
#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/mlp_blocks.h"
#include "cpu/paths/grad_request.h"

namespace fastmlp {
namespace cpu {

// mlp's forward on the layered path, into out. `hidden`: what backward reads
// (mlp), or empty (inference: nothing is kept).
template <typename scalar_t>
void layered_forward(const at::Tensor& x2, const std::vector<at::Tensor>& w,
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

// mlp_backward on the layered path: from the top layer down to m.lowest,
// each layer's backward split over threads by output features, the weight
// and bias gradients written by the threads that own their rows.
template <typename scalar_t>
void layered_backward(const at::Tensor& gy2, const at::Tensor& x2,
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

}  // namespace cpu
}  // namespace fastmlp

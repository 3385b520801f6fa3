// What a whole-MLP training step (forward, softmax cross-entropy, backward
// and the parameter update in one call) does whatever the optimizer: shared
// by fastmlp::mlp_sgd_step (mlp_sgd_step_cpu.cpp) and fastmlp::mlp_adam_step
// (mlp_adamw_step_cpu.cpp). Each of those supplies its update as callables
// that receive a parameter block's gradient right after it is final, while it
// is in cache, and the checks of its own arguments.
//
// A kernel's Layer type has the members weight, bias (undefined without
// biases), weight_c, bias_c (the copies the GEMMs read: the parameters
// themselves unless the compute type is narrower) and keep_copies (the copies
// are the caller's, to be left equal to the updated parameters).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/mlp_blocks.h"

namespace fastmlp {
namespace cpu {

// Softmax cross-entropy with label smoothing eps for rows r0:r1 of the
// logits z (B x C): writes each row's loss into row_loss and turns the row in
// place into d(mean loss)/d(logits) (the mean is over all B rows).
template <typename scalar_t>
void cross_entropy_rows(scalar_t* z, int64_t B, int64_t C, int64_t r0,
                        int64_t r1, const int64_t* target, double eps,
                        double* row_loss) {
  const double off_target = eps / static_cast<double>(C);
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* row = z + r * C;
    double mx = row[0], sum_z = 0;
    for (int64_t c = 0; c < C; ++c) {
      mx = std::fmax(mx, static_cast<double>(row[c]));
      sum_z += row[c];
    }
    double sum_exp = 0;
    for (int64_t c = 0; c < C; ++c) sum_exp += std::exp(row[c] - mx);
    // A NaN logit makes the loss and every gradient of the row NaN, as in
    // torch (fmax above skips NaN, so it is added back here).
    const double lse = mx + std::log(sum_exp) + (std::isnan(sum_z) ? NAN : 0);
    const int64_t t = target[r];
    row_loss[r] = (1 - eps) * (lse - row[t]) +
                  eps * (lse - sum_z / static_cast<double>(C));
    for (int64_t c = 0; c < C; ++c) {
      const double p = std::exp(row[c] - lse);
      const double want = off_target + (c == t ? 1 - eps : 0);
      row[c] = static_cast<scalar_t>((p - want) / static_cast<double>(B));
    }
  }
}

// data + offset of an optional tensor (an optimizer state), or nullptr.
template <typename T>
T* ptr_at(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// The output layer (no activation) with the loss, split over batch rows:
// the logits are usually too few (10) to split over threads by feature.
// Each thread, for its rows: logits, loss and d(loss)/d(logits), its rows of
// d(loss)/d(h) = g @ W (the old W), and its partial sums of the weight and
// bias gradients. The layer is then updated from the partial sums, which the
// update adds in block order (deterministic):
//   update_weight(i0, n, parts)  for elements i0:i0+n of the flat weight,
//                                parts[p] pointing at element i0 of part p
//                                (scalar_t), called from parallel chunks;
//   update_bias(parts)           once, parts[p] the C bias sums of part p
//                                (math_t), when the layer has a bias.
// Returns the mean loss; writes d(loss)/d(h) into grad_h when defined.
template <typename scalar_t, typename Layer, typename UpdateWeight,
          typename UpdateBias>
double output_layer_step(const at::Tensor& h, const Layer& layer,
                         const at::Tensor& target, double eps,
                         const at::Tensor& grad_h, Workspace& ws,
                         const UpdateWeight& update_weight,
                         const UpdateBias& update_bias) {
  using param_t = math_t<scalar_t>;
  const int64_t B = h.size(0), K = h.size(1), C = layer.weight.size(0);
  const int64_t grain = block_per_thread(B, 1);
  const int64_t blocks = ceil_div(B, grain);
  const bool has_bias = layer.bias.defined();
  at::Tensor logits = ws.next({B, C}, h.options());
  at::Tensor w_parts = ws.next({blocks, C, K}, h.options());
  at::Tensor b_parts = ws.next({blocks, C}, layer.weight.options()).zero_();
  std::vector<double> row_loss(B);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    BelowAutograd below;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * grain, rows = std::min(B, r0 + grain) - r0;
      const at::Tensor h_rows = h.narrow(0, r0, rows);
      at::Tensor z = logits.narrow(0, r0, rows);
      if (has_bias) {
        at::addmm_out(z, layer.bias_c, h_rows, layer.weight_c.t());
      } else {
        at::mm_out(z, h_rows, layer.weight_c.t());
      }
      cross_entropy_rows(logits.data_ptr<scalar_t>(), B, C, r0, r0 + rows,
                         target.data_ptr<int64_t>(), eps, row_loss.data());
      if (grad_h.defined()) {
        at::Tensor gh = grad_h.narrow(0, r0, rows);
        mm_on_this_thread<scalar_t>(gh, z, layer.weight_c);
      }
      at::Tensor w_part = w_parts.select(0, blk);
      mm_on_this_thread<scalar_t>(w_part, z.t(), h_rows);
      if (has_bias) {
        const scalar_t* g = z.data_ptr<scalar_t>();  // row stride C
        param_t* part = b_parts.data_ptr<param_t>() + blk * C;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < C; ++c) part[c] += g[r * C + c];
        }
      }
    }
  });
  const int64_t w_numel = C * K;
  at::parallel_for(0, w_numel, 16384, [&](int64_t i0, int64_t i1) {
    std::vector<const scalar_t*> grads;
    for (int64_t p = 0; p < blocks; ++p) {
      grads.push_back(w_parts.data_ptr<scalar_t>() + p * w_numel + i0);
    }
    update_weight(i0, i1 - i0, grads);
  });
  if (has_bias) {
    std::vector<const param_t*> grads;
    for (int64_t p = 0; p < blocks; ++p) {
      grads.push_back(b_parts.data_ptr<param_t>() + p * C);
    }
    update_bias(grads);
  }
  double total = 0;
  for (const double l : row_loss) total += l;  // fixed order: deterministic
  return total / static_cast<double>(B);
}

// The whole step: the compute copies (unless kept by the caller), the
// forward of every hidden layer (fused Linear+ReLU), then
//   output_step(h, layer, grad_h, ws) -> mean loss
// for the last layer (output_layer_step with the kernel's update; grad_h
// undefined for a single layer), and, from the top down,
//   hidden_step(g_parts, y, h, layer, need_grad_h, ws) -> g_parts below
// for each hidden layer (layer_backward with the kernel's update as its
// epilogue). Returns the loss.
template <typename scalar_t, typename Layer, typename OutputStep,
          typename HiddenStep>
double mlp_train_step(const at::Tensor& x, std::vector<Layer>& layers,
                      const OutputStep& output_step,
                      const HiddenStep& hidden_step) {
  const size_t L = layers.size();
  for (Layer& layer : layers) {
    if (layer.keep_copies) continue;
    layer.weight_c = layer.weight.to(x.scalar_type());
    if (layer.bias.defined()) layer.bias_c = layer.bias.to(x.scalar_type());
  }
  Workspace& ws = Workspace::for_this_thread();
  // acts[l] is layer l's input.
  std::vector<at::Tensor> acts(L);
  acts[0] = x;
  for (size_t l = 0; l + 1 < L; ++l) {
    at::Tensor out =
        ws.next({x.size(0), layers[l].weight.size(0)}, x.options());
    linear_relu_forward_impl<scalar_t>(acts[l], layers[l].weight_c,
                                       layers[l].bias_c, out);
    acts[l + 1] = out;
  }
  const at::Tensor grad_h =
      L > 1 ? ws.next(acts[L - 1].sizes(), x.options()) : at::Tensor();
  const double loss = output_step(acts[L - 1], layers[L - 1], grad_h, ws);
  at::Tensor g_parts = L > 1 ? grad_h.unsqueeze(0) : at::Tensor();
  for (size_t l = L - 1; l-- > 0;) {
    g_parts = hidden_step(g_parts, acts[l + 1], acts[l], layers[l], l > 0, ws);
  }
  return loss;
}

// The parameters in the order the per-parameter lists (optimizer states,
// compute copies) follow: weight, bias, weight, bias, ... (weights only when
// there are no biases).
inline std::vector<at::Tensor> parameter_order(at::TensorList weights,
                                               at::TensorList biases) {
  std::vector<at::Tensor> params;
  for (size_t l = 0; l < weights.size(); ++l) {
    params.push_back(weights[l]);
    if (!biases.empty()) params.push_back(biases[l]);
  }
  return params;
}

// A list holding one tensor per parameter (in parameter_order) when `wanted`,
// none otherwise; each contiguous, of its parameter's shape and device, and
// of `dtype`. `op` starts the error messages ("fastmlp.<op>: ").
inline void check_per_parameter(const char* op, at::TensorList list,
                                const char* name,
                                const std::vector<at::Tensor>& params,
                                bool wanted, const char* when,
                                at::ScalarType dtype) {
  TORCH_CHECK(list.size() == (wanted ? params.size() : 0), op, name,
              " must hold one tensor per parameter (", params.size(), ") ",
              when, ", and none otherwise, got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.sizes() == params[i].sizes() && t.scalar_type() == dtype &&
                    t.device() == params[i].device() && t.is_contiguous(),
                op, name, "[", i, "] must be a contiguous ", dtype,
                " tensor of shape ", params[i].sizes(), ", got ",
                t.scalar_type(), " of shape ", t.sizes());
  }
}

// The checks every training-step op makes of the batch, the layers, the
// compute copies and the loss; the op checks its optimizer's own arguments.
// Everything is checked before anything is written, so a bad call leaves the
// parameters untouched. Returns whether the GEMMs run in bfloat16.
inline bool check_train_step_args(const char* op, const at::Tensor& x,
                                  const at::Tensor& target,
                                  at::TensorList weights, at::TensorList biases,
                                  at::TensorList copies, double label_smoothing,
                                  std::optional<at::ScalarType> compute_dtype) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              op, "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, op,
              "x must be a non-empty batch of shape (batch, in_features), got ",
              x.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == x.size(0),
              op, "target must be int64 class indices of shape (", x.size(0),
              ",), got ", target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK(!weights.empty(), op, "weights must list at least one layer");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op,
              "biases must be empty or one per layer (", weights.size(),
              "), got ", biases.size());
  int64_t features = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == features && w.size(0) > 0, op,
                "weights[", l, "] must have shape (out_features, ", features,
                "), got ", w.sizes());
    features = w.size(0);
    if (!biases.empty()) {
      TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == w.size(0), op,
                  "biases[", l, "] must have shape (", w.size(0), ",), got ",
                  biases[l].sizes());
    }
  }
  const std::vector<at::Tensor> params = parameter_order(weights, biases);
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.scalar_type() == x.scalar_type() &&
                    p.device() == x.device() && p.is_contiguous(),
                op, "parameters must be contiguous and match x (",
                x.scalar_type(), " on ", x.device(), "), got ", p.scalar_type(),
                " on ", p.device());
  }
  const bool bf16 =
      compute_dtype.has_value() && *compute_dtype != x.scalar_type();
  TORCH_CHECK(!bf16 || (*compute_dtype == at::kBFloat16 &&
                        x.scalar_type() == at::kFloat),
              op,
              "compute_dtype must be None, the parameters' dtype, or bfloat16 "
              "with float32 parameters; got ",
              *compute_dtype, " with ", x.scalar_type(), " parameters");
  check_per_parameter(op, copies, "compute_copies", params,
                      bf16 && !copies.empty(),
                      "if given, under compute_dtype=bfloat16", at::kBFloat16);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  const int64_t classes = weights.back().size(0);
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.size(0); ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < classes, op, "target[", i, "] = ", tp[i],
                " is not a class index in [0, ", classes, ")");
  }
  return bf16;
}

}  // namespace cpu
}  // namespace fastmlp

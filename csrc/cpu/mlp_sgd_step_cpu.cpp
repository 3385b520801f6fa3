// CPU kernel of fastmlp::mlp_sgd_step: one whole SGD training step of an MLP
// (forward, softmax cross-entropy, backward, parameter update) in one call.
//
// Why: at the tutorial's batch 64 a step is ~1.1 ms of GEMMs, and the eager
// path adds several hundred microseconds around them: an autograd node per
// layer and per loss piece, the engine's bookkeeping, gradient tensors that
// are written, read back by the optimizer and zeroed, and one small kernel
// per parameter in optimizer.step(). Here the step is the GEMMs plus a few
// passes that touch each block while it is in cache:
//  - forward: the fused Linear+ReLU blocks of linear_relu_cpu;
//  - output layer and loss, split over batch rows (10 logits are too few to
//    split by feature): logits, log-softmax, loss and its gradient, the
//    gradient of the layer's input, partial weight gradients;
//  - backward of each hidden layer, split by output feature so that one
//    thread owns rows n0:n1 of W throughout, with no barrier in between:
//    the ReLU mask and bias gradient, its share of grad_input (reading the
//    old W), then the update. For plain SGD (momentum 0) the weight gradient
//    is never stored: the update is the GEMM W = (1 - lr*wd) W - lr g^T h.
// Under bfloat16 compute the GEMMs read bfloat16 copies of the float32
// parameters, and the update refreshes those copies in the same pass.
// Temporaries are kept from one call to the next (Workspace, mlp_blocks.h).
// The maths is torch.optim.SGD's (dampening 0) on nn.CrossEntropyLoss(mean,
// label_smoothing); results match the eager step up to rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/mlp_blocks.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the building blocks of this file

struct SgdOptions {
  double lr, momentum, weight_decay;
  bool nesterov;
};

// One layer's parameters, with momentum their buffers (else undefined), and
// the copies the step's GEMMs read (see math_t). keep_copies: the copies are
// the caller's, to be left equal to the updated parameters for its next step.
struct Layer {
  at::Tensor weight, bias, weight_buf, bias_buf, weight_c, bias_c;
  bool keep_copies = false;
};

// Parameters (and momentum buffers) are kept in math_t; GEMMs, activations
// and gradients run in scalar_t. They are the same type except under
// bfloat16 compute, where the float32 parameters are cast to bfloat16 copies
// for the step's GEMMs, as torch.autocast does, and updated in float32.

// torch.optim.SGD's update of n contiguous elements whose gradient is the
// sum of `grads` (partial sums, added in order): d = g + wd*p;
// buf = m*buf + d; d = nesterov ? d + m*buf : buf; p -= lr*d.
// When `copy` is given, the new values are also written there in copy_t (the
// compute copy of the parameters, kept up to date in the same pass).
template <typename param_t, typename grad_t, typename copy_t = grad_t>
void sgd_update(param_t* p, const std::vector<const grad_t*>& grads,
                param_t* buf, int64_t n, const SgdOptions& o,
                copy_t* copy = nullptr) {
  using Vec = Vectorized<param_t>;
  const Vec wd(static_cast<param_t>(o.weight_decay));
  const Vec m(static_cast<param_t>(o.momentum));
  const Vec lr(static_cast<param_t>(o.lr));
  auto step = [&](int64_t i, int64_t count) {
    Vec g = load_math(grads[0] + i, count);
    for (size_t k = 1; k < grads.size(); ++k) {
      g = g + load_math(grads[k] + i, count);
    }
    const Vec pv = Vec::loadu(p + i, count);
    Vec d = at::vec::fmadd(wd, pv, g);
    if (buf != nullptr) {
      const Vec b = at::vec::fmadd(m, Vec::loadu(buf + i, count), d);
      b.store(buf + i, count);
      d = o.nesterov ? at::vec::fmadd(m, b, d) : b;
    }
    const Vec updated = at::vec::fnmadd(lr, d, pv);
    updated.store(p + i, count);
    if (copy != nullptr) store_math(updated, copy + i, count);
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) step(i, Vec::size());
  if (i < n) step(i, n - i);
}

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

// data + offset of an optional tensor (a momentum buffer), or nullptr.
template <typename T>
T* ptr_at(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// The output layer (no activation) with the loss, split over batch rows:
// the logits are usually too few (10) to split over threads by feature.
// Each thread, for its rows: logits, loss and d(loss)/d(logits), its rows of
// d(loss)/d(h) = g @ W (the old W), and its partial sums of the weight and
// bias gradients. The partial sums are then added in block order
// (deterministic) while the layer is updated. Returns the mean loss; writes
// d(loss)/d(h) into grad_h when defined.
template <typename scalar_t>
double output_layer_step(const at::Tensor& h, Layer& layer,
                         const at::Tensor& target, double eps,
                         const at::Tensor& grad_h, const SgdOptions& o,
                         Workspace& ws) {
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
    sgd_update<param_t, scalar_t>(
        layer.weight.data_ptr<param_t>() + i0, grads,
        ptr_at<param_t>(layer.weight_buf, i0), i1 - i0, o,
        layer.keep_copies ? layer.weight_c.data_ptr<scalar_t>() + i0 : nullptr);
  });
  if (has_bias) {
    std::vector<const param_t*> grads;
    for (int64_t p = 0; p < blocks; ++p) {
      grads.push_back(b_parts.data_ptr<param_t>() + p * C);
    }
    sgd_update<param_t, param_t, scalar_t>(
        layer.bias.data_ptr<param_t>(), grads, ptr_at<param_t>(layer.bias_buf),
        C, o, layer.keep_copies ? layer.bias_c.data_ptr<scalar_t>() : nullptr);
  }
  double total = 0;
  for (const double l : row_loss) total += l;  // fixed order: deterministic
  return total / static_cast<double>(B);
}

// Backward and update of a hidden layer y = relu(h @ W.T + b): the shared
// layer backward (mlp_blocks.h), in which the thread that owns rows n0:n1 of
// W masks its columns of the gradient, reduces the bias gradient, computes
// its share of d(loss)/d(h) from the old W, and then, as the epilogue here,
// updates those rows. For plain SGD (momentum 0) the weight gradient is never
// stored: the update is the GEMM W = (1 - lr*wd) W - lr g^T h.
template <typename scalar_t>
at::Tensor layer_backward_update(const at::Tensor& g_parts, const at::Tensor& y,
                                 const at::Tensor& h, Layer& layer,
                                 bool need_grad_h, const SgdOptions& o,
                                 Workspace& ws) {
  using param_t = math_t<scalar_t>;
  const int64_t K = h.size(1);
  // Plain SGD on parameters of the compute type: the update is the GEMM.
  const bool update_in_gemm =
      !layer.weight_buf.defined() && std::is_same_v<scalar_t, param_t>;
  const double decay = 1.0 - o.lr * o.weight_decay;
  return layer_backward<scalar_t>(
      g_parts, y, layer.weight_c, need_grad_h, layer.bias.defined(),
      /*split_by_thread=*/true, ws,
      [&](int64_t n0, int64_t rows, const at::Tensor& g_cols,
          const param_t* bias_grad) {
        at::Tensor w_rows = layer.weight.narrow(0, n0, rows);
        if (update_in_gemm) {
          addmm_on_this_thread<scalar_t>(w_rows, g_cols.t(), h, decay, -o.lr);
        } else {
          at::Tensor grad_rows = scratch_matrix(rows, K, h.options());
          mm_on_this_thread<scalar_t>(grad_rows, g_cols.t(), h);
          sgd_update<param_t, scalar_t>(
              w_rows.data_ptr<param_t>(), {grad_rows.data_ptr<scalar_t>()},
              ptr_at<param_t>(layer.weight_buf, n0 * K), rows * K, o,
              layer.keep_copies ? layer.weight_c.data_ptr<scalar_t>() + n0 * K
                                : nullptr);
        }
        if (bias_grad != nullptr) {
          sgd_update<param_t, param_t, scalar_t>(
              layer.bias.data_ptr<param_t>() + n0, {bias_grad},
              ptr_at<param_t>(layer.bias_buf, n0), rows, o,
              layer.keep_copies ? layer.bias_c.data_ptr<scalar_t>() + n0
                                : nullptr);
        }
      });
}

template <typename scalar_t>
double mlp_sgd_step_impl(const at::Tensor& x, const at::Tensor& target,
                         std::vector<Layer>& layers, const SgdOptions& o,
                         double label_smoothing) {
  const size_t L = layers.size();
  // The compute copies of the parameters (the parameters themselves unless
  // the compute type is narrower).
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
  const double loss = output_layer_step<scalar_t>(
      acts[L - 1], layers[L - 1], target, label_smoothing, grad_h, o, ws);
  at::Tensor g_parts = L > 1 ? grad_h.unsqueeze(0) : at::Tensor();
  for (size_t l = L - 1; l-- > 0;) {
    g_parts = layer_backward_update<scalar_t>(g_parts, acts[l + 1], acts[l],
                                              layers[l], l > 0, o, ws);
  }
  return loss;
}

// The parameters in the order the per-parameter lists (momentum buffers,
// compute copies) follow: weight, bias, weight, bias, ... (weights only when
// there are no biases).
std::vector<at::Tensor> parameter_order(at::TensorList weights,
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
// of `dtype`.
void check_per_parameter(at::TensorList list, const char* name,
                         const std::vector<at::Tensor>& params, bool wanted,
                         const char* when, at::ScalarType dtype) {
  const char* op = "fastmlp.mlp_sgd_step: ";
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

// Everything is checked before anything is written, so a bad call leaves
// the parameters untouched. Returns whether the GEMMs run in bfloat16.
bool check_step_args(const at::Tensor& x, const at::Tensor& target,
                     at::TensorList weights, at::TensorList biases,
                     at::TensorList buffers, at::TensorList copies,
                     const SgdOptions& o, double label_smoothing,
                     std::optional<at::ScalarType> compute_dtype) {
  const char* op = "fastmlp.mlp_sgd_step: ";
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
  check_per_parameter(buffers, "momentum_buffers", params, o.momentum != 0,
                      "when momentum != 0", x.scalar_type());
  check_per_parameter(copies, "compute_copies", params, bf16 && !copies.empty(),
                      "if given, under compute_dtype=bfloat16", at::kBFloat16);
  TORCH_CHECK(std::isfinite(o.lr) && o.lr >= 0, op,
              "lr must be a finite number >= 0, got ", o.lr);
  TORCH_CHECK(o.momentum >= 0 && o.weight_decay >= 0, op,
              "momentum and weight_decay must be >= 0");
  TORCH_CHECK(!o.nesterov || o.momentum > 0, op, "nesterov needs momentum > 0");
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

at::Tensor mlp_sgd_step_cpu(const at::Tensor& x, const at::Tensor& target,
                            at::TensorList weights, at::TensorList biases,
                            at::TensorList momentum_buffers,
                            at::TensorList compute_copies, double lr,
                            double momentum, double weight_decay, bool nesterov,
                            double label_smoothing,
                            std::optional<at::ScalarType> compute_dtype) {
  const SgdOptions o{lr, momentum, weight_decay, nesterov};
  const bool bf16 =
      check_step_args(x, target, weights, biases, momentum_buffers,
                      compute_copies, o, label_smoothing, compute_dtype);
  std::vector<Layer> layers(weights.size());
  const bool has_bias = !biases.empty();
  for (size_t l = 0; l < weights.size(); ++l) {
    // Index of layer l's weight in the per-parameter lists (parameter_order);
    // its bias follows it.
    const size_t w = has_bias ? 2 * l : l;
    layers[l].weight = weights[l];
    if (has_bias) layers[l].bias = biases[l];
    if (!momentum_buffers.empty()) {
      layers[l].weight_buf = momentum_buffers[w];
      if (has_bias) layers[l].bias_buf = momentum_buffers[w + 1];
    }
    if (!compute_copies.empty()) {
      layers[l].keep_copies = true;
      layers[l].weight_c = compute_copies[w];
      if (has_bias) layers[l].bias_c = compute_copies[w + 1];
    }
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor t_c = target.contiguous();
  double loss = 0;
  if (bf16) {
    loss = mlp_sgd_step_impl<at::BFloat16>(x_c.to(at::kBFloat16), t_c, layers,
                                           o, label_smoothing);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_sgd_step_cpu", [&] {
      loss = mlp_sgd_step_impl<scalar_t>(x_c, t_c, layers, o, label_smoothing);
    });
  }
  // The parameters changed in place: tell autograd, so that a graph which
  // saved them errors out instead of using the new values.
  for (const auto list : {weights, biases, momentum_buffers, compute_copies}) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
  return at::scalar_tensor(loss, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_sgd_step", &mlp_sgd_step_cpu);
}

}  // namespace fastmlp

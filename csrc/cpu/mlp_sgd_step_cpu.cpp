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
// What does not depend on SGD is shared with the AdamW step: mlp_train_step.h.
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
#include "cpu/kernels/mlp_train_step.h"

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

// The output layer and the loss (output_layer_step, mlp_train_step.h), its
// partial gradient sums added in order while the layer is updated.
template <typename scalar_t>
double output_layer_sgd(const at::Tensor& h, const Layer& layer,
                        const at::Tensor& target, double eps,
                        const at::Tensor& grad_h, const SgdOptions& o,
                        Workspace& ws) {
  using param_t = math_t<scalar_t>;
  return output_layer_step<scalar_t>(
      h, layer, target, eps, grad_h, ws,
      [&](int64_t i0, int64_t n, const std::vector<const scalar_t*>& grads) {
        sgd_update<param_t, scalar_t>(
            layer.weight.data_ptr<param_t>() + i0, grads,
            ptr_at<param_t>(layer.weight_buf, i0), n, o,
            layer.keep_copies ? layer.weight_c.data_ptr<scalar_t>() + i0
                              : nullptr);
      },
      [&](const std::vector<const param_t*>& grads) {
        sgd_update<param_t, param_t, scalar_t>(
            layer.bias.data_ptr<param_t>(), grads,
            ptr_at<param_t>(layer.bias_buf), layer.weight.size(0), o,
            layer.keep_copies ? layer.bias_c.data_ptr<scalar_t>() : nullptr);
      });
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
  return mlp_train_step<scalar_t>(
      x, layers,
      [&](const at::Tensor& h, Layer& layer, const at::Tensor& grad_h,
          Workspace& ws) {
        return output_layer_sgd<scalar_t>(h, layer, target, label_smoothing,
                                          grad_h, o, ws);
      },
      [&](const at::Tensor& g_parts, const at::Tensor& y, const at::Tensor& h,
          Layer& layer, bool need_grad_h, Workspace& ws) {
        return layer_backward_update<scalar_t>(g_parts, y, h, layer,
                                               need_grad_h, o, ws);
      });
}

// Everything is checked before anything is written, so a bad call leaves
// the parameters untouched. Returns whether the GEMMs run in bfloat16.
bool check_step_args(const at::Tensor& x, const at::Tensor& target,
                     at::TensorList weights, at::TensorList biases,
                     at::TensorList buffers, at::TensorList copies,
                     const SgdOptions& o, double label_smoothing,
                     std::optional<at::ScalarType> compute_dtype) {
  const char* op = "fastmlp.mlp_sgd_step: ";
  const bool bf16 = check_train_step_args(
      op, x, target, weights, biases, copies, label_smoothing, compute_dtype);
  check_per_parameter(op, buffers, "momentum_buffers",
                      parameter_order(weights, biases), o.momentum != 0,
                      "when momentum != 0", x.scalar_type());
  TORCH_CHECK(std::isfinite(o.lr) && o.lr >= 0, op,
              "lr must be a finite number >= 0, got ", o.lr);
  TORCH_CHECK(o.momentum >= 0 && o.weight_decay >= 0, op,
              "momentum and weight_decay must be >= 0");
  TORCH_CHECK(!o.nesterov || o.momentum > 0, op, "nesterov needs momentum > 0");
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

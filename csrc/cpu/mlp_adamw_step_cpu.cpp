// CPU kernel of fastmlp::mlp_adamw_step: one whole Adam or AdamW training
// step of an MLP (forward, softmax cross-entropy, backward, parameter update)
// in one call, as fastmlp::mlp_sgd_step is for SGD (mlp_sgd_step_cpu.cpp
// says why; the parts that do not depend on the optimizer are shared:
// mlp_train_step.h).
//
// Adam's update is elementwise and memory-bound: per element it reads and
// writes the parameter and both moments. So each block's update runs right
// after its gradient is final, while the gradient is in cache, and the
// gradient is never written to memory as a whole:
//  - output layer: its partial gradient sums are added and applied in one
//    pass over chunks of the weight;
//  - hidden layers: the thread that owns rows n0:n1 of W (layer_backward,
//    mlp_blocks.h) computes their weight gradient a tile of rows at a time
//    (kTileBytes) into a scratch buffer and updates those rows from it.
// Under bfloat16 compute the GEMMs read bfloat16 copies of the float32
// parameters, and the update refreshes those copies in the same pass; the
// moments are float32, as with torch.autocast.
//
// The maths is torch.optim.Adam's (decoupled_weight_decay: AdamW's)
// single-tensor step, operation by operation with its roundings: step += 1;
// AdamW: p *= 1 - lr*wd, Adam: g += wd*p; m = lerp(m, g, 1 - b1);
// v = v*b2 + (1 - b2)*g*g; amsgrad: vmax = max(vmax, v), read instead of v;
// denom = sqrt(v) / sqrt(1 - b2^step) + eps;
// p += -(lr / (1 - b1^step)) * (m / denom). The scalars are computed in
// double and cast to the parameters' type, as torch does with Python floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/mlp_blocks.h"
#include "cpu/kernels/mlp_train_step.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the building blocks of this file

struct AdamOptions {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad;
};

// One parameter's optimizer state and the scalars of its update this step
// (torch keeps a step count per parameter, so bias corrections may differ).
struct AdamState {
  at::Tensor exp_avg, exp_avg_sq, max_exp_avg_sq;  // the last unless amsgrad
  double decay = 1;                                // AdamW: 1 - lr*wd
  double l2 = 0;                                   // Adam: wd
  double neg_step_size = 0, bias_correction2_sqrt = 1;
};

// One layer's parameters, their states, and the copies the step's GEMMs read
// (see mlp_train_step.h).
struct Layer {
  at::Tensor weight, bias, weight_c, bias_c;
  AdamState weight_state, bias_state;
  bool keep_copies = false;
};

// Bytes of weight gradient a hidden layer's update computes at once (the
// rows of a tile: this over the row's bytes, at least 16): the tile stays in
// L2 between the GEMM that writes it and the update that reads it, while
// each GEMM call is large enough to pay for packing h, which brgemm does per
// call. Measured on the tutorial MLP (one thread, AMD EPYC, L2 1 MB): tiles
// of 16 rows (50 KB) took the AdamW step from 2.5 ms (plain SGD) to 3.5 ms,
// 64-128 rows (200-400 KB) to 2.8-3.3 ms, whole blocks (1.6 MB) to 3.0 ms.
constexpr int64_t kTileBytes = 256 * 1024;

int64_t tile_rows(int64_t row_bytes) {
  return std::max<int64_t>(16, kTileBytes / std::max<int64_t>(row_bytes, 1));
}

// Adam's update of n contiguous elements of p (and of their moments) whose
// gradient is the sum of `grads` (partial sums, added in order). When `copy`
// is given, the new values are also written there in copy_t.
template <typename param_t, typename grad_t, typename copy_t = grad_t>
void adam_update(param_t* p, const std::vector<const grad_t*>& grads,
                 const AdamState& s, int64_t offset, int64_t n,
                 const AdamOptions& o, copy_t* copy = nullptr) {
  using Vec = Vectorized<param_t>;
  param_t* m = s.exp_avg.data_ptr<param_t>() + offset;
  param_t* v = s.exp_avg_sq.data_ptr<param_t>() + offset;
  param_t* vmax = ptr_at<param_t>(s.max_exp_avg_sq, offset);
  const bool decay = o.decoupled && o.weight_decay != 0;
  const bool l2 = !o.decoupled && o.weight_decay != 0;
  const Vec decay_v(static_cast<param_t>(s.decay));
  const Vec l2_v(static_cast<param_t>(s.l2));
  // torch's lerp: start + w*(end - start) for w < 0.5, else
  // end + (w - 1)*(end - start), each one fused multiply-add.
  const param_t w = static_cast<param_t>(1 - o.beta1);
  const bool small_w = std::abs(w) < param_t(0.5);
  const Vec lerp_w(small_w ? w : w - param_t(1));
  const Vec beta2(static_cast<param_t>(o.beta2));
  const Vec one_minus_beta2(static_cast<param_t>(1 - o.beta2));
  const Vec bc2_sqrt(static_cast<param_t>(s.bias_correction2_sqrt));
  const Vec eps(static_cast<param_t>(o.eps));
  const Vec neg_step(static_cast<param_t>(s.neg_step_size));
  auto step = [&](int64_t i, int64_t count) {
    Vec g = load_math(grads[0] + i, count);
    for (size_t k = 1; k < grads.size(); ++k) {
      g = g + load_math(grads[k] + i, count);
    }
    Vec pv = Vec::loadu(p + i, count);
    if (decay) pv = pv * decay_v;
    if (l2) g = at::vec::fmadd(pv, l2_v, g);
    const Vec mv = Vec::loadu(m + i, count);
    const Vec m_new = at::vec::fmadd(lerp_w, g - mv, small_w ? mv : g);
    Vec v_new = Vec::loadu(v + i, count) * beta2;
    v_new = v_new + one_minus_beta2 * g * g;
    m_new.store(m + i, count);
    v_new.store(v + i, count);
    Vec v_read = v_new;
    if (vmax != nullptr) {
      v_read = at::vec::maximum(Vec::loadu(vmax + i, count), v_new);
      v_read.store(vmax + i, count);
    }
    const Vec denom = v_read.sqrt() / bc2_sqrt + eps;
    const Vec updated = pv + neg_step * (m_new / denom);
    updated.store(p + i, count);
    if (copy != nullptr) store_math(updated, copy + i, count);
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) step(i, Vec::size());
  if (i < n) step(i, n - i);
}

template <typename scalar_t>
double output_layer_adam(const at::Tensor& h, const Layer& layer,
                         const at::Tensor& target, double eps,
                         const at::Tensor& grad_h, const AdamOptions& o,
                         Workspace& ws) {
  using param_t = math_t<scalar_t>;
  return output_layer_step<scalar_t>(
      h, layer, target, eps, grad_h, ws,
      [&](int64_t i0, int64_t n, const std::vector<const scalar_t*>& grads) {
        adam_update<param_t, scalar_t>(
            layer.weight.data_ptr<param_t>() + i0, grads, layer.weight_state,
            i0, n, o,
            layer.keep_copies ? layer.weight_c.data_ptr<scalar_t>() + i0
                              : nullptr);
      },
      [&](const std::vector<const param_t*>& grads) {
        adam_update<param_t, param_t, scalar_t>(
            layer.bias.data_ptr<param_t>(), grads, layer.bias_state, 0,
            layer.weight.size(0), o,
            layer.keep_copies ? layer.bias_c.data_ptr<scalar_t>() : nullptr);
      });
}

// Backward and update of a hidden layer y = relu(h @ W.T + b): the shared
// layer backward, whose epilogue, on the thread that owns rows n0:n1 of W,
// computes their gradient a tile of rows at a time and updates them.
template <typename scalar_t>
at::Tensor layer_backward_adam(const at::Tensor& g_parts, const at::Tensor& y,
                               const at::Tensor& h, const Layer& layer,
                               bool need_grad_h, const AdamOptions& o,
                               Workspace& ws) {
  using param_t = math_t<scalar_t>;
  const int64_t K = h.size(1);
  return layer_backward<scalar_t>(
      g_parts, y, layer.weight_c, need_grad_h, layer.bias.defined(),
      /*split_by_thread=*/true, ws,
      [&](int64_t n0, int64_t rows, const at::Tensor& g_cols,
          const param_t* bias_grad) {
        const int64_t tile_max =
            tile_rows(K * static_cast<int64_t>(sizeof(scalar_t)));
        for (int64_t r = 0; r < rows; r += tile_max) {
          const int64_t tile = std::min(tile_max, rows - r);
          at::Tensor grad = scratch_matrix(tile, K, h.options());
          mm_on_this_thread<scalar_t>(grad, g_cols.narrow(1, r, tile).t(), h);
          const int64_t offset = (n0 + r) * K;
          adam_update<param_t, scalar_t>(
              layer.weight.data_ptr<param_t>() + offset,
              {grad.data_ptr<scalar_t>()}, layer.weight_state, offset, tile * K,
              o,
              layer.keep_copies ? layer.weight_c.data_ptr<scalar_t>() + offset
                                : nullptr);
        }
        if (bias_grad != nullptr) {
          adam_update<param_t, param_t, scalar_t>(
              layer.bias.data_ptr<param_t>() + n0, {bias_grad},
              layer.bias_state, n0, rows, o,
              layer.keep_copies ? layer.bias_c.data_ptr<scalar_t>() + n0
                                : nullptr);
        }
      });
}

template <typename scalar_t>
double mlp_adamw_step_impl(const at::Tensor& x, const at::Tensor& target,
                           std::vector<Layer>& layers, const AdamOptions& o,
                           double label_smoothing) {
  return mlp_train_step<scalar_t>(
      x, layers,
      [&](const at::Tensor& h, Layer& layer, const at::Tensor& grad_h,
          Workspace& ws) {
        return output_layer_adam<scalar_t>(h, layer, target, label_smoothing,
                                           grad_h, o, ws);
      },
      [&](const at::Tensor& g_parts, const at::Tensor& y, const at::Tensor& h,
          Layer& layer, bool need_grad_h, Workspace& ws) {
        return layer_backward_adam<scalar_t>(g_parts, y, h, layer, need_grad_h,
                                             o, ws);
      });
}

// Everything is checked before anything is written, so a bad call leaves
// the parameters and states untouched. Returns whether the GEMMs run in
// bfloat16.
bool check_step_args(const at::Tensor& x, const at::Tensor& target,
                     at::TensorList weights, at::TensorList biases,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps,
                     at::TensorList copies, const AdamOptions& o,
                     double label_smoothing,
                     std::optional<at::ScalarType> compute_dtype) {
  const char* op = "fastmlp.mlp_adamw_step: ";
  const bool bf16 = check_train_step_args(
      op, x, target, weights, biases, copies, label_smoothing, compute_dtype);
  const std::vector<at::Tensor> params = parameter_order(weights, biases);
  check_per_parameter(op, exp_avgs, "exp_avgs", params, true, "always",
                      x.scalar_type());
  check_per_parameter(op, exp_avg_sqs, "exp_avg_sqs", params, true, "always",
                      x.scalar_type());
  check_per_parameter(op, max_exp_avg_sqs, "max_exp_avg_sqs", params, o.amsgrad,
                      "with amsgrad", x.scalar_type());
  TORCH_CHECK(steps.size() == params.size(), op,
              "state_steps must hold one tensor per parameter (", params.size(),
              "), got ", steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(
        s.dim() == 0 && s.device().is_cpu() &&
            (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
        op, "state_steps[", i,
        "] must be a 0-d float32 or float64 CPU tensor, got ", s.scalar_type(),
        " of shape ", s.sizes(), " on ", s.device());
  }
  TORCH_CHECK(std::isfinite(o.lr) && o.lr >= 0, op,
              "lr must be a finite number >= 0, got ", o.lr);
  TORCH_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, op,
              "betas must be in [0, 1), got (", o.beta1, ", ", o.beta2, ")");
  TORCH_CHECK(o.eps >= 0 && o.weight_decay >= 0, op,
              "eps and weight_decay must be >= 0");
  return bf16;
}

// Adds 1 to a parameter's step count and sets its state's scalars for this
// step from the new count, as torch's single-tensor Adam does.
void advance(AdamState& s, const at::Tensor& step_t, const AdamOptions& o) {
  double step = 0;
  if (step_t.scalar_type() == at::kFloat) {
    float* p = step_t.data_ptr<float>();
    step = *p += 1.0f;
  } else {
    double* p = step_t.data_ptr<double>();
    step = *p += 1.0;
  }
  s.decay = 1 - o.lr * o.weight_decay;
  s.l2 = o.weight_decay;
  const double bias_correction1 = 1 - std::pow(o.beta1, step);
  const double bias_correction2 = 1 - std::pow(o.beta2, step);
  s.neg_step_size = -(o.lr / bias_correction1);
  s.bias_correction2_sqrt = std::sqrt(bias_correction2);
}

at::Tensor mlp_adamw_step_cpu(
    const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    at::TensorList compute_copies, double lr, double beta1, double beta2,
    double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
    double label_smoothing, std::optional<at::ScalarType> compute_dtype) {
  const AdamOptions o{
      lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad};
  const bool bf16 = check_step_args(
      x, target, weights, biases, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
      state_steps, compute_copies, o, label_smoothing, compute_dtype);
  std::vector<Layer> layers(weights.size());
  const bool has_bias = !biases.empty();
  auto state_of = [&](size_t i) {
    AdamState s;
    s.exp_avg = exp_avgs[i];
    s.exp_avg_sq = exp_avg_sqs[i];
    if (amsgrad) s.max_exp_avg_sq = max_exp_avg_sqs[i];
    advance(s, state_steps[i], o);
    return s;
  };
  for (size_t l = 0; l < weights.size(); ++l) {
    // Index of layer l's weight in the per-parameter lists (parameter_order);
    // its bias follows it.
    const size_t w = has_bias ? 2 * l : l;
    layers[l].weight = weights[l];
    layers[l].weight_state = state_of(w);
    if (has_bias) {
      layers[l].bias = biases[l];
      layers[l].bias_state = state_of(w + 1);
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
    loss = mlp_adamw_step_impl<at::BFloat16>(x_c.to(at::kBFloat16), t_c, layers,
                                             o, label_smoothing);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_adamw_step_cpu", [&] {
      loss =
          mlp_adamw_step_impl<scalar_t>(x_c, t_c, layers, o, label_smoothing);
    });
  }
  // The tensors changed in place: tell autograd, so that a graph which saved
  // them errors out instead of using the new values.
  for (const auto list : {weights, biases, exp_avgs, exp_avg_sqs,
                          max_exp_avg_sqs, state_steps, compute_copies}) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
  return at::scalar_tensor(loss, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_adamw_step", &mlp_adamw_step_cpu);
}

}  // namespace fastmlp

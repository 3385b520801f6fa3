// CPU kernel of fastmlp::mlp_sgd_step: one whole SGD training step of an MLP
// (forward, softmax cross-entropy, backward, parameter update) in one call.
//
// Why: at the tutorial's batch 64 a step is ~1.5 ms of GEMMs, and the eager
// path adds several hundred microseconds around them: an autograd node per
// layer and per loss piece, the engine's bookkeeping, gradient tensors that
// are written, read back by the optimizer and zeroed, and one small kernel
// per parameter in optimizer.step(). Here the step is the GEMMs plus a few
// passes that touch each block while it is in cache:
//  - forward: the fused Linear+ReLU blocks of linear_relu_cpu;
//  - loss: log-softmax, loss and its gradient in one pass over the logits;
//  - backward, per layer: the ReLU mask and the bias gradient in one pass,
//    then grad_input = g @ W (which needs the old W), then the update. For
//    plain SGD (momentum 0) the weight gradient is never stored: the update
//    is the GEMM W = (1 - lr*wd) W - lr g^T h itself. With momentum each
//    thread computes its rows of the gradient and updates W and the buffer
//    while they are hot.
// The maths is torch.optim.SGD's (dampening 0) on nn.CrossEntropyLoss(mean,
// label_smoothing); results match the eager step up to rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the building blocks of this file

struct SgdOptions {
  double lr, momentum, weight_decay;
  bool nesterov;
};

// One layer's parameters and, with momentum, their buffers (else undefined).
struct Layer {
  at::Tensor weight, bias, weight_buf, bias_buf;
};

// torch.optim.SGD's update of n contiguous elements given their gradient g:
// d = g + wd*p; buf = m*buf + d; d = nesterov ? d + m*buf : buf; p -= lr*d.
template <typename scalar_t>
void sgd_update(scalar_t* p, const scalar_t* g, scalar_t* buf, int64_t n,
                const SgdOptions& o) {
  using Vec = Vectorized<scalar_t>;
  const Vec wd(static_cast<scalar_t>(o.weight_decay));
  const Vec m(static_cast<scalar_t>(o.momentum));
  const Vec lr(static_cast<scalar_t>(o.lr));
  auto step = [&](int64_t i, int64_t count) {
    Vec pv = Vec::loadu(p + i, count);
    Vec d = at::vec::fmadd(wd, pv, Vec::loadu(g + i, count));
    if (buf != nullptr) {
      const Vec b = at::vec::fmadd(m, Vec::loadu(buf + i, count), d);
      b.store(buf + i, count);
      d = o.nesterov ? at::vec::fmadd(m, b, d) : b;
    }
    at::vec::fnmadd(lr, d, pv).store(p + i, count);
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) step(i, Vec::size());
  if (i < n) step(i, n - i);
}

// g[:, c0:c1] = sum of the parts' columns c0:c1, masked where y <= 0 (the
// ReLU's threshold_backward rule; NaN passes) when y is given, with each
// column's sum added into bias_acc[c - c0]. Parts are B x ld row-major; g may
// be the first part. Rows are summed in order, so results do not depend on
// timing.
template <typename scalar_t>
void combine_grad_block(const std::vector<const scalar_t*>& parts,
                        const scalar_t* y, scalar_t* g, int64_t rows,
                        int64_t ld, int64_t c0, int64_t c1,
                        scalar_t* bias_acc) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * ld;
    for (int64_t c = c0; c < c1; c += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), c1 - c);
      Vec sum = Vec::loadu(parts[0] + off + c, n);
      for (size_t p = 1; p < parts.size(); ++p) {
        sum = sum + Vec::loadu(parts[p] + off + c, n);
      }
      if (y != nullptr) {
        sum = Vec::blendv(sum, zero, Vec::loadu(y + off + c, n) <= zero);
      }
      sum.store(g + off + c, n);
      if (bias_acc != nullptr) {
        (Vec::loadu(bias_acc + c - c0, n) + sum).store(bias_acc + c - c0, n);
      }
    }
  }
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

// The output layer (no activation) with the loss, split over batch rows:
// the logits are usually too few (10) to split over threads by feature.
// Each thread, for its rows: logits, loss and d(loss)/d(logits), its rows of
// d(loss)/d(h) = g @ W (the old W), and its partial sums of the weight and
// bias gradients. The partial sums are then added in block order
// (deterministic) and the layer updated. Returns the mean loss; writes
// d(loss)/d(h) into grad_h when defined.
template <typename scalar_t>
double output_layer_step(const at::Tensor& h, Layer& layer,
                         const at::Tensor& target, double eps,
                         const at::Tensor& grad_h, const SgdOptions& o) {
  const int64_t B = h.size(0), K = h.size(1), C = layer.weight.size(0);
  const int64_t grain = block_per_thread(B, 1);
  const int64_t blocks = ceil_div(B, grain);
  const bool has_bias = layer.bias.defined();
  at::Tensor logits = at::empty({B, C}, h.options());
  at::Tensor w_parts = at::empty({blocks, C, K}, h.options());
  at::Tensor b_parts = at::zeros({blocks, C}, h.options());
  std::vector<double> row_loss(B);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    BelowAutograd below;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * grain, rows = std::min(B, r0 + grain) - r0;
      const at::Tensor h_rows = h.narrow(0, r0, rows);
      at::Tensor z = logits.narrow(0, r0, rows);
      if (has_bias) {
        at::addmm_out(z, layer.bias, h_rows, layer.weight.t());
      } else {
        at::mm_out(z, h_rows, layer.weight.t());
      }
      cross_entropy_rows(logits.data_ptr<scalar_t>(), B, C, r0, r0 + rows,
                         target.data_ptr<int64_t>(), eps, row_loss.data());
      if (grad_h.defined()) {
        at::Tensor gh = grad_h.narrow(0, r0, rows);
        at::mm_out(gh, z, layer.weight);
      }
      at::Tensor w_part = w_parts.select(0, blk);
      at::mm_out(w_part, z.t(), h_rows);
      if (has_bias) {
        const scalar_t* g = z.data_ptr<scalar_t>();  // row stride C
        scalar_t* part = b_parts.data_ptr<scalar_t>() + blk * C;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < C; ++c) part[c] += g[r * C + c];
        }
      }
    }
  });
  // Sum the partial gradients into part 0 and update, over element ranges.
  scalar_t* wg = w_parts.data_ptr<scalar_t>();
  scalar_t* bg = b_parts.data_ptr<scalar_t>();
  const int64_t w_numel = C * K;
  const auto sum_parts = [blocks](scalar_t* parts, int64_t stride, int64_t i0,
                                  int64_t i1) {
    for (int64_t p = 1; p < blocks; ++p) {
      for (int64_t i = i0; i < i1; ++i) parts[i] += parts[p * stride + i];
    }
  };
  at::parallel_for(0, w_numel, 16384, [&](int64_t i0, int64_t i1) {
    sum_parts(wg, w_numel, i0, i1);
    sgd_update<scalar_t>(layer.weight.data_ptr<scalar_t>() + i0, wg + i0,
                         layer.weight_buf.defined()
                             ? layer.weight_buf.data_ptr<scalar_t>() + i0
                             : nullptr,
                         i1 - i0, o);
  });
  if (has_bias) {
    sum_parts(bg, C, 0, C);
    sgd_update<scalar_t>(layer.bias.data_ptr<scalar_t>(), bg,
                         layer.bias_buf.defined()
                             ? layer.bias_buf.data_ptr<scalar_t>()
                             : nullptr,
                         C, o);
  }
  double total = 0;
  for (const double l : row_loss) total += l;  // fixed order: deterministic
  return total / static_cast<double>(B);
}

// Backward and update of one layer y = act(h @ W.T + b).
//
// d(loss)/d(y) arrives as the sum of `g_parts` (P x B x N). The layer's
// output features are cut into one block per thread; the thread that owns
// rows n0:n1 of W does everything that touches them, with no barrier: sum
// and mask its columns of the gradient (into part 0), its share of
// d(loss)/d(h) = g[:, n0:n1] @ W[n0:n1, :] (which reads the old W), then the
// update of those rows. d(loss)/d(h) is returned as one part per block
// (summed by the layer below, in its own blocks), or undefined when
// need_grad_h is false.
template <typename scalar_t>
at::Tensor layer_backward_update(const at::Tensor& g_parts, const at::Tensor& y,
                                 const at::Tensor& h, Layer& layer,
                                 bool need_grad_h, const SgdOptions& o) {
  const int64_t B = g_parts.size(1), N = g_parts.size(2), K = h.size(1);
  const int64_t grain = block_per_thread(N, kColumnAlign);
  const int64_t blocks = ceil_div(N, grain);
  const at::Tensor out_parts =
      need_grad_h ? at::empty({blocks, B, K}, h.options()) : at::Tensor();
  std::vector<const scalar_t*> parts;
  for (int64_t p = 0; p < g_parts.size(0); ++p) {
    parts.push_back(g_parts.data_ptr<scalar_t>() + p * B * N);
  }
  scalar_t* g = g_parts.data_ptr<scalar_t>();  // the summed gradient, in place
  const at::Tensor g_mat = g_parts.select(0, 0);
  const bool has_bias = layer.bias.defined();
  const double decay = 1.0 - o.lr * o.weight_decay;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    BelowAutograd below;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * grain, rows = std::min(N, n0 + grain) - n0;
      std::vector<scalar_t> bias_grad(has_bias ? rows : 0, scalar_t(0));
      combine_grad_block<scalar_t>(
          parts, y.defined() ? y.data_ptr<scalar_t>() : nullptr, g, B, N, n0,
          n0 + rows, has_bias ? bias_grad.data() : nullptr);
      const at::Tensor g_cols = g_mat.narrow(1, n0, rows);
      at::Tensor w_rows = layer.weight.narrow(0, n0, rows);
      if (need_grad_h) {
        at::Tensor out = out_parts.select(0, blk);
        at::mm_out(out, g_cols, w_rows);
      }
      if (!layer.weight_buf.defined()) {
        // W = (1 - lr*wd) W - lr * g^T h, in the GEMM itself.
        w_rows.addmm_(g_cols.t(), h, decay, -o.lr);
      } else {
        const at::Tensor grad_rows = at::mm(g_cols.t(), h);
        sgd_update<scalar_t>(
            w_rows.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(),
            layer.weight_buf.data_ptr<scalar_t>() + n0 * K, rows * K, o);
      }
      if (has_bias) {
        scalar_t* buf = layer.bias_buf.defined()
                            ? layer.bias_buf.data_ptr<scalar_t>() + n0
                            : nullptr;
        sgd_update<scalar_t>(layer.bias.data_ptr<scalar_t>() + n0,
                             bias_grad.data(), buf, rows, o);
      }
    }
  });
  return out_parts;
}

template <typename scalar_t>
double mlp_sgd_step_impl(const at::Tensor& x, const at::Tensor& target,
                         std::vector<Layer>& layers, const SgdOptions& o,
                         double label_smoothing) {
  const size_t L = layers.size();
  // acts[l] is layer l's input.
  std::vector<at::Tensor> acts(L);
  acts[0] = x;
  for (size_t l = 0; l + 1 < L; ++l) {
    at::Tensor out =
        at::empty({x.size(0), layers[l].weight.size(0)}, x.options());
    linear_relu_forward_impl<scalar_t>(acts[l], layers[l].weight,
                                       layers[l].bias, out);
    acts[l + 1] = out;
  }
  const at::Tensor grad_h = L > 1 ? at::empty_like(acts[L - 1]) : at::Tensor();
  const double loss = output_layer_step<scalar_t>(
      acts[L - 1], layers[L - 1], target, label_smoothing, grad_h, o);
  at::Tensor g_parts = L > 1 ? grad_h.unsqueeze(0) : at::Tensor();
  for (size_t l = L - 1; l-- > 0;) {
    g_parts = layer_backward_update<scalar_t>(g_parts, acts[l + 1], acts[l],
                                              layers[l], l > 0, o);
  }
  return loss;
}

void check_step_args(const at::Tensor& x, const at::Tensor& target,
                     at::TensorList weights, at::TensorList biases,
                     at::TensorList buffers, const SgdOptions& o,
                     double label_smoothing) {
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
    std::vector<at::Tensor> params = {w};
    if (!biases.empty()) {
      TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == w.size(0), op,
                  "biases[", l, "] must have shape (", w.size(0), ",), got ",
                  biases[l].sizes());
      params.push_back(biases[l]);
    }
    for (const at::Tensor& p : params) {
      TORCH_CHECK(p.scalar_type() == x.scalar_type() &&
                      p.device() == x.device() && p.is_contiguous(),
                  op, "parameters of layer ", l,
                  " must be contiguous and match x (", x.scalar_type(), " on ",
                  x.device(), "), got ", p.scalar_type(), " on ", p.device());
    }
  }
  const size_t n_params = weights.size() + biases.size();
  TORCH_CHECK(buffers.size() == (o.momentum != 0 ? n_params : 0), op,
              "momentum_buffers must hold one buffer per parameter (", n_params,
              ") when momentum != 0 and none otherwise, got ", buffers.size());
  std::vector<at::Tensor> params;
  for (size_t l = 0; l < weights.size(); ++l) {
    params.push_back(weights[l]);
    if (!biases.empty()) params.push_back(biases[l]);
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    TORCH_CHECK(buffers[i].sizes() == params[i].sizes() &&
                    buffers[i].scalar_type() == params[i].scalar_type() &&
                    buffers[i].device() == params[i].device() &&
                    buffers[i].is_contiguous(),
                op, "momentum_buffers[", i,
                "] must be a contiguous tensor like its parameter (",
                params[i].sizes(), ", ", params[i].scalar_type(), "), got ",
                buffers[i].sizes(), " ", buffers[i].scalar_type());
  }
  TORCH_CHECK(std::isfinite(o.lr) && o.lr >= 0, op,
              "lr must be a finite number >= 0, got ", o.lr);
  TORCH_CHECK(o.momentum >= 0 && o.weight_decay >= 0, op,
              "momentum and weight_decay must be >= 0");
  TORCH_CHECK(!o.nesterov || o.momentum > 0, op, "nesterov needs momentum > 0");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  // Targets are checked before anything is written, so a bad batch leaves
  // the parameters untouched.
  const int64_t classes = weights.back().size(0);
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.size(0); ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < classes, op, "target[", i, "] = ", tp[i],
                " is not a class index in [0, ", classes, ")");
  }
}

at::Tensor mlp_sgd_step_cpu(const at::Tensor& x, const at::Tensor& target,
                            at::TensorList weights, at::TensorList biases,
                            at::TensorList momentum_buffers, double lr,
                            double momentum, double weight_decay, bool nesterov,
                            double label_smoothing) {
  const SgdOptions o{lr, momentum, weight_decay, nesterov};
  check_step_args(x, target, weights, biases, momentum_buffers, o,
                  label_smoothing);
  std::vector<Layer> layers(weights.size());
  const size_t per_layer = biases.empty() ? 1 : 2;
  for (size_t l = 0; l < weights.size(); ++l) {
    layers[l].weight = weights[l];
    if (!biases.empty()) layers[l].bias = biases[l];
    if (!momentum_buffers.empty()) {
      // Buffers come in parameter order: weight, bias, weight, bias, ...
      layers[l].weight_buf = momentum_buffers[per_layer * l];
      if (!biases.empty()) layers[l].bias_buf = momentum_buffers[2 * l + 1];
    }
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor t_c = target.contiguous();
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_sgd_step_cpu", [&] {
    loss = mlp_sgd_step_impl<scalar_t>(x_c, t_c, layers, o, label_smoothing);
  });
  // The parameters changed in place: tell autograd, so that a graph which
  // saved them errors out instead of using the new values.
  for (const auto list : {weights, biases, momentum_buffers}) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
  return at::scalar_tensor(loss, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_sgd_step", &mlp_sgd_step_cpu);
}

}  // namespace fastmlp

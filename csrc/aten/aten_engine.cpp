// See aten_engine.h.
#include "aten/aten_engine.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "checks.h"  // as_rows, with_last

namespace fastmlp {
namespace {

// Runs ATen ops below autograd and autocast.
struct AtenScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// act(z) as torch.nn.functional computes it; in_place: ReLU may overwrite z
// (a hidden layer's, which it saves as its output).
at::Tensor activation_aten(at::Tensor z, Activation a, double slope,
                           bool in_place = false) {
  static_assert(kActivationCount == 8, "a case for each activation");
  switch (a) {
    case Activation::kReLU:
      return in_place ? z.relu_() : at::relu(z);  // NaN stays NaN
    case Activation::kLeakyReLU:
      return at::leaky_relu(z, slope);
    case Activation::kTanh:
      return at::tanh(z);
    case Activation::kSigmoid:
      return at::sigmoid(z);
    case Activation::kNone:
      return z;
    case Activation::kGelu:
      return at::gelu(z, "none");
    case Activation::kGeluTanh:
      return at::gelu(z, "tanh");
    case Activation::kSilu:
      return at::silu(z);
  }
  TORCH_CHECK(false, "fastmlp: unknown activation");
}

// d(loss)/d(z) from g = d(loss)/d(act(z)), with PyTorch's backward ops. `saved`
// is the layer's output when from_output (see saves_output), else its
// pre-activation z.
at::Tensor activation_backward_aten(const at::Tensor& g,
                                    const at::Tensor& saved, bool from_output,
                                    Activation a, double slope) {
  static_assert(kActivationCount == 8, "a case for each activation");
  switch (a) {
    case Activation::kReLU:
      // Zero where the output is <= 0 (NaN passes); z <= 0 exactly where
      // relu(z) <= 0, so the pre-activation gives the same mask.
      return at::threshold_backward(g, saved, 0);
    case Activation::kLeakyReLU:
      // saved > 0 ? g : g * slope; the output has z's sign when it is saved
      // (slope >= 0).
      return at::leaky_relu_backward(g, saved, slope, false);
    case Activation::kTanh:
      return at::tanh_backward(g, from_output ? saved : at::tanh(saved));
    case Activation::kSigmoid:
      return at::sigmoid_backward(g, from_output ? saved : at::sigmoid(saved));
    case Activation::kNone:
      return g;
    case Activation::kGelu:
      return at::gelu_backward(g, saved, "none");
    case Activation::kGeluTanh:
      return at::gelu_backward(g, saved, "tanh");
    case Activation::kSilu:
      return at::silu_backward(g, saved);
  }
  TORCH_CHECK(false, "fastmlp: unknown activation");
}

}  // namespace

at::Tensor linear_relu_aten(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  AtenScope scope;
  return at::relu(at::linear(x, weight, bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_aten(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  AtenScope scope;
  // Leading dims multiplied out rather than reshape({-1, N}), which is
  // undefined for N == 0.
  const int64_t M = c10::multiply_integers(y.sizes().slice(0, y.dim() - 1));
  const int64_t N = y.size(-1);
  const at::Tensor g = at::threshold_backward(grad_y, y, 0).reshape({M, N});
  auto unrequested = [&] { return at::empty({0}, y.options()); };
  at::Tensor gx =
      mask[0]
          ? at::mm(g, *weight).reshape(with_last(y.sizes(), weight->size(1)))
          : unrequested();
  at::Tensor gw =
      mask[1] ? at::mm(g.t(), x->reshape({M, x->size(-1)})) : unrequested();
  at::Tensor gb = mask[2] ? g.sum(0) : unrequested();
  return {gx, gw, gb};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_aten(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const MlpActivations& act, bool save_hidden) {
  AtenScope scope;
  const size_t L = weights.size();
  const bool saves_output = act.hidden_saves_output();
  at::Tensor h = as_rows(x);
  std::vector<at::Tensor> hidden;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor wt = weights[l].t();
    const at::Tensor z =
        biases.empty() ? at::mm(h, wt) : at::addmm(biases[l], h, wt);
    const bool top = l + 1 == L;
    h = activation_aten(z, top ? act.output : act.hidden, act.negative_slope,
                        /*in_place=*/!top);
    if (!save_hidden) continue;
    if (top) {
      if (act.output != Activation::kNone) hidden.push_back(z);
    } else {
      hidden.push_back(saves_output ? h : z);
    }
  }
  return {h.view(with_last(x.sizes(), weights[L - 1].size(0))), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_aten(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                  at::TensorList weights, at::TensorList hidden,
                  const std::vector<bool>& mask, const MlpActivations& act) {
  AtenScope scope;
  const bool saves_output = act.hidden_saves_output();
  const size_t L = weights.size();
  const bool has_bias = mask.size() == 1 + 2 * L;
  const auto empty = [&] { return at::empty({0}, grad_y.options()); };
  // One tensor per output, also for those not asked for: outputs of an op
  // must not alias each other.
  std::vector<at::Tensor> grad_w, grad_b;
  size_t lowest = L;  // the lowest layer the gradient must reach
  for (size_t l = 0; l < L; ++l) {
    grad_w.push_back(empty());
    if (has_bias) grad_b.push_back(empty());
    const bool needed = mask[1 + l] || (has_bias && mask[1 + L + l]);
    if (needed && lowest == L) lowest = l;
  }
  if (mask[0]) lowest = 0;
  at::Tensor grad_x = empty();
  const at::Tensor x2 = mask[1] ? as_rows(*x) : at::Tensor();
  at::Tensor g = as_rows(grad_y);
  for (size_t l = L; l-- > lowest;) {
    if (l + 1 < L) {
      g = activation_backward_aten(g, hidden[l], saves_output, act.hidden,
                                   act.negative_slope);
    } else if (act.output != Activation::kNone) {
      g = activation_backward_aten(g, hidden[l], false, act.output,
                                   act.negative_slope);
    }
    if (mask[1 + l]) {
      // The layer's input: x, or the output of the layer below, recomputed
      // when that layer saved its pre-activation.
      const at::Tensor input =
          l == 0 ? x2
          : saves_output
              ? hidden[l - 1]
              : activation_aten(hidden[l - 1], act.hidden, act.negative_slope);
      grad_w[l] = at::mm(g.t(), input);
    }
    if (has_bias && mask[1 + L + l]) grad_b[l] = g.sum(0);
    if (l > lowest || mask[0]) g = at::mm(g, weights[l]);
  }
  if (mask[0]) {
    grad_x = g.view(with_last(grad_y.sizes(), weights[0].size(1)));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace fastmlp

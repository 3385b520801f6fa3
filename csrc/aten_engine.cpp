// See aten_engine.h.
#include "aten_engine.h"

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
    const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  AtenScope scope;
  const size_t L = weights.size();
  at::Tensor h = as_rows(x);
  std::vector<at::Tensor> hidden;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor wt = weights[l].t();
    at::Tensor y = biases.empty() ? at::mm(h, wt) : at::addmm(biases[l], h, wt);
    if (l + 1 == L) {
      h = y;
      break;
    }
    y.relu_();  // torch.relu: NaN stays NaN
    hidden.push_back(y);
    h = y;
  }
  return {h.view(with_last(x.sizes(), weights[L - 1].size(0))), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_aten(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                  at::TensorList weights, at::TensorList hidden,
                  const std::vector<bool>& mask) {
  AtenScope scope;
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
      // relu's backward, as torch runs it: zero where the output is <= 0
      // (NaN outputs pass the gradient).
      g = at::threshold_backward(g, hidden[l], 0);
    }
    if (mask[1 + l]) grad_w[l] = at::mm(g.t(), l == 0 ? x2 : hidden[l - 1]);
    if (has_bias && mask[1 + L + l]) grad_b[l] = g.sum(0);
    if (l > lowest || mask[0]) g = at::mm(g, weights[l]);
  }
  if (mask[0]) {
    grad_x = g.view(with_last(grad_y.sizes(), weights[0].size(1)));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace fastmlp

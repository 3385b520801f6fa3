// See aten_engine.h.
#include "aten_engine.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>

#include <vector>

namespace fastmlp {
namespace {

// Runs ATen ops below autograd and autocast.
struct AtenScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
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

}  // namespace fastmlp

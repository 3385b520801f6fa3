// CUDA kernels of fastmlp::mlp and fastmlp::mlp_backward through plain ATen
// ops (the "aten engine"): cuBLAS GEMMs as torch.nn.functional.linear runs
// them, ReLU and its mask as torch.relu and its backward do. It is correct
// on every GPU torch supports and keeps PyTorch's NaN semantics; no custom
// CUDA engine is validated for the whole-MLP ops yet, so this is the only one
// (cuBLASLt's RELU_AUX_BIAS / DRELU_BGRAD epilogues would fit, but turn NaN
// into 0). ATen only, so the host compiler builds it; setup.py compiles it
// only when the CUDA extension is built. Every ATen call runs on the current
// CUDA stream, as CUDA graphs and torch.compile need.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

namespace fastmlp {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  check_mlp_args(x, weights, biases);
  const c10::DeviceGuard guard(x.device());
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
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weights[L - 1].size(0);
  return {h.view(out_shape), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                  at::TensorList weights, at::TensorList hidden,
                  const c10::List<bool>& output_mask_list) {
  const std::vector<bool> mask = output_mask_list.vec();
  check_mlp_backward_args(grad_y, x, weights, hidden, mask);
  const c10::DeviceGuard guard(grad_y.device());
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
    std::vector<int64_t> x_shape(grad_y.sizes().begin(), grad_y.sizes().end());
    x_shape.back() = weights[0].size(1);
    grad_x = g.view(x_shape);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("mlp", &mlp_cuda);
  m.impl("mlp_backward", &mlp_backward_cuda);
}

}  // namespace fastmlp

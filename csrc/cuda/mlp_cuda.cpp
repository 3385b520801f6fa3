// CUDA kernels of fastmlp::mlp, mlp_inference and mlp_backward: the argument
// checks, the device guard and the "aten engine" (aten_engine.cpp): cuBLAS
// GEMMs as torch.nn.functional.linear runs them, each activation and its
// backward as the torch.nn.functional call and PyTorch's backward op do. It
// is correct on every GPU torch supports
// and keeps PyTorch's NaN semantics; no faster CUDA engine is validated for
// the whole-MLP ops yet, so this is the only one (cuBLASLt's RELU_AUX_BIAS /
// DRELU_BGRAD epilogues would fit, but turn NaN into 0). Every ATen call runs
// on the current CUDA stream, as CUDA graphs and torch.compile need. Host
// code; setup.py compiles it only when the CUDA extension is built.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "aten/aten_engine.h"
#include "checks.h"

namespace fastmlp {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, c10::string_view output_activation,
    double negative_slope) {
  const MlpActivations act = parse_mlp_activations(
      activation, output_activation, negative_slope, "fastmlp.mlp: ");
  check_mlp_args(x, weights, biases);
  const c10::DeviceGuard guard(x.device());
  return mlp_aten(x, weights, biases, act);
}

// mlp_inference: the forward's output (the aten engine saves nothing a caller
// does not get back anyway).
at::Tensor mlp_inference_cuda(const at::Tensor& x, at::TensorList weights,
                              at::TensorList biases,
                              c10::string_view activation,
                              c10::string_view output_activation,
                              double negative_slope) {
  return std::get<0>(mlp_cuda(x, weights, biases, activation, output_activation,
                              negative_slope));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                  at::TensorList weights, at::TensorList hidden,
                  const c10::List<bool>& output_mask_list,
                  c10::string_view activation,
                  c10::string_view output_activation, double negative_slope) {
  const std::vector<bool> mask = output_mask_list.vec();
  const MlpActivations act = parse_mlp_activations(
      activation, output_activation, negative_slope, "fastmlp.mlp_backward: ");
  check_mlp_backward_args(grad_y, x, weights, hidden, mask, act);
  const c10::DeviceGuard guard(grad_y.device());
  return mlp_backward_aten(grad_y, x, weights, hidden, mask, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("mlp", &mlp_cuda);
  m.impl("mlp_backward", &mlp_backward_cuda);
  m.impl("mlp_inference", &mlp_inference_cuda);
}

}  // namespace fastmlp

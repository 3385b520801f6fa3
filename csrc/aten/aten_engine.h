// The "aten" engine: linear_relu and its backward written in plain ATen ops.
//
// Device-generic host code, compiled in every build. The CUDA op glue uses it
// as the engine that is correct on every GPU (the default until a recorded GPU
// run has validated a faster engine, see cuda/engine_rule.h) and for float64,
// and the whole-MLP ops' only CUDA engine so far; on the CPU it is the "aten"
// path (cpu/paths/rule.h), and the C++ tests run it against the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "activation_kinds.h"

namespace fastmlp {

// relu(linear(x, weight, bias)), below autograd and autocast: the inputs
// already have the dtype the caller chose and the result keeps it.
at::Tensor linear_relu_aten(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias);

// (grad_x, grad_weight, grad_bias) from grad_y and the forward output y, with
// linear_relu_backward's contract: an output not asked for in mask is an
// empty (0,) tensor of its own (never one tensor shared by several outputs,
// which the schema does not declare as aliases).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_aten(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> mask);

// fastmlp::mlp: Linear layers with act.hidden after every one but the last
// and act.output after the last, as F.linear and the torch.nn.functional
// activations run them. Returns the output and the hidden tensors of mlp's
// schema (each layer's output or pre-activation, see MlpActivations).
// Arguments already checked.
// save_hidden = false (inference) keeps nothing: each layer's activations
// are freed once the next layer has read them, as in eager PyTorch.
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_aten(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const MlpActivations& act = MlpActivations(), bool save_hidden = true);

// fastmlp::mlp_backward's contract: mask = (grad_x, grad_w[0..L), grad_b[0..L)
// when there are biases); outputs not asked for are empty (0,) tensors of
// their own. Only the layers down to the lowest gradient asked for are run.
// The activations' backwards are PyTorch's own ops (threshold_backward,
// leaky_relu_backward, tanh_backward, sigmoid_backward, gelu_backward,
// silu_backward).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_aten(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                  at::TensorList weights, at::TensorList hidden,
                  const std::vector<bool>& mask,
                  const MlpActivations& act = MlpActivations());

}  // namespace fastmlp

// Autograd for fastmlp::linear_relu, for every backend: the backward is the
// fastmlp::linear_relu_backward op.
//
// Why C++ and not torch.library.register_autograd in Python: the Python
// path costs tens of microseconds per layer and step (an autograd.Function
// call and a Python redispatch in forward, a Python backward), measured at
// 128 us vs eager's 58 us for a tiny layer's forward+backward. At the
// tutorial's batch 64 that is several percent of the whole layer's time,
// which is the margin fusion has to win. Here the overhead is that of a
// native op. torch.compile and opcheck see the same plain ops either way.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastmlp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::linear_relu_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, std::array<bool, 3>)>();
  return op.call(grad_y, y, x, weight, mask);
}

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class LinearReLUFunction
    : public torch::autograd::Function<LinearReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = call_forward(x, weight, bias);
    }
    // Save only what backward reads: the output (its sign is the ReLU mask),
    // the weight for grad_x, the input for grad_weight.
    // (ctx->needs_input_grad is only valid once a graph node exists, which
    // is not the case when no input requires grad.)
    const bool need_x = x.requires_grad();
    const bool need_w = weight.requires_grad();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward(
        {y, need_x ? weight : at::Tensor(), need_w ? x : at::Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0),
                                      ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2])
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor grad_y = grad_outputs[0].contiguous();
    // With create_graph=True, go through the backward op's autograd, which
    // raises a clear "double backward is not supported" when used; otherwise
    // skip the autograd layer entirely.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [gx, gw, gb] =
        call_backward(grad_y, saved[0], maybe(saved[2]), maybe(saved[1]), mask);
    return {mask[0] ? gx : at::Tensor(), mask[1] ? gw : at::Tensor(),
            mask[2] ? gb : at::Tensor()};
  }
};

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  return LinearReLUFunction::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  m.impl("linear_relu", &linear_relu_autograd);
}

}  // namespace fastmlp

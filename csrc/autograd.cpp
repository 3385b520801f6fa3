// Autograd for fastmlp::linear_relu and fastmlp::mlp, for every backend
// (and mlp_inference's refusal of it):
// their backwards are the fastmlp::linear_relu_backward and
// fastmlp::mlp_backward ops.
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
#include <string>
#include <tuple>
#include <vector>

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

using MlpResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using MlpGrads =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

MlpResult call_mlp(const at::Tensor& x, at::TensorList weights,
                   at::TensorList biases, c10::string_view activation,
                   c10::string_view output_activation, double negative_slope) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp", "")
          .typed<MlpResult(const at::Tensor&, at::TensorList, at::TensorList,
                           c10::string_view, c10::string_view, double)>();
  return op.call(x, weights, biases, activation, output_activation,
                 negative_slope);
}

MlpGrads call_mlp_backward(const at::Tensor& grad_y,
                           const std::optional<at::Tensor>& x,
                           at::TensorList weights, at::TensorList hidden,
                           const c10::List<bool>& mask,
                           c10::string_view activation,
                           c10::string_view output_activation,
                           double negative_slope) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp_backward", "")
          .typed<MlpGrads(const at::Tensor&, const std::optional<at::Tensor>&,
                          at::TensorList, at::TensorList,
                          const c10::List<bool>&, c10::string_view,
                          c10::string_view, double)>();
  return op.call(grad_y, x, weights, hidden, mask, activation,
                 output_activation, negative_slope);
}

// The whole MLP as one autograd node. Inputs, as autograd counts them: x,
// then each weight, then each bias, then the three activation arguments
// (not tensors: no gradient). Outputs: y, then the hidden tensors, which are
// not differentiable (they are what backward reads).
class MlpFunction : public torch::autograd::Function<MlpFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               at::TensorList weights, at::TensorList biases,
                               const std::string& activation,
                               const std::string& output_activation,
                               double negative_slope) {
    MlpResult result;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      result = call_mlp(x, weights, biases, activation, output_activation,
                        negative_slope);
    }
    auto& [y, hidden] = result;
    // Save only what backward reads: every weight (the gradient flows down
    // through them), the hidden tensors as mlp returned them (each layer's
    // output or pre-activation, as its activation needs), and x when
    // weights[0] needs a gradient (see LinearReLUFunction for why not
    // needs_input_grad).
    variable_list saved(weights.begin(), weights.end());
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    saved.push_back(weights[0].requires_grad() ? x : at::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["hidden"] = static_cast<int64_t>(hidden.size());
    ctx->saved_data["has_bias"] = !biases.empty();
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["output_activation"] = output_activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->mark_non_differentiable(hidden);
    // No zero tensors for the hidden outputs' (never used) gradients.
    ctx->set_materialize_grads(false);
    variable_list out{y};
    out.insert(out.end(), hidden.begin(), hidden.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const auto L = static_cast<size_t>(ctx->saved_data["layers"].toInt());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto H = static_cast<size_t>(ctx->saved_data["hidden"].toInt());
    const size_t inputs = 1 + L * (has_bias ? 2 : 1);
    // One (undefined) gradient per non-tensor argument too.
    const size_t outputs = inputs + 3;
    c10::List<bool> mask;
    bool any = false;
    for (size_t i = 0; i < inputs; ++i) {
      mask.push_back(ctx->needs_input_grad(i));
      any = any || mask.get(i);
    }
    const at::Tensor& grad_y = grad_outputs[0];
    if (!any || !grad_y.defined()) return variable_list(outputs);
    const auto saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> weights(saved.begin(), saved.begin() + L);
    const std::vector<at::Tensor> hidden(saved.begin() + L,
                                         saved.begin() + L + H);
    // As in LinearReLUFunction: with create_graph=True go through the
    // backward op's autograd, which raises a clear error if differentiated.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [gx, gw, gb] = call_mlp_backward(
        grad_y.contiguous(), maybe(saved[L + H]), weights, hidden, mask,
        ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["output_activation"].toStringRef(),
        ctx->saved_data["negative_slope"].toDouble());
    variable_list grads(outputs);
    if (mask.get(0)) grads[0] = gx;
    for (size_t l = 0; l < L; ++l) {
      if (mask.get(1 + l)) grads[1 + l] = gw[l];
      if (has_bias && mask.get(1 + L + l)) grads[1 + L + l] = gb[l];
    }
    return grads;
  }
};

MlpResult mlp_autograd(const at::Tensor& x, at::TensorList weights,
                       at::TensorList biases, c10::string_view activation,
                       c10::string_view output_activation,
                       double negative_slope) {
  variable_list out = MlpFunction::apply(
      x, weights, biases, std::string(activation.data(), activation.size()),
      std::string(output_activation.data(), output_activation.size()),
      negative_slope);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

// mlp_inference saves nothing, so it has no backward: refuse to record it
// (else autograd would leave the inputs without gradients, silently).
at::Tensor mlp_inference_autograd(const at::Tensor& x, at::TensorList weights,
                                  at::TensorList biases,
                                  c10::string_view activation,
                                  c10::string_view output_activation,
                                  double negative_slope) {
  bool requires_grad = x.requires_grad();
  bool dual = x._fw_grad(/*level=*/0).defined();
  for (const auto& list : {weights, biases}) {
    for (const auto& t : list) {
      requires_grad = requires_grad || t.requires_grad();
      dual = dual || t._fw_grad(/*level=*/0).defined();
    }
  }
  const bool recorded = at::GradMode::is_enabled() && requires_grad;
  TORCH_CHECK(!dual,
              "fastmlp: forward-mode AD of the MLP ops works through "
              "torch.func.jvp and torch.func.jacfwd, not through "
              "torch.autograd.forward_ad dual tensors");
  TORCH_CHECK(!recorded,
              "fastmlp.mlp_inference is not differentiable (it saves nothing "
              "for backward); call fastmlp.mlp, which runs it when no "
              "gradient is recorded");
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp_inference", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList,
                            c10::string_view, c10::string_view, double)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, weights, biases, activation, output_activation,
                 negative_slope);
}

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  return LinearReLUFunction::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  m.impl("linear_relu", &linear_relu_autograd);
  m.impl("mlp", &mlp_autograd);
  m.impl("mlp_inference", &mlp_inference_autograd);
}

}  // namespace fastmlp

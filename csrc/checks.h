// Argument validation shared by every backend of the fastmlp ops.
//
// Each message names the argument and what was expected, so a user who passes
// the wrong thing gets a Python RuntimeError that says what to fix. The fake
// (meta) implementations in fastmlp/ops.py repeat these checks for tracing.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <string>
#include <vector>

#include "activation_kinds.h"

namespace fastmlp {

// (..., features) -> (rows, features), contiguous. Unlike reshape({-1, f}) it
// is defined when features is 0, as F.linear allows.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t rows = c10::multiply_integers(t.sizes().slice(0, t.dim() - 1));
  return t.reshape({rows, t.size(-1)}).contiguous();
}

// t's sizes with the last one replaced: the shape (..., last) of an op's
// result or gradient for an input of shape (..., features).
inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
         t == at::kHalf;
}

inline void check_float_tensor(const at::Tensor& t, const char* name,
                               const char* op = "fastmlp.linear_relu: ") {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, name,
              " must be a floating-point tensor (float32, bfloat16, float16 "
              "or float64), got ",
              t.scalar_type());
}

// Checks x (..., in_features), weight (out_features, in_features) and the
// optional bias (out_features,) against each other.
inline void check_linear_relu_args(const at::Tensor& x,
                                   const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  check_float_tensor(x, "x");
  check_float_tensor(weight, "weight");
  TORCH_CHECK(weight.dim() == 2,
              "fastmlp.linear_relu: weight must be 2-D (out_features, "
              "in_features), got a ",
              weight.dim(), "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1,
              "fastmlp.linear_relu: x must have at least 1 dimension "
              "(..., in_features), got a 0-D tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(),
              "fastmlp.linear_relu: x and weight must have the same dtype, got "
              "x ",
              x.scalar_type(), " and weight ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(),
              "fastmlp.linear_relu: x and weight must be on the same device, "
              "got x on ",
              x.device(), " and weight on ", weight.device());
  TORCH_CHECK(x.size(-1) == weight.size(1),
              "fastmlp.linear_relu: in_features mismatch: x has ", x.size(-1),
              " features in its last dimension but weight expects ",
              weight.size(1), " (weight shape ", weight.sizes(), ")");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_float_tensor(b, "bias");
    TORCH_CHECK(b.dim() == 1,
                "fastmlp.linear_relu: bias must be 1-D (out_features,), got a ",
                b.dim(), "-D tensor of shape ", b.sizes());
    TORCH_CHECK(b.size(0) == weight.size(0),
                "fastmlp.linear_relu: bias must have out_features = ",
                weight.size(0), " elements, got ", b.size(0));
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(),
                "fastmlp.linear_relu: bias and weight must have the same "
                "dtype, got bias ",
                b.scalar_type(), " and weight ", weight.scalar_type());
    TORCH_CHECK(b.device() == weight.device(),
                "fastmlp.linear_relu: bias and weight must be on the same "
                "device, got bias on ",
                b.device(), " and weight on ", weight.device());
  }
}

// Checks the backward op's arguments. grad_y and y have the forward output's
// shape (..., out_features). weight is needed (and given) only when grad_x is
// asked for, x only when grad_weight is: autograd saves no more than that.
inline void check_linear_relu_backward_args(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask) {
  check_float_tensor(grad_y, "grad_y");
  check_float_tensor(y, "y");
  TORCH_CHECK(y.dim() >= 1,
              "fastmlp.linear_relu_backward: y must have at least 1 dimension");
  TORCH_CHECK(grad_y.sizes() == y.sizes(),
              "fastmlp.linear_relu_backward: grad_y must have the shape of the "
              "forward output y ",
              y.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(),
              "fastmlp.linear_relu_backward: grad_y and y must have the same "
              "dtype, got grad_y ",
              grad_y.scalar_type(), " and y ", y.scalar_type());
  TORCH_CHECK(grad_y.device() == y.device(),
              "fastmlp.linear_relu_backward: grad_y and y must be on the same "
              "device, got grad_y on ",
              grad_y.device(), " and y on ", y.device());
  TORCH_CHECK(!output_mask[0] || weight.has_value(),
              "fastmlp.linear_relu_backward: weight is required to compute "
              "grad_x (output_mask[0] is true)");
  TORCH_CHECK(!output_mask[1] || x.has_value(),
              "fastmlp.linear_relu_backward: x is required to compute "
              "grad_weight (output_mask[1] is true)");
  const int64_t out_features = y.size(-1);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_float_tensor(w, "weight");
    TORCH_CHECK(w.dim() == 2 && w.size(0) == out_features,
                "fastmlp.linear_relu_backward: weight must have shape (",
                out_features, ", in_features), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == y.scalar_type() && w.device() == y.device(),
                "fastmlp.linear_relu_backward: weight must match y's dtype ",
                y.scalar_type(), " and device ", y.device(), ", got ",
                w.scalar_type(), " on ", w.device());
  }
  if (x.has_value()) {
    const at::Tensor& xv = *x;
    check_float_tensor(xv, "x");
    TORCH_CHECK(xv.dim() == y.dim() && xv.sizes().slice(0, xv.dim() - 1) ==
                                           y.sizes().slice(0, y.dim() - 1),
                "fastmlp.linear_relu_backward: x must have shape (..., "
                "in_features) with the leading dimensions of y ",
                y.sizes(), ", got ", xv.sizes());
    TORCH_CHECK(
        xv.scalar_type() == y.scalar_type() && xv.device() == y.device(),
        "fastmlp.linear_relu_backward: x must match y's dtype ",
        y.scalar_type(), " and device ", y.device(), ", got ", xv.scalar_type(),
        " on ", xv.device());
    if (weight.has_value()) {
      TORCH_CHECK(xv.size(-1) == weight->size(1),
                  "fastmlp.linear_relu_backward: x has ", xv.size(-1),
                  " features but weight expects ", weight->size(1));
    }
  }
}

// Checks the whole-MLP forward's x (..., in_features), weights (L layers,
// weights[l] of shape (out_l, in_l) with in_0 = in_features and
// in_l = out_{l-1}) and biases (empty, or one (out_l,) per layer), all of x's
// dtype and device. Widths must be positive: a layer of width 0 makes the MLP
// a constant, which is a mistake far more often than an intent.
inline void check_mlp_args(const at::Tensor& x, at::TensorList weights,
                           at::TensorList biases) {
  const char* op = "fastmlp.mlp: ";
  check_float_tensor(x, "x", op);
  TORCH_CHECK(x.dim() >= 1, op,
              "x must have at least 1 dimension (..., in_features), got a 0-D "
              "tensor");
  TORCH_CHECK(!weights.empty(), op, "weights must list at least one layer");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op,
              "biases must be empty (no biases) or hold one tensor per layer (",
              weights.size(), "), got ", biases.size());
  int64_t features = x.size(-1);
  TORCH_CHECK(features > 0, op, "x must have in_features > 0, got shape ",
              x.sizes());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const std::string name = "weights[" + std::to_string(l) + "]";
    check_float_tensor(w, name.c_str(), op);
    TORCH_CHECK(w.dim() == 2 && w.size(0) > 0, op, name,
                " must be 2-D (out_features, in_features) with out_features > "
                "0, got shape ",
                w.sizes());
    TORCH_CHECK(w.size(1) == features, op, "in_features mismatch: ", name,
                " has shape ", w.sizes(), " but its input has ", features,
                l == 0 ? " features (the last dimension of x)"
                       : " features (the rows of the layer before)");
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, name,
                " must have x's dtype ", x.scalar_type(), ", got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), op, name, " must be on x's device ",
                x.device(), ", got ", w.device());
    features = w.size(0);
    if (biases.empty()) continue;
    const at::Tensor& b = biases[l];
    const std::string bname = "biases[" + std::to_string(l) + "]";
    check_float_tensor(b, bname.c_str(), op);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), op, bname,
                " must have shape (", w.size(0), ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, bname,
                " must have x's dtype ", x.scalar_type(), ", got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, bname, " must be on x's device ",
                x.device(), ", got ", b.device());
  }
}

// Checks mlp_backward's arguments: grad_y of the forward output's shape,
// the forward's weights and hidden tensors (one (rows, out_l) per layer but
// the last, and one more for the last layer with an output activation: see
// MlpActivations::hidden_count), x when weights[0]'s gradient is asked for,
// and output_mask = (grad_x, grad of each weight[, grad of each bias]): 1 + L
// entries without biases, 1 + 2L with.
inline void check_mlp_backward_args(const at::Tensor& grad_y,
                                    const std::optional<at::Tensor>& x,
                                    at::TensorList weights,
                                    at::TensorList hidden,
                                    const std::vector<bool>& output_mask,
                                    const MlpActivations& act) {
  const char* op = "fastmlp.mlp_backward: ";
  TORCH_CHECK(!weights.empty(), op, "weights must list at least one layer");
  const size_t L = weights.size();
  TORCH_CHECK(output_mask.size() == 1 + L || output_mask.size() == 1 + 2 * L,
              op,
              "output_mask must have 1 + L (no biases) or 1 + 2L entries "
              "for L = ",
              L, " layers, got ", output_mask.size());
  const size_t H = act.hidden_count(L);
  TORCH_CHECK(hidden.size() == H, op, "hidden must hold ", H,
              " tensors (one per layer but the last",
              act.output != Activation::kNone
                  ? ", and the last layer's pre-activation for its "
                    "output_activation"
                  : "",
              "), got ", hidden.size());
  check_float_tensor(grad_y, "grad_y", op);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == weights[L - 1].size(0),
              op, "grad_y must have shape (..., ", weights[L - 1].size(0),
              "), got ", grad_y.sizes());
  const int64_t rows =
      c10::multiply_integers(grad_y.sizes().slice(0, grad_y.dim() - 1));
  const auto same_kind = [&](const at::Tensor& t, const std::string& name) {
    check_float_tensor(t, name.c_str(), op);
    TORCH_CHECK(t.scalar_type() == grad_y.scalar_type() &&
                    t.device() == grad_y.device(),
                op, name, " must match grad_y's dtype ", grad_y.scalar_type(),
                " and device ", grad_y.device(), ", got ", t.scalar_type(),
                " on ", t.device());
  };
  for (size_t l = 0; l < L; ++l) {
    const std::string name = "weights[" + std::to_string(l) + "]";
    same_kind(weights[l], name);
    TORCH_CHECK(weights[l].dim() == 2 &&
                    (l == 0 || weights[l].size(1) == weights[l - 1].size(0)),
                op, name, " must be 2-D and take the layer before's ",
                l == 0 ? 0 : weights[l - 1].size(0), " outputs, got shape ",
                weights[l].sizes());
    if (l < H) {
      const std::string hname = "hidden[" + std::to_string(l) + "]";
      same_kind(hidden[l], hname);
      TORCH_CHECK(hidden[l].dim() == 2 && hidden[l].size(0) == rows &&
                      hidden[l].size(1) == weights[l].size(0),
                  op, hname, " must have shape (", rows, ", ",
                  weights[l].size(0), "), got ", hidden[l].sizes());
    }
  }
  if (output_mask[1]) {
    TORCH_CHECK(x.has_value(), op,
                "x is required to compute weights[0]'s gradient "
                "(output_mask[1] is true)");
  }
  if (x.has_value()) {
    same_kind(*x, "x");
    TORCH_CHECK(x->dim() >= 1 && x->size(-1) == weights[0].size(1) &&
                    x->numel() == rows * weights[0].size(1),
                op, "x must have shape (..., ", weights[0].size(1), ") with ",
                rows, " rows, got ", x->sizes());
  }
}

}  // namespace fastmlp

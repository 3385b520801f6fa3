// The activations of the whole-MLP ops (fastmlp::mlp / mlp_backward): their
// names, parsed in this one place for every backend, and what each saves for
// the backward. Device-generic (no vector code): the CPU kernels are in
// cpu/kernels/activation_epilogues.h, the ATen versions in aten_engine.cpp.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstddef>
#include <iterator>
#include <string>

namespace fastmlp {

// The activations, listed once: X(enumerator, name) for each, in enum order.
// Each one is exactly the torch.nn.functional call of the same name:
// relu, leaky_relu(z, negative_slope), tanh, sigmoid, identity ("none"),
// gelu(z, approximate="none"), gelu(z, approximate="tanh"), silu. The enum,
// the parser, the names (also fastmlp._C._activation_names(), which Python
// checks its own list against) expand this list; a switch over Activation
// (here, the CPU epilogues, the ATen engine) states kActivationCount in a
// static_assert, so that a new entry fails to build until every switch has
// its case.
#define FASTMLP_ACTIVATIONS(X) \
  X(kReLU, "relu")             \
  X(kLeakyReLU, "leaky_relu")  \
  X(kTanh, "tanh")             \
  X(kSigmoid, "sigmoid")       \
  X(kNone, "none")             \
  X(kGelu, "gelu")             \
  X(kGeluTanh, "gelu_tanh")    \
  X(kSilu, "silu")

enum class Activation {
#define FASTMLP_ENUMERATOR(kind, name) kind,
  FASTMLP_ACTIVATIONS(FASTMLP_ENUMERATOR)
#undef FASTMLP_ENUMERATOR
};

// The names, in enum order.
inline constexpr const char* kActivationNameList[] = {
#define FASTMLP_NAME(kind, name) name,
    FASTMLP_ACTIVATIONS(FASTMLP_NAME)
#undef FASTMLP_NAME
};
inline constexpr size_t kActivationCount = std::size(kActivationNameList);

// The names as one line: "relu, leaky_relu, ...", for error messages.
inline std::string activation_names_text() {
  std::string text;
  for (const char* name : kActivationNameList) {
    text += text.empty() ? name : std::string(", ") + name;
  }
  return text;
}

// `name` as an Activation; an unknown name is an error naming the argument
// (`arg`, e.g. "activation") and listing the valid names.
inline Activation parse_activation(c10::string_view name, const char* op,
                                   const char* arg) {
  for (size_t i = 0; i < kActivationCount; ++i) {
    if (name == kActivationNameList[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK(false, op, arg, " must be one of ", activation_names_text(),
              ", got '", std::string(name.data(), name.size()), "'");
}

// Whether a layer with this activation saves its output for the backward
// (the derivative is a function of the output: relu's mask, 1 - y^2,
// (1 - y) y, leaky_relu's sign when the slope keeps it) rather than its
// pre-activation z (gelu, gelu_tanh, silu, leaky_relu with a negative slope).
inline bool saves_output(Activation a, double negative_slope) {
  static_assert(kActivationCount == 8, "a case for each activation");
  switch (a) {
    case Activation::kGelu:
    case Activation::kGeluTanh:
    case Activation::kSilu:
      return false;
    case Activation::kLeakyReLU:
      return negative_slope >= 0;
    case Activation::kReLU:
    case Activation::kTanh:
    case Activation::kSigmoid:
    case Activation::kNone:
      return true;
  }
  TORCH_CHECK(false, "saves_output: unknown activation ", static_cast<int>(a));
}

// The activation arguments of mlp / mlp_backward, parsed and checked.
struct MlpActivations {
  Activation hidden = Activation::kReLU;  // after every layer but the last
  Activation output = Activation::kNone;  // after the last layer
  double negative_slope = 0.01;           // leaky_relu's

  // mlp's hidden outputs: per layer but the last, what it saves (its output
  // or its pre-activation); with an output activation, one more: the last
  // layer's pre-activation.
  size_t hidden_count(size_t layers) const {
    return layers - 1 + (output != Activation::kNone ? 1 : 0);
  }
  bool hidden_saves_output() const {
    return saves_output(hidden, negative_slope);
  }
};

inline MlpActivations parse_mlp_activations(c10::string_view activation,
                                            c10::string_view output_activation,
                                            double negative_slope,
                                            const char* op) {
  TORCH_CHECK(std::isfinite(negative_slope), op,
              "negative_slope must be a finite number, got ", negative_slope);
  MlpActivations a;
  a.hidden = parse_activation(activation, op, "activation");
  a.output = parse_activation(output_activation, op, "output_activation");
  a.negative_slope = negative_slope;
  return a;
}

}  // namespace fastmlp

// The activations of the whole-MLP ops on CPU: vectorised forward and
// backward of each kind, as the epilogues of the blocks in cpu_kernels.h and
// mlp_blocks.h.
//
// The formulas are those of ATen's CPU kernels (Activation.cpp,
// UnaryOpsKernel.cpp, BinaryOpsKernel.cpp), so results match
// torch.nn.functional's, NaN and inf included: for bfloat16 and float16 the
// activation and its derivative are computed in float (math_t) and rounded
// once, as ATen does. ReLU keeps its own code (relu_row, ReluMask): the same
// instructions as before activations were a choice.
//
// The kind is a template parameter: the choice among them is made once per
// layer (with_activation_rows / with_activation_deriv), never per element.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "activation_kinds.h"
#include "cpu/kernels/cpu_kernels.h"

namespace fastmlp {
namespace cpu {

// v rounded to T and back (a no-op for float and double): the value PyTorch
// would have stored in a T tensor between two ops.
template <typename T>
Vectorized<math_t<T>> round_to(const Vectorized<math_t<T>>& v) {
  if constexpr (std::is_same_v<T, math_t<T>>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return std::get<0>(
        at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
  } else {
    return std::get<0>(
        at::vec::convert_half_float(at::vec::convert_float_half(v, v)));
  }
}

// act(z) for every kind but ReLU (relu_row) and "none".
template <Activation A, typename M>
Vectorized<M> act_forward(const Vectorized<M>& z, M slope) {
  using Vec = Vectorized<M>;
  const Vec one(M(1));
  if constexpr (A == Activation::kLeakyReLU) {
    return Vec::blendv(z * Vec(slope), z, z > Vec(M(0)));
  } else if constexpr (A == Activation::kTanh) {
    return z.tanh();
  } else if constexpr (A == Activation::kSigmoid) {
    return (one + z.neg().exp()).reciprocal();
  } else if constexpr (A == Activation::kGelu) {
    return z * Vec(M(0.5)) * (one + (z * Vec(M(M_SQRT1_2))).erf());
  } else if constexpr (A == Activation::kGeluTanh) {
    const Vec beta(M(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(M(0.044715));
    const Vec cube = z * z * z;
    const Vec inner = beta * (z + kappa * cube);
    return Vec(M(0.5)) * z * (one + inner.tanh());
  } else if constexpr (A == Activation::kSilu) {
    return z / (one + z.neg().exp());
  } else {
    static_assert(A == Activation::kNone, "relu has relu_row");
    return z;
  }
}

// The forward epilogue of a layer with activation A (see ReluRows): a = act(z)
// on a row, a may be z.
template <Activation A, typename T>
struct ActRows {
  math_t<T> slope;
  void operator()(const T* z, T* a, int64_t n) const {
    if constexpr (A == Activation::kNone) {
      if (a != z) std::copy(z, z + n, a);
    } else {
      using Vec = Vectorized<math_t<T>>;
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const int64_t k = std::min<int64_t>(Vec::size(), n - i);
        store_math(act_forward<A>(load_math(z + i, k), slope), a + i, k);
      }
    }
  }
};

// The backward of activation A on a vector: the incoming gradient g and what
// the layer saved, s: its output y when kFromOutput, else its pre-activation
// z (from which tanh and sigmoid first recompute y, rounded to T as PyTorch's
// forward stored it). PyTorch's backward formulas: leaky_relu_backward (z > 0
// ? g : g * slope; y has z's sign when slope >= 0, the only case y is
// saved), tanh_backward, sigmoid_backward, gelu_backward (both forms),
// silu_backward. ReLU: ReluMask.
template <Activation A, bool kFromOutput, typename T>
struct ActDeriv {
  using M = math_t<T>;
  using Vec = Vectorized<M>;
  M slope;
  Vec operator()(const Vec& g, const Vec& s) const {
    const Vec one(M(1));
    if constexpr (A == Activation::kLeakyReLU) {
      return Vec::blendv(g * Vec(slope), g, s > Vec(M(0)));
    } else if constexpr (A == Activation::kTanh) {
      const Vec y = kFromOutput ? s : round_to<T>(act_forward<A>(s, slope));
      return g * (one - y * y);
    } else if constexpr (A == Activation::kSigmoid) {
      const Vec y = kFromOutput ? s : round_to<T>(act_forward<A>(s, slope));
      return g * (one - y) * y;
    } else if constexpr (A == Activation::kGelu) {
      const Vec alpha(M(M_SQRT1_2)), beta(M(M_2_SQRTPI * M_SQRT1_2 * 0.5));
      const Vec half(M(0.5)), minus_half(M(-0.5));
      const Vec cdf = half * (one + (s * alpha).erf());
      const Vec pdf = beta * (s * s * minus_half).exp();
      return g * (cdf + s * pdf);
    } else if constexpr (A == Activation::kGeluTanh) {
      const Vec beta(M(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(M(0.044715));
      const Vec half(M(0.5)), three(M(3));
      const Vec sq = s * s;
      const Vec cube = s * s * s;
      const Vec t = (beta * (s + kappa * cube)).tanh();
      const Vec left = half * s;
      const Vec right = one + t;
      const Vec left_derivative = half * right;
      const Vec tanh_derivative = one - t * t;
      const Vec inner_derivative = beta * (one + three * kappa * sq);
      const Vec right_derivative = left * tanh_derivative * inner_derivative;
      return g * (left_derivative + right_derivative);
    } else if constexpr (A == Activation::kSilu) {
      const Vec sig = one / (one + s.neg().exp());
      return g * sig * (one + s * (one - sig));
    } else {
      static_assert(A == Activation::kNone, "relu has ReluMask");
      return g;
    }
  }
};

// f(epilogue) with the forward epilogue of activation a (ReluRows for ReLU).
template <typename T, typename F>
void with_activation_rows(Activation a, double slope, F&& f) {
  const math_t<T> s = static_cast<math_t<T>>(slope);
  static_assert(kActivationCount == 8, "a case for each activation");
  switch (a) {
    case Activation::kReLU:
      return f(ReluRows<T>{});
    case Activation::kLeakyReLU:
      return f(ActRows<Activation::kLeakyReLU, T>{s});
    case Activation::kTanh:
      return f(ActRows<Activation::kTanh, T>{s});
    case Activation::kSigmoid:
      return f(ActRows<Activation::kSigmoid, T>{s});
    case Activation::kNone:
      return f(ActRows<Activation::kNone, T>{s});
    case Activation::kGelu:
      return f(ActRows<Activation::kGelu, T>{s});
    case Activation::kGeluTanh:
      return f(ActRows<Activation::kGeluTanh, T>{s});
    case Activation::kSilu:
      return f(ActRows<Activation::kSilu, T>{s});
  }
  TORCH_CHECK(false, "with_activation_rows: unknown activation ",
              static_cast<int>(a));
}

// f(deriv) with the backward of activation a from what the layer saved (its
// output when from_output, else its pre-activation). For "none" the caller
// passes no saved tensor instead (the gradient passes as it is).
template <typename T, typename F>
void with_activation_deriv(Activation a, bool from_output, double slope,
                           F&& f) {
  const math_t<T> s = static_cast<math_t<T>>(slope);
  static_assert(kActivationCount == 8, "a case for each activation");
  switch (a) {
    case Activation::kReLU:
      return f(ReluMask<T>{});
    case Activation::kLeakyReLU:
      return f(ActDeriv<Activation::kLeakyReLU, true, T>{s});
    case Activation::kTanh:
      return from_output ? f(ActDeriv<Activation::kTanh, true, T>{s})
                         : f(ActDeriv<Activation::kTanh, false, T>{s});
    case Activation::kSigmoid:
      return from_output ? f(ActDeriv<Activation::kSigmoid, true, T>{s})
                         : f(ActDeriv<Activation::kSigmoid, false, T>{s});
    case Activation::kNone:
      return f(ActDeriv<Activation::kNone, true, T>{s});
    case Activation::kGelu:
      return f(ActDeriv<Activation::kGelu, false, T>{s});
    case Activation::kGeluTanh:
      return f(ActDeriv<Activation::kGeluTanh, false, T>{s});
    case Activation::kSilu:
      return f(ActDeriv<Activation::kSilu, false, T>{s});
  }
  TORCH_CHECK(false, "with_activation_deriv: unknown activation ",
              static_cast<int>(a));
}

}  // namespace cpu
}  // namespace fastmlp

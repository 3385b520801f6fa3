// Integer arithmetic shared by the CPU kernels, the CUDA kernels and their
// host glue. Free of torch headers on purpose: gemm_kernels.cu, which nvcc
// compiles without torch, includes it too.
#pragma once

#include <type_traits>

// Device code may call these only when they are marked __device__, and only
// nvcc knows those keywords.
#ifdef __CUDACC__
#define FASTMLP_HOST_DEVICE __host__ __device__
#else
#define FASTMLP_HOST_DEVICE
#endif

namespace fastmlp {

// ceil(a / b) for a >= 0 and b > 0: how many blocks of b cover a. Computed
// in the common type of a and b, so a + b - 1 must fit in it; the CUDA
// kernels' int extents keep that margin (kMaxKernelExtent in
// cuda/linear_relu_cuda.cpp).
template <typename A, typename B>
FASTMLP_HOST_DEVICE constexpr std::common_type_t<A, B> ceil_div(A a, B b) {
  static_assert(std::is_integral_v<A> && std::is_integral_v<B>,
                "ceil_div is integer division");
  using T = std::common_type_t<A, B>;
  return (static_cast<T>(a) + static_cast<T>(b) - 1) / static_cast<T>(b);
}

// Checked where every backend compiles: an edit that breaks rounding up
// (exact multiples, zero, one past a multiple) fails the build.
static_assert(ceil_div(0, 4) == 0 && ceil_div(1, 4) == 1 &&
              ceil_div(4, 4) == 1 && ceil_div(5, 4) == 2);

}  // namespace fastmlp

// Building blocks of the CPU kernels, shared by the per-layer ops
// (linear_relu_cpu.cpp), the whole-MLP ops' paths (paths/layered.h,
// paths/rowblock.h) and the whole-step op (mlp_sgd_step_cpu.cpp).
//
// The GEMMs are the BLAS that torch ships (MKL / oneDNN through ATen); the
// fusion around them is ours. Work is split by hand over at::parallel_for so
// that each thread owns a block of the output and applies the epilogue to it
// while it is still in the thread's cache. Inside a parallel region the BLAS
// runs single-threaded.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common_math.h"

namespace fastmlp {
namespace cpu {

using at::vec::Vectorized;

// Bytes of output a thread computes per forward GEMM call before applying
// the epilogue to it: large enough that the GEMM runs at full speed, small
// enough to still be in L2 (1 MiB per core on the EPYC this was tuned on).
constexpr int64_t kForwardBlockBytes = 512 * 1024;

// Columns per forward block are rounded to this so blocks start on a vector
// and cache-line boundary.
constexpr int64_t kColumnAlign = 16;

// Grain for splitting `n` items over the pool: one contiguous block per
// thread, aligned to `align`.
inline int64_t block_per_thread(int64_t n, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(align,
                           ceil_div(ceil_div(n, threads), align) * align);
}

// at::parallel_for's workers start with default dispatch state, not the
// caller's. The tensors handed to our kernel may require grad, and the *_out
// calls below write into them: they must neither be recorded by autograd nor
// bump version counters. The latter matters under torch.inference_mode(),
// whose tensors refuse in-place updates on a thread outside inference mode
// ("Inplace update to inference tensor outside InferenceMode"), and a worker
// does not carry the caller's mode. Every ATen call on a worker runs under
// this guard (the calling op itself already runs below both keys).
struct BelowAutograd {
  c10::impl::ExcludeDispatchKeyGuard guard{
      c10::autograd_dispatch_keyset_with_ADInplaceOrView};
};

// out[0:n] = relu(in[0:n]), keeping NaN (like torch.relu):
// Vectorized::maximum propagates NaN. out may be in.
template <typename scalar_t>
void relu_row(const scalar_t* in, scalar_t* out, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::maximum(Vec::loadu(in + i), zero).store(out + i);
  }
  if (i < n) {
    at::vec::maximum(Vec::loadu(in + i, n - i), zero).store(out + i, n - i);
  }
}

template <typename scalar_t>
void relu_inplace(scalar_t* row, int64_t n) {
  relu_row(row, row, n);
}

// The forward epilogue of linear_relu and the ReLU layers of the MLP ops:
// called as epilogue(z_row, a_row, n) on each row of a block right after its
// GEMM, it writes relu(z_row) to a_row (the same row when in place). Other
// activations have their own epilogues (activation_epilogues.h).
template <typename scalar_t>
struct ReluRows {
  void operator()(const scalar_t* z, scalar_t* a, int64_t n) const {
    relu_row(z, a, n);
  }
};

// z[0:rows, 0:cols] (row stride ldz) = x_rows @ w_cols.T + bias_cols, then
// epilogue(z row, a row, cols) on each row, a (row stride lda) being the
// activation's output (a == z: in place). The block is first filled with the
// bias so that the GEMM accumulates onto it (beta = 1): the pre-activation is
// rounded once, as in torch's addmm.
template <typename scalar_t, typename Epilogue>
void forward_block(const at::Tensor& x_rows, const at::Tensor& w_cols,
                   const scalar_t* bias, at::Tensor z_block, scalar_t* a,
                   int64_t lda, const Epilogue& epilogue) {
  const int64_t rows = z_block.size(0), cols = z_block.size(1);
  scalar_t* z = z_block.data_ptr<scalar_t>();
  const int64_t ldz = z_block.stride(0);
  if (bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(bias, bias + cols, z + r * ldz);
    }
    at::addmm_out(z_block, z_block, x_rows, w_cols.t());
  } else {
    at::mm_out(z_block, x_rows, w_cols.t());
  }
  for (int64_t r = 0; r < rows; ++r) {
    epilogue(z + r * ldz, a + r * lda, cols);
  }
}

// Whether to split the GEMMs over threads ourselves (each thread's block then
// gets its epilogue while in cache) or to call one GEMM and let the library
// thread it. Measured on a 2-core EPYC at batch 64-1024, 512/784 -> 512: for
// float32/float64 MKL run per thread matches or beats its own threading, so
// the fusion is free; for bfloat16/float16 oneDNN's single-threaded GEMMs were
// 15-35% slower than one library-threaded GEMM, more than the saved passes.
template <typename scalar_t>
constexpr bool split_gemms_by_thread() {
  return !at::is_reduced_floating_point_v<scalar_t>;
}

// a = epilogue(z), row by row in parallel (z and a contiguous, same shape;
// a == z for an epilogue in place).
template <typename scalar_t, typename Epilogue>
void apply_rows(const at::Tensor& z, at::Tensor& a, const Epilogue& epilogue) {
  const int64_t N = z.size(1);
  const scalar_t* z_data = z.data_ptr<scalar_t>();
  scalar_t* a_data = a.data_ptr<scalar_t>();
  at::parallel_for(0, z.size(0), std::max<int64_t>(1, 16384 / N),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       epilogue(z_data + r * N, a_data + r * N, N);
                     }
                   });
}

// Library-threaded forward: one addmm into z (bias folded in, rounded once),
// then the epilogue over row blocks in parallel, into a (a == z: in place).
template <typename scalar_t, typename Epilogue>
void forward_whole(const at::Tensor& x2, const at::Tensor& w,
                   const at::Tensor& bias, at::Tensor& z, at::Tensor& a,
                   const Epilogue& epilogue) {
  if (bias.defined()) {
    at::addmm_out(z, bias, x2, w.t());
  } else {
    at::mm_out(z, x2, w.t());
  }
  apply_rows<scalar_t>(z, a, epilogue);
}

// z = x2 @ w.T + bias and a = act(z) by the epilogue (see forward_block),
// z and a contiguous (M x N), a == z for an activation computed in place.
template <typename scalar_t, typename Epilogue>
void linear_act_forward_impl(const at::Tensor& x2, const at::Tensor& w,
                             const at::Tensor& bias_t, at::Tensor& z,
                             at::Tensor& a, const Epilogue& epilogue) {
  if (!split_gemms_by_thread<scalar_t>()) {
    forward_whole<scalar_t>(x2, w, bias_t, z, a, epilogue);
    return;
  }
  const scalar_t* bias =
      bias_t.defined() ? bias_t.data_ptr<scalar_t>() : nullptr;
  scalar_t* a_data = a.data_ptr<scalar_t>();
  const int64_t M = x2.size(0), N = w.size(0);
  // Split over output columns: each thread reads only its slice of the
  // weight (which stays in its cache from one row block to the next) and
  // owns z[:, n0:n1]. Rows go in blocks so the block fits in L2.
  const int64_t col_grain = block_per_thread(N, kColumnAlign);
  const int64_t row_block = std::max<int64_t>(
      16, kForwardBlockBytes / (static_cast<int64_t>(sizeof(scalar_t)) *
                                std::min(N, col_grain)));
  at::parallel_for(0, N, col_grain, [&](int64_t n0, int64_t n1) {
    BelowAutograd below;
    const at::Tensor w_cols = w.narrow(0, n0, n1 - n0);
    for (int64_t m0 = 0; m0 < M; m0 += row_block) {
      const int64_t rows = std::min(row_block, M - m0);
      forward_block<scalar_t>(x2.narrow(0, m0, rows), w_cols,
                              bias == nullptr ? nullptr : bias + n0,
                              z.narrow(0, m0, rows).narrow(1, n0, n1 - n0),
                              a_data + m0 * N + n0, N, epilogue);
    }
  });
}

// out = relu(x2 @ w.T + bias), computed in place in out.
template <typename scalar_t>
void linear_relu_forward_impl(const at::Tensor& x2, const at::Tensor& w,
                              const at::Tensor& bias_t, at::Tensor& out) {
  linear_act_forward_impl<scalar_t>(x2, w, bias_t, out, out,
                                    ReluRows<scalar_t>{});
}

// Element arithmetic type: float for the 16-bit types (as torch accumulates),
// the type itself otherwise.
template <typename scalar_t>
using math_t = at::opmath_type<scalar_t>;

// Loads n <= Vectorized<math_t<T>>::size() elements of T as math_t.
template <typename T>
Vectorized<math_t<T>> load_math(const T* p, int64_t n) {
  using Vec = Vectorized<math_t<T>>;
  if constexpr (std::is_same_v<T, math_t<T>>) {
    return Vec::loadu(p, n);
  } else {
    __at_align__ T buf[Vec::size()];
    const T* src = p;
    if (n < Vec::size()) {
      std::fill(buf, buf + Vec::size(), T(0));
      std::copy(p, p + n, buf);
      src = buf;
    }
    Vec out;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::load_fp32_from_bf16(src, out);
    } else {
      at::vec::load_fp32_from_fp16(src, out);
    }
    return out;
  }
}

// Stores n <= Vectorized<math_t<T>>::size() elements of v as T.
template <typename T>
void store_math(const Vectorized<math_t<T>>& v, T* p, int64_t n) {
  if constexpr (std::is_same_v<T, math_t<T>>) {
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    // A full vector of floats is half a vector of 16-bit values: store those
    // 16 bytes directly (the partial store below goes through a memcpy, too
    // slow for a pass over every weight of a step).
    if (n == Vectorized<float>::size()) {
      const __m256 f = v;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       std::is_same_v<T, c10::BFloat16>
                           ? at::vec::cvtfp32_bf16(f)
                           : at::vec::cvtfp32_fp16(f));
      return;
    }
#endif
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::convert_float_bfloat16(v, v).store(p, n);
    } else {
      at::vec::convert_float_half(v, v).store(p, n);
    }
  }
}

// ReLU's backward on a vector of the incoming gradient g (in math_t) and the
// saved output y: threshold_backward's rule, zero where y <= 0 (NaN passes,
// 0 blocks). The pre-activation z gives the same mask (relu(z) <= 0 exactly
// where z <= 0, and NaN where z is). Other activations: activation_epilogues.h.
template <typename scalar_t>
struct ReluMask {
  using Vec = Vectorized<math_t<scalar_t>>;
  Vec operator()(const Vec& g, const Vec& y) const {
    return Vec::blendv(g, Vec(0), y <= Vec(0));
  }
};

// Rows per partial sum of the bias gradients (combine_grad_block).
constexpr int64_t kSumChunk = 128;

// g[:, c0:c1] = sum of the parts' columns c0:c1, passed through the
// activation's backward deriv(sum, saved) (ReLU's mask by default) with
// `saved` what the layer saved (its output y or pre-activation), with each
// column's sum added into bias_acc[c - c0] (when given). Parts are rows x ld
// row-major; g may be the first part. saved == nullptr: no activation (the
// sum passes as it is); g == nullptr: nothing stored (only the bias sums are
// wanted). Sums are in math_t, in row order within chunks of kSumChunk rows,
// then chunk by chunk (a two-level cascade, as PyTorch's sums: one running
// sum over thousands of rows loses digits), so results do not depend on the
// thread count or timing.
template <typename scalar_t, typename Deriv = ReluMask<scalar_t>>
void combine_grad_block(const std::vector<const scalar_t*>& parts,
                        const scalar_t* saved, scalar_t* g, int64_t rows,
                        int64_t ld, int64_t c0, int64_t c1,
                        math_t<scalar_t>* bias_acc,
                        const Deriv& deriv = Deriv()) {
  if (bias_acc != nullptr && rows > kSumChunk) {
    std::vector<math_t<scalar_t>> chunk(c1 - c0);
    std::vector<const scalar_t*> chunk_parts(parts.size());
    for (int64_t r0 = 0; r0 < rows; r0 += kSumChunk) {
      std::fill(chunk.begin(), chunk.end(), math_t<scalar_t>(0));
      for (size_t p = 0; p < parts.size(); ++p) {
        chunk_parts[p] = parts[p] + r0 * ld;
      }
      combine_grad_block<scalar_t>(
          chunk_parts, saved == nullptr ? nullptr : saved + r0 * ld,
          g == nullptr ? nullptr : g + r0 * ld, std::min(kSumChunk, rows - r0),
          ld, c0, c1, chunk.data(), deriv);
      for (int64_t c = 0; c < c1 - c0; ++c) bias_acc[c] += chunk[c];
    }
    return;
  }
  using Vec = Vectorized<math_t<scalar_t>>;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * ld;
    for (int64_t c = c0; c < c1; c += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), c1 - c);
      Vec sum = load_math(parts[0] + off + c, n);
      for (size_t p = 1; p < parts.size(); ++p) {
        sum = sum + load_math(parts[p] + off + c, n);
      }
      if (saved != nullptr) {
        sum = deriv(sum, load_math(saved + off + c, n));
      }
      if (g != nullptr) store_math(sum, g + off + c, n);
      if (bias_acc != nullptr) {
        (Vec::loadu(bias_acc + c - c0, n) + sum).store(bias_acc + c - c0, n);
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastmlp

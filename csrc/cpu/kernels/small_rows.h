// A linear layer over a few rows (1 to kSmallRows: serving batches), float:
// z[r, j] = b[j] + sum_k x[r, k] w[j, k] for the output features c0..c0+cols.
//
// At these batches a layer is a matrix-vector product: every weight is used
// by a few rows only, so the time is reading the weights. The GEMM libraries
// pack (copy) their operands per call, which here costs as much as the
// product (tutorial MLP, 2.7 MB of weights: 111 us at 8 rows through MKL's
// sgemm against 68 us for ONNX Runtime's whole call). This kernel reads each
// weight row once, in the row-major layout nn.Linear keeps, and uses it for
// every row of the batch: dot products of 4 weight rows with 2 input rows at
// a time (8 vector accumulators), the input rows staying in L1. Bias and
// activation are the caller's epilogue, as for the library GEMM it replaces.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace fastmlp {
namespace cpu {

// The most rows the kernel takes; more go to the GEMM libraries.
constexpr int64_t kSmallRows = 8;
// The fewest in_features it takes: below, each output's horizontal sum costs
// as much as its few vector steps, and MKL's small-matrix code is faster
// (32-64x4-16 at 4-8 rows: 1.2-1.5x; the tutorial's 784 and 512: 1.4-2x the
// other way; AMD EPYC Zen 4 class, 2 threads, alternating builds).
constexpr int64_t kSmallRowsMinK = 256;

namespace small_rows_detail {

using Vec = at::vec::Vectorized<float>;

// out[r][j] = dot(x row r, w row j) for R rows and 4 weight rows, k long.
template <int R>
inline void dot_tile(const float* x, int64_t ldx, const float* w, int64_t k,
                     float out[R][4]) {
  Vec acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = Vec(0.f);
  }
  int64_t i = 0;
  for (; i + Vec::size() <= k; i += Vec::size()) {
    Vec wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = Vec::loadu(w + j * k + i);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * ldx + i);
      for (int j = 0; j < 4; ++j)
        acc[r][j] = at::vec::fmadd(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) {
      float sum = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return a + b; }, acc[r][j]);
      for (int64_t t = i; t < k; ++t) sum += x[r * ldx + t] * w[j * k + t];
      out[r][j] = sum;
    }
  }
}

// out[r] = dot(x row r, w row) for R rows: the last (fewer than 4) weight rows.
template <int R>
inline void dot_one(const float* x, int64_t ldx, const float* w, int64_t k,
                    float out[R]) {
  for (int r = 0; r < R; ++r) {
    Vec acc(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= k; i += Vec::size()) {
      acc = at::vec::fmadd(Vec::loadu(x + r * ldx + i), Vec::loadu(w + i), acc);
    }
    float sum = at::vec::vec_reduce_all<float>(
        [](const Vec& a, const Vec& b) { return a + b; }, acc);
    for (; i < k; ++i) sum += x[r * ldx + i] * w[i];
    out[r] = sum;
  }
}

// z rows 0..R, columns j..j+4 (output features c0 + j ..): one weight tile.
template <int R>
inline void store_tile(const float* x, int64_t ldx, const float* w,
                       const float* b, int64_t k, float* z, int64_t ldz,
                       int64_t c0, int64_t j) {
  float out[R][4];
  dot_tile<R>(x, ldx, w + (c0 + j) * k, k, out);
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      z[r * ldz + j + q] = out[r][q] + (b ? b[c0 + j + q] : 0.f);
    }
  }
}

}  // namespace small_rows_detail

// z (rows x cols, row stride ldz) = x (rows x k, row stride ldx) @ w.T + b for
// the output features c0..c0+cols of w (n x k, row-major; b: n or null).
// rows <= kSmallRows. The bias is added to the finished dot product.
inline void small_rows_linear(const float* x, int64_t ldx, int64_t rows,
                              const float* w, const float* b, int64_t k,
                              float* z, int64_t ldz, int64_t c0, int64_t cols) {
  using small_rows_detail::dot_one;
  using small_rows_detail::store_tile;
  int64_t j = 0;
  // Weight tiles outside, rows inside: a tile (4 x k) stays in L1 while every
  // pair of rows uses it, so the weights are read from memory once.
  for (; j + 4 <= cols; j += 4) {
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      store_tile<2>(x + r * ldx, ldx, w, b, k, z + r * ldz, ldz, c0, j);
    }
    if (r < rows)
      store_tile<1>(x + r * ldx, ldx, w, b, k, z + r * ldz, ldz, c0, j);
  }
  for (; j < cols; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      float out[1];
      dot_one<1>(x + r * ldx, ldx, w + (c0 + j) * k, k, out);
      z[r * ldz + j] = out[0] + (b ? b[c0 + j] : 0.f);
    }
  }
}

}  // namespace cpu
}  // namespace fastmlp

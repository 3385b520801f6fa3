// A small cuBLASLt GEMM wrapper for fastmlp's CUDA ops (the `cublaslt`
// engine). Host code; compiled only in CUDA builds.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace fastmlp {
namespace cublaslt {

// Column-major D[m x n] (ld ldd) = op(A) @ op(B), A and B column-major as
// stored (lda, ldb), with an optional bias epilogue (bias of length m), on
// the current stream, in the dtype of `like` (float32 uses TF32 when torch
// allows it). Returns false when cuBLASLt has no algorithm for it (the
// caller falls back).
bool matmul(const at::Tensor& like, bool transa, bool transb, int64_t m,
            int64_t n, int64_t k, const void* A, int64_t lda, const void* B,
            int64_t ldb, void* D, int64_t ldd, const void* bias);

// Algorithms cached per shape and layout, least recently used first out.
constexpr size_t kAlgoCacheCapacity = 512;
size_t algo_cache_size();

}  // namespace cublaslt
}  // namespace fastmlp

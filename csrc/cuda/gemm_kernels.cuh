// Launchers for fastmlp's own CUDA kernels (implemented in gemm_kernels.cu).
//
// This header is deliberately free of torch headers: gemm_kernels.cu is the
// only file nvcc compiles, and the torch glue that includes this header
// (linear_relu_cuda.cpp) is host code for the host compiler. Every launcher
// checks cudaGetLastError() after each of its launches and returns the first
// error; the caller turns it into a Python error with C10_CUDA_CHECK.
//
// Conventions: all matrices are row-major and contiguous; pointers are raw
// device pointers to elements of `dtype`; "mask(g, y)" is PyTorch's ReLU
// backward, threshold_backward(g, y, 0) = (y <= 0 ? 0 : g), so a NaN in y
// lets the gradient through.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastmlp {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How float32 products are computed: on tensor cores in TF32 (operands
// rounded to 10 mantissa bits, fp32 accumulation) or exactly with FFMA.
// bfloat16/float16 always use tensor cores with fp32 accumulation.
enum class F32Math : int { kTF32 = 0, kExact = 1 };

// y[M,N] = relu(x[M,K] @ w[N,K]^T + b[N]); b may be null. ReLU keeps NaN.
cudaError_t launch_forward(DType dtype, F32Math f32, const void* x,
                           const void* w, const void* b, void* y, int M, int N,
                           int K, int num_sms, cudaStream_t stream);

// gx[M,K] = mask(g, y)[M,N] @ w[N,K].
cudaError_t launch_dgrad(DType dtype, F32Math f32, const void* g, const void* y,
                         const void* w, void* gx, int M, int N, int K,
                         int num_sms, cudaStream_t stream);

// Split-K factor the weight-gradient launcher will use, and the float32
// workspace (in floats) it needs for it (0 when splits == 1).
int wgrad_splits(int M, int N, int K, int num_sms);
size_t wgrad_workspace_floats(int M, int N, int K, int splits);

// gw[N,K] = mask(g, y)[M,N]^T @ x[M,K] and, when gb is not null,
// gb[N] = sum over rows of mask(g, y), computed by the same CTAs from the
// same loaded tiles. Deterministic: with splits > 1 the partial sums go to
// `workspace` and are added in a fixed order by a second kernel.
cudaError_t launch_wgrad(DType dtype, F32Math f32, const void* g, const void* y,
                         const void* x, void* gw, void* gb, int M, int N, int K,
                         int splits, float* workspace, cudaStream_t stream);

// One pass over g and y: gm = mask(g, y) when gm is not null, and
// gb[N] = column sums of mask(g, y) (fp32 accumulation) when gb is not null.
// Deterministic two-level reduction; `partial` needs
// colsum_chunks(M) * N floats when colsum_chunks(M) > 1 (else may be null).
int colsum_chunks(int M);
cudaError_t launch_mask_colsum(DType dtype, const void* g, const void* y,
                               void* gm, void* gb, float* partial, int M, int N,
                               cudaStream_t stream);

// In place y = (y > 0 || isnan(y)) ? y : 0 over n contiguous elements.
cudaError_t launch_relu_inplace(DType dtype, void* y, int64_t n,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmlp

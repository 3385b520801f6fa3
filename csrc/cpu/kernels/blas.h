// Direct calls of the GEMMs inside torch, for the small GEMMs of the
// row-blocked path (paths/rowblock.h) and the per-thread GEMMs of the
// layer-by-layer blocks (mm_on_this_thread: the layered path, mlp_sgd_step):
// float by oneDNN's batch-reduce GEMM micro-kernel (brgemm, in cache blocks)
// where this torch has it, else MKL's sgemm (see brgemm_f32_available for
// why and when); double by MKL's dgemm; bfloat16 by MKL's
// cblas_gemm_bf16bf16f32.
//
// Why not at::mm_out: a row block of a narrow network is a GEMM of a few
// hundred rows by 32-256 columns, 10-50 us of arithmetic, and an ATen call
// around it (dispatcher, tensor views, checks) costs several microseconds.
// The BLAS entry points cost well under one.
//
// bfloat16 goes through MKL's cblas_gemm_bf16bf16f32 (float accumulation,
// float output): native on CPUs with AVX512-BF16 or AMX, emulated (correct,
// slower) elsewhere.
//
// MKL's symbols are declared weak: torch's x86-64 Linux builds export MKL's
// Fortran BLAS from libtorch_cpu, but a torch built without MKL does not, and
// then blas_available() is false and the path rule never picks the path
// that needs it (forcing that path raises). The extension still loads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "cpu/kernels/scratch.h"

extern "C" {
// Column-major BLAS (Fortran calling convention, LP64 integers as MKL's
// mkl_intel_lp64 interface that torch links).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's bfloat16 GEMM with float accumulation and output, row- or
// column-major (CBLAS enums: 101 row-major; 111 no transpose, 112
// transpose); MKL_BF16 is a 16-bit unsigned integer.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n,
                            int k, float alpha, const uint16_t* a, int lda,
                            const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
// MKL's C API (mkl_service.h spells it mkl_set_num_threads_local, a macro;
// the lower-case symbol is the Fortran one, taking a pointer): the number of
// threads its calls from this thread use (0: the global setting); returns
// the previous value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace fastmlp {
namespace cpu {

// Whether the BLAS calls below exist for scalar_t in this process.
template <typename scalar_t>
bool blas_available() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return &sgemm_ != nullptr;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return &dgemm_ != nullptr;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return &cblas_gemm_bf16bf16f32 != nullptr;
  } else {
    return false;
  }
}

// Every extent of a BLAS call must fit its 32-bit integers.
inline bool fits_blas_int(int64_t n) {
  return n <= std::numeric_limits<int>::max();
}

template <typename scalar_t>
void colmajor_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k,
                   const scalar_t* a, int64_t lda, const scalar_t* b,
                   int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n),
            ik = static_cast<int>(k), ilda = static_cast<int>(lda),
            ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  const scalar_t one(1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    static_assert(std::is_same_v<scalar_t, double>, "float or double");
    dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// The three products of a layer, on row-major matrices (ld = row stride);
// beta = 0 overwrites C, beta = 1 accumulates into it. Row-major C = A op B is
// column-major C.T = B.T op A.T, hence the swapped operands.

// C (m x n) = A (m x k) @ B.T + beta C, B stored n x k: a layer's forward
// (B its weight).
template <typename scalar_t>
void gemm_nt(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
             const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
             int64_t ldc) {
  colmajor_gemm<scalar_t>('T', 'N', n, m, k, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = A (m x k) @ B (k x n) + beta C: the gradient of a layer's input
// (B its weight).
template <typename scalar_t>
void gemm_nn(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
             const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
             int64_t ldc) {
  colmajor_gemm<scalar_t>('N', 'N', n, m, k, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = A.T @ B + beta C, A stored k x m and B k x n: the gradient of a
// layer's weight (A the output gradient, B the input, k the rows).
template <typename scalar_t>
void gemm_tn(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
             const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
             int64_t ldc) {
  colmajor_gemm<scalar_t>('N', 'T', n, m, k, b, ldb, a, lda, beta, c, ldc);
}

// The same three products for bfloat16 operands, accumulated and returned in
// float (C is float; beta as above).
inline void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n,
                      int64_t k, const c10::BFloat16* a, int64_t lda,
                      const c10::BFloat16* b, int64_t ldb, float beta, float* c,
                      int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(
      kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
      static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
      reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
      reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
      static_cast<int>(ldc));
}

inline void gemm_nt(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                    int64_t lda, const c10::BFloat16* b, int64_t ldb,
                    float beta, float* c, int64_t ldc) {
  gemm_bf16(false, true, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

inline void gemm_nn(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                    int64_t lda, const c10::BFloat16* b, int64_t ldb,
                    float beta, float* c, int64_t ldc) {
  gemm_bf16(false, false, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

inline void gemm_tn(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                    int64_t lda, const c10::BFloat16* b, int64_t ldb,
                    float beta, float* c, int64_t ldc) {
  gemm_bf16(true, false, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

// float GEMMs go to oneDNN's batch-reduce GEMM micro-kernel where this torch
// has it (at::native::cpublas::brgemm, the one inductor's CPU GEMM template
// calls), MKL's sgemm elsewhere. Why: on the AMD EPYC (Zen 5 class) this was
// measured on, MKL runs its AVX2 code (it picks AVX-512 code on Intel CPUs
// only) and oneDNN its AVX-512 code: single-threaded, a 384x64x64 block took
// 89 GFLOP/s in sgemm and 211 in brgemm (128x256x256: 98 and 232). For a
// GEMV (one row: batch 1) sgemm was the faster (39 vs 29 GFLOP/s).
// brgemm takes B as k x n: the forward passes W.T made once per call
// (paths/rowblock.h: gemm_nt stays sgemm), the weight gradient transposes its
// block of the output gradient into per-thread scratch (O(m k) work for an
// O(m n k) product). brgemm is a micro-kernel: products larger than the
// caches are cut into blocks (brgemm_nn).
inline bool brgemm_f32_available() {
  static const bool ok = [] {
    // One small product, checked: absent, failing or wrong means MKL.
    try {
      constexpr int64_t n = 8;
      std::vector<float> a(n * n), b(n * n), c(n * n, 1.0f);
      for (int64_t i = 0; i < n * n; ++i) {
        a[i] = static_cast<float>(i % 5);
        b[i] = static_cast<float>(i % 3);
      }
      at::native::cpublas::brgemm(n, n, n, n, n, n, /*add_C=*/true, a.data(),
                                  b.data(), c.data(), /*is_vnni=*/false);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          float want = 1.0f;
          for (int64_t t = 0; t < n; ++t) want += a[i * n + t] * b[t * n + j];
          if (c[i * n + j] != want) return false;
        }
      }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// Rows below which a float product stays in sgemm (a GEMV-like product reads
// each weight once either way, and a transposed copy would read it twice).
constexpr int64_t kBrgemmMinRows = 16;

// dst (cols x rows, row stride rows) = scale * src (rows x cols, row stride
// lds).T.
inline void transpose_into(float* dst, const float* src, int64_t rows,
                           int64_t cols, int64_t lds, float scale = 1.0f) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * rows + r] = scale * src[r * lds + c];
    }
  }
}

// C (m x n) = A (m x k) @ B (k x n) + beta C for beta 0 or 1, by one
// brgemm call: for products that fit the caches (brgemm_nn blocks others).
inline void brgemm_block(int64_t m, int64_t n, int64_t k, const float* a,
                         int64_t lda, const float* b, int64_t ldb, float beta,
                         float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(beta == 0.0f || beta == 1.0f);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta == 1.0f, a, b, c,
                              /*is_vnni=*/false);
}

// The size in bytes of this CPU's data (or unified) cache of `level`, read
// once from sysfs; `fallback` where it cannot be read (not Linux).
inline int64_t cache_bytes(int level, int64_t fallback) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"),
        size_file(dir + "/size");
    int found_level = 0;
    std::string type, size;
    if (!(level_file >> found_level) || !(type_file >> type) ||
        !(size_file >> size)) {
      break;
    }
    if (found_level != level || type == "Instruction") continue;
    char* end = nullptr;
    const long long value = std::strtoll(size.c_str(), &end, 10);
    const int64_t unit = *end == 'K' ? 1024 : *end == 'M' ? 1024 * 1024 : 1;
    if (value > 0) return value * unit;
  }
  return fallback;
}

// Cache blocks of a float product C (m x n) += A (m x k) @ B (k x n) on one
// thread (the GotoBLAS scheme inductor's CPU GEMM template also uses around
// brgemm): a kc x nc panel of B, packed contiguously, fills a quarter of the
// L2 cache and is reused by every mc-row block of A (another quarter).
// Measured on one Zen 4 core (L2 1 MiB: blocks 256 x 256 x 256), single
// thread, against torch.mm: 512x2048x2048 (m x n x k) 106 vs 95 GFLOP/s
// (unblocked brgemm: 25); under ONEDNN_MAX_CPU_ISA=AVX2 87 vs 88 (unblocked:
// 13); wider panels (nc 512) lost 10-30% under AVX2.
// Called on a whole layer in one piece, brgemm streamed B's columns from
// memory at a power-of-two row stride: 512x2048x2048 ran 6 GFLOP/s against
// torch.mm's 37 on an AVX2 Zen 1 core.
struct GemmBlocks {
  int64_t mc, nc, kc;
};

inline const GemmBlocks& gemm_blocks() {
  static const GemmBlocks blocks = [] {
    const int64_t l2 =
        std::clamp<int64_t>(cache_bytes(2, int64_t{512} << 10),
                            int64_t{256} << 10, int64_t{4} << 20);
    constexpr int64_t kc = 256;
    const int64_t row = kc * static_cast<int64_t>(sizeof(float));
    const int64_t quarter = l2 / 4 / row / 16 * 16;
    return GemmBlocks{std::clamp<int64_t>(quarter, 16, 512),
                      std::clamp<int64_t>(quarter / 64 * 64, 64, 1024), kc};
  }();
  return blocks;
}

// `total` cut into equal pieces of at most `most` (a multiple of `align`
// where it can be): no small tail block, and few distinct brgemm shapes.
inline int64_t even_block(int64_t total, int64_t most, int64_t align) {
  const int64_t pieces = (total + most - 1) / most;
  const int64_t size = (total + pieces - 1) / pieces;
  return std::min(most, (size + align - 1) / align * align);
}

// C (m x n) = A (m x k) @ B (k x n) + beta C for beta 0 or 1, by brgemm on
// cache-sized blocks (gemm_blocks); in one call where the product is one
// block. Sums over k run block by block, in a fixed order.
inline void brgemm_nn(int64_t m, int64_t n, int64_t k, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  const GemmBlocks& most = gemm_blocks();
  if (m <= most.mc && n <= most.nc && k <= most.kc) {
    brgemm_block(m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t nc = even_block(n, most.nc, 16);
  const int64_t kc = even_block(k, most.kc, 16);
  const int64_t mc = even_block(m, most.mc, 16);
  // Packed even for one row block: the AVX2 kernels ran 30-60% slower on
  // panels read at the matrix's row stride (on AVX-512, packing cost up to
  // 20% where m was 24 rows, and nothing from 256).
  const ScratchLease<float> panel(thread_scratch<float>(kPanelSlot), kc * nc);
  float* p = panel.data();
  for (int64_t n0 = 0; n0 < n; n0 += nc) {
    const int64_t nb = std::min(nc, n - n0);
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
      const int64_t kb = std::min(kc, k - k0);
      for (int64_t r = 0; r < kb; ++r) {
        std::copy_n(b + (k0 + r) * ldb + n0, nb, p + r * nb);
      }
      const float block_beta = k0 == 0 ? beta : 1.0f;
      for (int64_t m0 = 0; m0 < m; m0 += mc) {
        brgemm_block(std::min(mc, m - m0), nb, kb, a + m0 * lda + k0, lda, p,
                     nb, block_beta, c + m0 * ldc + n0, ldc);
      }
    }
  }
}

inline void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) {
  if (m >= kBrgemmMinRows && brgemm_f32_available()) {
    brgemm_nn(m, n, k, a, lda, b, ldb, beta, c, ldc);
  } else {
    colmajor_gemm<float>('N', 'N', n, m, k, b, ldb, a, lda, beta, c, ldc);
  }
}

inline void gemm_tn(int64_t m, int64_t n, int64_t k, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) {
  if (k >= kBrgemmMinRows && brgemm_f32_available()) {
    const ScratchLease<float> at(thread_scratch<float>(kTransposeSlot), k * m);
    transpose_into(at.data(), a, k, m, lda);
    brgemm_nn(m, n, k, at.data(), k, b, ldb, beta, c, ldc);
  } else {
    colmajor_gemm<float>('N', 'T', n, m, k, b, ldb, a, lda, beta, c, ldc);
  }
}

// out = a @ b for 2-D views with unit column stride (a may instead be a
// transposed view, unit row stride: a weight gradient's g.T), on this thread:
// the float GEMMs above (brgemm where it runs), at::mm_out for other dtypes,
// layouts the BLAS cannot take, or a torch without them. Call it where the
// work is already split over threads (inside at::parallel_for).
template <typename scalar_t>
void mm_on_this_thread(at::Tensor& out, const at::Tensor& a,
                       const at::Tensor& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    const bool plain_b =
        b.stride(1) == 1 && b.stride(0) >= std::max<int64_t>(1, n);
    const bool plain_out =
        out.stride(1) == 1 && out.stride(0) >= std::max<int64_t>(1, n);
    if (blas_available<float>() && plain_b && plain_out && m > 0 && n > 0 &&
        k > 0 &&
        fits_blas_int(std::max(
            {m, n, k, a.stride(0), a.stride(1), b.stride(0), out.stride(0)}))) {
      if (a.stride(1) == 1 && a.stride(0) >= k) {
        gemm_nn(m, n, k, a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(),
                b.stride(0), 0.0f, out.data_ptr<float>(), out.stride(0));
        return;
      }
      if (a.stride(0) == 1 && a.stride(1) >= m) {
        gemm_tn(m, n, k, a.data_ptr<float>(), a.stride(1), b.data_ptr<float>(),
                b.stride(0), 0.0f, out.data_ptr<float>(), out.stride(0));
        return;
      }
    }
  }
  at::mm_out(out, a, b);
}

// out = beta * out + alpha * (a @ b), a a transposed view (unit row stride:
// a weight gradient's g.T) and b, out with unit column stride, on this
// thread: brgemm for float where it runs (alpha folded into the transposed
// copy of a, out scaled first), Tensor::addmm_ otherwise. An SGD update of
// weight rows in one product: W = (1 - lr wd) W - lr g.T h.
template <typename scalar_t>
void addmm_on_this_thread(at::Tensor& out, const at::Tensor& a,
                          const at::Tensor& b, double beta, double alpha) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    if (k >= kBrgemmMinRows && m > 0 && n > 0 && brgemm_f32_available() &&
        a.stride(0) == 1 && a.stride(1) >= m && b.stride(1) == 1 &&
        b.stride(0) >= n && out.stride(1) == 1 && out.stride(0) >= n) {
      float* o = out.data_ptr<float>();
      const int64_t ldo = out.stride(0);
      if (beta != 1.0) {
        // Weight decay without momentum: W *= 1 - lr wd before the product
        // adds onto it. The row stride is read once: read per element (a
        // call the compiler cannot hoist) the pass ran scalar, and FusedSGD's
        // tutorial step with weight decay took 2.17 ms against 1.23 without
        // (Zen 4, 2 threads); now 1.36-1.42 against 1.25-1.40.
        const auto fb = static_cast<float>(beta);
        for (int64_t r = 0; r < m; ++r) {
          float* row = o + r * ldo;
          for (int64_t c = 0; c < n; ++c) row[c] *= fb;
        }
      }
      // a is stored k x m (row stride a.stride(1)): its transpose, scaled.
      const ScratchLease<float> at(thread_scratch<float>(kTransposeSlot),
                                   k * m);
      transpose_into(at.data(), a.data_ptr<float>(), k, m, a.stride(1),
                     static_cast<float>(alpha));
      brgemm_nn(m, n, k, at.data(), k, b.data_ptr<float>(), b.stride(0), 1.0f,
                o, ldo);
      return;
    }
  }
  out.addmm_(a, b, beta, alpha);
}

// While alive, the BLAS calls of this thread run on this thread only: the
// row-blocked path threads the work itself, and a call made outside a parallel
// region (one row block) must not wake the library's pool for a tiny GEMM.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas()
      : previous_(&MKL_Set_Num_Threads_Local != nullptr
                      ? MKL_Set_Num_Threads_Local(1)
                      : 0) {}
  ~SingleThreadedBlas() {
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      MKL_Set_Num_Threads_Local(previous_);
    }
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

}  // namespace cpu
}  // namespace fastmlp

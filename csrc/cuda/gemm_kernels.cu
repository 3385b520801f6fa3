// fastmlp's own CUDA kernels: a tiled tensor-core GEMM with the Linear+ReLU
// prologues/epilogues fused in, plus two small elementwise kernels.
//
// One GEMM template serves the three products of a Linear+ReLU layer:
//
//   forward  y [M,N] = relu(x[M,K] @ W[N,K]^T + b)  A = x  (K), B = W (K)
//   dgrad    gx[M,K] = g'[M,N] @ W[N,K]              A = g' (K), B = W (R)
//   wgrad    gW[N,K] = g'^T @ x,  gb = colsum(g')    A = g' (R), B = x (R)
//
// where g' = mask(g, y) = (y <= 0 ? 0 : g) is applied while the tile of g is
// moved from registers to shared memory, so g' never exists in device memory.
// "K" (K-major) means the reduction index is contiguous in global memory,
// "R" (R-major) that the output-row index is. Whatever the global layout,
// shared memory holds every operand tile as [row][k] (k contiguous, rows
// padded), so the fragment loads below are the same for all three products.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8"),
// with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   m16n8k16 (bf16/f16, 2 elements per 32-bit register, lower half = lower k):
//     A: a0 (g,   2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//     B: b0 (k = 2t..2t+1, n = g)   b1 (k = 2t+8.., n = g)
//   m16n8k8 (tf32, one element per register):
//     A: a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//     B: b0 (k = t, n = g)   b1 (k = t+4, n = g)
//   C/D (f32, both shapes): c0 (g, 2t) c1 (g, 2t+1) c2 (g+8, 2t) c3 (g+8, 2t+1)
// The exact-fp32 path keeps the same C layout and computes it with FFMA, so
// the epilogue is shared by all three math modes.
//
// Pipelining is the simple register-prefetch kind: the global loads of tile
// t+1 are issued before the MMAs of tile t and land in shared memory after
// them. Shared memory stays under the 48 KB static limit (no opt-in needed).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common_math.h"
#include "cuda/gemm_kernels.cuh"

namespace fastmlp {
namespace cuda {
namespace {

#define FASTMLP_RETURN_IF_LAUNCH_ERROR()   \
  do {                                     \
    cudaError_t err_ = cudaGetLastError(); \
    if (err_ != cudaSuccess) return err_;  \
  } while (0)

// ---------------------------------------------------------------------------
// Element types. Kernels move raw bits (uint16_t for bf16/f16, uint32_t for
// f32) and convert to float only where arithmetic happens.

struct BF16 {
  using Bits = uint16_t;
  static constexpr int kBytes = 2;
  __device__ static float to_float(uint32_t b) {
    return __uint_as_float(b << 16);
  }
  __device__ static uint32_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
struct F16 {
  using Bits = uint16_t;
  static constexpr int kBytes = 2;
  __device__ static float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ static uint32_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
struct F32 {
  using Bits = uint32_t;
  static constexpr int kBytes = 4;
  __device__ static float to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ static uint32_t from_float(float v) { return __float_as_uint(v); }
};

enum class MathKind { kMMA16, kTF32, kFFMA };

// torch.relu semantics: NaN passes, everything <= 0 (and -0) becomes +0.
__device__ __forceinline__ float relu_keep_nan(float v) {
  return (v > 0.f || v != v) ? v : 0.f;
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// A chunk is 16 bytes of consecutive elements in global memory: 8 16-bit or
// 4 32-bit ones, kept as four 32-bit words.
template <int kBytes>
struct Chunk {
  static constexpr int V = 16 / kBytes;
  uint32_t w[4];
  __device__ __forceinline__ uint32_t get(int e) const {
    if constexpr (kBytes == 2) {
      return (w[e >> 1] >> (16 * (e & 1))) & 0xffffu;
    } else {
      return w[e];
    }
  }
  __device__ __forceinline__ void zero(int e) {
    if constexpr (kBytes == 2) {
      w[e >> 1] &= ~(0xffffu << (16 * (e & 1)));
    } else {
      w[e] = 0u;
    }
  }
};

// Loads `valid` (0..V) elements starting at p; the rest are zero. The 16-byte
// load is used only when the caller proved p is 16-byte aligned (vec).
template <int kBytes>
__device__ __forceinline__ void load_chunk(Chunk<kBytes>& c, const void* p,
                                           int valid, bool vec) {
  constexpr int V = 16 / kBytes;
  if (vec && valid == V) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    c.w[0] = q.x;
    c.w[1] = q.y;
    c.w[2] = q.z;
    c.w[3] = q.w;
    return;
  }
  c.w[0] = c.w[1] = c.w[2] = c.w[3] = 0u;
  if constexpr (kBytes == 2) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < valid) c.w[e >> 1] |= uint32_t(s[e]) << (16 * (e & 1));
    }
  } else {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < valid) c.w[e] = s[e];
    }
  }
}

// ---------------------------------------------------------------------------
// Tile configuration.

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 32;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;  // mma tiles per warp
  static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile");
};
using BigCfg = TileCfg<128, 128, 2, 4>;  // 256 threads, 64x32 per warp
using SmallCfg = TileCfg<64, 64, 2, 2>;  // 128 threads, 32x32 per warp

// Moves an R x BK operand tile from global memory to shared memory [R][P].
//   KMAJOR:  element (r, k) at base[r * ld + k]; a chunk runs along k.
//   !KMAJOR: element (r, k) at base[k * ld + r]; a chunk runs along r.
// With MASK, a second tile (y, same layout) zeroes the elements where
// y <= 0. With BSUM (R-major only) each thread also accumulates the column
// sums of the rows it owns: because THREADS is a multiple of the chunks per
// k-line, a thread always owns the same V rows r.
template <class Elt, MathKind MK, int R, int BK, int THREADS, bool KMAJOR,
          bool MASK>
struct TileLoader {
  static constexpr int kBytes = Elt::kBytes;
  static constexpr int V = 16 / kBytes;
  static constexpr int CPL = KMAJOR ? BK / V : R / V;  // chunks per line
  static constexpr int CHUNKS = R * BK / V;
  static constexpr int PER_THREAD = CHUNKS / THREADS;
  static_assert(CHUNKS % THREADS == 0, "tile not divisible among threads");
  static_assert(KMAJOR || THREADS % CPL == 0, "bsum ownership");
  // Shared-memory pitch in elements. K-major tiles are written with 16-byte
  // stores, so rows stay 16-byte aligned, and +16 bytes makes the fragment
  // loads (8 rows x 4 words per warp) conflict-free. R-major tiles are written
  // element by element (a transpose) and padded by one 32-bit word.
  static constexpr int P = KMAJOR ? BK + V : BK + 4 / kBytes;
  using SBits = typename Elt::Bits;
  static constexpr int SMEM_BYTES = R * P * kBytes;

  Chunk<kBytes> c[PER_THREAD];
  Chunk<kBytes> m[MASK ? PER_THREAD : 1];

  __device__ __forceinline__ void load(const void* base, const void* mbase,
                                       int64_t ld, int row0, int rows, int k0,
                                       int kend, bool vec) {
    const char* b = static_cast<const char*>(base);
    const char* mb = static_cast<const char*>(mbase);
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = threadIdx.x + j * THREADS;
      const int line = i / CPL;
      const int ci = i % CPL;
      int valid;
      int64_t off;
      if constexpr (KMAJOR) {
        const int r = row0 + line;
        const int k = k0 + ci * V;
        valid = (r < rows) ? min(V, kend - k) : 0;
        off = static_cast<int64_t>(r) * ld + k;
      } else {
        const int k = k0 + line;
        const int r = row0 + ci * V;
        valid = (k < kend) ? min(V, rows - r) : 0;
        off = static_cast<int64_t>(k) * ld + r;
      }
      if (valid < 0) valid = 0;
      // Out-of-range addresses are never dereferenced (valid == 0).
      load_chunk<kBytes>(c[j], b + off * kBytes, valid, vec);
      if constexpr (MASK)
        load_chunk<kBytes>(m[j], mb + off * kBytes, valid, vec);
    }
  }

  // Applies the ReLU mask, accumulates bias sums, converts, stores.
  template <bool BSUM>
  __device__ __forceinline__ void store(SBits* s, float (&bsum)[V],
                                        bool do_bsum) {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = threadIdx.x + j * THREADS;
      const int line = i / CPL;
      const int ci = i % CPL;
      if constexpr (MASK) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (Elt::to_float(m[j].get(e)) <= 0.f) c[j].zero(e);
        }
      }
      if constexpr (BSUM) {
        if (do_bsum) {
#pragma unroll
          for (int e = 0; e < V; ++e) bsum[e] += Elt::to_float(c[j].get(e));
        }
      }
      if constexpr (MK == MathKind::kTF32) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          c[j].w[e] = to_tf32(__uint_as_float(c[j].w[e]));
      }
      if constexpr (KMAJOR) {
        *reinterpret_cast<uint4*>(s + line * P + ci * V) =
            make_uint4(c[j].w[0], c[j].w[1], c[j].w[2], c[j].w[3]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          s[(ci * V + e) * P + line] = static_cast<SBits>(c[j].get(e));
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------
// The GEMM.

enum Epilogue : int {
  kEpiStore = 0,     // C (T) = acc
  kEpiBiasRelu = 1,  // C (T) = relu(acc + bias)
  kEpiPartial = 2,   // C (float) [blockIdx.z] = acc   (split-K partials)
};

struct GemmParams {
  const void* A;
  const void* Amask;  // y, same layout as A, when the A tile is masked
  int64_t lda;
  const void* B;
  int64_t ldb;
  void* C;           // [M][N] of T, or [splits][M][N] float for kEpiPartial
  const void* bias;  // kEpiBiasRelu: [N] of T or null
  void* bsum;        // BSUM: [M] of T (splits == 1) or [splits][M] float
  int M, N, K;
  int k_per_split;  // multiple of BK
  bool a_vec, b_vec, c_pair;
  bool want_bsum;
};

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The three math paths of one BK-deep step of the block GEMM: each warp
// multiplies its MI x NI fragments of the shared-memory tiles sA [BM][LA::P]
// and sB [BN][LB::P] into acc, with (g, t) the lane's mma fragment
// coordinates and (wm, wn) the warp's position in the block tile.

// bf16/fp16 tensor cores; fragment registers hold element pairs (k, k+1).
template <class Elt, class Cfg, class LA, class LB>
__device__ __forceinline__ void mma_step_16bit(
    float (&acc)[Cfg::MI][Cfg::NI][4], const void* sA, const void* sB, int wm,
    int wn, int g, int t) {
  constexpr int BK = Cfg::BK, MI = Cfg::MI, NI = Cfg::NI;
  const uint16_t* a16 = static_cast<const uint16_t*>(sA);
  const uint16_t* b16 = static_cast<const uint16_t*>(sB);
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    uint32_t af[MI][4], bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int r = wm * Cfg::WTM + mi * 16 + g;
      const uint16_t* p0 = a16 + r * LA::P + kk + 2 * t;
      const uint16_t* p1 = p0 + 8 * LA::P;
      af[mi][0] = *reinterpret_cast<const uint32_t*>(p0);
      af[mi][1] = *reinterpret_cast<const uint32_t*>(p1);
      af[mi][2] = *reinterpret_cast<const uint32_t*>(p0 + 8);
      af[mi][3] = *reinterpret_cast<const uint32_t*>(p1 + 8);
    }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int n = wn * Cfg::WTN + ni * 8 + g;
      const uint16_t* q = b16 + n * LB::P + kk + 2 * t;
      bf[ni][0] = *reinterpret_cast<const uint32_t*>(q);
      bf[ni][1] = *reinterpret_cast<const uint32_t*>(q + 8);
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        if constexpr (std::is_same<Elt, BF16>::value) {
          mma_bf16(acc[mi][ni], af[mi], bf[ni]);
        } else {
          mma_f16(acc[mi][ni], af[mi], bf[ni]);
        }
      }
  }
}

// TF32 tensor cores on float32 tiles already rounded to TF32 by the loaders.
template <class Cfg, class LA, class LB>
__device__ __forceinline__ void mma_step_tf32(float (&acc)[Cfg::MI][Cfg::NI][4],
                                              const void* sA, const void* sB,
                                              int wm, int wn, int g, int t) {
  constexpr int BK = Cfg::BK, MI = Cfg::MI, NI = Cfg::NI;
  const uint32_t* a32 = static_cast<const uint32_t*>(sA);
  const uint32_t* b32 = static_cast<const uint32_t*>(sB);
#pragma unroll
  for (int kk = 0; kk < BK; kk += 8) {
    uint32_t af[MI][4], bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int r = wm * Cfg::WTM + mi * 16 + g;
      const uint32_t* p0 = a32 + r * LA::P + kk + t;
      const uint32_t* p1 = p0 + 8 * LA::P;
      af[mi][0] = p0[0];
      af[mi][1] = p1[0];
      af[mi][2] = p0[4];
      af[mi][3] = p1[4];
    }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int n = wn * Cfg::WTN + ni * 8 + g;
      const uint32_t* q = b32 + n * LB::P + kk + t;
      bf[ni][0] = q[0];
      bf[ni][1] = q[4];
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma_tf32(acc[mi][ni], af[mi], bf[ni]);
  }
}

// Exact fp32 with FFMA: same accumulator ownership as the mma C fragment.
template <class Cfg, class LA, class LB>
__device__ __forceinline__ void ffma_step(float (&acc)[Cfg::MI][Cfg::NI][4],
                                          const void* sA, const void* sB,
                                          int wm, int wn, int g, int t) {
  constexpr int BK = Cfg::BK, MI = Cfg::MI, NI = Cfg::NI;
  const float* a32 = static_cast<const float*>(sA);
  const float* b32 = static_cast<const float*>(sB);
#pragma unroll 4
  for (int k = 0; k < BK; ++k) {
    float af[MI][2], bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int r = wm * Cfg::WTM + mi * 16 + g;
      af[mi][0] = a32[r * LA::P + k];
      af[mi][1] = a32[(r + 8) * LA::P + k];
    }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int n = wn * Cfg::WTN + ni * 8 + 2 * t;
      bf[ni][0] = b32[n * LB::P + k];
      bf[ni][1] = b32[(n + 1) * LB::P + k];
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        acc[mi][ni][0] = fmaf(af[mi][0], bf[ni][0], acc[mi][ni][0]);
        acc[mi][ni][1] = fmaf(af[mi][0], bf[ni][1], acc[mi][ni][1]);
        acc[mi][ni][2] = fmaf(af[mi][1], bf[ni][0], acc[mi][ni][2]);
        acc[mi][ni][3] = fmaf(af[mi][1], bf[ni][1], acc[mi][ni][3]);
      }
  }
}

// The epilogue: each thread writes its accumulators, as float32 partial sums
// of split z (kEpiPartial), or in the element type after the optional bias
// and ReLU (kEpiBiasRelu) or as they are (kEpiPlain).
template <class Elt, class Cfg, int EPI>
__device__ __forceinline__ void store_tile(
    const float (&acc)[Cfg::MI][Cfg::NI][4], const GemmParams& p, int m0,
    int n0, int wm, int wn, int g, int t) {
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  using SBits = typename Elt::Bits;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * Cfg::WTM + mi * 16 + g + 8 * h;
      if (row >= p.M) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * Cfg::WTN + ni * 8 + 2 * t;
        if (col >= p.N) continue;
        const bool has1 = col + 1 < p.N;
        float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        if constexpr (EPI == kEpiPartial) {
          float* out = static_cast<float*>(p.C) +
                       static_cast<int64_t>(blockIdx.z) * p.M * p.N +
                       static_cast<int64_t>(row) * p.N + col;
          if (has1 && p.c_pair) {
            *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
          } else {
            out[0] = v0;
            if (has1) out[1] = v1;
          }
        } else {
          if constexpr (EPI == kEpiBiasRelu) {
            if (p.bias != nullptr) {
              const SBits* bb = static_cast<const SBits*>(p.bias);
              v0 += Elt::to_float(bb[col]);
              if (has1) v1 += Elt::to_float(bb[col + 1]);
            }
            v0 = relu_keep_nan(v0);
            v1 = relu_keep_nan(v1);
          }
          SBits* out =
              static_cast<SBits*>(p.C) + static_cast<int64_t>(row) * p.N + col;
          const uint32_t b0 = Elt::from_float(v0), b1 = Elt::from_float(v1);
          if (has1 && p.c_pair) {
            if constexpr (Elt::kBytes == 2) {
              *reinterpret_cast<uint32_t*>(out) = b0 | (b1 << 16);
            } else {
              *reinterpret_cast<uint2*>(out) = make_uint2(b0, b1);
            }
          } else {
            out[0] = static_cast<SBits>(b0);
            if (has1) out[1] = static_cast<SBits>(b1);
          }
        }
      }
    }
  }
}

// The bias gradient of the CTA's rows, from each thread's column sums bsum of
// the masked grad_y tiles it loaded. Reuses the tile memory smem, so every
// thread of the CTA must call it (uniform per CTA: barriers are safe).
template <class Elt, class Cfg, class LA, int EPI>
__device__ __forceinline__ void store_bias_sum(unsigned char* smem,
                                               const float (&bsum)[LA::V],
                                               const GemmParams& p, int m0) {
  constexpr int BM = Cfg::BM, THREADS = Cfg::THREADS, V = LA::V;
  using SBits = typename Elt::Bits;
  // Thread tid owns rows (tid % CPL) * V + e of this CTA's M range; the
  // THREADS / CPL owners of a row are summed in a fixed order.
  constexpr int CPL = LA::CPL;
  float* red = reinterpret_cast<float*>(smem);  // [THREADS / CPL][BM]
  const int q = threadIdx.x / CPL, ci = threadIdx.x % CPL;
#pragma unroll
  for (int e = 0; e < V; ++e) red[q * BM + ci * V + e] = bsum[e];
  __syncthreads();
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    float s = 0.f;
    for (int qq = 0; qq < THREADS / CPL; ++qq) s += red[qq * BM + r];
    const int row = m0 + r;
    if (row < p.M) {
      if constexpr (EPI == kEpiPartial) {
        static_cast<float*>(
            p.bsum)[static_cast<int64_t>(blockIdx.z) * p.M + row] = s;
      } else {
        static_cast<SBits*>(p.bsum)[row] =
            static_cast<SBits>(Elt::from_float(s));
      }
    }
  }
}

template <class Elt, MathKind MK, class Cfg, bool A_KMAJOR, bool B_KMAJOR,
          bool MASK_A, int EPI, bool BSUM>
__global__ void __launch_bounds__(Cfg::THREADS)
    gemm_kernel(const GemmParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  constexpr int THREADS = Cfg::THREADS;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  using LA = TileLoader<Elt, MK, BM, BK, THREADS, A_KMAJOR, MASK_A>;
  using LB = TileLoader<Elt, MK, BN, BK, THREADS, B_KMAJOR, false>;
  using SBits = typename Elt::Bits;
  constexpr int V = LA::V;
  static_assert(!BSUM || (!A_KMAJOR && MASK_A),
                "bsum needs the R-major g tile");
  constexpr int TILE_BYTES = LA::SMEM_BYTES + LB::SMEM_BYTES;
  constexpr int RED_BYTES = BSUM ? THREADS * V * 4 : 0;
  constexpr int SMEM_BYTES = TILE_BYTES > RED_BYTES ? TILE_BYTES : RED_BYTES;
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");
  __shared__ __align__(16) unsigned char smem[SMEM_BYTES];
  SBits* sA = reinterpret_cast<SBits*>(smem);
  SBits* sB = reinterpret_cast<SBits*>(smem + LA::SMEM_BYTES);
  static_assert(LA::SMEM_BYTES % 16 == 0, "sB alignment");

  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int kbeg = blockIdx.z * p.k_per_split;
  const int kend = min(p.K, kbeg + p.k_per_split);
  const int ntiles = kend > kbeg ? ceil_div(kend - kbeg, BK) : 0;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int g = lane / 4, t = lane % 4;

  const bool do_bsum = BSUM && p.want_bsum && blockIdx.y == 0;
  float bsum[V];
#pragma unroll
  for (int e = 0; e < V; ++e) bsum[e] = 0.f;

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.f;

  LA la;
  LB lb;
  if (ntiles > 0) {
    la.load(p.A, p.Amask, p.lda, m0, p.M, kbeg, kend, p.a_vec);
    lb.load(p.B, nullptr, p.ldb, n0, p.N, kbeg, kend, p.b_vec);
  }
  for (int tile = 0; tile < ntiles; ++tile) {
    la.template store<BSUM>(sA, bsum, do_bsum);
    lb.template store<false>(sB, bsum, false);
    __syncthreads();
    if (tile + 1 < ntiles) {
      const int k0 = kbeg + (tile + 1) * BK;
      la.load(p.A, p.Amask, p.lda, m0, p.M, k0, kend, p.a_vec);
      lb.load(p.B, nullptr, p.ldb, n0, p.N, k0, kend, p.b_vec);
    }
    if constexpr (MK == MathKind::kMMA16) {
      mma_step_16bit<Elt, Cfg, LA, LB>(acc, sA, sB, wm, wn, g, t);
    } else if constexpr (MK == MathKind::kTF32) {
      mma_step_tf32<Cfg, LA, LB>(acc, sA, sB, wm, wn, g, t);
    } else {
      ffma_step<Cfg, LA, LB>(acc, sA, sB, wm, wn, g, t);
    }
    __syncthreads();  // the next store overwrites the tiles just read
  }

  store_tile<Elt, Cfg, EPI>(acc, p, m0, n0, wm, wn, g, t);
  if constexpr (BSUM) {
    if (do_bsum) store_bias_sum<Elt, Cfg, LA, EPI>(smem, bsum, p, m0);
  }
}

// Sums split-K partials in a fixed order: out[i] = sum_z part[z][i] for the
// gW matrix (count elements) followed by the bias (bcount elements).
template <class Elt>
__global__ void splitk_reduce_kernel(const float* part, void* out,
                                     int64_t count, int splits,
                                     const float* bpart, void* bout,
                                     int64_t bcount) {
  using SBits = typename Elt::Bits;
  const int64_t total = count + (bout != nullptr ? bcount : 0);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < count) {
      float s = 0.f;
      for (int z = 0; z < splits; ++z) s += part[z * count + i];
      static_cast<SBits*>(out)[i] = static_cast<SBits>(Elt::from_float(s));
    } else {
      const int64_t j = i - count;
      float s = 0.f;
      for (int z = 0; z < splits; ++z) s += bpart[z * bcount + j];
      static_cast<SBits*>(bout)[j] = static_cast<SBits>(Elt::from_float(s));
    }
  }
}

// ---------------------------------------------------------------------------
// Elementwise kernels.

constexpr int kColsumRowsPerChunk = 256;
constexpr int kColsumMaxChunks = 64;

// Block (32, 8): 32 consecutive columns (coalesced), 8 row lanes.
template <class Elt>
__global__ void __launch_bounds__(256)
    mask_colsum_kernel(const void* g, const void* y, void* gm, void* gb,
                       float* partial, int M, int N, int rows_per_chunk) {
  using SBits = typename Elt::Bits;
  __shared__ float red[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int rbeg = blockIdx.y * rows_per_chunk;
  const int rend = min(M, rbeg + rows_per_chunk);
  const SBits* gg = static_cast<const SBits*>(g);
  const SBits* yy = static_cast<const SBits*>(y);
  SBits* out = static_cast<SBits*>(gm);
  float s = 0.f;
  if (col < N) {
    for (int r = rbeg + threadIdx.y; r < rend; r += 8) {
      const int64_t idx = static_cast<int64_t>(r) * N + col;
      SBits v = gg[idx];
      if (Elt::to_float(yy[idx]) <= 0.f) v = 0;
      if (out != nullptr) out[idx] = v;
      s += Elt::to_float(v);
    }
  }
  if (gb == nullptr) return;  // uniform: no barrier is skipped by a subset
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float tot = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) tot += red[q][threadIdx.x];
    if (gridDim.y == 1) {
      static_cast<SBits*>(gb)[col] = static_cast<SBits>(Elt::from_float(tot));
    } else {
      partial[static_cast<int64_t>(blockIdx.y) * N + col] = tot;
    }
  }
}

template <class Elt>
__global__ void colsum_finalize_kernel(const float* partial, void* gb, int N,
                                       int chunks) {
  using SBits = typename Elt::Bits;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= N) return;
  float s = 0.f;
  for (int c = 0; c < chunks; ++c)
    s += partial[static_cast<int64_t>(c) * N + col];
  static_cast<SBits*>(gb)[col] = static_cast<SBits>(Elt::from_float(s));
}

template <class Elt>
__global__ void relu_inplace_kernel(void* y, int64_t n, bool vec) {
  using SBits = typename Elt::Bits;
  constexpr int V = 16 / Elt::kBytes;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    uint4* yv = static_cast<uint4*>(y);
    for (int64_t i = tid; i < nv; i += stride) {
      Chunk<Elt::kBytes> c;
      const uint4 q = yv[i];
      c.w[0] = q.x;
      c.w[1] = q.y;
      c.w[2] = q.z;
      c.w[3] = q.w;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (Elt::to_float(c.get(e)) <= 0.f) c.zero(e);  // NaN kept
      }
      yv[i] = make_uint4(c.w[0], c.w[1], c.w[2], c.w[3]);
    }
    done = nv * V;
  }
  SBits* ys = static_cast<SBits*>(y);
  for (int64_t i = done + tid; i < n; i += stride) {
    if (Elt::to_float(ys[i]) <= 0.f) ys[i] = 0;
  }
}

// ---------------------------------------------------------------------------
// Host side.

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <class Elt, MathKind MK, class Cfg, bool A_KMAJOR, bool B_KMAJOR,
          bool MASK_A, int EPI, bool BSUM>
cudaError_t run_gemm(const GemmParams& p, int splits, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.M, Cfg::BM), ceil_div(p.N, Cfg::BN), splits);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  gemm_kernel<Elt, MK, Cfg, A_KMAJOR, B_KMAJOR, MASK_A, EPI, BSUM>
      <<<grid, Cfg::THREADS, 0, stream>>>(p);
  FASTMLP_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// Big tiles only when they alone fill the GPU; otherwise 64x64 tiles give
// four times as many CTAs.
bool use_big_tiles(int M, int N, int num_sms) {
  return int64_t(ceil_div(M, BigCfg::BM)) * ceil_div(N, BigCfg::BN) >=
         int64_t(num_sms);
}

template <class Elt, MathKind MK>
cudaError_t forward_impl(const void* x, const void* w, const void* b, void* y,
                         int M, int N, int K, int num_sms,
                         cudaStream_t stream) {
  constexpr int V = 16 / Elt::kBytes;
  GemmParams p{};
  p.A = x;
  p.Amask = nullptr;
  p.lda = K;
  p.B = w;
  p.ldb = K;
  p.C = y;
  p.bias = b;
  p.bsum = nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.k_per_split = K > 0 ? K : 1;
  p.a_vec = aligned16(x) && K % V == 0;
  p.b_vec = aligned16(w) && K % V == 0;
  p.c_pair =
      (reinterpret_cast<uintptr_t>(y) % (2 * Elt::kBytes)) == 0 && N % 2 == 0;
  p.want_bsum = false;
  if (use_big_tiles(M, N, num_sms)) {
    return run_gemm<Elt, MK, BigCfg, true, true, false, kEpiBiasRelu, false>(
        p, 1, stream);
  }
  return run_gemm<Elt, MK, SmallCfg, true, true, false, kEpiBiasRelu, false>(
      p, 1, stream);
}

template <class Elt, MathKind MK>
cudaError_t dgrad_impl(const void* g, const void* y, const void* w, void* gx,
                       int M, int N, int K, int num_sms, cudaStream_t stream) {
  constexpr int V = 16 / Elt::kBytes;
  // C = gx [M][K]; A = g' (rows M, reduction N, K-major, ld N);
  // B = W (rows K, reduction N, R-major: element (k, n) at w[n * K + k]).
  GemmParams p{};
  p.A = g;
  p.Amask = y;
  p.lda = N;
  p.B = w;
  p.ldb = K;
  p.C = gx;
  p.bias = nullptr;
  p.bsum = nullptr;
  p.M = M;
  p.N = K;
  p.K = N;
  p.k_per_split = N > 0 ? N : 1;
  p.a_vec = aligned16(g) && aligned16(y) && N % V == 0;
  p.b_vec = aligned16(w) && K % V == 0;
  p.c_pair =
      (reinterpret_cast<uintptr_t>(gx) % (2 * Elt::kBytes)) == 0 && K % 2 == 0;
  p.want_bsum = false;
  if (use_big_tiles(M, K, num_sms)) {
    return run_gemm<Elt, MK, BigCfg, true, false, true, kEpiStore, false>(
        p, 1, stream);
  }
  return run_gemm<Elt, MK, SmallCfg, true, false, true, kEpiStore, false>(
      p, 1, stream);
}

template <class Elt, MathKind MK>
cudaError_t wgrad_impl(const void* g, const void* y, const void* x, void* gw,
                       void* gb, int M, int N, int K, int splits,
                       float* workspace, cudaStream_t stream) {
  using Cfg = SmallCfg;
  constexpr int V = 16 / Elt::kBytes;
  // C = gW [N][K]; A = g'^T (rows N, reduction M; element (n, m) at
  // g[m * N + n], R-major, ld N); B = x^T (rows K, reduction M; element
  // (k, m) at x[m * K + k], R-major, ld K).
  GemmParams p{};
  p.A = g;
  p.Amask = y;
  p.lda = N;
  p.B = x;
  p.ldb = K;
  p.bias = nullptr;
  p.M = N;
  p.N = K;
  p.K = M;
  p.a_vec = aligned16(g) && aligned16(y) && N % V == 0;
  p.b_vec = aligned16(x) && K % V == 0;
  p.want_bsum = gb != nullptr;
  if (splits <= 1) {
    p.C = gw;
    p.bsum = gb;
    p.k_per_split = M > 0 ? M : 1;
    p.c_pair = (reinterpret_cast<uintptr_t>(gw) % (2 * Elt::kBytes)) == 0 &&
               K % 2 == 0;
    return run_gemm<Elt, MK, Cfg, false, false, true, kEpiStore, true>(p, 1,
                                                                       stream);
  }
  const int64_t count = int64_t(N) * K;
  float* part = workspace;                    // [splits][N][K]
  float* bpart = workspace + splits * count;  // [splits][N]
  p.C = part;
  p.bsum = bpart;
  p.k_per_split = ceil_div(ceil_div(M, splits), Cfg::BK) * Cfg::BK;
  p.c_pair = K % 2 == 0;  // the workspace comes from the caching allocator
  cudaError_t err =
      run_gemm<Elt, MK, Cfg, false, false, true, kEpiPartial, true>(p, splits,
                                                                    stream);
  if (err != cudaSuccess) return err;
  const int64_t total = count + (gb != nullptr ? N : 0);
  const int blocks =
      static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 65535));
  if (blocks > 0) {
    splitk_reduce_kernel<Elt>
        <<<blocks, 256, 0, stream>>>(part, gw, count, splits, bpart, gb, N);
    FASTMLP_RETURN_IF_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

}  // namespace

// ---------------------------------------------------------------------------
// Public launchers.

#define FASTMLP_DISPATCH_MATH(dtype, f32, FN, ...)                             \
  switch (dtype) {                                                             \
    case DType::kBFloat16:                                                     \
      return FN<BF16, MathKind::kMMA16>(__VA_ARGS__);                          \
    case DType::kFloat16:                                                      \
      return FN<F16, MathKind::kMMA16>(__VA_ARGS__);                           \
    case DType::kFloat32:                                                      \
      if (f32 == F32Math::kTF32) return FN<F32, MathKind::kTF32>(__VA_ARGS__); \
      return FN<F32, MathKind::kFFMA>(__VA_ARGS__);                            \
  }                                                                            \
  return cudaErrorInvalidValue

cudaError_t launch_forward(DType dtype, F32Math f32, const void* x,
                           const void* w, const void* b, void* y, int M, int N,
                           int K, int num_sms, cudaStream_t stream) {
  FASTMLP_DISPATCH_MATH(dtype, f32, forward_impl, x, w, b, y, M, N, K, num_sms,
                        stream);
}

cudaError_t launch_dgrad(DType dtype, F32Math f32, const void* g, const void* y,
                         const void* w, void* gx, int M, int N, int K,
                         int num_sms, cudaStream_t stream) {
  FASTMLP_DISPATCH_MATH(dtype, f32, dgrad_impl, g, y, w, gx, M, N, K, num_sms,
                        stream);
}

int wgrad_splits(int M, int N, int K, int num_sms) {
  const int64_t tiles =
      int64_t(ceil_div(N, SmallCfg::BM)) * ceil_div(K, SmallCfg::BN);
  if (tiles == 0) return 1;
  // Aim for about two CTAs per SM, keeping at least 4 k-tiles per split.
  int64_t s = ceil_div(2 * int64_t(num_sms), tiles);
  s = std::min<int64_t>(s, M / (4 * SmallCfg::BK));
  s = std::min<int64_t>(s, 16);
  return s < 2 ? 1 : static_cast<int>(s);
}

size_t wgrad_workspace_floats(int M, int N, int K, int splits) {
  (void)M;
  if (splits <= 1) return 0;
  return size_t(splits) * (size_t(N) * size_t(K) + size_t(N));
}

cudaError_t launch_wgrad(DType dtype, F32Math f32, const void* g, const void* y,
                         const void* x, void* gw, void* gb, int M, int N, int K,
                         int splits, float* workspace, cudaStream_t stream) {
  FASTMLP_DISPATCH_MATH(dtype, f32, wgrad_impl, g, y, x, gw, gb, M, N, K,
                        splits, workspace, stream);
}

int colsum_chunks(int M) {
  return std::max(1,
                  std::min(kColsumMaxChunks, ceil_div(M, kColsumRowsPerChunk)));
}

namespace {
template <class Elt>
cudaError_t mask_colsum_impl(const void* g, const void* y, void* gm, void* gb,
                             float* partial, int M, int N,
                             cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (M == 0 && gb == nullptr) return cudaSuccess;
  const int chunks = colsum_chunks(M);
  const int rows_per_chunk = std::max(1, ceil_div(M, chunks));
  const dim3 grid(ceil_div(N, 32), chunks);
  mask_colsum_kernel<Elt><<<grid, dim3(32, 8), 0, stream>>>(
      g, y, gm, gb, partial, M, N, rows_per_chunk);
  FASTMLP_RETURN_IF_LAUNCH_ERROR();
  if (gb != nullptr && chunks > 1) {
    colsum_finalize_kernel<Elt>
        <<<ceil_div(N, 256), 256, 0, stream>>>(partial, gb, N, chunks);
    FASTMLP_RETURN_IF_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

template <class Elt>
cudaError_t relu_impl(void* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int V = 16 / Elt::kBytes;
  const bool vec = aligned16(y);
  const int64_t work = vec ? n / V + V : n;
  const int blocks =
      static_cast<int>(std::min<int64_t>(ceil_div(work, 256), 8192));
  relu_inplace_kernel<Elt><<<blocks, 256, 0, stream>>>(y, n, vec);
  FASTMLP_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}
}  // namespace

cudaError_t launch_mask_colsum(DType dtype, const void* g, const void* y,
                               void* gm, void* gb, float* partial, int M, int N,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return mask_colsum_impl<BF16>(g, y, gm, gb, partial, M, N, stream);
    case DType::kFloat16:
      return mask_colsum_impl<F16>(g, y, gm, gb, partial, M, N, stream);
    case DType::kFloat32:
      return mask_colsum_impl<F32>(g, y, gm, gb, partial, M, N, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_relu_inplace(DType dtype, void* y, int64_t n,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return relu_impl<BF16>(y, n, stream);
    case DType::kFloat16:
      return relu_impl<F16>(y, n, stream);
    case DType::kFloat32:
      return relu_impl<F32>(y, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastmlp

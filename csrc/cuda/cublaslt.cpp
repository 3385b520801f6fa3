// See cublaslt.h.
//
// Two things a GEMM wrapper called on every training step must not do, and
// this one avoids: grow without bound (the algorithm cache is keyed by shape,
// and ragged last batches or dynamic shapes bring new ones: it is an LRU of
// kAlgoCacheCapacity entries) and allocate per call (the workspace is
// PyTorch's own cuBLASLt workspace for the current handle and stream, the
// one torch's addmm uses, so it is stream-ordered and safe under CUDA graph
// capture). A heuristic that finds no algorithm is not cached: the next call
// asks again rather than taking one failure as permanent.
#include "cuda/cublaslt.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace fastmlp {
namespace cublaslt {
namespace {

#define FASTMLP_CUBLASLT_CHECK(expr)                                     \
  do {                                                                   \
    cublasStatus_t st_ = (expr);                                         \
    TORCH_CHECK(st_ == CUBLAS_STATUS_SUCCESS, "fastmlp: cuBLASLt call ", \
                #expr, " failed with status ", static_cast<int>(st_));   \
  } while (0)

bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

int alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (int al : {16, 8, 4, 2}) {
    if (a % al == 0) return al;
  }
  return 1;
}

// Compared and hashed as raw bytes, so the layout has no padding (96 bytes).
struct Key {
  int32_t device, dtype, compute, transa, transb, epilogue;
  int64_t m, n, k, lda, ldb, ldd, workspace;
  int32_t align_a, align_b, align_d, reserved;
  bool operator==(const Key& o) const {
    return std::memcmp(this, &o, sizeof(Key)) == 0;
  }
};
static_assert(sizeof(Key) == 6 * 4 + 7 * 8 + 4 * 4, "Key has padding");
struct KeyHash {
  size_t operator()(const Key& k) const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

class AlgoCache {
 public:
  bool find(const Key& key, cublasLtMatmulAlgo_t* algo) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it == index_.end()) return false;
    order_.splice(order_.begin(), order_, it->second);  // most recent first
    *algo = it->second->second;
    return true;
  }
  void insert(const Key& key, const cublasLtMatmulAlgo_t& algo) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      it->second->second = algo;
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.emplace_front(key, algo);
    index_[key] = order_.begin();
    if (order_.size() > kAlgoCacheCapacity) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return order_.size();
  }

 private:
  std::mutex mutex_;
  std::list<std::pair<Key, cublasLtMatmulAlgo_t>> order_;
  std::unordered_map<
      Key, std::list<std::pair<Key, cublasLtMatmulAlgo_t>>::iterator, KeyHash>
      index_;
};

AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
}

// RAII holders so an exception from TORCH_CHECK leaks nothing.
struct Desc {
  cublasLtMatmulDesc_t d = nullptr;
  ~Desc() {
    if (d) cublasLtMatmulDescDestroy(d);
  }
};
struct Layout {
  cublasLtMatrixLayout_t l = nullptr;
  ~Layout() {
    if (l) cublasLtMatrixLayoutDestroy(l);
  }
};
struct Pref {
  cublasLtMatmulPreference_t p = nullptr;
  ~Pref() {
    if (p) cublasLtMatmulPreferenceDestroy(p);
  }
};

template <typename T>
void set_pref(cublasLtMatmulPreference_t p,
              cublasLtMatmulPreferenceAttributes_t attr, T value) {
  FASTMLP_CUBLASLT_CHECK(
      cublasLtMatmulPreferenceSetAttribute(p, attr, &value, sizeof(value)));
}

// The cuBLASLt data and compute types of a GEMM in `dtype` (float32 computes
// in TF32 when torch allows it); false for a dtype this wrapper does not take.
bool gemm_types(at::ScalarType dtype, cudaDataType_t* dt,
                cublasComputeType_t* ct) {
  *ct = CUBLAS_COMPUTE_32F;
  switch (dtype) {
    case at::kFloat:
      *dt = CUDA_R_32F;
      if (tf32_allowed()) *ct = CUBLAS_COMPUTE_32F_FAST_TF32;
      return true;
    case at::kBFloat16:
      *dt = CUDA_R_16BF;
      return true;
    case at::kHalf:
      *dt = CUDA_R_16F;
      return true;
    default:
      return false;
  }
}

// desc.d: the operation op(A) @ op(B), with the bias epilogue when bias is
// given, accumulated in float.
void describe_matmul(Desc& desc, cublasComputeType_t ct, cublasOperation_t opa,
                     cublasOperation_t opb, cublasLtEpilogue_t epi,
                     const void* bias) {
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.d, ct, CUDA_R_32F));
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(
      desc.d, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(
      desc.d, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(
      desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (bias != nullptr) {
    FASTMLP_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(
        desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
}

// *algo: the cached algorithm for `key`, else cuBLASLt's first heuristic
// choice for it (then cached). False when cuBLASLt has none.
bool find_algo(const Key& key, cublasLtHandle_t handle, const Desc& desc,
               const Layout& la, const Layout& lb, const Layout& ld,
               size_t workspace_bytes, cublasLtMatmulAlgo_t* algo) {
  if (algo_cache().find(key, algo)) return true;
  Pref pref;
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.p));
  set_pref<uint64_t>(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                     workspace_bytes);
  set_pref<uint32_t>(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                     key.align_a);
  set_pref<uint32_t>(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                     key.align_b);
  set_pref<uint32_t>(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                     key.align_d);
  set_pref<uint32_t>(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                     key.align_d);
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle, desc.d, la.l, lb.l, ld.l, ld.l, pref.p, 1, &result, &returned);
  if (st != CUBLAS_STATUS_SUCCESS || returned == 0) return false;
  *algo = result.algo;
  algo_cache().insert(key, *algo);
  return true;
}

}  // namespace

size_t algo_cache_size() { return algo_cache().size(); }

bool matmul(const at::Tensor& like, bool transa, bool transb, int64_t m,
            int64_t n, int64_t k, const void* A, int64_t lda, const void* B,
            int64_t ldb, void* D, int64_t ldd, const void* bias) {
  cudaDataType_t dt;
  cublasComputeType_t ct;
  if (!gemm_types(like.scalar_type(), &dt, &ct)) return false;
  const cublasLtEpilogue_t epi =
      bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  const cublasOperation_t opa = transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = transb ? CUBLAS_OP_T : CUBLAS_OP_N;

  Desc desc;
  describe_matmul(desc, ct, opa, opb, epi, bias);
  Layout la, lb, ld;
  FASTMLP_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&la.l, dt, transa ? k : m,
                                                    transa ? m : k, lda));
  FASTMLP_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&lb.l, dt, transb ? n : k,
                                                    transb ? k : n, ldb));
  FASTMLP_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&ld.l, dt, m, n, ldd));

  // PyTorch's workspace for this handle and stream (its size is fixed per
  // process, CUBLASLT_WORKSPACE_SIZE, and part of the key all the same).
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const size_t workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();

  const Key key{like.device().index(),
                static_cast<int>(dt),
                static_cast<int>(ct),
                transa,
                transb,
                static_cast<int>(epi),
                m,
                n,
                k,
                lda,
                ldb,
                ldd,
                static_cast<int64_t>(workspace_bytes),
                alignment_of(A),
                alignment_of(B),
                alignment_of(D),
                0};
  cublasLtMatmulAlgo_t algo;
  if (!find_algo(key, handle, desc, la, lb, ld, workspace_bytes, &algo)) {
    return false;
  }
  const float alpha = 1.f, beta = 0.f;
  FASTMLP_CUBLASLT_CHECK(cublasLtMatmul(
      handle, desc.d, &alpha, A, la.l, B, lb.l, &beta, D, ld.l, D, ld.l, &algo,
      workspace, workspace_bytes, at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace cublaslt
}  // namespace fastmlp

// For the CUDA tests: the cache must stay bounded under ragged shapes.
TORCH_LIBRARY_FRAGMENT(fastmlp, m) {
  m.def("_cublaslt_algo_cache_size() -> int", []() -> int64_t {
    return static_cast<int64_t>(fastmlp::cublaslt::algo_cache_size());
  });
}

// Temporaries a thread keeps from one call to the next, and the bound on
// what it keeps.
//
// Why keep them: a fresh allocation of hundreds of KiB is new pages from the
// OS at every call, and their faults cost as much as the GEMM writing them
// (measured: the 256x784 weight-gradient block took 330 us instead of 180).
// Why bound them: a thread keeps its buffers until it exits, and one call of
// a wide MLP on a big batch needs hundreds of MB (256-8192-256-8192-16 at
// 4096 rows kept 535 MB with ReLU, 919 MB with GELU, after the model was
// gone). Above kKeptScratchBytes per buffer the faults cost little beside
// the O(n k) arithmetic done on an O(n) buffer, so such a buffer is given
// back when the call (or the scope that leased it) ends.
#pragma once

#include <cstdint>
#include <vector>

namespace fastmlp {
namespace cpu {

// The largest buffer a thread keeps after a call (docs/cpu.md: memory).
constexpr int64_t kKeptScratchBytes = int64_t{8} << 20;

// n elements of a thread's kept vector `v` for the lifetime of this object;
// at its end v's memory is given back if it is above kKeptScratchBytes.
// Leases of one vector must not overlap (a second could reallocate it).
template <typename T>
class ScratchLease {
 public:
  ScratchLease(std::vector<T>& v, int64_t n) : v_(v) {
    if (static_cast<int64_t>(v_.size()) < n) v_.resize(n);
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ~ScratchLease() {
    if (static_cast<int64_t>(v_.capacity() * sizeof(T)) > kKeptScratchBytes) {
      std::vector<T>().swap(v_);
    }
  }
  T* data() const { return v_.data(); }

 private:
  std::vector<T>& v_;
};

// The calling thread's kept scratch vector number `slot` (lease it for a
// call). Slots 0-3: the row-blocked path's activations and accumulators
// (paths/rowblock.h); the two below: blas.h's GEMMs, which run inside it.
constexpr int kTransposeSlot = 4;  // a transposed operand (gemm_tn)
constexpr int kPanelSlot = 5;      // a packed panel of B (brgemm_nn)
template <typename T>
std::vector<T>& thread_scratch(int slot) {
  thread_local std::vector<T> buffers[6];
  return buffers[slot];
}

}  // namespace cpu
}  // namespace fastmlp

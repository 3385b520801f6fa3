// Which CPU path runs a whole-MLP call (fastmlp::mlp, mlp_inference,
// mlp_backward): the rule, written once, and the switch that forces a path
// (for tests and for users who measured their own shapes).
//
//   layered      layer by layer over the whole batch, each layer's GEMM split
//                over threads by output features (paths/layered.h): best where
//                the layers are wide, whose GEMMs are compute-bound.
//   row_blocked  block by block of rows through every layer
//                (paths/rowblock.h): best for narrow networks, whose layers are
//                cheap GEMMs over activations that no longer fit a cache, and
//                for small batches (one block, on the calling thread).
//   aten         plain ATen ops layer by layer (aten_engine.h): what eager
//                PyTorch computes, so never slower than it beyond the op's
//                own overhead; the rule never picks it, a measurement may.
//
// The rule's crossovers were measured on one CPU; on another the best path
// can differ (a Zen 4 trained 32-1024x4-16 at 4096 rows at 0.68x eager on
// the rule's row_blocked, 0.86x layered). So, unless a path is forced or
// FASTMLP_CPU_TUNE=off, the first call of a shape class (phase, dtype,
// widths, rows rounded up to a power of two, threads) runs every path that
// can run it, keeps the fastest for the rest of the process
// (record_measured_path) and later calls take it: cuDNN's benchmark mode.
//
// `python -m fastmlp.engines` prints the choice and its reason for a shape.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace fastmlp {
namespace cpu {

enum class CpuPath { kLayered, kRowBlocked, kAten };

// What the call computes: forward saving for backward, forward only
// (no_grad / inference_mode), or backward.
enum class MlpPhase { kTrainForward, kInference, kBackward };

struct CpuPathChoice {
  CpuPath path;
  std::string reason;
  // The rule's choice, which the caller may replace by measuring every
  // runnable path (nothing forced, tuning on, not measured yet, rows > 0).
  bool may_measure = false;
  // Where the choice came from: "forced", "measured" (in this process),
  // "cached" (by `fastmlp tune`, read from disk: fastmlp/path_cache.py) or
  // "rule".
  const char* source = "rule";
};

// The path for an MLP of layer widths `widths` (in_features, then each
// layer's out_features) over `rows` rows of `dtype`: forced, measured
// earlier in this process, or the rule's.
CpuPathChoice choose_cpu_path(int64_t rows, const std::vector<int64_t>& widths,
                              at::ScalarType dtype, MlpPhase phase);

// The paths that can run dtype here, in a fixed order.
std::vector<CpuPath> runnable_cpu_paths(at::ScalarType dtype);

// Records the path measured fastest for the shape class of a call, and the
// times that chose it ("layered 1.2 ms, ...").
void record_measured_path(int64_t rows, const std::vector<int64_t>& widths,
                          at::ScalarType dtype, MlpPhase phase, CpuPath path,
                          const std::string& times);

const char* path_name(CpuPath path);

// Calls below this many flops (about 0.2 s here) are timed twice per path
// when measured: the first run of a path may pay page faults and kernel
// generation, and a single timing on a busy machine can pick the wrong path;
// larger ones once, so that measuring a big call costs about one call per
// path.
constexpr double kTimeTwiceBelowFlops = 2e10;

// run(path) on the path choose_cpu_path picks; where that choice may be
// measured, run(path) for every runnable path (timed, in a fixed order),
// the fastest recorded, and a result of the fastest returned. run must be
// a pure function of its path (the ops' CPU kernels are: they return new
// tensors). `flops`: the call's arithmetic, for kTimeTwiceBelowFlops.
template <typename Run>
auto run_on_cpu_path(int64_t rows, const std::vector<int64_t>& widths,
                     at::ScalarType dtype, MlpPhase phase, double flops,
                     Run&& run) -> decltype(run(CpuPath::kLayered)) {
  const CpuPathChoice choice = choose_cpu_path(rows, widths, dtype, phase);
  if (!choice.may_measure) return run(choice.path);
  const std::vector<CpuPath> paths = runnable_cpu_paths(dtype);
  const int rounds = flops < kTimeTwiceBelowFlops ? 2 : 1;
  std::vector<double> best(paths.size(),
                           std::numeric_limits<double>::infinity());
  std::optional<decltype(run(CpuPath::kLayered))> last;
  size_t last_index = 0;
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < paths.size(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      last.reset();  // the previous result's memory goes back first
      last.emplace(run(paths[i]));
      const std::chrono::duration<double> took =
          std::chrono::steady_clock::now() - start;
      best[i] = std::min(best[i], took.count());
      last_index = i;
    }
  }
  size_t winner = 0;
  std::string times;
  for (size_t i = 0; i < paths.size(); ++i) {
    if (best[i] < best[winner]) winner = i;
    char took[32];
    std::snprintf(took, sizeof(took), " %.3g ms", best[i] * 1e3);
    times += std::string(i ? ", " : "") + path_name(paths[i]) + took;
  }
  record_measured_path(rows, widths, dtype, phase, paths[winner], times);
  if (winner == last_index) return std::move(*last);
  last.reset();
  return run(paths[winner]);
}

}  // namespace cpu
}  // namespace fastmlp

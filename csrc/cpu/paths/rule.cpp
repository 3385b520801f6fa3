// The CPU path rule (paths/rule.h) and the ops fastmlp/engines.py reads it
// through.
#include "cpu/paths/rule.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cpu/kernels/blas.h"
#include "cpu/paths/rowblock.h"

namespace fastmlp {
namespace cpu {
namespace {

// Widest layer (out_features) the row-blocked path takes by default. Above
// it a layer's GEMM per block is big enough to be compute-bound, and its
// activations over the batch no longer cost much more than the arithmetic;
// the per-thread weight-gradient sums also grow with width squared.
// Measured on a 2-core AMD EPYC (Zen 5 class, AVX-512): see docs/cpu.md.
constexpr int64_t kNarrowWidth = 256;

// With MKL's GEMMs (float64; float where oneDNN's brgemm is missing), layers
// up to kMidWidth wide take the row-blocked path from kBigBatch rows on:
// there the batch's activations (tens of MB) cost more than the per-block
// GEMMs lose (32-512-512-16 at 16384 rows, fp32 on sgemm: 1.33x eager in
// training and 1.66x in inference row-blocked, 1.14x and 0.99x layered; the
// tutorial's 784-512-512-10 at 1024 rows favoured layered, 0.97x vs 0.92x).
constexpr int64_t kMidWidth = 512;
constexpr int64_t kBigBatch = 4096;

// With oneDNN's brgemm (float; blas.h), whose blocks run AVX-512 code where
// MKL runs AVX2 (AMD CPUs), layers up to kBrgemmWidth wide take the
// row-blocked path from kBrgemmTrainRows rows in training and from
// kBrgemmInferenceRows in inference. Measured, speed-up over eager,
// row-blocked vs layered: 784-512-512-10 training at 64 rows 0.75x vs 1.05x,
// at 256 rows 1.22x vs 0.95x, at 4096 1.97x vs 1.01x; inference at 64 rows
// 0.60x vs 1.06x, 256 rows 1.01x vs 0.94x, 4096 rows 1.73x vs 0.90x;
// 32-1024-1024-16 at 256 rows: training 1.14x vs 1.02x, inference 0.91x vs
// 0.99x; at 4096 rows 1.53x vs 1.09x and 2.41x vs 1.14x.
// In the shape grid (32 -> width x 4 -> 16) width 1024 at 256 rows trained at
// 0.80x eager row-blocked: layers wider than kBrgemmNarrowerWidth train
// row-blocked from kBigBatch rows only (width 1024 at 4096 rows: 1.16x).
constexpr int64_t kBrgemmWidth = 1024;
constexpr int64_t kBrgemmNarrowerWidth = 512;
constexpr int64_t kBrgemmTrainRows = 256;
constexpr int64_t kBrgemmInferenceRows = 1024;

// "auto" (nothing forced), or the path forced by FASTMLP_CPU_PATH (read
// once) or fastmlp.engines.set_cpu_path.
std::optional<CpuPath> parse_path(const std::string& name, const char* where) {
  if (name == "auto") return std::nullopt;
  if (name == "layered") return CpuPath::kLayered;
  if (name == "row_blocked") return CpuPath::kRowBlocked;
  if (name == "aten") return CpuPath::kAten;
  TORCH_CHECK(false, where, "unknown CPU path '", name,
              "': expected auto, layered, row_blocked or aten");
}

// -1: auto; else a CpuPath.
std::atomic<int>& forced_path() {
  static std::atomic<int> forced = [] {
    const char* env = std::getenv("FASTMLP_CPU_PATH");
    if (env == nullptr || *env == '\0') return -1;
    const auto p = parse_path(env, "FASTMLP_CPU_PATH: ");
    return p ? static_cast<int>(*p) : -1;
  }();
  return forced;
}

// What fastmlp.engines.force_cpu_path forced on this thread: kNotForced
// (the process-wide choice, forced_path(), applies), -1 (auto) or a CpuPath.
// Thread-local so that contexts in two threads neither see nor undo each
// other; the ops choose their path on the calling thread (autograd runs a
// CPU backward on the thread that calls backward()).
constexpr int kNotForced = -2;
int& thread_forced_path() {
  thread_local int forced = kNotForced;
  return forced;
}

int effective_forced_path() {
  const int on_thread = thread_forced_path();
  return on_thread != kNotForced ? on_thread : forced_path().load();
}

// Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX);
// elsewhere MKL emulates them, slower than the layered path's oneDNN.
bool native_bf16() {
  static const bool native = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ||
           __builtin_cpu_supports("amx-bf16");
  }();
  return native;
}

// Whether the row-blocked path can run dtype here (forced or not): bf16
// only where it is native (MKL's emulation elsewhere is untested here).
bool row_blocked_supports(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return blas_available<float>();
    case at::kDouble:
      return blas_available<double>();
    case at::kBFloat16:
      return blas_available<c10::BFloat16>() && native_bf16();
    default:
      return false;
  }
}

std::string why_not_row_blocked(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16) {
    return std::string(
               "the row-blocked path runs float32, float64 and bfloat16; ") +
           c10::toString(dtype) + " runs layer by layer";
  }
  if (dtype == at::kBFloat16 && !native_bf16()) {
    return "bfloat16 is not native on this CPU (no AVX512-BF16 or AMX): it "
           "runs layer by layer, with oneDNN's GEMMs";
  }
  return std::string("this torch build exports no BLAS (MKL) GEMM for ") +
         c10::toString(dtype) + " for the row-blocked path";
}

// Whether a path left to the rule may be measured (FASTMLP_CPU_TUNE, read
// once: on unless "off"; fastmlp.engines.set_cpu_tuning changes it).
std::atomic<bool>& tuning_on() {
  static std::atomic<bool> on = [] {
    const char* env = std::getenv("FASTMLP_CPU_TUNE");
    if (env == nullptr || *env == '\0') return true;
    const std::string value(env);
    TORCH_CHECK(value == "on" || value == "off",
                "FASTMLP_CPU_TUNE: expected on or off, got '", value, "'");
    return value == "on";
  }();
  return on;
}

// The paths measured fastest in this process, by shape class.
struct Measured {
  CpuPath path;
  std::string times;
  bool cached = false;  // read from `fastmlp tune`'s cache, not timed here
};
std::mutex measured_mutex;
std::map<std::string, Measured>& measured_paths() {
  static std::map<std::string, Measured> paths;
  return paths;
}

// The shape class of a call: calls that differ only in rows within a power
// of two share a measurement.
std::string shape_class(int64_t rows, const std::vector<int64_t>& widths,
                        at::ScalarType dtype, MlpPhase phase) {
  int64_t bucket = 1;
  while (bucket < rows && bucket < (int64_t{1} << 62)) bucket *= 2;
  std::string key = std::to_string(static_cast<int>(phase)) + " " +
                    c10::toString(dtype) + " " +
                    std::to_string(at::get_num_threads()) +
                    " rows<=" + std::to_string(bucket) + " widths";
  for (const int64_t w : widths) key += " " + std::to_string(w);
  return key;
}

CpuPathChoice rule_choice(int64_t rows, const std::vector<int64_t>& widths,
                          at::ScalarType dtype, MlpPhase phase);

}  // namespace

const char* path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kRowBlocked:
      return "row_blocked";
    case CpuPath::kAten:
      return "aten";
    default:
      return "layered";
  }
}

std::vector<CpuPath> runnable_cpu_paths(at::ScalarType dtype) {
  std::vector<CpuPath> paths{CpuPath::kLayered};
  if (row_blocked_supports(dtype)) paths.push_back(CpuPath::kRowBlocked);
  paths.push_back(CpuPath::kAten);
  return paths;
}

void record_measured_path(int64_t rows, const std::vector<int64_t>& widths,
                          at::ScalarType dtype, MlpPhase phase, CpuPath path,
                          const std::string& times) {
  const std::lock_guard<std::mutex> lock(measured_mutex);
  measured_paths()[shape_class(rows, widths, dtype, phase)] = {path, times};
}

CpuPathChoice choose_cpu_path(int64_t rows, const std::vector<int64_t>& widths,
                              at::ScalarType dtype, MlpPhase phase) {
  const int forced = effective_forced_path();
  if (forced >= 0) {
    const auto path = static_cast<CpuPath>(forced);
    TORCH_CHECK(path != CpuPath::kRowBlocked || row_blocked_supports(dtype),
                "fastmlp: the CPU path is forced to row_blocked, but ",
                why_not_row_blocked(dtype));
    return {path, "forced", false, "forced"};
  }
  if (!tuning_on().load()) return rule_choice(rows, widths, dtype, phase);
  {
    const std::lock_guard<std::mutex> lock(measured_mutex);
    const auto& paths = measured_paths();
    const auto found = paths.find(shape_class(rows, widths, dtype, phase));
    if (found != paths.end()) {
      const Measured& m = found->second;
      if (m.cached) {
        return {m.path,
                "measured fastest on this machine by `fastmlp tune` (" +
                    m.times + ")",
                false, "cached"};
      }
      return {
          m.path,
          "measured fastest here at this shape's first call (" + m.times + ")",
          false, "measured"};
    }
  }
  CpuPathChoice choice = rule_choice(rows, widths, dtype, phase);
  choice.may_measure = rows > 0;
  return choice;
}

namespace {

// The built-in rule: the choice before any measurement, and with
// FASTMLP_CPU_TUNE=off.
CpuPathChoice rule_choice(int64_t rows, const std::vector<int64_t>& widths,
                          at::ScalarType dtype, MlpPhase phase) {
  const bool supported = row_blocked_supports(dtype);
  if (!supported) return {CpuPath::kLayered, why_not_row_blocked(dtype)};
  if (dtype == at::kBFloat16) {
    return {CpuPath::kLayered,
            "bfloat16: MKL's bf16 GEMM, which the row-blocked path runs, was "
            "slower than the layered path's oneDNN on the CPU measured (AMD "
            "EPYC with AVX512-BF16: 0.3-0.6x eager); force row_blocked to "
            "try it"};
  }
  int64_t widest = 0;
  for (size_t i = 1; i < widths.size(); ++i) {
    widest = std::max(widest, widths[i]);
  }
  const int64_t element = c10::elementSize(dtype);
  if (widest <= kNarrowWidth) {
    return {CpuPath::kRowBlocked,
            "narrow: every layer at most " + std::to_string(kNarrowWidth) +
                " wide, so a block's activations stay in cache"};
  }
  const bool brgemm = dtype == at::kFloat && brgemm_f32_available();
  if (brgemm && widest <= kBrgemmWidth) {
    const int64_t from = phase == MlpPhase::kInference    ? kBrgemmInferenceRows
                         : widest <= kBrgemmNarrowerWidth ? kBrgemmTrainRows
                                                          : kBigBatch;
    if (rows >= from) {
      return {CpuPath::kRowBlocked,
              "layers at most " + std::to_string(kBrgemmWidth) + " wide on " +
                  std::to_string(rows) + " >= " + std::to_string(from) +
                  " rows: oneDNN brgemm blocks beat per-layer GEMMs"};
    }
  }
  if (!brgemm && widest <= kMidWidth && rows >= kBigBatch) {
    return {CpuPath::kRowBlocked,
            "big batch (" + std::to_string(rows) +
                " >= " + std::to_string(kBigBatch) +
                " rows) of layers at most " + std::to_string(kMidWidth) +
                " wide: the batch's activations would not stay in cache"};
  }
  if (phase == MlpPhase::kInference && rows <= rowblock_rows(widest, element)) {
    return {CpuPath::kRowBlocked,
            "small batch: one block on the calling thread, no hand-off"};
  }
  return {CpuPath::kLayered, "wide layers (" + std::to_string(widest) + " > " +
                                 std::to_string(kNarrowWidth) +
                                 "): per-layer GEMMs split over threads"};
}

std::vector<std::string> cpu_path_op(int64_t rows, std::vector<int64_t> widths,
                                     at::ScalarType dtype,
                                     c10::string_view phase) {
  TORCH_CHECK(widths.size() >= 2,
              "fastmlp: widths must list in_features and at least one "
              "layer's out_features");
  MlpPhase p;
  if (phase == "train") {
    p = MlpPhase::kTrainForward;
  } else if (phase == "inference") {
    p = MlpPhase::kInference;
  } else {
    TORCH_CHECK(phase == "backward", "fastmlp: unknown phase '",
                std::string(phase), "': expected train, inference or backward");
    p = MlpPhase::kBackward;
  }
  const CpuPathChoice c = choose_cpu_path(rows, widths, dtype, p);
  std::string reason = c.reason;
  if (c.may_measure) reason += "; measured at this shape's first call";
  return {path_name(c.path), reason, c.source};
}

void set_cpu_tuning_op(std::optional<bool> on) {
  tuning_on().store(on.value_or(true));
}

bool cpu_tuning_op() { return tuning_on().load(); }

// Forgets what was measured (tests; a user who changed the machine's load).
void clear_measured_paths_op() {
  const std::lock_guard<std::mutex> lock(measured_mutex);
  measured_paths().clear();
}

// What was measured in this process, "shape class\tpath\ttimes" per entry,
// for `fastmlp tune` to write to disk (cached entries read from it left out).
std::vector<std::string> measured_paths_op() {
  const std::lock_guard<std::mutex> lock(measured_mutex);
  std::vector<std::string> out;
  for (const auto& [key, m] : measured_paths()) {
    if (!m.cached)
      out.push_back(key + "\t" + path_name(m.path) + "\t" + m.times);
  }
  return out;
}

// One entry of `fastmlp tune`'s cache: its shape class takes `path` from
// now on (unless measured in this process already: that measurement wins).
void load_measured_path_op(const std::string& key, const std::string& path,
                           const std::string& times) {
  const auto p = parse_path(path, "fastmlp: the CPU path cache: ");
  TORCH_CHECK(p.has_value(), "fastmlp: the CPU path cache names path 'auto'");
  TORCH_CHECK(*p != CpuPath::kRowBlocked ||
                  key.find("BFloat16") == std::string::npos ||
                  row_blocked_supports(at::kBFloat16),
              "fastmlp: the CPU path cache: row_blocked cannot run ", key);
  const std::lock_guard<std::mutex> lock(measured_mutex);
  measured_paths().emplace(key, Measured{*p, times, true});
}

void set_cpu_path_op(const std::optional<std::string>& name) {
  const auto p = parse_path(name.value_or("auto"), "fastmlp.set_cpu_path: ");
  forced_path().store(p ? static_cast<int>(*p) : -1);
}

// The library behind the row-blocked path's float GEMMs here.
std::string cpu_float_gemm_op() {
  if (brgemm_f32_available()) return "onednn_brgemm";
  return blas_available<float>() ? "mkl_sgemm" : "none";
}

std::string forced_name(int forced) {
  return forced < 0 ? "auto" : path_name(static_cast<CpuPath>(forced));
}

std::string requested_cpu_path_op() {
  return forced_name(effective_forced_path());
}

// Forces a path on the calling thread only (None: back to the process-wide
// choice); returns what was forced on it before, for the context manager to
// restore.
std::optional<std::string> set_thread_cpu_path_op(
    const std::optional<std::string>& name) {
  const int before = thread_forced_path();
  if (name.has_value()) {
    const auto p = parse_path(*name, "fastmlp.force_cpu_path: ");
    thread_forced_path() = p ? static_cast<int>(*p) : -1;
  } else {
    thread_forced_path() = kNotForced;
  }
  if (before == kNotForced) return std::nullopt;
  return forced_name(before);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmlp

// Helpers for fastmlp/engines.py (no tensors; not part of the model API).
TORCH_LIBRARY_FRAGMENT(fastmlp, m) {
  m.def(
      "_cpu_path(int rows, int[] widths, ScalarType dtype, str phase) -> "
      "str[]",
      &fastmlp::cpu::cpu_path_op);
  m.def("_set_cpu_path(str? name) -> ()", &fastmlp::cpu::set_cpu_path_op);
  m.def("_set_cpu_tuning(bool? on) -> ()", &fastmlp::cpu::set_cpu_tuning_op);
  m.def("_cpu_tuning() -> bool", &fastmlp::cpu::cpu_tuning_op);
  m.def("_clear_measured_cpu_paths() -> ()",
        &fastmlp::cpu::clear_measured_paths_op);
  m.def("_measured_cpu_paths() -> str[]", &fastmlp::cpu::measured_paths_op);
  m.def("_load_measured_cpu_path(str key, str path, str times) -> ()",
        &fastmlp::cpu::load_measured_path_op);
  m.def("_cpu_requested_path() -> str", &fastmlp::cpu::requested_cpu_path_op);
  m.def("_set_thread_cpu_path(str? name) -> str?",
        &fastmlp::cpu::set_thread_cpu_path_op);
  m.def("_cpu_float_gemm() -> str", &fastmlp::cpu::cpu_float_gemm_op);
}

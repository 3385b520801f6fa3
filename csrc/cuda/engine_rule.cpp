// See cuda/engine_rule.h. Also registers three small ops through which Python
// reports and switches the engine (fastmlp/engines.py).
#include "cuda/engine_rule.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>  // INFINITY, for a last entry with no upper bound
#include <cstdlib>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

namespace fastmlp {

const std::vector<ValidatedEngine>& validated_engines() {
  // Empty until a GPU run validates an engine: no fastmlp CUDA kernel has
  // executed yet, so `auto` uses `aten` everywhere. scripts/gpu_check.sh
  // prints the lines to add here, e.g.
  //   {90, Precision::kBFloat16, Engine::kCustom, 8.0e9},
  static const std::vector<ValidatedEngine> table = {};
  return table;
}

const char* engine_name(Engine e) {
  switch (e) {
    case Engine::kAuto:
      return "auto";
    case Engine::kCustom:
      return "custom";
    case Engine::kCublasLt:
      return "cublaslt";
    case Engine::kAten:
      return "aten";
  }
  return "?";
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFloat32:
      return "fp32";
    case Precision::kTF32:
      return "tf32";
    case Precision::kBFloat16:
      return "bf16";
    case Precision::kFloat16:
      return "fp16";
    case Precision::kFloat64:
      return "fp64";
  }
  return "?";
}

namespace {

std::optional<Engine> parse_engine(const std::string& s) {
  for (Engine e :
       {Engine::kAuto, Engine::kCustom, Engine::kCublasLt, Engine::kAten}) {
    if (s == engine_name(e)) return e;
  }
  return std::nullopt;
}

Precision parse_precision(const std::string& s) {
  for (Precision p :
       {Precision::kFloat32, Precision::kTF32, Precision::kBFloat16,
        Precision::kFloat16, Precision::kFloat64}) {
    if (s == precision_name(p)) return p;
  }
  TORCH_CHECK(false, "fastmlp: unknown precision '", s,
              "'; expected fp32, tf32, bf16, fp16 or fp64");
}

std::string capability_name(int capability) {
  std::ostringstream s;
  s << capability / 10 << "." << capability % 10;
  return s.str();
}

bool is_validated(const std::vector<ValidatedEngine>& table, int capability,
                  Precision precision, Engine engine) {
  for (const ValidatedEngine& v : table) {
    if (v.capability == capability && v.precision == precision &&
        v.engine == engine) {
      return true;
    }
  }
  return false;
}

// -1: not read yet; else an Engine. Read once; an invalid value is not
// cached, so every call raises until it is fixed.
std::atomic<int> requested{-1};

std::mutex warned_mutex;
std::set<std::tuple<int, int, int>> warned;  // (engine, capability, precision)

void warn_once_if_unvalidated(const EngineChoice& c, int capability,
                              Precision precision) {
  if (!c.unvalidated_forced) return;
  {
    std::lock_guard<std::mutex> lock(warned_mutex);
    const auto key = std::make_tuple(static_cast<int>(c.engine), capability,
                                     static_cast<int>(precision));
    if (!warned.insert(key).second) return;
  }
  TORCH_WARN("fastmlp: FASTMLP_CUDA_ENGINE forces the '", engine_name(c.engine),
             "' engine, which no recorded GPU run has validated for ",
             precision_name(precision), " on compute capability ",
             capability_name(capability),
             "; its results are unverified on this GPU (scripts/gpu_check.sh "
             "validates it; FASTMLP_CUDA_ENGINE=auto uses validated engines "
             "only)");
}

}  // namespace

Engine requested_engine() {
  const int cached = requested.load(std::memory_order_relaxed);
  if (cached >= 0) return static_cast<Engine>(cached);
  const char* s = std::getenv("FASTMLP_CUDA_ENGINE");
  const std::string value = s == nullptr ? "" : s;
  const std::optional<Engine> e = value.empty()
                                      ? std::optional<Engine>(Engine::kAuto)
                                      : parse_engine(value);
  TORCH_CHECK(e.has_value(),
              "fastmlp: FASTMLP_CUDA_ENGINE must be one of auto, custom, "
              "cublaslt, aten; got '",
              value, "'");
  requested.store(static_cast<int>(*e), std::memory_order_relaxed);
  return *e;
}

void set_requested_engine(const std::optional<std::string>& name) {
  if (name.has_value()) {
    const std::optional<Engine> e = parse_engine(*name);
    TORCH_CHECK(e.has_value(),
                "fastmlp: the CUDA engine must be one of auto, custom, "
                "cublaslt, aten; got '",
                *name, "'");
    requested.store(static_cast<int>(*e), std::memory_order_relaxed);
  } else {
    requested.store(-1, std::memory_order_relaxed);
  }
  std::lock_guard<std::mutex> lock(warned_mutex);
  warned.clear();
}

EngineChoice choose_engine(const std::vector<ValidatedEngine>& table,
                           Engine requested, int capability,
                           Precision precision, double flops,
                           bool fits_custom) {
  if (precision == Precision::kFloat64) {
    return {Engine::kAten, Reason::kFallback,
            "fastmlp has no float64 GPU kernel", false};
  }
  if (flops == 0) {
    return {Engine::kAten, Reason::kFallback, "empty product", false};
  }
  if (requested != Engine::kAuto) {
    Engine e = requested;
    std::string why = std::string("FASTMLP_CUDA_ENGINE=") + engine_name(e);
    if (e == Engine::kCustom && !fits_custom) {
      e = Engine::kCublasLt;
      why += " (shape too large for fastmlp's kernels: cublaslt)";
    }
    const bool validated =
        e == Engine::kAten || is_validated(table, capability, precision, e);
    if (!validated) why += ", not validated on this GPU";
    return {e, Reason::kForced, why, !validated};
  }
  for (const ValidatedEngine& v : table) {
    if (v.capability != capability || v.precision != precision) continue;
    if (flops > v.max_flops) continue;
    if (v.engine == Engine::kCustom && !fits_custom) continue;
    std::ostringstream why;
    why << "validated on compute capability " << capability_name(capability)
        << " up to " << v.max_flops << " flops";
    return {v.engine, Reason::kValidated, why.str(), false};
  }
  return {Engine::kAten, Reason::kFallback,
          "no engine validated for " + std::string(precision_name(precision)) +
              " on compute capability " + capability_name(capability) +
              " at this size",
          false};
}

EngineChoice resolve_engine(int capability, Precision precision, double flops,
                            bool fits_custom) {
  EngineChoice c = choose_engine(validated_engines(), requested_engine(),
                                 capability, precision, flops, fits_custom);
  warn_once_if_unvalidated(c, capability, precision);
  return c;
}

namespace {

const char* reason_name(Reason r) {
  switch (r) {
    case Reason::kValidated:
      return "validated";
    case Reason::kFallback:
      return "fallback";
    case Reason::kForced:
      return "forced";
  }
  return "?";
}

// Table entries as text, "90 bf16 custom 8e+09": how Python reads the
// recorded table and how tests pass a filled one.
std::string entry_text(const ValidatedEngine& v) {
  std::ostringstream s;
  s << v.capability << " " << precision_name(v.precision) << " "
    << engine_name(v.engine) << " " << v.max_flops;
  return s.str();
}

ValidatedEngine parse_entry(const std::string& text) {
  std::istringstream s(text);
  ValidatedEngine v{};
  std::string precision, engine, max_flops, rest;
  s >> v.capability >> precision >> engine >> max_flops;
  bool ok = !s.fail() && !(s >> rest);
  try {
    size_t used = 0;
    v.max_flops = std::stod(max_flops, &used);  // also reads "inf"
    ok = ok && used == max_flops.size();
  } catch (const std::exception&) {
    ok = false;
  }
  TORCH_CHECK(ok,
              "fastmlp: a validated-engine entry reads "
              "'<capability> <precision> <engine> <max_flops>', got '",
              text, "'");
  v.precision = parse_precision(precision);
  const std::optional<Engine> e = parse_engine(engine);
  TORCH_CHECK(e.has_value() && *e != Engine::kAuto,
              "fastmlp: unknown engine in entry '", text, "'");
  v.engine = *e;
  return v;
}

std::vector<std::string> engine_choice_op(
    int64_t capability, const std::string& precision, double flops,
    bool fits_custom, const std::optional<std::vector<std::string>>& table) {
  const Precision p = parse_precision(precision);
  EngineChoice c;
  if (table.has_value()) {
    std::vector<ValidatedEngine> entries;
    for (const std::string& t : *table) entries.push_back(parse_entry(t));
    c = choose_engine(entries, requested_engine(), static_cast<int>(capability),
                      p, flops, fits_custom);
    warn_once_if_unvalidated(c, static_cast<int>(capability), p);
  } else {
    c = resolve_engine(static_cast<int>(capability), p, flops, fits_custom);
  }
  return {engine_name(c.engine), reason_name(c.reason), c.why};
}

void set_engine_op(const std::optional<std::string>& name) {
  set_requested_engine(name);
}

std::string requested_engine_op() { return engine_name(requested_engine()); }

std::vector<std::string> validated_engines_op() {
  std::vector<std::string> out;
  for (const ValidatedEngine& v : validated_engines()) {
    out.push_back(entry_text(v));
  }
  return out;
}

}  // namespace
}  // namespace fastmlp

// Helpers for fastmlp/engines.py (no tensors; not part of the model API).
TORCH_LIBRARY_FRAGMENT(fastmlp, m) {
  m.def(
      "_cuda_engine_choice(int capability, str precision, float flops, "
      "bool fits_custom, str[]? table=None) -> str[]",
      &fastmlp::engine_choice_op);
  m.def("_set_cuda_engine(str? name) -> ()", &fastmlp::set_engine_op);
  m.def("_cuda_requested_engine() -> str", &fastmlp::requested_engine_op);
  m.def("_cuda_validated_engines() -> str[]", &fastmlp::validated_engines_op);
}

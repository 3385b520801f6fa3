// Which engine runs a fastmlp op on a GPU: the validated-engine rule.
//
// Host code with no CUDA dependency, compiled in every build, so that the
// rule and its report can be tested on machines without a GPU.
//
// Engines: `custom` (fastmlp's own tensor-core kernels, gemm_kernels.cu),
// `cublaslt` (cuBLASLt GEMMs plus our mask/ReLU passes), `aten` (plain ATen
// ops: correct on every GPU). An engine enters kValidatedEngines only after a
// recorded GPU run (scripts/gpu_check.sh) passed all of its tests for that
// compute capability and precision; that script prints the entries its run
// earned, so promoting an engine is a reviewed one-line change here.
//
// FASTMLP_CUDA_ENGINE=auto (default) takes the first validated entry that
// fits the product, else `aten`. custom|cublaslt|aten force an engine; a
// forced engine that is not validated for this GPU and precision runs with a
// warning, once per process for each (engine, capability, precision). The
// variable is read once per process; set_requested_engine() (Python:
// fastmlp.engines.set_cuda_engine) switches it, e.g. in tests.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fastmlp {

enum class Engine { kAuto, kCustom, kCublasLt, kAten };

// float32 is two precisions on a GPU: exact (FFMA) or TF32 tensor cores,
// whichever torch.backends.cuda.matmul.allow_tf32 asks for.
enum class Precision { kFloat32, kTF32, kBFloat16, kFloat16, kFloat64 };

struct ValidatedEngine {
  int capability;  // major * 10 + minor: 90 for H100/H200
  Precision precision;
  Engine engine;
  // auto uses this entry for products of at most max_flops (2*M*N*K); the
  // crossover to the next entry comes from the recorded benchmark.
  double max_flops;
};

// The entries recorded GPU runs have earned, in order of preference.
const std::vector<ValidatedEngine>& validated_engines();

enum class Reason { kValidated, kFallback, kForced };

struct EngineChoice {
  Engine engine;
  Reason reason;
  std::string why;          // one line for the report
  bool unvalidated_forced;  // a forced engine no recorded run has validated
};

// The rule itself, pure: the table is a parameter so tests can fill it.
// fits_custom says whether fastmlp's own kernels can take the shape (int
// extents, grid limits); a forced `custom` that cannot becomes `cublaslt`.
EngineChoice choose_engine(const std::vector<ValidatedEngine>& table,
                           Engine requested, int capability,
                           Precision precision, double flops, bool fits_custom);

// The engine the process asked for (FASTMLP_CUDA_ENGINE, read once).
Engine requested_engine();
// Overrides it (nullopt: read the variable again) and forgets which
// warnings were already given.
void set_requested_engine(const std::optional<std::string>& name);

// choose_engine() with the recorded table and the requested engine, plus the
// one-time warning for an unvalidated forced engine. What the ops call.
EngineChoice resolve_engine(int capability, Precision precision, double flops,
                            bool fits_custom);

const char* engine_name(Engine e);
const char* precision_name(Precision p);

}  // namespace fastmlp

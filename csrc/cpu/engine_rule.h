// Which CPU engine runs a whole-MLP call (fastmlp::mlp, mlp_inference,
// mlp_backward): the rule, written once, and the switch that forces a path
// (for tests and for users who measured their own shapes).
//
//   layered      layer by layer over the whole batch, each layer's GEMM split
//                over threads by output features (mlp_cpu.cpp): best where
//                the layers are wide, whose GEMMs are compute-bound.
//   row_blocked  block by block of rows through every layer
//                (mlp_rowblock.h): best for narrow networks, whose layers are
//                cheap GEMMs over activations that no longer fit a cache, and
//                for small batches (one block, on the calling thread).
//
// `python -m fastmlp.engines` prints the choice and its reason for a shape.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fastmlp {
namespace cpu {

enum class CpuPath { kLayered, kRowBlocked };

// What the call computes: forward saving for backward, forward only
// (no_grad / inference_mode), or backward.
enum class MlpPhase { kTrainForward, kInference, kBackward };

struct CpuPathChoice {
  CpuPath path;
  std::string reason;
};

// The path for an MLP of layer widths `widths` (in_features, then each
// layer's out_features) over `rows` rows of `dtype`.
CpuPathChoice choose_cpu_path(int64_t rows, const std::vector<int64_t>& widths,
                              at::ScalarType dtype, MlpPhase phase);

const char* path_name(CpuPath path);

}  // namespace cpu
}  // namespace fastmlp

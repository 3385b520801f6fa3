// What mlp_backward asks of a CPU path (paths/layered.h, paths/rowblock.h):
// which gradients to compute, from the op's output_mask (mlp_cpu.cpp).
#pragma once

#include <cstddef>
#include <vector>

namespace fastmlp {
namespace cpu {

// Which gradients mlp_backward computes, as the paths read them.
struct GradRequest {
  bool grad_x = false;
  std::vector<bool> weight, bias;
  size_t lowest = 0;  // the lowest layer the gradient must reach
};

}  // namespace cpu
}  // namespace fastmlp

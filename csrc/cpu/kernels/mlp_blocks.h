// The whole-MLP building blocks shared by the layered path of fastmlp::mlp /
// mlp_backward (paths/layered.h) and fastmlp::mlp_sgd_step
// (mlp_sgd_step_cpu.cpp): the temporaries kept from call to call, and the
// backward of one layer in which each thread owns a block of the layer's
// output features (rows of W) from the ReLU mask to the weight gradient, with
// what happens to that gradient (stored for autograd, or applied as an SGD
// update) left to an epilogue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels/blas.h"
#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/scratch.h"

namespace fastmlp {
namespace cpu {

// `buffer` viewed as a tensor of `sizes`, reallocated only when too small or
// of another dtype. A reallocation makes a normal tensor even under
// torch.inference_mode(): an inference tensor kept for the next call would
// refuse the in-place writes of a later call made outside inference mode.
// A buffer above kKeptScratchBytes (scratch.h) is not kept: a fresh tensor,
// freed when the call drops it.
inline at::Tensor reuse_buffer(at::Tensor& buffer, at::IntArrayRef sizes,
                               const at::TensorOptions& options) {
  const int64_t n = c10::multiply_integers(sizes);
  if (n * static_cast<int64_t>(options.dtype().itemsize()) >
      kKeptScratchBytes) {
    c10::InferenceMode normal_tensor(false);
    return at::empty(sizes, options);
  }
  if (!buffer.defined() || buffer.numel() < n ||
      buffer.scalar_type() != options.dtype().toScalarType()) {
    c10::InferenceMode normal_tensor(false);
    buffer = at::empty({n}, options);
  }
  return buffer.narrow(0, 0, n).view(sizes);
}

// A rows x cols matrix in memory this thread keeps from one call to the
// next, up to kKeptScratchBytes (scratch.h says why).
inline at::Tensor scratch_matrix(int64_t rows, int64_t cols,
                                 const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  return reuse_buffer(buffer, {rows, cols}, options);
}

// The larger temporaries of one call (activations, gradient parts), kept by
// the calling thread from one call to the next for the same reason as
// scratch_matrix, each up to kKeptScratchBytes. Each call takes its buffers in
// the same order (next()). Nothing taken from here may outlive the call (never
// return one to a user).
class Workspace {
 public:
  static Workspace& for_this_thread() {
    thread_local Workspace ws;
    ws.slot_ = 0;
    return ws;
  }
  at::Tensor next(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (slot_ == buffers_.size()) buffers_.emplace_back();
    return reuse_buffer(buffers_[slot_++], sizes, options);
  }

 private:
  std::vector<at::Tensor> buffers_;
  size_t slot_ = 0;
};

// Backward of one layer y = act(h @ W.T + b) of a whole MLP, h of shape
// B x K, W of N x K.
//
// d(loss)/d(y) arrives as the sum of `g_parts` (P x B x N, contiguous). `y`
// is what the layer saved for its activation's backward, applied as
// deriv(sum, y) (ReLU's mask by default: y is then the ReLU output), or
// undefined for a layer without activation. The output features are cut into
// one block per thread; the thread that owns rows n0:n1 of W does everything
// that touches them, with no barrier: it sums and masks its columns of the
// gradient (in place into part 0, or into g_dst (B x N) when given; when
// there is one part and no mask, part 0 is read as it is and never written,
// so it may be the caller's grad_y; with a mask, pass g_dst then),
// reduces them into the bias gradient (when need_bias_grad), computes its
// share of d(loss)/d(h) = g[:, n0:n1] @ W[n0:n1, :] (reading W before the
// epilogue, which may update it), then calls
//   epilogue(n0, rows, g_cols, bias_grad)
// with g_cols the B x rows block of the masked gradient and bias_grad its
// column sums in math_t (nullptr unless need_bias_grad): store the weight
// gradient g_cols.T @ h into rows n0:n0+rows, or update W there.
// d(loss)/d(h) is returned as one part per block (blocks x B x K, from `ws`;
// the layer below sums them in its own blocks), or undefined when
// need_grad_h is false. Sums run in a fixed order: results do not depend on
// thread timing.
// split_by_thread = false makes one block of all N features, run by the
// calling thread with the GEMMs threaded by the library: for bfloat16 and
// float16 that is faster (see split_gemms_by_thread), and d(loss)/d(h) is
// then one GEMM rounded once to the 16-bit type, as PyTorch's, instead of
// per-thread parts each rounded before they are summed.
template <typename scalar_t, typename Epilogue,
          typename Deriv = ReluMask<scalar_t>>
at::Tensor layer_backward(const at::Tensor& g_parts, const at::Tensor& y,
                          const at::Tensor& weight_c, bool need_grad_h,
                          bool need_bias_grad, bool split_by_thread,
                          Workspace& ws, Epilogue&& epilogue,
                          const Deriv& deriv = Deriv(),
                          const at::Tensor& g_dst = at::Tensor()) {
  const int64_t P = g_parts.size(0), B = g_parts.size(1), N = g_parts.size(2);
  const int64_t K = weight_c.size(1);
  const int64_t grain = split_by_thread ? block_per_thread(N, kColumnAlign)
                                        : std::max<int64_t>(N, 1);
  const int64_t blocks = ceil_div(N, grain);
  const at::Tensor out_parts =
      need_grad_h ? ws.next({blocks, B, K}, g_parts.options()) : at::Tensor();
  std::vector<const scalar_t*> parts;
  for (int64_t p = 0; p < P; ++p) {
    parts.push_back(g_parts.data_ptr<scalar_t>() + p * B * N);
  }
  const scalar_t* mask = y.defined() ? y.data_ptr<scalar_t>() : nullptr;
  // One unmasked part is the gradient already: read it, never write it.
  const bool combine = mask != nullptr || P > 1;
  const at::Tensor g_mat =
      combine && g_dst.defined() ? g_dst : g_parts.select(0, 0);
  scalar_t* g = combine ? g_mat.data_ptr<scalar_t>() : nullptr;
  using acc_t = math_t<scalar_t>;

  const auto run_blocks = [&](int64_t b0, int64_t b1) {
    BelowAutograd below;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * grain, rows = std::min(N, n0 + grain) - n0;
      std::vector<acc_t> bias_grad(need_bias_grad ? rows : 0, acc_t(0));
      if (combine || need_bias_grad) {
        combine_grad_block<scalar_t>(
            parts, mask, g, B, N, n0, n0 + rows,
            need_bias_grad ? bias_grad.data() : nullptr, deriv);
      }
      const at::Tensor g_cols = g_mat.narrow(1, n0, rows);
      if (need_grad_h) {
        at::Tensor out = out_parts.select(0, blk);
        mm_on_this_thread<scalar_t>(out, g_cols, weight_c.narrow(0, n0, rows));
      }
      epilogue(
          n0, rows, g_cols,
          need_bias_grad ? bias_grad.data() : static_cast<acc_t*>(nullptr));
    }
  };
  if (split_by_thread) {
    at::parallel_for(0, blocks, 1, run_blocks);
  } else {
    // Outside any parallel region, so that the library threads the GEMMs.
    run_blocks(0, blocks);
  }
  return out_parts;
}

}  // namespace cpu
}  // namespace fastmlp

// CPU kernels of fastmlp::linear_relu and fastmlp::linear_relu_backward.
//
// The GEMMs are the BLAS that torch ships (MKL / oneDNN through ATen); the
// fusion around them is ours. Work is split by hand over at::parallel_for so
// that each thread owns a block of the output and applies bias and ReLU (or,
// in backward, the ReLU mask and the bias-gradient reduction) to that block
// while it is still in the thread's cache, instead of in separate passes over
// full-size tensors. Inside a parallel region the BLAS runs single-threaded.
// For bfloat16/float16 the GEMMs are instead left to the library's own
// threading, which measured faster (see split_gemms_by_thread); the mask and
// bias-gradient pass stays ours.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/kernels/cpu_kernels.h"

namespace fastmlp {
namespace {

using namespace cpu;  // NOLINT: the building blocks of this file

// Rows of a batch processed per backward step: the masked gradient of one
// step (kBackwardRows x out_features) is the only temporary and stays small
// enough for L2, whatever the batch size.
constexpr int64_t kBackwardRows = 1024;

at::Tensor linear_relu_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  check_linear_relu_args(x, weight, bias);
  const int64_t N = weight.size(0);
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, x.scalar_type(), "linear_relu_cpu",
        [&] { linear_relu_forward_impl<scalar_t>(x2, w, b, out); });
  }
  return out.view(with_last(x.sizes(), N));
}

// grad_weight (+)= g.T @ x for one row step; `acc` (float) when 16-bit
// results are summed over several steps, `first` says whether to overwrite.
void accumulate_grad_weight(const at::Tensor& g, const at::Tensor& x,
                            at::Tensor grad_w, at::Tensor acc, bool first) {
  const at::Tensor gt = g.t();
  if (acc.defined()) {
    acc.add_(at::mm(gt, x));
  } else if (first) {
    at::mm_out(grad_w, gt, x);
  } else {
    at::addmm_out(grad_w, grad_w, gt, x);
  }
}

template <typename scalar_t>
void linear_relu_backward_impl(const at::Tensor& gy, const at::Tensor& y,
                               const at::Tensor& x2, const at::Tensor& w,
                               std::array<bool, 3> mask, at::Tensor& grad_x,
                               at::Tensor& grad_w, at::Tensor& grad_b) {
  const int64_t M = y.size(0), N = y.size(1);
  const int64_t rows_per_step = std::min(M, kBackwardRows);
  const bool split = split_gemms_by_thread<scalar_t>();
  at::Tensor g = at::empty({rows_per_step, N}, y.options());
  // grad_weight is summed over row steps; a 16-bit result is accumulated in
  // float across steps so that it is rounded once.
  at::Tensor gw_acc;
  if (mask[1] && M > rows_per_step &&
      at::is_reduced_floating_point_v<scalar_t>) {
    gw_acc = at::zeros(grad_w.sizes(), grad_w.options().dtype(at::kFloat));
  }
  std::vector<math_t<scalar_t>> bias_acc(mask[2] ? N : 0, math_t<scalar_t>(0));
  const int64_t col_grain = block_per_thread(N, kColumnAlign);

  for (int64_t m0 = 0; m0 < M; m0 += rows_per_step) {
    const int64_t rows = std::min(rows_per_step, M - m0);
    const at::Tensor g_rows = g.narrow(0, 0, rows);
    const bool first = m0 == 0;
    const at::Tensor x_rows = mask[1] ? x2.narrow(0, m0, rows) : at::Tensor();
    // Columns: each thread masks its columns of this row block and reduces
    // them into the bias gradient; when the GEMMs are split by thread it also
    // computes, while they are hot, its rows of grad_weight = g.T @ x_rows.
    at::parallel_for(0, N, col_grain, [&](int64_t n0, int64_t n1) {
      BelowAutograd below;
      combine_grad_block<scalar_t>({gy.data_ptr<scalar_t>() + m0 * N},
                                   y.data_ptr<scalar_t>() + m0 * N,
                                   g.data_ptr<scalar_t>(), rows, N, n0, n1,
                                   mask[2] ? bias_acc.data() + n0 : nullptr);
      if (split && mask[1]) {
        accumulate_grad_weight(
            g_rows.narrow(1, n0, n1 - n0), x_rows,
            grad_w.narrow(0, n0, n1 - n0),
            gw_acc.defined() ? gw_acc.narrow(0, n0, n1 - n0) : at::Tensor(),
            first);
      }
    });
    if (!split && mask[1]) {
      accumulate_grad_weight(g_rows, x_rows, grad_w, gw_acc, first);
    }
    // grad_x for this row block = g @ weight.
    if (mask[0]) {
      if (split) {
        const int64_t row_grain = block_per_thread(rows, 1);
        at::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
          BelowAutograd below;
          at::Tensor gx = grad_x.narrow(0, m0 + r0, r1 - r0);
          at::mm_out(gx, g_rows.narrow(0, r0, r1 - r0), w);
        });
      } else {
        at::Tensor gx = grad_x.narrow(0, m0, rows);
        at::mm_out(gx, g_rows, w);
      }
    }
  }
  if (gw_acc.defined()) grad_w.copy_(gw_acc);
  if (mask[2]) {
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) gb[j] = static_cast<scalar_t>(bias_acc[j]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask) {
  check_linear_relu_backward_args(grad_y, y, x, weight, output_mask);
  const int64_t N = y.size(-1);
  const at::Tensor y2 = as_rows(y);
  const at::Tensor gy2 = as_rows(grad_y);
  const int64_t M = y2.size(0);
  const auto empty = [&] { return at::empty({0}, y.options()); };

  at::Tensor x2, w, grad_x = empty(), grad_w = empty(), grad_b = empty();
  if (output_mask[0]) {
    w = weight->contiguous();
    grad_x = at::empty({M, w.size(1)}, y.options());
  }
  if (output_mask[1]) {
    x2 = as_rows(*x);
    grad_w = at::empty({N, x2.size(1)}, y.options());
  }
  if (output_mask[2]) grad_b = at::empty({N}, y.options());

  if (M == 0 || N == 0) {
    // No rows or no outputs: every gradient is an empty sum.
    grad_x.zero_();
    grad_w.zero_();
    grad_b.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(),
                                    "linear_relu_backward_cpu", [&] {
                                      linear_relu_backward_impl<scalar_t>(
                                          gy2, y2, x2, w, output_mask, grad_x,
                                          grad_w, grad_b);
                                    });
  }
  if (output_mask[0]) {
    grad_x = grad_x.view(with_last(y.sizes(), w.size(1)));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

}  // namespace fastmlp

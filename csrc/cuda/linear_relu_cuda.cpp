// CUDA implementations of fastmlp::linear_relu and linear_relu_backward:
// the op glue. Three engines sit behind the two ops, and the validated-engine
// rule (cuda/engine_rule.h) picks one per call:
//
//   custom    our kernels (gemm_kernels.cu): tensor-core GEMM with bias+ReLU
//             fused into the epilogue; the backward applies the ReLU mask
//             while loading grad_y tiles and sums the bias gradient from the
//             same tiles in the weight-gradient GEMM (no temporary).
//   cublaslt  cuBLASLt GEMMs (cublaslt.h; see "Why not RELU_AUX_BIAS /
//             DRELU_BGRAD") plus our mask and ReLU passes.
//   aten      plain ATen ops (aten_engine.h): correct on every GPU, the
//             float64 path, and what `auto` runs until a recorded GPU run
//             has validated a faster engine.
//
// Host code only (the kernels are launched through gemm_kernels.cuh), so the
// host compiler builds it, faster than nvcc would.
//
// Why not RELU_AUX_BIAS / DRELU_BGRAD. cuBLASLt's fused ReLU maps NaN to 0
// while torch.relu keeps NaN, and its 1-bit aux mask (pre-activation > 0)
// cannot tell a NaN from a negative value, so neither the output nor the mask
// can be repaired afterwards. DRELU_BGRAD applies the mask to the *result*
// of a GEMM, i.e. it fuses one layer's grad_x GEMM with the *previous*
// layer's ReLU backward; this op's backward must mask its *input* grad_y,
// which no cuBLASLt epilogue does. So the cuBLASLt engine runs the forward
// with the BIAS epilogue and then one in-place ReLU pass with PyTorch
// semantics (cost: one extra read+write of y and one launch), and the
// backward with one pass that writes mask(grad_y) and the bias gradient
// (deterministic column sums) followed by two plain GEMMs. Exact semantics
// on every input, including NaN produced inside the GEMM by overflow.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "aten/aten_engine.h"
#include "checks.h"
#include "common_math.h"
#include "cuda/cublaslt.h"
#include "cuda/engine_rule.h"
#include "cuda/gemm_kernels.cuh"

namespace fastmlp {
namespace {

namespace fk = fastmlp::cuda;

bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

// Largest extent our kernels' int index math handles. The kernels compute
// row/column/k indices up to one tile (and, with split-K, up to 16 * BK)
// *past* an extent before comparing them with it, e.g. row = m0 + 127 in the
// GEMM epilogue or r += 8 in the column sums; with M right below INT_MAX
// those would overflow to negative values that pass the bounds checks and
// address memory out of range. The margin keeps them representable.
constexpr int64_t kMaxKernelExtent = std::numeric_limits<int>::max() - 4096;

// Whether fastmlp's own GEMMs can run this shape: int extents, and at most
// 65535 64-wide tiles along N (forward, wgrad) and K (dgrad, wgrad) in grid.y.
bool fits_custom(int64_t M, int64_t N, int64_t K) {
  return M <= kMaxKernelExtent && N <= kMaxKernelExtent &&
         K <= kMaxKernelExtent && ceil_div(N, 64) <= 65535 &&
         ceil_div(K, 64) <= 65535;
}

// The mask/column-sum kernel takes M and N as int (same margin).
bool fits_colsum(int64_t M, int64_t N) {
  return M <= kMaxKernelExtent && N <= kMaxKernelExtent;
}

Precision precision_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return tf32_allowed() ? Precision::kTF32 : Precision::kFloat32;
    case at::kBFloat16:
      return Precision::kBFloat16;
    case at::kHalf:
      return Precision::kFloat16;
    default:
      return Precision::kFloat64;
  }
}

// The validated-engine rule for this device, dtype and product.
Engine pick_engine(const at::Tensor& t, int64_t M, int64_t N, int64_t K) {
  const cudaDeviceProp* prop =
      at::cuda::getDeviceProperties(t.device().index());
  const double flops = 2.0 * double(M) * double(N) * double(K);
  return resolve_engine(prop->major * 10 + prop->minor,
                        precision_of(t.scalar_type()), flops,
                        fits_custom(M, N, K))
      .engine;
}

fk::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return fk::DType::kFloat32;
    case at::kBFloat16:
      return fk::DType::kBFloat16;
    case at::kHalf:
      return fk::DType::kFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "fastmlp: no CUDA kernel for ", t);
  }
}

fk::F32Math f32_math() {
  return tf32_allowed() ? fk::F32Math::kTF32 : fk::F32Math::kExact;
}

int num_sms(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}

// ---------------------------------------------------------------------------
// Forward.

void forward_custom(const at::Tensor& x, const at::Tensor& w, const void* b,
                    at::Tensor& y, int64_t M, int64_t N, int64_t K) {
  C10_CUDA_CHECK(fk::launch_forward(
      to_kernel_dtype(x.scalar_type()), f32_math(), x.data_ptr(), w.data_ptr(),
      b, y.data_ptr(), static_cast<int>(M), static_cast<int>(N),
      static_cast<int>(K), num_sms(x), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool forward_cublaslt(const at::Tensor& x, const at::Tensor& w, const void* b,
                      at::Tensor& y, int64_t M, int64_t N, int64_t K) {
  // Row-major y[M,N] is column-major y^T[N,M] = W (col-major K x N, op T)
  // times x^T (col-major K x M, op N); the bias runs along N = rows of D.
  if (!cublaslt::matmul(x, /*transa=*/true, /*transb=*/false, N, M, K,
                        w.data_ptr(), K, x.data_ptr(), K, y.data_ptr(), N, b)) {
    return false;
  }
  C10_CUDA_CHECK(fk::launch_relu_inplace(to_kernel_dtype(x.scalar_type()),
                                         y.data_ptr(), y.numel(),
                                         at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  check_linear_relu_args(x, weight, bias);
  TORCH_CHECK(x.is_cuda(), "fastmlp.linear_relu: x must be a CUDA tensor, got ",
              x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  int64_t M = 1;
  for (int64_t d = 0; d < x.dim() - 1; ++d) M *= x.size(d);

  const Engine engine = pick_engine(x, M, N, K);
  if (engine == Engine::kAten) return linear_relu_aten(x, weight, bias);

  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    // cuBLASLt wants an aligned bias vector; a copy of N elements is cheap.
    if (reinterpret_cast<uintptr_t>(bc.data_ptr()) % 16 != 0) bc = bc.clone();
  }
  const void* bptr = bc.defined() ? bc.data_ptr() : nullptr;
  at::Tensor y = at::empty(with_last(x.sizes(), N), x.options());

  if (engine == Engine::kCublasLt) {
    if (forward_cublaslt(xc, wc, bptr, y, M, N, K)) return y;
    // The rule also sends shapes our kernels cannot take (int overflow,
    // grid.y limit) to cuBLASLt; the static_cast<int>s in forward_custom
    // would truncate them, so those fall back to ATen instead.
    if (!fits_custom(M, N, K)) return linear_relu_aten(x, weight, bias);
    TORCH_WARN_ONCE("fastmlp: cuBLASLt has no algorithm for linear_relu with ",
                    "M=", M, " N=", N, " K=", K, " ", x.scalar_type(),
                    "; using fastmlp's own kernel");
  }
  forward_custom(xc, wc, bptr, y, M, N, K);
  return y;
}

// ---------------------------------------------------------------------------
// Backward.

// One linear_relu_backward call on the custom or cuBLASLt engine: its
// arguments and sizes, grad_y and y contiguous, the launch settings, and the
// three outputs that the parts below fill.
struct BackwardCall {
  const at::Tensor& y;
  const std::optional<at::Tensor>& x;
  const std::optional<at::Tensor>& weight;
  const std::array<bool, 3> mask;
  const int64_t M, N, K;
  const at::Tensor gc, yc;  // grad_y and y, contiguous
  const fk::DType dt;
  const fk::F32Math f32;
  const cudaStream_t stream;
  const at::TensorOptions fopts;  // float32 on y's device: workspaces
  // One tensor per output, also for the unrequested ones: outputs that
  // share a TensorImpl would alias, which the schema does not declare.
  at::Tensor gx, gw, gb;
};

// The mask and column-sum pass: gm_out (when given) = grad_y where y > 0,
// and the bias gradient when it is asked for.
void mask_colsum(const BackwardCall& c, void* gm_out) {
  const int chunks = fk::colsum_chunks(static_cast<int>(c.M));
  at::Tensor partial;
  if (c.mask[2] && chunks > 1)
    partial = at::empty({int64_t(chunks) * c.N}, c.fopts);
  C10_CUDA_CHECK(fk::launch_mask_colsum(
      c.dt, c.gc.data_ptr(), c.yc.data_ptr(), gm_out,
      c.mask[2] ? c.gb.data_ptr() : nullptr,
      partial.defined() ? partial.data_ptr<float>() : nullptr,
      static_cast<int>(c.M), static_cast<int>(c.N), c.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The cuBLASLt engine's backward: one pass for gm = mask(grad_y) and the bias
// gradient, then a GEMM per asked gradient. False when cuBLASLt has no
// algorithm for a GEMM (the outputs are then incomplete).
bool backward_cublaslt(BackwardCall& c) {
  const int64_t M = c.M, N = c.N, K = c.K;
  const bool need_gm = c.mask[0] || c.mask[1];
  at::Tensor gm;
  if (need_gm) gm = at::empty({M, N}, c.y.options());
  if (need_gm || c.mask[2]) mask_colsum(c, need_gm ? gm.data_ptr() : nullptr);
  bool ok = true;
  if (c.mask[0]) {
    const at::Tensor wc = c.weight->contiguous();
    c.gx = at::empty(with_last(c.y.sizes(), K), c.y.options());
    // grad_x^T (col-major K x M) = W (col-major K x N) @ gm^T (N x M).
    ok = ok && cublaslt::matmul(c.y, false, false, K, M, N, wc.data_ptr(), K,
                                gm.data_ptr(), N, c.gx.data_ptr(), K, nullptr);
  }
  if (c.mask[1] && ok) {
    const at::Tensor xc = c.x->contiguous();
    c.gw = at::empty({N, K}, c.y.options());
    // grad_W^T (col-major K x N) = x^T (col-major K x M) @ op_T(gm^T).
    ok = cublaslt::matmul(c.y, false, true, K, N, M, xc.data_ptr(), K,
                          gm.data_ptr(), N, c.gw.data_ptr(), K, nullptr);
  }
  return ok;
}

// grad_x with our dgrad kernel.
void custom_dgrad(BackwardCall& c) {
  const at::Tensor wc = c.weight->contiguous();
  c.gx = at::empty(with_last(c.y.sizes(), c.K), c.y.options());
  C10_CUDA_CHECK(fk::launch_dgrad(
      c.dt, c.f32, c.gc.data_ptr(), c.yc.data_ptr(), wc.data_ptr(),
      c.gx.data_ptr(), static_cast<int>(c.M), static_cast<int>(c.N),
      static_cast<int>(c.K), num_sms(c.y), c.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_W, and the bias gradient when asked for, with our wgrad kernel.
void custom_wgrad(BackwardCall& c) {
  const int M = static_cast<int>(c.M), N = static_cast<int>(c.N),
            K = static_cast<int>(c.K);
  const at::Tensor xc = c.x->contiguous();
  c.gw = at::empty({c.N, c.K}, c.y.options());
  const int splits = fk::wgrad_splits(M, N, K, num_sms(c.y));
  const size_t ws = fk::wgrad_workspace_floats(M, N, K, splits);
  at::Tensor workspace;
  if (ws > 0) workspace = at::empty({static_cast<int64_t>(ws)}, c.fopts);
  C10_CUDA_CHECK(fk::launch_wgrad(
      c.dt, c.f32, c.gc.data_ptr(), c.yc.data_ptr(), xc.data_ptr(),
      c.gw.data_ptr(), c.mask[2] ? c.gb.data_ptr() : nullptr, M, N, K, splits,
      workspace.defined() ? workspace.data_ptr<float>() : nullptr, c.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The custom engine's backward, also cuBLASLt's fallback: every asked
// gradient with our kernels (the bias gradient with wgrad's, or alone by the
// mask and column-sum pass).
void backward_custom(BackwardCall& c) {
  if (c.mask[0]) custom_dgrad(c);
  if (c.mask[1]) {
    custom_wgrad(c);
  } else if (c.mask[2]) {
    mask_colsum(c, nullptr);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  check_linear_relu_backward_args(grad_y, y, x, weight, mask);
  TORCH_CHECK(y.is_cuda(),
              "fastmlp.linear_relu_backward: y must be a CUDA tensor, got ",
              y.device());
  c10::cuda::CUDAGuard guard(y.device());
  const int64_t N = y.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d < y.dim() - 1; ++d) M *= y.size(d);
  int64_t K = 1;  // in_features; unknown (unneeded) when only grad_b is asked
  if (weight.has_value()) {
    K = weight->size(1);
  } else if (x.has_value()) {
    K = x->size(-1);
  }

  const Engine engine = pick_engine(y, M, N, K);
  if (engine == Engine::kAten) {
    return linear_relu_backward_aten(grad_y, y, x, weight, mask);
  }
  BackwardCall c{y,
                 x,
                 weight,
                 mask,
                 M,
                 N,
                 K,
                 grad_y.contiguous(),
                 y.contiguous(),
                 to_kernel_dtype(y.scalar_type()),
                 f32_math(),
                 at::cuda::getCurrentCUDAStream(),
                 y.options().dtype(at::kFloat),
                 at::empty({0}, y.options()),
                 at::empty({0}, y.options()),
                 at::empty({mask[2] ? N : 0}, y.options())};

  if (engine == Engine::kCublasLt && !fits_colsum(M, N)) {
    // Shapes past the custom kernels' limits are routed to cuBLASLt, but its
    // path below still runs our int-indexed mask/column-sum kernel (M, N are
    // static_cast to int): use ATen rather than truncate them.
    return linear_relu_backward_aten(grad_y, y, x, weight, mask);
  }
  if (engine == Engine::kCublasLt) {
    if (backward_cublaslt(c)) return {c.gx, c.gw, c.gb};
    // Shapes our kernels cannot take (see fits_custom) go to ATen instead.
    if (!fits_custom(M, N, K)) {
      return linear_relu_backward_aten(grad_y, y, x, weight, mask);
    }
    TORCH_WARN_ONCE(
        "fastmlp: cuBLASLt has no algorithm for linear_relu_backward ",
        "with M=", M, " N=", N, " K=", K, " ", y.scalar_type(),
        "; using fastmlp's own kernels");
    // fall through: recompute everything with our kernels
  }
  backward_custom(c);
  return {c.gx, c.gw, c.gb};
}

}  // namespace
}  // namespace fastmlp

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("linear_relu", &fastmlp::linear_relu_cuda);
  m.impl("linear_relu_backward", &fastmlp::linear_relu_backward_cuda);
}

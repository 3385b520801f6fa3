// The row-blocked path of the whole-MLP ops on CPU ("fully fused", as
// tiny-cuda-nn calls it on GPUs): a block of rows goes through every layer
// before the next block starts, so its activations stay in the core's cache;
// backward walks each block down through the layers the same way, each thread
// accumulating weight and bias gradients of its own blocks, reduced once at
// the end. Nothing is written to memory but the output, what autograd saves
// (mlp's `hidden`; nothing at all for inference) and the gradients.
//
// It wins where the layered path (paths/layered.h) pays memory traffic
// and per-call costs for little arithmetic: narrow networks on big batches
// (each layer's activations of a whole batch are megabytes that a block keeps
// in L1/L2) and small batches (one block on the calling thread: no thread
// hand-off, no allocation). The GEMMs are the BLAS's (blas.h), called once
// per layer and block; bias, activation and its derivative are epilogues
// (activation_epilogues.h). float, double and bfloat16 (float accumulation,
// each GEMM's output rounded once as torch's; the weight and bias gradients
// summed in float over the whole batch and rounded once); float16 and a torch
// without MKL run the layered path (paths/rule.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "activation_kinds.h"
#include "cpu/kernels/activation_epilogues.h"
#include "cpu/kernels/blas.h"
#include "cpu/kernels/cpu_kernels.h"
#include "cpu/kernels/small_rows.h"
#include "cpu/paths/grad_request.h"

namespace fastmlp {
namespace cpu {

// Bytes of one block's widest activation: small enough that the two or three
// of them a block uses, with the layer's weight, stay in a core's L2 (1 MiB
// on the EPYCs measured, 1.25-2 MiB on recent Intel).
constexpr int64_t kRowBlockBytes = 96 * 1024;

// Rows per block for layers at most `max_width` wide: a multiple of 8 (whole
// cache lines of rows for the BLAS), 16 to 1024.
inline int64_t rowblock_rows(int64_t max_width, int64_t elem_size) {
  const int64_t rows =
      kRowBlockBytes / std::max<int64_t>(1, max_width * elem_size);
  return std::clamp<int64_t>(rows / 8 * 8, 16, 1024);
}

// Fewest rows per thread for which a call is split over the threads: below
// it the hand-off costs more than the second core saves.
constexpr int64_t kMinRowsPerThread = 64;

// The threads the path's parallel_for will use: one inside a parallel
// region (it then runs inline).
inline int64_t path_threads() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

// Rows per block for a call of M rows: rowblock_rows, shrunk (to a multiple
// of 8) so that the blocks split evenly over the threads once each thread
// gets at least kMinRowsPerThread rows; a batch of 256 rows of a narrow net
// is one block of rowblock_rows but two of 128 here, one per core.
inline int64_t balanced_block_rows(int64_t M, int64_t max_width,
                                   int64_t elem_size, int64_t threads) {
  const int64_t R = rowblock_rows(max_width, elem_size);
  if (threads <= 1 || M < threads * kMinRowsPerThread) return R;
  const int64_t blocks = ceil_div(ceil_div(M, R), threads) * threads;
  return std::max<int64_t>(8, ceil_div(ceil_div(M, blocks), 8) * 8);
}

// One layer as the path reads it: W (n x k, contiguous), its bias (n, or
// nullptr) and, for float forwards on brgemm, W.T (k x n, contiguous: the
// operand layout brgemm takes; nullptr otherwise), made once per call rather
// than once per block.
template <typename T>
struct LayerRef {
  const T* w;
  const T* b;
  int64_t n, k;
  const T* wt = nullptr;
};

template <typename T>
std::vector<LayerRef<T>> layer_refs(const std::vector<at::Tensor>& w,
                                    const std::vector<at::Tensor>& b) {
  std::vector<LayerRef<T>> layers;
  for (size_t l = 0; l < w.size(); ++l) {
    layers.push_back({w[l].data_ptr<T>(),
                      b[l].defined() ? b[l].data_ptr<T>() : nullptr,
                      w[l].size(0), w[l].size(1)});
  }
  return layers;
}

// dst (rows x n, row stride ldd) = a product that gemm(c, ldc) computes into
// a math_t matrix: in place for float and double; for bfloat16 into float
// scratch (slot 3) and rounded once into dst, as torch's bf16 GEMMs round
// their float accumulators.
template <typename T, typename Gemm>
void gemm_into(T* dst, int64_t rows, int64_t n, int64_t ldd, const Gemm& gemm) {
  if constexpr (std::is_same_v<T, math_t<T>>) {
    gemm(dst, ldd);
  } else {
    using Vec = Vectorized<float>;
    const ScratchLease<float> lease(thread_scratch<float>(3), rows * n);
    float* acc = lease.data();
    gemm(acc, n);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n; c += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), n - c);
        store_math(Vec::loadu(acc + r * n + c, count), dst + r * ldd + c,
                   count);
      }
    }
  }
}

// z (rows x cols, row stride ldz) = in (rows x k, row stride ldin) @ W.T + b
// for the layer's output features c0:c0+cols: the bias copied into the
// accumulator first and the product added onto it, rounded once as torch's
// addmm.
template <typename T>
void layer_rows_forward(const T* in, int64_t ldin, const LayerRef<T>& layer,
                        int64_t rows, T* z, int64_t ldz, int64_t c0,
                        int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    // A few rows: each weight read once (small_rows.h), no library packing.
    if (rows <= kSmallRows && layer.k >= kSmallRowsMinK &&
        layer.wt == nullptr) {
      small_rows_linear(in, ldin, rows, layer.w, layer.b, layer.k, z, ldz, c0,
                        cols);
      return;
    }
  }
  using acc_t = math_t<T>;
  gemm_into<T>(z, rows, cols, ldz, [&](acc_t* c, int64_t ldc) {
    if (layer.b != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < cols; ++j) {
          c[r * ldc + j] = static_cast<acc_t>(layer.b[c0 + j]);
        }
      }
    }
    const acc_t beta(layer.b != nullptr ? 1 : 0);
    if (layer.wt != nullptr) {
      gemm_nn(rows, cols, layer.k, in, ldin, layer.wt + c0, layer.n, beta, c,
              ldc);
    } else {
      gemm_nt(rows, cols, layer.k, in, ldin, layer.w + c0 * layer.k, layer.k,
              beta, c, ldc);
    }
  });
}

// The whole layer: z (rows x n, row stride n).
template <typename T>
void layer_rows_forward(const T* in, int64_t ldin, const LayerRef<T>& layer,
                        int64_t rows, T* z) {
  layer_rows_forward<T>(in, ldin, layer, rows, z, layer.n, 0, layer.n);
}

// a = act(z) row by row (rows x n, row stride ld, n by default; a may be z).
template <typename T>
void activate_rows(Activation kind, double slope, const T* z, T* a,
                   int64_t rows, int64_t n, int64_t ld = 0) {
  if (ld == 0) ld = n;
  with_activation_rows<T>(kind, slope, [&](const auto& epilogue) {
    for (int64_t r = 0; r < rows; ++r) epilogue(z + r * ld, a + r * ld, n);
  });
}

// The widest layer's out_features (at least 1): what a block's buffers hold.
template <typename T>
int64_t widest_layer(const std::vector<LayerRef<T>>& layers) {
  int64_t widest = 1;
  for (const auto& layer : layers) widest = std::max(widest, layer.n);
  return widest;
}

// Weights of at least this many bytes make a one-block forward split each
// layer's output features over the threads (split_columns_forward): reading
// them is then most of the work, and two cores read twice as fast as one
// (tutorial MLP at batch 1, 2.7 MB of weights: 45 us on one thread, less on
// two; measured on the 2-core EPYC).
constexpr int64_t kSplitColumnsBytes = 256 * 1024;

// mlp's forward for one block of rows (all M of them), each layer's output
// features split over the threads, with a barrier between layers. Arguments
// as rowblock_forward's; buffers are the calling thread's scratch.
template <typename T>
void split_columns_forward(const T* x, int64_t M, int64_t K0,
                           const std::vector<LayerRef<T>>& layers,
                           const MlpActivations& act,
                           const std::vector<T*>& saved, T* y,
                           int64_t max_width) {
  const size_t L = layers.size();
  const bool training = !saved.empty();
  const bool in_place = act.hidden_saves_output();
  const ScratchLease<T> lease0(thread_scratch<T>(0), M * max_width);
  const ScratchLease<T> lease1(thread_scratch<T>(1), M * max_width);
  T* const buf[2] = {lease0.data(), lease1.data()};
  const auto other = [&](const T* p) { return p == buf[0] ? buf[1] : buf[0]; };
  const T* in = x;
  int64_t ldin = K0;
  for (size_t l = 0; l < L; ++l) {
    const LayerRef<T>& layer = layers[l];
    const bool top = l + 1 == L;
    const Activation kind = top ? act.output : act.hidden;
    // z: the pre-activation; a: the activation (the next layer's input).
    T* a = top ? y : (training && in_place ? saved[l] : other(in));
    T* z = (training && (!top || kind != Activation::kNone)) ? saved[l] : a;
    const int64_t n = layer.n;
    at::parallel_for(
        0, n, block_per_thread(n, kColumnAlign), [&](int64_t c0, int64_t c1) {
          SingleThreadedBlas single;
          const int64_t cols = c1 - c0;
          layer_rows_forward<T>(in, ldin, layer, M, z + c0, n, c0, cols);
          // No activation: z is a (its layers save their output).
          if (kind != Activation::kNone) {
            activate_rows<T>(kind, act.negative_slope, z + c0, a + c0, M, cols,
                             n);
          }
        });
    in = a;
    ldin = n;
  }
}

// mlp's forward, block by block. hidden: mlp's saved tensors (see
// schemas.cpp), written as the blocks pass, or empty for inference (nothing
// saved: the activations live only in per-thread scratch).
template <typename T>
void rowblock_forward(const at::Tensor& x2, const std::vector<at::Tensor>& w,
                      const std::vector<at::Tensor>& b,
                      const MlpActivations& act,
                      const std::vector<at::Tensor>& hidden, at::Tensor& out) {
  std::vector<LayerRef<T>> layers = layer_refs<T>(w, b);
  const size_t L = layers.size();
  const int64_t M = x2.size(0), K0 = x2.size(1);
  const int64_t max_width = widest_layer(layers);
  const int64_t threads = path_threads();
  const int64_t R = balanced_block_rows(M, max_width, sizeof(T), threads);
  const bool training = !hidden.empty();
  // Layers that save their output compute the activation in place.
  const bool in_place = act.hidden_saves_output();
  const T* x = x2.data_ptr<T>();
  T* y = out.data_ptr<T>();
  std::vector<T*> saved;
  for (const auto& h : hidden) saved.push_back(h.data_ptr<T>());
  int64_t weight_bytes = 0;
  for (const auto& layer : layers) {
    weight_bytes += layer.n * layer.k * static_cast<int64_t>(sizeof(T));
  }
  if (M <= rowblock_rows(max_width, sizeof(T)) &&
      weight_bytes >= kSplitColumnsBytes && threads > 1) {
    split_columns_forward<T>(x, M, K0, layers, act, saved, y, max_width);
    return;
  }
  // brgemm's operand layout for the weights, made once for all blocks.
  std::vector<at::Tensor> transposed_weights;
  if constexpr (std::is_same_v<T, float>) {
    if (M >= kBrgemmMinRows && brgemm_f32_available()) {
      for (size_t l = 0; l < L; ++l) {
        transposed_weights.push_back(w[l].t().contiguous());
        layers[l].wt = transposed_weights.back().data_ptr<T>();
      }
    }
  }

  at::parallel_for(0, ceil_div(M, R), 1, [&](int64_t b0, int64_t b1) {
    SingleThreadedBlas single;
    const ScratchLease<T> lease0(thread_scratch<T>(0), R * max_width);
    const ScratchLease<T> lease1(thread_scratch<T>(1), R * max_width);
    T* const buf[2] = {lease0.data(), lease1.data()};
    // The scratch buffer that `p` is not.
    const auto other = [&](const T* p) {
      return p == buf[0] ? buf[1] : buf[0];
    };
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * R, rows = std::min(R, M - m0);
      const T* in = x + m0 * K0;
      int64_t ldin = K0;
      for (size_t l = 0; l + 1 < L; ++l) {
        const int64_t n = layers[l].n;
        T* z = training ? saved[l] + m0 * n : other(in);
        layer_rows_forward<T>(in, ldin, layers[l], rows, z);
        T* a = (!training || in_place) ? z : other(in);
        activate_rows<T>(act.hidden, act.negative_slope, z, a, rows, n);
        in = a;
        ldin = n;
      }
      const LayerRef<T>& top = layers[L - 1];
      T* y_rows = y + m0 * top.n;
      if (act.output == Activation::kNone) {
        layer_rows_forward<T>(in, ldin, top, rows, y_rows);
      } else {
        T* z = training ? saved[L - 1] + m0 * top.n : y_rows;
        layer_rows_forward<T>(in, ldin, top, rows, z);
        activate_rows<T>(act.output, act.negative_slope, z, y_rows, rows,
                         top.n);
      }
    }
  });
}

// Per-thread gradient accumulators of the row-blocked backward: for each
// layer from `lowest` up, its weight gradient (n x k) when asked for, then
// its bias gradient (n) when asked for, one such set per thread, zeroed.
template <typename T>
class GradAccumulators {
 public:
  template <typename W>
  GradAccumulators(const std::vector<LayerRef<W>>& layers,
                   const GradRequest& req, int64_t threads) {
    for (size_t l = 0; l < layers.size(); ++l) {
      w_off_.push_back(per_thread_);
      if (l >= req.lowest && req.weight[l]) {
        per_thread_ += layers[l].n * layers[l].k;
      }
      b_off_.push_back(per_thread_);
      if (l >= req.lowest && req.bias[l]) per_thread_ += layers[l].n;
    }
    data_.assign(per_thread_ * threads, T(0));
    threads_ = threads;
  }
  T* weight(int64_t thread, size_t l) {
    return data_.data() + thread * per_thread_ + w_off_[l];
  }
  T* bias(int64_t thread, size_t l) {
    return data_.data() + thread * per_thread_ + b_off_[l];
  }
  // dst[i] = sum over threads, in thread order, of the block at `offset`,
  // rounded once to dst's type.
  template <typename D>
  void reduce(int64_t offset, int64_t n, D* dst) const {
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T sum = data_[offset + i];
        for (int64_t t = 1; t < threads_; ++t) {
          sum += data_[t * per_thread_ + offset + i];
        }
        dst[i] = static_cast<D>(sum);
      }
    });
  }
  int64_t weight_offset(size_t l) const { return w_off_[l]; }
  int64_t bias_offset(size_t l) const { return b_off_[l]; }

 private:
  std::vector<int64_t> w_off_, b_off_;
  int64_t per_thread_ = 0, threads_ = 1;
  std::vector<T> data_;
};

// g_out (rows x n) = deriv(g, saved) with the column sums added into
// bias_acc (when given); saved == nullptr: no activation, g passes as it is
// (then g_out may be nullptr: only the sums are wanted).
template <typename T>
void activation_backward_rows(Activation kind, bool from_output, double slope,
                              const T* g, const T* saved, T* g_out,
                              int64_t rows, int64_t n, math_t<T>* bias_acc) {
  const std::vector<const T*> parts{g};
  with_activation_deriv<T>(kind, from_output, slope, [&](const auto& deriv) {
    combine_grad_block<T>(parts, saved, g_out, rows, n, 0, n, bias_acc, deriv);
  });
}

// A thread's scratch for the row-blocked backward, each block_rows x widest:
// two buffers for the gradient between layers (a layer writes to the one its
// gradient is not in) and one for a layer input recomputed from the saved
// pre-activation.
template <typename T>
class BackwardBuffers {
 public:
  explicit BackwardBuffers(int64_t n)
      : lease0_(thread_scratch<T>(0), n),
        lease1_(thread_scratch<T>(1), n),
        lease2_(thread_scratch<T>(2), n) {}
  // The gradient buffer that `p` is not.
  T* other(const T* p) const {
    return p == lease0_.data() ? lease1_.data() : lease0_.data();
  }
  T* input() const { return lease2_.data(); }

 private:
  const ScratchLease<T> lease0_, lease1_, lease2_;
};

// mlp_backward, block by block (see mlp_backward_cpu for the arguments):
// what one call reads and writes, named once, and its parts, from one block
// through one layer up to the whole call (rowblock_backward, below).
// Weight and bias gradients are summed per thread in row order and the
// threads' sums added in thread order: deterministic for a thread count.
template <typename T>
class RowBlockBackward {
 public:
  using acc_t = math_t<T>;

  RowBlockBackward(const at::Tensor& gy2, const at::Tensor& x2,
                   const std::vector<at::Tensor>& w,
                   const std::vector<at::Tensor>& hidden,
                   const MlpActivations& act, const GradRequest& req,
                   at::Tensor& grad_x, std::vector<at::Tensor>& grad_w,
                   std::vector<at::Tensor>& grad_b)
      : act_(act),
        req_(req),
        layers_(layer_refs<T>(w, std::vector<at::Tensor>(w.size()))),
        rows_(gy2.size(0)),
        widest_(widest_layer(layers_)),
        threads_(path_threads()),
        block_rows_(balanced_block_rows(rows_, widest_, sizeof(T), threads_)),
        direct_(ceil_div(rows_, block_rows_) == 1 && std::is_same_v<T, acc_t>),
        sums_(layers_, req, direct_ ? 0 : threads_),
        saves_output_(act.hidden_saves_output()),
        grad_y_(gy2.data_ptr<T>()),
        x_(x2.defined() ? x2.data_ptr<T>() : nullptr),
        grad_x_(req.grad_x ? grad_x.data_ptr<T>() : nullptr),
        grad_w_(grad_w),
        grad_b_(grad_b) {
    for (const auto& h : hidden) saved_.push_back(h.data_ptr<T>());
  }

  // The whole call: every block on the threads, then the threads' sums.
  void run() {
    if (direct_) {
      for (size_t l = req_.lowest; l < layers_.size(); ++l) {
        if (req_.bias[l]) grad_b_[l].zero_();
      }
    }
    at::parallel_for(0, ceil_div(rows_, block_rows_), 1,
                     [&](int64_t b0, int64_t b1) { run_blocks(b0, b1); });
    if (!direct_) reduce_sums();
  }

 private:
  // Blocks b0..b1 on this thread, each down through the layers.
  void run_blocks(int64_t b0, int64_t b1) {
    const int64_t tid = threads_ == 1 ? 0 : at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < threads_, "more workers than threads");
    SingleThreadedBlas single;
    const BackwardBuffers<T> buffers(block_rows_ * widest_);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * block_rows_;
      const int64_t rows = std::min(block_rows_, rows_ - m0);
      // The gradient reaching layer l's output (rows x n, row stride n).
      const T* g = grad_y_ + m0 * layers_.back().n;
      for (size_t l = layers_.size(); l-- > req_.lowest;) {
        g = layer_rows_backward(tid, buffers, l, m0, rows, g);
      }
    }
  }

  // Layer l's backward for rows m0.. of a block, from g, the gradient at its
  // output: adds to its weight and bias sums, returns the gradient at its
  // input (g itself where none is needed below).
  const T* layer_rows_backward(int64_t tid, const BackwardBuffers<T>& buffers,
                               size_t l, int64_t m0, int64_t rows, const T* g) {
    const T* gz = grad_at_preactivation(tid, buffers, l, m0, rows, g);
    if (req_.weight[l]) add_weight_grad(tid, buffers, l, m0, rows, gz);
    if (l > req_.lowest || req_.grad_x) {
      return grad_at_input(buffers, l, m0, rows, gz);
    }
    return g;
  }

  // The gradient at layer l's pre-activation: a buffer of ours unless it is
  // g itself (no activation). Adds its column sums to the bias sum.
  const T* grad_at_preactivation(int64_t tid, const BackwardBuffers<T>& buffers,
                                 size_t l, int64_t m0, int64_t rows,
                                 const T* g) {
    const LayerRef<T>& layer = layers_[l];
    const bool top = l + 1 == layers_.size();
    const Activation kind = top ? act_.output : act_.hidden;
    const T* saved_rows =
        kind == Activation::kNone ? nullptr : saved_[l] + m0 * layer.n;
    acc_t* bias_acc = req_.bias[l] ? bias_sum(tid, l) : nullptr;
    if (saved_rows != nullptr) {
      T* dst = buffers.other(g);
      activation_backward_rows<T>(kind, !top && saves_output_,
                                  act_.negative_slope, g, saved_rows, dst, rows,
                                  layer.n, bias_acc);
      return dst;
    }
    if (bias_acc != nullptr) {
      activation_backward_rows<T>(kind, true, act_.negative_slope, g, nullptr,
                                  nullptr, rows, layer.n, bias_acc);
    }
    return g;
  }

  // Adds gz^T times the layer's input to layer l's weight sum. The input: x,
  // the layer below's saved output, or its activation recomputed from the
  // saved pre-activation.
  void add_weight_grad(int64_t tid, const BackwardBuffers<T>& buffers, size_t l,
                       int64_t m0, int64_t rows, const T* gz) {
    const LayerRef<T>& layer = layers_[l];
    const T* in = l == 0 ? x_ + m0 * layer.k : saved_[l - 1] + m0 * layer.k;
    if (l > 0 && !saves_output_) {
      activate_rows<T>(act_.hidden, act_.negative_slope, in, buffers.input(),
                       rows, layer.k);
      in = buffers.input();
    }
    gemm_tn(layer.n, layer.k, rows, gz, layer.n, in, layer.k,
            acc_t(direct_ ? 0 : 1), weight_sum(tid, l), layer.k);
  }

  // gz times layer l's weight: the gradient at its input, in grad_x for the
  // first layer, else in the gradient buffer gz is not in.
  const T* grad_at_input(const BackwardBuffers<T>& buffers, size_t l,
                         int64_t m0, int64_t rows, const T* gz) {
    const LayerRef<T>& layer = layers_[l];
    T* dst = l == 0 ? grad_x_ + m0 * layer.k : buffers.other(gz);
    gemm_into<T>(dst, rows, layer.k, layer.k, [&](acc_t* c, int64_t ldc) {
      gemm_nn(rows, layer.k, layer.n, gz, layer.n, layer.w, layer.k, acc_t(0),
              c, ldc);
    });
    return dst;
  }

  // Where thread tid sums layer l's weight (bias) gradient: the gradient
  // itself when direct_, else the thread's accumulator.
  acc_t* weight_sum(int64_t tid, size_t l) {
    if constexpr (std::is_same_v<T, acc_t>) {
      if (direct_) return grad_w_[l].data_ptr<T>();
    }
    return sums_.weight(tid, l);
  }
  acc_t* bias_sum(int64_t tid, size_t l) {
    if constexpr (std::is_same_v<T, acc_t>) {
      if (direct_) return grad_b_[l].data_ptr<T>();
    }
    return sums_.bias(tid, l);
  }

  // The gradients: the threads' sums added in thread order.
  void reduce_sums() {
    for (size_t l = req_.lowest; l < layers_.size(); ++l) {
      if (req_.weight[l]) {
        sums_.reduce(sums_.weight_offset(l), layers_[l].n * layers_[l].k,
                     grad_w_[l].data_ptr<T>());
      }
      if (req_.bias[l]) {
        sums_.reduce(sums_.bias_offset(l), layers_[l].n,
                     grad_b_[l].data_ptr<T>());
      }
    }
  }

  const MlpActivations& act_;
  const GradRequest& req_;
  const std::vector<LayerRef<T>> layers_;
  const int64_t rows_;        // of the whole call (M)
  const int64_t widest_;      // the widest layer's out_features
  const int64_t threads_;     // that parallel_for will use
  const int64_t block_rows_;  // per block (the last may have fewer)
  // One block (a small batch) of float or double: its sums are the
  // gradients, written in place; no per-thread sums to zero and reduce (at
  // batch 1 those were three passes over the weights' size for one outer
  // product).
  const bool direct_;
  GradAccumulators<acc_t> sums_;  // per thread, unless direct_
  const bool saves_output_;       // hidden layers saved output, not z
  const T* const grad_y_;
  const T* const x_;  // null when the first weight's gradient is not asked
  T* const grad_x_;   // null when not asked
  std::vector<at::Tensor>& grad_w_;
  std::vector<at::Tensor>& grad_b_;
  std::vector<const T*> saved_;  // mlp's hidden tensors
};

// mlp_backward, block by block (see RowBlockBackward).
template <typename T>
void rowblock_backward(const at::Tensor& gy2, const at::Tensor& x2,
                       const std::vector<at::Tensor>& w,
                       const std::vector<at::Tensor>& hidden,
                       const MlpActivations& act, const GradRequest& req,
                       at::Tensor& grad_x, std::vector<at::Tensor>& grad_w,
                       std::vector<at::Tensor>& grad_b) {
  RowBlockBackward<T>(gy2, x2, w, hidden, act, req, grad_x, grad_w, grad_b)
      .run();
}

}  // namespace cpu
}  // namespace fastmlp

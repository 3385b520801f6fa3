// C++ unit tests of the CPU kernels, run by ctest (also under ASan + UBSan).
// They call the ops through the dispatcher exactly as Python does, and check
// them against ATen's own linear + relu computed in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "aten/aten_engine.h"
#include "cpu/kernels/blas.h"
#include "cpu/paths/rowblock.h"

namespace {

int failures = 0;
int checks = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

using Forward = at::Tensor(const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, std::array<bool, 3>);

at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::linear_relu", "")
                       .typed<Forward>();
  return op.call(x, w, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(
    const at::Tensor& gy, const at::Tensor& y,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
    std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::linear_relu_backward", "")
                       .typed<Backward>();
  return op.call(gy, y, x, w, mask);
}

// ||a - ref|| / ||scale||: error relative to the products on absolute values.
double scaled_err(const at::Tensor& a, const at::Tensor& ref,
                  const at::Tensor& scale) {
  if (ref.numel() == 0) return 0.0;
  const double diff = (a.to(at::kDouble) - ref).norm().item<double>();
  return diff / std::max(scale.norm().item<double>(), 1e-300);
}

double tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return 1e-13;
    case at::kFloat:
      return 2e-6;
    default:
      return 1e-2;  // bfloat16: 8 bits of mantissa
  }
}

void check_against_reference(int64_t M, int64_t K, int64_t N,
                             at::ScalarType dtype, bool with_bias) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor x = at::randn({M, K}, opts);
  const at::Tensor w =
      at::randn({N, K}, opts).mul_(1.0 / std::sqrt(std::max<int64_t>(K, 1)));
  std::optional<at::Tensor> b;
  if (with_bias) b = at::randn({N}, opts);
  const std::string name = "M=" + std::to_string(M) +
                           " K=" + std::to_string(K) +
                           " N=" + std::to_string(N) + " " +
                           c10::toString(dtype) + (with_bias ? " bias" : "");

  const at::Tensor y = linear_relu(x, w, b);
  const at::Tensor x64 = x.to(at::kDouble), w64 = w.to(at::kDouble);
  const std::optional<at::Tensor> b64 =
      b ? std::optional<at::Tensor>(b->to(at::kDouble)) : std::nullopt;
  const at::Tensor y_ref = at::relu(at::linear(x64, w64, b64));
  const at::Tensor y_mag =
      at::linear(x64.abs(), w64.abs(), b64 ? b64->abs() : at::Tensor());
  check(y.sizes() == y_ref.sizes() && y.scalar_type() == dtype,
        name + ": forward shape/dtype");
  check(scaled_err(y, y_ref, y_mag) <= tolerance(dtype), name + ": forward");

  const at::Tensor gy = at::randn({M, N}, opts);
  auto [gx, gw, gb] =
      linear_relu_backward(gy, y, x, w, {true, true, with_bias});
  // threshold_backward: the gradient passes where y > 0 (here y is finite).
  const at::Tensor g64 = gy.to(at::kDouble) * (y.to(at::kDouble) > 0);
  const at::Tensor ga = gy.to(at::kDouble).abs();
  check(scaled_err(gx, g64.mm(w64), ga.mm(w64.abs())) <= tolerance(dtype),
        name + ": grad_x");
  check(
      scaled_err(gw, g64.t().mm(x64), ga.t().mm(x64.abs())) <= tolerance(dtype),
      name + ": grad_weight");
  if (with_bias) {
    check(scaled_err(gb, g64.sum(0), ga.sum(0)) <= tolerance(dtype),
          name + ": grad_bias");
  } else {
    check(gb.numel() == 0, name + ": grad_bias not asked for is empty");
  }
}

void test_grid() {
  const int64_t batches[] = {0, 1, 3, 64, 129, 1500};
  const int64_t features[] = {0, 1, 7, 512, 513};
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    for (int64_t M : batches) {
      for (int64_t K : features) {
        for (int64_t N : features) {
          check_against_reference(M, K, N, dtype, /*with_bias=*/true);
        }
      }
    }
    check_against_reference(33, 20, 17, dtype, /*with_bias=*/false);
  }
}

void test_nan_and_zero_semantics() {
  at::Tensor x = at::randn({4, 3});
  at::Tensor w = at::randn({5, 3});
  at::Tensor b = at::randn({5});
  w[0].zero_();
  b[0] = 0.0;  // column 0: pre-activation exactly 0
  at::Tensor y = linear_relu(x, w, b);
  check((y.select(1, 0) == 0).all().item<bool>(), "zero column is 0");
  const at::Tensor gy = at::ones({4, 5});
  auto grads = linear_relu_backward(gy, y, x, w, {true, true, true});
  check(std::get<2>(grads)[0].item<float>() == 0.0f,
        "gradient at pre-activation 0 is 0");

  x[1][2] = NAN;
  y = linear_relu(x, w, b);
  check(at::isnan(y[1]).all().item<bool>(), "NaN row stays NaN");
  grads = linear_relu_backward(gy, y, x, w, {true, true, true});
  // Where y is NaN the gradient passes (torch's threshold_backward): column
  // 0's only nonzero gradient now comes from the NaN row.
  check(std::get<2>(grads)[0].item<float>() == 1.0f,
        "NaN output passes its gradient");
}

void test_non_contiguous_and_leading_dims() {
  const at::Tensor base = at::randn({2, 6, 10});
  const at::Tensor x = base.slice(2, 0, 10, 2);  // (2, 6, 5), strided
  const at::Tensor w = at::randn({5, 4}).t();    // (4, 5), a transposed view
  const at::Tensor y = linear_relu(x, w, std::nullopt);
  const at::Tensor ref = at::relu(at::linear(x, w));
  check(y.sizes() == ref.sizes(), "leading dims kept");
  check(at::allclose(y, ref, 1e-5, 1e-6), "non-contiguous inputs");
}

void expect_error(const std::function<void()>& f, const std::string& needle,
                  const std::string& what) {
  try {
    f();
    check(false, what + ": no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos,
          what + ": message lacks '" + needle + "': " + msg.substr(0, 200));
  }
}

void test_bad_input() {
  const at::Tensor x = at::randn({2, 3});
  const at::Tensor w = at::randn({4, 3});
  expect_error([&] { linear_relu(x, w.to(at::kDouble), std::nullopt); },
               "same dtype", "dtype mismatch");
  expect_error(
      [&] {
        linear_relu(at::randn({2, 5}), w, std::nullopt);
      },
      "in_features mismatch", "in_features");
  expect_error([&] { linear_relu(x, w, at::randn({5})); }, "bias must have",
               "bias length");
  expect_error(
      [&] {
        linear_relu(x, w, at::randn({1, 4}));
      },
      "bias must be 1-D", "bias rank");
  expect_error([&] { linear_relu(x, at::randn({3}), std::nullopt); },
               "weight must be 2-D", "weight rank");
  expect_error([&] { linear_relu(x.to(at::kInt), w, std::nullopt); },
               "x must be a floating", "integer x");
  expect_error(
      [&] {
        linear_relu_backward(at::rand({3, 5}), at::rand({3, 4}), std::nullopt,
                             std::nullopt, {false, false, true});
      },
      "grad_y must have the shape", "backward shapes");
}

}  // namespace

// fastmlp::mlp_sgd_step against the step written out with ATen ops (the
// analytic gradients of softmax cross-entropy and ReLU, then SGD with
// momentum, Nesterov and weight decay), in float64, over odd shapes.
using Step = at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, double,
                        double, double, bool, double,
                        std::optional<at::ScalarType>);

at::Tensor mlp_sgd_step(const at::Tensor& x, const at::Tensor& t,
                        at::TensorList w, at::TensorList b, at::TensorList buf,
                        double lr, double m, double wd, bool nesterov,
                        double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::mlp_sgd_step", "")
                       .typed<Step>();
  return op.call(x, t, w, b, buf, {}, lr, m, wd, nesterov, eps, std::nullopt);
}

double reference_step(const at::Tensor& x, const at::Tensor& t,
                      std::vector<at::Tensor>& w, std::vector<at::Tensor>& b,
                      std::vector<at::Tensor>& buf, double lr, double m,
                      double wd, bool nesterov, double eps) {
  const size_t L = w.size();
  std::vector<at::Tensor> h = {x};
  for (size_t l = 0; l < L; ++l) {
    at::Tensor z = at::addmm(b[l], h[l], w[l].t());
    h.push_back(l + 1 < L ? at::relu(z) : z);
  }
  const int64_t B = x.size(0), C = h[L].size(1);
  const at::Tensor logp = at::log_softmax(h[L], 1);
  const at::Tensor want =
      at::one_hot(t, C).to(at::kDouble).mul(1 - eps).add(eps / C);
  const double loss = -(want * logp).sum().item<double>() / B;
  at::Tensor g = (logp.exp() - want) / B;
  for (size_t l = L; l-- > 0;) {
    const at::Tensor gw = g.t().mm(h[l]), gb = g.sum(0);
    if (l > 0) g = g.mm(w[l]) * (h[l] > 0);  // with the old weight
    const std::array<at::Tensor, 2> params = {w[l], b[l]};
    const std::array<at::Tensor, 2> grads = {gw, gb};
    for (size_t i = 0; i < 2; ++i) {
      at::Tensor d = grads[i] + wd * params[i];
      at::Tensor& mb = buf[2 * l + i];
      mb.mul_(m).add_(d);
      d = nesterov ? d + m * mb : mb;
      params[i].sub_(lr * d);
    }
  }
  return loss;
}

void test_mlp_sgd_step() {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> cases = {
      {{7, 13, 5, 3}, 3},
      {{33, 129, 17, 5}, 129},
      {{5, 2}, 1},
      {{40, 1, 4}, 2}};
  for (const auto& [sizes, B] : cases) {
    std::vector<at::Tensor> w, b, buf, w_ref, b_ref, buf_ref;
    for (size_t l = 0; l + 1 < sizes.size(); ++l) {
      w.push_back(at::randn({sizes[l + 1], sizes[l]}, opts));
      b.push_back(at::randn({sizes[l + 1]}, opts));
      w_ref.push_back(w.back().clone());
      b_ref.push_back(b.back().clone());
      for (const at::Tensor& p : {w.back(), b.back()}) {
        buf.push_back(at::zeros_like(p));
        buf_ref.push_back(at::zeros_like(p));
      }
    }
    std::string name = "mlp_sgd_step B=" + std::to_string(B) + " sizes";
    for (const int64_t s : sizes) name += " " + std::to_string(s);
    for (int step = 0; step < 2; ++step) {
      const at::Tensor x = at::randn({B, sizes[0]}, opts);
      const at::Tensor t = at::randint(sizes.back(), {B}, at::kLong);
      const double loss =
          mlp_sgd_step(x, t, w, b, buf, 0.1, 0.9, 0.01, true, 0.1)
              .item<double>();
      const double ref = reference_step(x, t, w_ref, b_ref, buf_ref, 0.1, 0.9,
                                        0.01, true, 0.1);
      check(std::abs(loss - ref) <= 1e-12 * std::max(1.0, std::abs(ref)),
            name + ": loss");
    }
    for (size_t i = 0; i < w.size(); ++i) {
      check(at::allclose(w[i], w_ref[i], 1e-10, 1e-12), name + ": weight");
      check(at::allclose(b[i], b_ref[i], 1e-10, 1e-12), name + ": bias");
    }
    for (size_t i = 0; i < buf.size(); ++i) {
      check(at::allclose(buf[i], buf_ref[i], 1e-10, 1e-12), name + ": buffer");
    }
  }
}

// The ATen engine (what the CUDA ops run by default, and for float64) is
// device-generic: checked here on CPU tensors against the CPU kernels.
void test_aten_engine() {
  struct Shape {
    std::vector<int64_t> lead;
    int64_t K, N;
  };
  const Shape shapes[] = {{{0}, 5, 7},    {{1}, 1, 1},    {{3}, 7, 0},
                          {{65}, 33, 17}, {{2, 3}, 9, 4}, {{129}, 513, 7}};
  for (const Shape& s : shapes) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      std::vector<int64_t> xs = s.lead, ys = s.lead;
      xs.push_back(s.K);
      ys.push_back(s.N);
      const at::Tensor x = at::randn(xs, opts);
      const at::Tensor w = at::randn({s.N, s.K}, opts);
      const at::Tensor b = at::randn({s.N}, opts);
      const std::string name = "aten engine K=" + std::to_string(s.K) +
                               " N=" + std::to_string(s.N) + " " +
                               c10::toString(dtype);
      const at::Tensor y = fastmlp::linear_relu_aten(x, w, b);
      check(at::allclose(y, linear_relu(x, w, b), 1e-5, 1e-6),
            name + ": forward");
      const at::Tensor gy = at::randn(ys, opts);
      const auto full = linear_relu_backward(gy, y, x, w, {true, true, true});
      for (int bits = 0; bits < 8; ++bits) {
        const std::array<bool, 3> mask = {(bits & 1) != 0, (bits & 2) != 0,
                                          (bits & 4) != 0};
        const auto got = fastmlp::linear_relu_backward_aten(
            gy, y, mask[1] ? std::optional<at::Tensor>(x) : std::nullopt,
            mask[0] ? std::optional<at::Tensor>(w) : std::nullopt, mask);
        const at::Tensor outs[] = {std::get<0>(got), std::get<1>(got),
                                   std::get<2>(got)};
        const at::Tensor refs[] = {std::get<0>(full), std::get<1>(full),
                                   std::get<2>(full)};
        const std::string m = name + " mask " + std::to_string(bits);
        for (int i = 0; i < 3; ++i) {
          if (mask[i]) {
            check(at::allclose(outs[i], refs[i], 1e-5, 1e-5),
                  m + ": output " + std::to_string(i));
          } else {
            check(outs[i].dim() == 1 && outs[i].size(0) == 0,
                  m + ": output not asked for is (0,)");
          }
          // Never one tensor for two outputs: the schema declares no alias.
          for (int j = 0; j < i; ++j) {
            check(!outs[i].is_same(outs[j]),
                  m + ": outputs " + std::to_string(j) + " and " +
                      std::to_string(i) + " are one tensor");
          }
        }
      }
    }
  }
  // NaN semantics of torch.relu: NaN stays NaN.
  at::Tensor x = at::randn({4, 3});
  x[1][2] = std::numeric_limits<float>::quiet_NaN();
  const at::Tensor y = fastmlp::linear_relu_aten(x, at::randn({5, 3}), {});
  check(y[1].isnan().all().item<bool>(), "aten engine: NaN propagates");
}

using MlpResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using MlpGrads =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

MlpResult mlp(const at::Tensor& x, at::TensorList w, at::TensorList b,
              const std::string& activation = "relu",
              const std::string& output_activation = "none",
              double negative_slope = 0.01) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp", "")
          .typed<MlpResult(const at::Tensor&, at::TensorList, at::TensorList,
                           c10::string_view, c10::string_view, double)>();
  return op.call(x, w, b, activation, output_activation, negative_slope);
}

MlpGrads mlp_backward(const at::Tensor& gy, const std::optional<at::Tensor>& x,
                      at::TensorList w, at::TensorList hidden,
                      const std::vector<bool>& mask,
                      const std::string& activation = "relu",
                      const std::string& output_activation = "none",
                      double negative_slope = 0.01) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp_backward", "")
          .typed<MlpGrads(const at::Tensor&, const std::optional<at::Tensor>&,
                          at::TensorList, at::TensorList,
                          const c10::List<bool>&, c10::string_view,
                          c10::string_view, double)>();
  c10::List<bool> list;
  for (const bool m : mask) list.push_back(m);
  return op.call(gy, x, w, hidden, list, activation, output_activation,
                 negative_slope);
}

// The whole-MLP op and its backward against ATen in float64, with every
// gradient asked for and with only some (the others must come back empty).
void test_mlp() {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> cases = {
      {{7, 13, 5, 3}, 3}, {{33, 129, 17, 5}, 129}, {{5, 2}, 1},
      {{40, 1, 4}, 2},    {{9, 513, 8}, 0},        {{6, 7, 7, 7, 2}, 64}};
  for (const auto& [sizes, B] : cases) {
    const size_t L = sizes.size() - 1;
    std::vector<at::Tensor> w, b;
    for (size_t l = 0; l < L; ++l) {
      w.push_back(at::randn({sizes[l + 1], sizes[l]}, opts));
      b.push_back(at::randn({sizes[l + 1]}, opts));
    }
    const at::Tensor x = at::randn({B, sizes[0]}, opts);
    std::vector<at::Tensor> h = {x};  // the reference activations
    for (size_t l = 0; l < L; ++l) {
      const at::Tensor z = at::addmm(b[l], h[l], w[l].t());
      h.push_back(l + 1 < L ? at::relu(z) : z);
    }
    std::string name = "mlp B=" + std::to_string(B) + " sizes";
    for (const int64_t s : sizes) name += " " + std::to_string(s);
    auto [y, hidden] = mlp(x, w, b);
    check(hidden.size() == L - 1 && at::allclose(y, h[L], 1e-10, 1e-12),
          name + ": forward");
    // The ATen engine (the whole-MLP ops' CUDA implementation) on CPU tensors.
    auto [y_aten, hidden_aten] = fastmlp::mlp_aten(x, w, b);
    check(
        hidden_aten.size() == L - 1 && at::allclose(y_aten, h[L], 1e-10, 1e-12),
        name + ": aten engine forward");
    const at::Tensor gy = at::randn_like(y);
    // Reference gradients, top layer down.
    std::vector<at::Tensor> gw_ref(L), gb_ref(L);
    at::Tensor g = gy, gx_ref;
    for (size_t l = L; l-- > 0;) {
      gw_ref[l] = g.t().mm(h[l]);
      gb_ref[l] = g.sum(0);
      g = g.mm(w[l]);
      if (l > 0) g = g * (h[l] > 0);
    }
    gx_ref = g;
    for (int pattern = 0; pattern < 3; ++pattern) {
      std::vector<bool> mask(1 + 2 * L);
      for (size_t i = 0; i < mask.size(); ++i) {
        mask[i] = pattern == 0 || (pattern == 1 && i % 2 == 1) ||
                  (pattern == 2 && i == L);  // the last weight only
      }
      const auto same = [&](const at::Tensor& a, const at::Tensor& ref,
                            bool wanted, const std::string& what) {
        check(wanted ? at::allclose(a, ref, 1e-10, 1e-12) : a.numel() == 0,
              name + " mask " + std::to_string(pattern) + ": " + what);
      };
      const auto check_grads = [&](const auto& grads, const std::string& who) {
        const auto& [gx, gw, gb] = grads;
        same(gx, gx_ref, mask[0], who + "grad_x");
        std::vector<const at::Tensor*> outs = {&gx};
        for (size_t l = 0; l < L; ++l) {
          same(gw[l], gw_ref[l], mask[1 + l],
               who + "grad_w" + std::to_string(l));
          same(gb[l], gb_ref[l], mask[1 + L + l],
               who + "grad_b" + std::to_string(l));
          outs.push_back(&gw[l]);
          outs.push_back(&gb[l]);
        }
        // Outputs not asked for are tensors of their own, never aliases.
        for (size_t i = 0; i < outs.size(); ++i) {
          for (size_t j = 0; j < i; ++j) {
            check(!outs[i]->is_same(*outs[j]),
                  name + ": " + who + "outputs alias (mask " +
                      std::to_string(pattern) + ")");
          }
        }
      };
      check_grads(mlp_backward(gy, x, w, hidden, mask), "");
      check_grads(fastmlp::mlp_backward_aten(gy, x, w, hidden_aten, mask),
                  "aten engine ");
    }
  }
  const at::Tensor x = at::randn({2, 3});
  const std::vector<at::Tensor> w = {at::randn({4, 3}), at::randn({2, 5})};
  expect_error([&] { mlp(x, w, {}); }, "weights[1]", "mlp chain mismatch");
  expect_error([&] { mlp(x, {}, {}); }, "at least one layer", "mlp no layers");
}

// act(z) as torch.nn.functional computes it, for the reference.
at::Tensor reference_activation(const at::Tensor& z, const std::string& kind,
                                double slope) {
  if (kind == "relu") return at::relu(z);
  if (kind == "leaky_relu") return at::leaky_relu(z, slope);
  if (kind == "tanh") return at::tanh(z);
  if (kind == "sigmoid") return at::sigmoid(z);
  if (kind == "gelu") return at::gelu(z, "none");
  if (kind == "gelu_tanh") return at::gelu(z, "tanh");
  if (kind == "silu") return at::silu(z);
  return z;  // "none"
}

const char* const kActivations[] = {"relu",      "leaky_relu", "tanh",
                                    "sigmoid",   "none",       "gelu",
                                    "gelu_tanh", "silu"};

// Every activation, hidden and on the output, forward and backward of a
// small MLP against ATen's own ops differentiated by autograd, in float64
// (and float32 against the same reference); the aten engine (the CUDA
// implementation) on CPU tensors against it too. Also: what hidden holds,
// grad_y left as it was, the gradient at a pre-activation of exactly 0.
void test_mlp_activations() {
  struct Case {
    std::string kind, out;
    double slope;
  };
  std::vector<Case> cases;
  for (const char* kind : kActivations) {
    for (const char* out : {"none", kind, "sigmoid"}) {
      cases.push_back({kind, out, 0.01});
    }
  }
  cases.push_back({"leaky_relu", "leaky_relu", -0.3});
  cases.push_back({"leaky_relu", "none", 0.0});
  const std::vector<int64_t> sizes = {7, 513, 1, 9};
  const size_t L = sizes.size() - 1;
  for (const auto& c : cases) {
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      const int64_t B = dtype == at::kDouble ? 129 : 3;
      std::vector<at::Tensor> w, b;
      for (size_t l = 0; l < L; ++l) {
        w.push_back(at::randn({sizes[l + 1], sizes[l]}, opts)
                        .mul_(1.5 / std::sqrt(sizes[l])));
        b.push_back(at::randn({sizes[l + 1]}, opts));
      }
      const at::Tensor x = at::randn({B, sizes[0]}, opts);
      const std::string name = "mlp " + c.kind + "/" + c.out +
                               " slope=" + std::to_string(c.slope) + " " +
                               c10::toString(dtype);
      // The reference, in float64 through autograd.
      std::vector<at::Tensor> leaves = {
          x.to(at::kDouble).clone().requires_grad_(true)};
      for (const auto& t : w)
        leaves.push_back(t.to(at::kDouble).clone().requires_grad_());
      for (const auto& t : b)
        leaves.push_back(t.to(at::kDouble).clone().requires_grad_());
      std::vector<at::Tensor> z_ref, a_ref;
      at::Tensor h = leaves[0];
      for (size_t l = 0; l < L; ++l) {
        const at::Tensor z = at::linear(h, leaves[1 + l], leaves[1 + L + l]);
        h = reference_activation(z, l + 1 < L ? c.kind : c.out, c.slope);
        z_ref.push_back(z.detach());
        a_ref.push_back(h.detach());
      }
      const at::Tensor gy = at::randn({B, sizes[L]}, opts);
      const at::Tensor gy_before = gy.clone();
      h.backward(gy.to(at::kDouble));
      const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
      const auto close = [&](const at::Tensor& a, const at::Tensor& ref) {
        return a.scalar_type() == dtype && a.sizes() == ref.sizes() &&
               (a.to(at::kDouble) - ref).norm().item<double>() <=
                   tol * std::max(1.0, ref.norm().item<double>());
      };
      const bool saves_output = c.kind == "relu" || c.kind == "tanh" ||
                                c.kind == "sigmoid" || c.kind == "none" ||
                                (c.kind == "leaky_relu" && c.slope >= 0);
      fastmlp::MlpActivations act =
          fastmlp::parse_mlp_activations(c.kind, c.out, c.slope, "test: ");
      for (int engine = 0; engine < 2; ++engine) {
        const std::string who = name + (engine == 1 ? " aten engine" : "");
        auto [y, hidden] = engine == 0 ? mlp(x, w, b, c.kind, c.out, c.slope)
                                       : fastmlp::mlp_aten(x, w, b, act);
        check(close(y, a_ref[L - 1]), who + ": forward");
        const size_t H = L - 1 + (c.out != "none" ? 1 : 0);
        check(hidden.size() == H, who + ": hidden count");
        for (size_t l = 0; l < std::min(H, hidden.size()); ++l) {
          const at::Tensor& want =
              l + 1 < L && saves_output ? a_ref[l] : z_ref[l];
          check(close(hidden[l], want),
                who + ": hidden[" + std::to_string(l) + "]");
        }
        std::vector<bool> mask(1 + 2 * L, true);
        auto [gx, gw, gb] =
            engine == 0
                ? mlp_backward(gy, x, w, hidden, mask, c.kind, c.out, c.slope)
                : fastmlp::mlp_backward_aten(gy, x, w, hidden, mask, act);
        check(at::equal(gy, gy_before), who + ": grad_y left as it was");
        check(close(gx, leaves[0].grad()), who + ": grad_x");
        for (size_t l = 0; l < L; ++l) {
          check(close(gw[l], leaves[1 + l].grad()),
                who + ": grad_w" + std::to_string(l));
          check(close(gb[l], leaves[1 + L + l].grad()),
                who + ": grad_b" + std::to_string(l));
        }
        // Only the top weight's gradient: the layer below's output is
        // recomputed (or read) for it, nothing else is run.
        std::vector<bool> top(1 + 2 * L, false);
        top[L] = true;
        auto [gx2, gw2, gb2] = engine == 0
                                   ? mlp_backward(gy, std::nullopt, w, hidden,
                                                  top, c.kind, c.out, c.slope)
                                   : fastmlp::mlp_backward_aten(
                                         gy, std::nullopt, w, hidden, top, act);
        check(close(gw2[L - 1], leaves[L].grad()) && gx2.numel() == 0,
              who + ": top weight's gradient alone");
      }
    }
  }
  // The gradient at a pre-activation of exactly 0, hidden and on the output.
  const std::vector<std::pair<std::string, double>> at_zero = {
      {"relu", 0.0}, {"leaky_relu", 0.2}, {"tanh", 1.0},      {"sigmoid", 0.25},
      {"none", 1.0}, {"gelu", 0.5},       {"gelu_tanh", 0.5}, {"silu", 0.5}};
  for (const auto& [kind, want] : at_zero) {
    const at::Tensor x = at::zeros({3, 1});
    const at::Tensor one = at::ones({1, 1});
    for (int hidden_layer = 0; hidden_layer < 2; ++hidden_layer) {
      const std::vector<at::Tensor> w = hidden_layer
                                            ? std::vector<at::Tensor>{one, one}
                                            : std::vector<at::Tensor>{one};
      const std::string k = hidden_layer ? kind : "none";
      const std::string o = hidden_layer ? "none" : kind;
      auto [y, hidden] = mlp(x, w, {}, k, o, 0.2);
      std::vector<bool> mask(1 + w.size(), false);
      mask[0] = true;
      auto grads = mlp_backward(at::ones_like(y), std::nullopt, w, hidden, mask,
                                k, o, 0.2);
      check((std::get<0>(grads) == want).all().item<bool>(),
            "gradient at 0 of " + kind + (hidden_layer ? " (hidden)" : ""));
    }
  }
  const at::Tensor x = at::randn({2, 3});
  const std::vector<at::Tensor> w = {at::randn({4, 3}), at::randn({2, 4})};
  expect_error([&] { mlp(x, w, {}, "gelu_erf"); },
               "activation must be one of relu, leaky_relu, tanh",
               "unknown activation");
  expect_error([&] { mlp(x, w, {}, "relu", "softmax"); },
               "output_activation must be one of", "unknown output activation");
  expect_error([&] { mlp(x, w, {}, "leaky_relu", "none", std::nan("")); },
               "negative_slope must be a finite number", "NaN slope");
  expect_error(
      [&] {
        mlp_backward(at::randn({2, 2}), x, w, {at::randn({2, 4})},
                     {true, true, true}, "relu", "tanh");
      },
      "hidden must hold 2 tensors", "hidden count with output activation");
}

// The BLAS wrappers of the row-blocked path (blas.h) against ATen's
// products, on odd shapes and row strides wider than the rows: double (MKL's
// dgemm) and float (oneDNN's brgemm from 16 rows where torch has it, else
// MKL's sgemm).
template <typename T>
void test_blas_wrappers() {
  using fastmlp::cpu::gemm_nn;
  using fastmlp::cpu::gemm_nt;
  using fastmlp::cpu::gemm_tn;
  if (!fastmlp::cpu::blas_available<T>()) {
    std::printf("no BLAS in this torch: skipping the BLAS wrapper tests\n");
    return;
  }
  const auto opts =
      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-4;
  for (const auto& [m, n, k] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 1},
           {3, 7, 5},
           {17, 100, 33},
           {64, 1, 257},
           {40, 64, 16},
           // More than one cache block (blas.h: gemm_blocks) in every
           // dimension, on any L2 size.
           {1100, 1100, 530}}) {
    const std::string name = std::string(c10::toString(opts.dtype())) +
                             " blas m=" + std::to_string(m) +
                             " n=" + std::to_string(n) +
                             " k=" + std::to_string(k);
    // Views into wider matrices: the leading dimensions are not the widths.
    const at::Tensor a = at::randn({m, k + 3}, opts).narrow(1, 0, k);
    const at::Tensor bt = at::randn({n, k + 2}, opts).narrow(1, 0, k);
    const at::Tensor c0 = at::randn({m, n + 1}, opts);
    at::Tensor c = c0.clone();
    gemm_nt(m, n, k, a.data_ptr<T>(), k + 3, bt.data_ptr<T>(), k + 2, T(1),
            c.data_ptr<T>(), n + 1);
    check(at::allclose(c.narrow(1, 0, n), c0.narrow(1, 0, n) + a.mm(bt.t()),
                       tol, tol) &&
              at::equal(c.narrow(1, n, 1), c0.narrow(1, n, 1)),
          name + ": gemm_nt accumulates, leaves the padding");
    const at::Tensor b = at::randn({k, n + 2}, opts).narrow(1, 0, n);
    gemm_nn(m, n, k, a.data_ptr<T>(), k + 3, b.data_ptr<T>(), n + 2, T(0),
            c.data_ptr<T>(), n + 1);
    check(at::allclose(c.narrow(1, 0, n), a.mm(b), tol, tol),
          name + ": gemm_nn overwrites");
    c.copy_(c0);
    gemm_nn(m, n, k, a.data_ptr<T>(), k + 3, b.data_ptr<T>(), n + 2, T(1),
            c.data_ptr<T>(), n + 1);
    check(
        at::allclose(c.narrow(1, 0, n), c0.narrow(1, 0, n) + a.mm(b), tol, tol),
        name + ": gemm_nn accumulates");
    const at::Tensor g = at::randn({k, m + 1}, opts).narrow(1, 0, m);
    gemm_tn(m, n, k, g.data_ptr<T>(), m + 1, b.data_ptr<T>(), n + 2, T(0),
            c.data_ptr<T>(), n + 1);
    check(at::allclose(c.narrow(1, 0, n), g.t().mm(b), tol, tol),
          name + ": gemm_tn");
  }
  for (const int64_t width : {1, 7, 64, 256, 4096, 1 << 20}) {
    const int64_t rows = fastmlp::cpu::rowblock_rows(width, 4);
    check(rows >= 16 && rows <= 1024 && rows % 8 == 0,
          "rowblock_rows(" + std::to_string(width) + ") = " +
              std::to_string(rows) + " is a multiple of 8 in [16, 1024]");
  }
}

void set_cpu_path(const std::string& path) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::_set_cpu_path", "")
                       .typed<void(const std::optional<std::string>&)>();
  op.call(path);
}

int main() {
  at::manual_seed(0);
  // The whole-MLP tests once per CPU path (paths/rule.h), then on the rule's
  // own choice.
  for (const char* path : {"layered", "row_blocked"}) {
    set_cpu_path(path);
    test_mlp();
    test_mlp_activations();
  }
  set_cpu_path("auto");
  test_grid();
  test_nan_and_zero_semantics();
  test_non_contiguous_and_leading_dims();
  test_bad_input();
  test_mlp_sgd_step();
  test_aten_engine();
  test_mlp();
  test_mlp_activations();
  // Last: their draws would shift the random inputs of the tests above.
  test_blas_wrappers<double>();
  test_blas_wrappers<float>();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}

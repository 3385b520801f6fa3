"""CUDA tests of the fastmlp ops: every engine, dtype and odd shape.

Skipped without a GPU. Errors are bounded relative to what plain PyTorch in
the same precision gets against a float64 reference (DESIGN.md), so the
tolerances follow the hardware rather than magic constants. Every engine is
tested, forced with fastmlp.engines.set_cuda_engine (as FASTMLP_CUDA_ENGINE
would): these tests are what validates an engine on a GPU (scripts/gpu_check.sh
prints the validated-engine entries a run of them earned).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastmlp.testing import allow_tf32, assert_error_bounded, capture_cuda_graph
from fastmlp.testing import layer_inputs as _layer_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    from fastmlp import engines
    from fastmlp.ops import linear_relu

ENGINES = ["custom", "cublaslt", "aten"]
# Precision modes: (dtype, allow tf32).
PRECISIONS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp64": (torch.float64, False),
}

BATCHES = [0, 1, 3, 64, 129]
FEATURES = [(1, 7), (7, 1), (7, 513), (513, 784), (784, 512), (512, 512)]


def _fwd():
    return torch.ops.fastmlp.linear_relu.default


def _bwd():
    return torch.ops.fastmlp.linear_relu_backward.default


@pytest.fixture
def engine(request):
    with engines.cuda_engine(request.param):
        yield request.param


@contextlib.contextmanager
def precision(name: str):
    """Sets torch's TF32 switch for the duration (our ops read the same one)."""
    with allow_tf32(PRECISIONS[name][1]):
        yield PRECISIONS[name][0]


def _poison_allocator(numel: int) -> None:
    """Leaves NaN-filled blocks in the caching allocator, so an output element
    that a kernel forgets to write shows up as NaN instead of a stale value."""
    for n in {numel, 2 * numel, numel // 2 + 1}:
        t = torch.full((max(n, 1),), float("nan"), device="cuda", dtype=torch.float64)
        del t


def _inputs(batch, fin, fout, dtype, device="cuda", bias=True, gen_seed=0):
    return _layer_inputs(batch, fin, fout, dtype, device, bias=bias, seed=gen_seed)


def _check(name, ours, torch_same, ref, prec, magnitude=None):
    """Errors relative to ||magnitude|| (the same product on absolute values, which
    bounds dot-product rounding); relative to ||ref|| when not given."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output for finite inputs"
    assert_error_bounded(name, ours, torch_same, ref, magnitude, precision=prec)


def _check_forward_backward(x, w, b, gy, prec):
    """Both ops against float64 and against PyTorch in the same precision."""
    y = _fwd()(x, w, b)
    assert y.dtype == x.dtype
    b64 = None if b is None else b.double()
    y_ref = torch.relu(F.linear(x.double(), w.double(), b64))
    y_mag = F.linear(x.double().abs(), w.double().abs(), None if b is None else b64.abs())
    _check("y", y, torch.relu(F.linear(x, w, b)), y_ref, prec, y_mag)

    # Backward on our y (its sign is the mask); the reference uses the same mask.
    gx, gw, gb = _bwd()(gy, y, x, w, [True, True, b is not None])
    g_ref = torch.where(y.double() <= 0, 0.0, gy.double())
    g_same = torch.ops.aten.threshold_backward(gy, y, 0)
    g_abs = g_ref.abs()
    w_abs, x_abs = w.double().abs(), x.double().abs()
    _check("grad_x", gx, g_same @ w, g_ref @ w.double(), prec, g_abs @ w_abs)
    _check("grad_w", gw, g_same.t() @ x, g_ref.t() @ x.double(), prec, g_abs.t() @ x_abs)
    if b is not None:
        _check("grad_b", gb, g_same.sum(0), g_ref.sum(0), prec, g_abs.sum(0))
    else:
        assert gb.shape == (0,)


# ---------------------------------------------------------------------------
# Correctness grid.


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", list(PRECISIONS))
@pytest.mark.parametrize("fin,fout", FEATURES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_grid(engine, prec, fin, fout, batch, bias):
    if not bias and (batch, fin, fout) not in {(3, 7, 513), (129, 784, 512), (1, 1, 7)}:
        pytest.skip("no-bias variant only on a few shapes")
    with precision(prec) as dtype:
        x, w, b, gy = _inputs(batch, fin, fout, dtype, bias=bias)
        _poison_allocator(batch * max(fin, fout) + fin * fout)
        _check_forward_backward(x, w, b, gy, prec)


@pytest.mark.parametrize("engine", ["custom", "cublaslt", "auto"], indirect=True)
@pytest.mark.parametrize("prec", ["tf32", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "batch,fin,fout",
    [
        (4099, 784, 1030),
        (1000, 7, 129),
        (4096, 784, 512),
        (300, 513, 64),
        (2048, 512, 8200),
        # Split-K weight gradient with empty trailing splits: on a 132-SM GPU
        # M=2100, N=K=64 gives 16 splits of which the last two start past M.
        (2100, 64, 64),
    ],
)
def test_large_shapes(engine, prec, batch, fin, fout):
    """Big tiles, split-K weight gradients and tails of every kind."""
    with precision(prec) as dtype:
        x, w, b, gy = _inputs(batch, fin, fout, dtype)
        _poison_allocator(batch * max(fin, fout))
        _check_forward_backward(x, w, b, gy, prec)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", ["bf16", "tf32", "fp64"])
def test_output_mask_subsets(engine, prec):
    with precision(prec) as dtype:
        x, w, b, gy = _inputs(65, 33, 17, dtype)
        y = _fwd()(x, w, b)
        full = _bwd()(gy, y, x, w, [True, True, True])
        for mask in (
            [True, False, False],
            [False, True, False],
            [False, False, True],
            [False, True, True],
            [True, False, True],
        ):
            xs = x if mask[1] else None
            ws = w if mask[0] else None
            out = _bwd()(gy, y, xs, ws, mask)
            for want, got, ref in zip(mask, out, full, strict=True):
                if want:
                    # grad_b alone comes from a different reduction order.
                    torch.testing.assert_close(got, ref)
                else:
                    assert got.shape == (0,)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", ["bf16", "tf32", "fp16"])
def test_noncontiguous_and_misaligned(engine, prec):
    """Strided views and odd storage offsets (no 16-byte vector loads)."""
    with precision(prec) as dtype:
        x0, w0, b0, gy0 = _inputs(37, 24, 40, dtype)
        # Non-contiguous: transposed storage.
        xt = x0.t().contiguous().t()
        wt = w0.t().contiguous().t()
        bt = torch.stack([b0, b0], 1)[:, 0]
        assert not xt.is_contiguous() and not wt.is_contiguous() and not bt.is_contiguous()
        # Misaligned: storage offset of one element.
        xm = torch.empty(x0.numel() + 1, device="cuda", dtype=dtype)[1:].view_as(x0).copy_(x0)
        wm = torch.empty(w0.numel() + 1, device="cuda", dtype=dtype)[1:].view_as(w0).copy_(w0)
        gm = torch.empty(gy0.numel() + 1, device="cuda", dtype=dtype)[1:].view_as(gy0).copy_(gy0)
        bm = torch.empty(b0.numel() + 1, device="cuda", dtype=dtype)[1:].copy_(b0)
        # Our kernels must give the same bits whichever load path they take;
        # cuBLAS may pick another algorithm for other alignments.
        tol = {"rtol": 0, "atol": 0} if engine == "custom" else {}
        y_ref = _fwd()(x0, w0, b0)
        for x, w, b in ((xt, wt, bt), (xm, wm, bm)):
            torch.testing.assert_close(_fwd()(x, w, b), y_ref, **tol)
        ref = _bwd()(gy0, y_ref, x0, w0, [True, True, True])
        got = _bwd()(gm, y_ref, xm, wm, [True, True, True])
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_leading_dims(engine):
    with precision("bf16") as dtype:
        x, w, b, _ = _inputs(2 * 3 * 5, 20, 9, dtype)
        x3 = x.view(2, 3, 5, 20)
        y = _fwd()(x3, w, b)
        assert y.shape == (2, 3, 5, 9)
        torch.testing.assert_close(y.view(30, 9), _fwd()(x, w, b))
        gy = torch.randn_like(y)
        gx, gw, gb = _bwd()(gy, y, x3, w, [True, True, True])
        assert gx.shape == x3.shape and gw.shape == w.shape and gb.shape == b.shape


# ---------------------------------------------------------------------------
# Semantics: NaN, zero pre-activation, determinism.


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", ["fp32", "tf32", "bf16", "fp16", "fp64"])
def test_nan_propagates_like_torch_relu(engine, prec):
    with precision(prec) as dtype:
        x, w, b, _ = _inputs(70, 33, 130, dtype)
        x[3, 5] = float("nan")
        w[7, 0] = float("nan")
        b[11] = float("nan")
        x[9, 1] = float("inf")  # inf * w: +-inf, and NaN where the sum meets -inf
        y = _fwd()(x, w, b)
        y_torch = torch.relu(F.linear(x, w, b))
        assert torch.equal(torch.isnan(y), torch.isnan(y_torch))
        assert (
            torch.isnan(y[3]).all() and torch.isnan(y[:, 7]).all() and torch.isnan(y[:, 11]).all()
        )


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", ["tf32", "bf16", "fp64"])
def test_backward_mask_rule(engine, prec):
    """threshold_backward(g, y, 0): y <= 0 blocks, y > 0 and NaN pass."""
    with precision(prec) as dtype:
        x, w, _, gy = _inputs(40, 24, 72, dtype)
        y = torch.randn(40, 72, device="cuda", dtype=torch.float64).to(dtype)
        y[y < -0.5] = 0.0
        y[0, :5] = float("nan")
        y[1, :5] = -0.0
        ref = torch.ops.aten.threshold_backward(gy.double(), y.double(), 0)
        assert ref[0, :5].ne(0).all()
        gx, gw, gb = _bwd()(gy, y, x, w, [True, True, True])
        _check("grad_x", gx, ref.to(dtype) @ w, ref @ w.double(), prec)
        _check("grad_w", gw, ref.to(dtype).t() @ x, ref.t() @ x.double(), prec)
        _check("grad_b", gb, ref.to(dtype).sum(0), ref.sum(0), prec)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("prec", ["tf32", "bf16", "fp64"])
def test_zero_preactivation_has_zero_gradient(engine, prec):
    with precision(prec) as dtype:
        x, w, _, _ = _inputs(16, 8, 12, dtype)
        b = torch.zeros(12, device="cuda", dtype=dtype)
        x[2] = 0.0  # pre-activation of row 2 is exactly 0
        x = x.requires_grad_()
        wr = w.clone().requires_grad_()
        br = b.clone().requires_grad_()
        y = linear_relu(x, wr, br)
        assert (y[2] == 0).all()
        y.sum().backward()
        # Row 2 contributes nothing: the bias gradient counts only y > 0.
        torch.testing.assert_close(br.grad, (y > 0).sum(0).to(dtype), rtol=0, atol=0)
        assert (x.grad[2] == 0).all()


@pytest.mark.parametrize("engine", ["custom", "cublaslt", "auto"], indirect=True)
@pytest.mark.parametrize("prec", ["tf32", "bf16", "fp16", "fp32"])
def test_deterministic_bitwise(engine, prec):
    with precision(prec) as dtype:
        x, w, b, gy = _inputs(1500, 384, 200, dtype)
        outs = []
        for _ in range(2):
            _poison_allocator(1500 * 384)
            y = _fwd()(x, w, b)
            outs.append((y, *_bwd()(gy, y, x, w, [True, True, True])))
        for a, c in zip(*outs, strict=True):
            assert not torch.isnan(a).any()
            assert torch.equal(a, c)


def test_bad_engine_name(monkeypatch):
    monkeypatch.setenv("FASTMLP_CUDA_ENGINE", "fastest")
    engines.set_cuda_engine(None)  # the variable is read once per process
    try:
        x, w, b, _ = _inputs(4, 8, 8, torch.float32)
        with pytest.raises(RuntimeError, match="FASTMLP_CUDA_ENGINE"):
            _fwd()(x, w, b)
    finally:
        monkeypatch.delenv("FASTMLP_CUDA_ENGINE")
        engines.set_cuda_engine(None)


def test_auto_runs_only_validated_engines():
    """With nothing validated for this GPU, auto gives aten's results bit for bit."""
    report = {c.precision: c for c in engines.cuda_engine_report()}
    if report["bf16"].reason == "validated":
        pytest.skip("an engine is validated for bf16 on this GPU")
    x, w, b, gy = _inputs(64, 512, 512, torch.bfloat16)
    with engines.cuda_engine("aten"):
        ref = _fwd()(x, w, b)
    with engines.cuda_engine("auto"):
        torch.testing.assert_close(_fwd()(x, w, b), ref, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["cublaslt"], indirect=True)
def test_cublaslt_algorithm_cache_is_bounded(engine):
    """Ragged batches bring new shapes; the algorithm cache stays bounded and correct."""
    with precision("bf16") as dtype:
        x, w, b, _ = _inputs(700, 40, 24, dtype)
        for m in range(1, 700):
            y = _fwd()(x[:m], w, b)
            if m % 97 == 0:
                torch.testing.assert_close(y, torch.relu(F.linear(x[:m], w, b)))
        assert torch.ops.fastmlp._cublaslt_algo_cache_size() <= 512


def test_bad_input_message():
    x, w, b, _ = _inputs(4, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="in_features"):
        _fwd()(x, w[:, :5], b)
    with pytest.raises(RuntimeError):
        _fwd()(x, w.to(torch.bfloat16), b)


# ---------------------------------------------------------------------------
# Autograd, opcheck, compile, graphs, devices, autocast.


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_gradcheck_float64(engine):
    x, w, b, _ = _inputs(5, 6, 7, torch.float64)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(linear_relu, args)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(engine, dtype):
    x, w, b, gy = _inputs(9, 17, 13, dtype)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    torch.library.opcheck(_fwd(), (xg, wg, bg))
    torch.library.opcheck(_fwd(), (xg, wg, None))
    y = _fwd()(x, w, b)
    # Every mask: outputs not asked for are tensors of their own, never aliases.
    for bits in range(8):
        mask = [bool(bits & 1), bool(bits & 2), bool(bits & 4)]
        xs, ws = (x if mask[1] else None), (w if mask[0] else None)
        torch.library.opcheck(_bwd(), (gy, y, xs, ws, mask))


class _SmallMLP(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = linear_relu(x, layer.weight, layer.bias)
        return self.layers[-1](x)


@pytest.mark.parametrize("engine", ["custom", "cublaslt"], indirect=True)
def test_compile_reduce_overhead(engine):
    torch.manual_seed(0)
    model = _SmallMLP([32, 64, 48, 10]).cuda()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")

    def step(m, x):
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().mean().backward()
        return out.detach().clone(), [p.grad.detach().clone() for p in m.parameters()]

    for _i in range(4):  # warm-up, capture, then replays with new inputs
        x = torch.randn(16, 32, device="cuda")
        out_c, grads_c = step(compiled, x)
        out_e, grads_e = step(model, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        for gc, ge in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["custom", "cublaslt", "aten"], indirect=True)
@pytest.mark.parametrize("prec", ["bf16", "tf32"])
def test_manual_cuda_graph(engine, prec):
    with precision(prec) as dtype:
        x, w, b, gy = _inputs(96, 80, 72, dtype)
        static = [t.clone() for t in (x, w, b, gy)]

        def run():
            y = _fwd()(static[0], static[1], static[2])
            return (y, *_bwd()(static[3], y, static[0], static[1], [True, True, True]))

        graph, outs = capture_cuda_graph(run, warmup=2)
        for seed in range(3):
            new = _inputs(96, 80, 72, dtype, gen_seed=seed + 1)
            for dst, src in zip(static, new, strict=True):
                dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            y = _fwd()(*new[:3])
            ref = (y, *_bwd()(new[3], y, new[0], new[1], [True, True, True]))
            tol = {"rtol": 0, "atol": 0} if engine != "aten" else {}
            for a, r in zip(outs, ref, strict=True):
                torch.testing.assert_close(a, r, **tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_non_default_device(engine):
    with precision("bf16") as dtype:
        x, w, b, gy = _inputs(130, 70, 90, dtype, device="cuda:1")
        with torch.cuda.device(0):
            y = _fwd()(x, w, b)
            gx, gw, gb = _bwd()(gy, y, x, w, [True, True, True])
        assert y.device == x.device and gw.device == x.device
        torch.cuda.synchronize(1)
        x0, w0, b0, gy0 = (t.to("cuda:0") for t in (x, w, b, gy))
        y0 = _fwd()(x0, w0, b0)
        torch.testing.assert_close(y.to("cuda:0"), y0)
        for a, r in zip((gx, gw, gb), _bwd()(gy0, y0, x0, w0, [True, True, True]), strict=True):
            torch.testing.assert_close(a.to("cuda:0"), r)


@pytest.mark.parametrize("engine", ["custom", "cublaslt", "auto"], indirect=True)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast(engine, amp_dtype):
    x, w, b, _ = _inputs(64, 48, 40, torch.float32)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.autocast("cuda", dtype=amp_dtype):
        y = linear_relu(x, wr, br)
        y_ref = torch.relu(F.linear(x, w, b))
    assert y.dtype in (amp_dtype, torch.float32)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert wr.grad.dtype == torch.float32 and br.grad.dtype == torch.float32
    assert torch.isfinite(wr.grad).all() and torch.isfinite(br.grad).all()

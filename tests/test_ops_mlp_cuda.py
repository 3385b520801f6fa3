"""CUDA tests of the whole-MLP ops (fastmlp.ops.mlp, its aten engine): numerics against
a float64 reference with the error bounded by PyTorch's own in the same precision, the
gradients asked for, opcheck, compile, autocast, CUDA graphs' stream, and device errors.

Skipped without a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastmlp.testing import mlp_forward_backward as _run
from fastmlp.testing import mlp_ref, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import fastmlp
    from fastmlp.ops import mlp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES["fp64"] = torch.float64
FLOOR = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3, "fp64": 1e-12}
WIDTHS = (1, 7, 513)
GRID = list(itertools.product(range(1, 5), (0, 1, 3, 64, 129), DTYPES, (True, False)))


@pytest.fixture(autouse=True)
def _no_tf32():
    # PyTorch's reference must run in full float32, as ours does.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _layers(sizes, dtype, bias, gen):
    weights = [
        ((torch.rand(o, i, generator=gen) * 2 - 1) * i**-0.5).to("cuda", dtype)
        for i, o in zip(sizes[:-1], sizes[1:], strict=False)
    ]
    biases = (
        [((torch.rand(o, generator=gen) * 2 - 1) * 0.3).to("cuda", dtype) for o in sizes[1:]]
        if bias
        else None
    )
    return weights, biases


@pytest.mark.parametrize(
    "layers,batch,prec,bias",
    GRID,
    ids=[f"L{c[0]}-b{c[1]}-{c[2]}-{'bias' if c[3] else 'nobias'}" for c in GRID],
)
def test_matches_torch(layers, batch, prec, bias):
    case = GRID.index((layers, batch, prec, bias))
    sizes = [WIDTHS[(case + i) % 3] for i in range(layers + 1)]
    gen = torch.Generator().manual_seed(case)
    dtype = DTYPES[prec]
    weights, biases = _layers(sizes, dtype, bias, gen)
    x = torch.randn(batch, sizes[0], generator=gen).to("cuda", dtype)
    y, grads, gy = _run(mlp, x, weights, biases)
    y_t, grads_t, _ = _run(mlp_ref, x, weights, biases, gy)
    as64 = [w.double() for w in weights], None if biases is None else [b.double() for b in biases]
    y_64, grads_64, _ = _run(mlp_ref, x.double(), *as64, gy.double())
    for ours, theirs, ref in zip([y, *grads], [y_t, *grads_t], [y_64, *grads_64], strict=True):
        assert ours.shape == ref.shape and ours.dtype == dtype and ours.device == x.device
        assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + FLOOR[prec]


def test_only_requested_gradients_and_unaliased_outputs():
    gen = torch.Generator().manual_seed(1)
    weights, biases = _layers((6, 8, 8, 3), torch.float32, True, gen)
    x = torch.randn(5, 6, generator=gen).cuda()
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    gy = torch.randn_like(y)
    mask = [False, False, True, False, False, False, True]
    gx, gws, gbs = torch.ops.fastmlp.mlp_backward(gy, None, weights, hidden, mask)
    assert gx.numel() == 0 and gws[0].numel() == 0 and gbs[0].numel() == 0
    assert len({id(t) for t in (gx, gws[0], gws[2], gbs[0], gbs[1])}) == 5  # no aliases
    g = torch.where(hidden[1] > 0, gy @ weights[2], 0.0)
    torch.testing.assert_close(gws[1], g.t() @ hidden[0])
    torch.testing.assert_close(gbs[2], gy.sum(0))


def test_nan_propagates_like_torch_relu():
    gen = torch.Generator().manual_seed(2)
    weights, biases = _layers((9, 11, 6, 3), torch.float32, True, gen)
    x = torch.randn(6, 9, generator=gen).cuda()
    x[2, 3] = float("nan")
    y, grads, gy = _run(mlp, x, weights, biases)
    y_t, grads_t, _ = _run(mlp_ref, x, weights, biases, gy)
    assert torch.isnan(y[2]).all()
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_opcheck(prec):
    gen = torch.Generator().manual_seed(3)
    weights, biases = _layers((5, 7, 3), DTYPES[prec], True, gen)
    x = torch.randn(6, 5, generator=gen).to("cuda", DTYPES[prec])
    for args in [(x, weights, biases), (x, weights, []), (x[:0], weights, biases)]:
        torch.library.opcheck(torch.ops.fastmlp.mlp.default, args)
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    gy = torch.randn_like(y)
    for mask in ([True] * 5, [False, True, False, True, False], [True, False, False]):
        args = (gy, x if mask[1] else None, weights, hidden, mask)
        torch.library.opcheck(torch.ops.fastmlp.mlp_backward.default, args)


def test_model_compile_fullgraph_and_cpu_parity():
    torch.manual_seed(0)
    model = fastmlp.MLP((20, 16, 16, 4)).cuda()
    cpu = fastmlp.MLP((20, 16, 16, 4))
    cpu.load_state_dict(model.state_dict())
    x = torch.randn(9, 20)
    target = torch.arange(9) % 4

    def step(m, x, t):
        loss = F.cross_entropy(m(x), t)
        loss.backward()
        return loss

    loss = step(torch.compile(model, fullgraph=True), x.cuda(), target.cuda())
    torch.testing.assert_close(loss.cpu(), step(cpu, x, target))
    for p, q in zip(model.parameters(), cpu.parameters(), strict=True):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-5)


def test_autocast_cuda_bfloat16():
    gen = torch.Generator().manual_seed(4)
    weights, biases = _layers((12, 10, 6), torch.float32, True, gen)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    x = torch.randn(16, 12, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mlp(x, params[:2], params[2:])
        y_t = mlp_ref(x, params[:2], params[2:])
    assert y.dtype == y_t.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_t, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_runs_on_the_current_stream_under_cuda_graphs():
    gen = torch.Generator().manual_seed(5)
    weights, biases = _layers((8, 16, 4), torch.float32, True, gen)
    static_x = torch.randn(32, 8, generator=gen).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            mlp(static_x, weights, biases)  # warm-up on the side stream, as CUDA graphs need
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mlp(static_x, weights, biases)
    new_x = torch.randn(32, 8, generator=gen).cuda()
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, mlp_ref(new_x, weights, biases))


def test_device_mix_raises_clear_error():
    weights = [torch.randn(4, 3, device="cuda"), torch.randn(2, 4)]
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be on x's device"):
        mlp(torch.randn(2, 3, device="cuda"), weights)
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be on x's device"):
        mlp(torch.randn(2, 3), [w.cuda() for w in weights])


# --- every activation (issue 23): the aten engine computes them all ---------------------

ACTS = [
    ("relu", 0.01),
    ("leaky_relu", 0.01),
    ("leaky_relu", -0.3),
    ("tanh", 0.01),
    ("sigmoid", 0.01),
    ("none", 0.01),
    ("gelu", 0.01),
    ("gelu_tanh", 0.01),
    ("silu", 0.01),
]
ACT_IDS = [a if s == 0.01 else f"{a}{s}" for a, s in ACTS]
ACT_GRID = list(itertools.product(range(len(ACTS)), (0, 1, 3, 129), DTYPES))


def _act_fns(activation, output_activation, slope):
    kw = dict(activation=activation, output_activation=output_activation, negative_slope=slope)

    def ours(x, w, b):
        return mlp(x, w, b, **kw)

    def ref(x, w, b):
        return mlp_ref(x, w, b, **kw)

    return ours, ref


@pytest.mark.parametrize(
    "act,batch,prec",
    ACT_GRID,
    ids=[f"{ACT_IDS[a]}-b{b}-{p}" for a, b, p in ACT_GRID],
)
def test_every_activation_matches_torch(act, batch, prec):
    case = ACT_GRID.index((act, batch, prec))
    activation, slope = ACTS[act]
    out = activation if case % 2 else "none"
    layers, bias = 1 + case % 3, (case // 2) % 2 == 0
    sizes = [WIDTHS[(case + i) % 3] for i in range(layers + 1)]
    gen = torch.Generator().manual_seed(case)
    dtype = DTYPES[prec]
    weights, biases = _layers(sizes, dtype, bias, gen)
    x = torch.randn(batch, sizes[0], generator=gen).to("cuda", dtype)
    ours_fn, ref_fn = _act_fns(activation, out, slope)
    y, grads, gy = _run(ours_fn, x, weights, biases)
    y_t, grads_t, _ = _run(ref_fn, x, weights, biases, gy)
    as64 = [w.double() for w in weights], None if biases is None else [b.double() for b in biases]
    y_64, grads_64, _ = _run(ref_fn, x.double(), *as64, gy.double())
    for ours, theirs, ref in zip([y, *grads], [y_t, *grads_t], [y_64, *grads_64], strict=True):
        assert ours.shape == ref.shape and ours.dtype == dtype and ours.device == x.device
        assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + FLOOR[prec], (activation, out)


@pytest.mark.parametrize("act", range(len(ACTS)), ids=ACT_IDS)
def test_every_activation_nan_inf_and_opcheck(act):
    activation, slope = ACTS[act]
    gen = torch.Generator().manual_seed(6)
    weights, biases = _layers((9, 11, 6, 3), torch.float32, True, gen)
    x = torch.randn(6, 9, generator=gen).cuda()
    x[2, 3], x[4, 1] = float("nan"), float("inf")
    ours_fn, ref_fn = _act_fns(activation, activation, slope)
    y, grads, gy = _run(ours_fn, x, weights, biases)
    y_t, grads_t, _ = _run(ref_fn, x, weights, biases, gy)
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    acts = (activation, activation, slope)
    x = x.nan_to_num()
    torch.library.opcheck(torch.ops.fastmlp.mlp.default, (x, weights, biases, *acts))
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases, *acts)
    assert len(hidden) == 3
    args = (torch.randn_like(y), x, weights, hidden, [True] * 7, *acts)
    torch.library.opcheck(torch.ops.fastmlp.mlp_backward.default, args)


@pytest.mark.parametrize("act", range(len(ACTS)), ids=ACT_IDS)
def test_every_activation_autocast_and_cpu_parity(act):
    activation, slope = ACTS[act]
    torch.manual_seed(7)
    cpu = fastmlp.MLP(
        (20, 16, 16, 4), activation=activation, output_activation=activation, negative_slope=slope
    )
    model = fastmlp.MLP(
        (20, 16, 16, 4), activation=activation, output_activation=activation, negative_slope=slope
    ).cuda()
    model.load_state_dict(cpu.state_dict())
    x = torch.randn(9, 20)
    torch.testing.assert_close(model(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x.cuda())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().cpu(), cpu(x), atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())

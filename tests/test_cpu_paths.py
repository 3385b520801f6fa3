"""The CPU paths of the whole-MLP ops (issue 24): every one (``layered``, ``row_blocked``,
``aten`` and the rule's ``auto``) forced with :func:`fastmlp.engines.force_cpu_path` and
checked against a float64 reference with the error bounded by PyTorch's own in the same
dtype: odd widths 1/7/100/257, depth 1-8, batch 0/1/3/17/4099, fp32/fp64/bf16, bias or
not, needs_input_grad subsets, several activations; inference (``mlp_inference``, what
``fastmlp.mlp`` runs under no_grad/inference_mode) and its refusal to be differentiated;
forward on one path and backward on the other; vmap; one and two threads, bitwise-
deterministic gradients; opcheck, gradcheck, torch.compile; clear errors. The rule and its
report are in tests/test_engines.py.

row_blocked runs float32 and float64 only: its bf16 cases are skipped with the engine's
own reason, and one test checks that forcing it for bf16 raises that reason.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import fastmlp
from fastmlp.engines import cpu_path, force_cpu_path
from fastmlp.testing import (
    assert_mlp_matches_torch,
    mlp_layers,
    mlp_ref,
    rel_err,
)
from fastmlp.testing import mlp_forward_backward as _run

PATHS = ("layered", "row_blocked", "aten", "auto")
WIDTHS = (1, 7, 100, 257)
BATCHES = (0, 1, 3, 17, 4099)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Ours may be at most twice as far from float64 as plain PyTorch in the same dtype, plus
# this floor (as tests/test_activations.py: float64 through a width-1 bottleneck differs
# by summation order up to ~1e-11). A wrong mask, term, layer or block is off by O(1).
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture(autouse=True)
def _seeded():
    # grad_y and other draws of the global generator: the same in every run, so that a
    # case near the bound does not pass or fail by chance.
    torch.manual_seed(24)


@pytest.fixture(params=PATHS)
def path(request):
    """The CPU path every op call of the test runs on (``auto``: the rule's)."""
    with force_cpu_path(request.param):
        yield request.param


def skip_unless_runs(path: str, dtype: torch.dtype) -> None:
    """Skip, with the engine's reason, where the forced path cannot run ``dtype``."""
    try:
        cpu_path([1, 1], 1, dtype)
    except RuntimeError as e:
        assert path == "row_blocked", e
        pytest.skip(str(e))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fns(activation="relu", output_activation="none", slope=0.01):
    kw = dict(activation=activation, output_activation=output_activation, negative_slope=slope)
    return functools.partial(fastmlp.mlp, **kw), functools.partial(mlp_ref, **kw)


def _inputs(sizes, batch, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    weights, biases = mlp_layers(sizes, dtype, bias, gen)
    x = torch.randn(batch, sizes[0], generator=gen).to(dtype)
    return x, weights, biases


# --- forward and backward against float64, every path --------------------------------

# (sizes, batch, dtype, bias, activation, output_activation, negative_slope), hand-picked
# so that each width sits at each position, each depth 1..8 and each batch appears, and
# 257 (above the rule's 256: auto picks layered) is in training shapes of every dtype.
HAND = [
    ((1, 1), 1, F64, False, "relu", "none", 0.01),
    ((7, 1, 7), 17, F32, True, "relu", "none", 0.01),
    ((1, 100, 1), 4099, F32, True, "gelu", "none", 0.01),
    ((257, 7, 100), 3, F64, False, "tanh", "sigmoid", 0.01),
    ((100, 257, 257, 1), 17, F32, True, "silu", "none", 0.01),
    ((100, 257, 7, 1, 100), 4099, F32, False, "relu", "sigmoid", 0.01),
    ((7, 100, 100, 7, 1, 7), 0, F32, True, "relu", "none", 0.01),
    ((7, 7, 7, 7, 7, 7, 7, 7), 4099, F64, True, "leaky_relu", "none", -0.3),
    ((7, 1, 7, 100, 7, 1, 7, 1, 7), 3, F32, True, "gelu", "tanh", 0.01),
    ((257, 100, 257), 4099, F64, True, "leaky_relu", "none", 0.2),
    ((7, 100, 7), 17, BF16, True, "relu", "none", 0.01),
    ((100, 257, 1, 7), 4099, BF16, False, "silu", "sigmoid", 0.01),
    ((257, 257), 3, BF16, True, "relu", "none", 0.01),
    ((7, 100, 7, 100), 4099, F32, True, "none", "none", 0.01),
    ((100, 7, 257, 7), 17, F64, False, "sigmoid", "gelu_tanh", 0.01),
]
KINDS = [("relu", 0.01), ("gelu", 0.01), ("tanh", 0.01), ("silu", 0.01), ("leaky_relu", -0.3)]


def _random_cases(n: int, seed: int = 24) -> list[tuple]:
    """A fixed sample of the rest of the grid (the full product is thousands of cases)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        depth = rng.randint(1, 8)
        sizes = tuple(rng.choice(WIDTHS) for _ in range(depth + 1))
        batch = rng.choice(BATCHES)
        # Keep the file fast: no more than ~20M multiply-adds per forward.
        if batch * sum(a * b for a, b in zip(sizes, sizes[1:], strict=False)) > 2e7:
            continue
        activation, slope = rng.choice(KINDS)
        output = rng.choice(("none", "none", "sigmoid", "tanh"))
        cases.append(
            (sizes, batch, rng.choice(DTYPES), rng.random() < 0.5, activation, output, slope)
        )
    return cases


CASES = HAND + _random_cases(14)


def _case_id(c) -> str:
    sizes, batch, dtype, bias, activation, output, slope = c
    act = activation if slope == 0.01 else f"{activation}{slope}"
    widths = "-".join(map(str, sizes))
    return f"{widths}-b{batch}-{_name(dtype)}-{'bias' if bias else 'nobias'}-{act}-{output}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward_matches_float64(path, case):
    sizes, batch, dtype, bias, activation, output, slope = case
    skip_unless_runs(path, dtype)
    x, weights, biases = _inputs(sizes, batch, dtype, bias, CASES.index(case))
    ours, ref = _fns(activation, output, slope)
    assert_mlp_matches_torch(ours, ref, x, weights, biases, FLOOR[dtype], what=f"{path}, ")


# needs_input_grad subsets of a 3-layer MLP with biases (inputs x, w0, w1, w2, b0, b1,
# b2): each gradient asked for must match, each other one must stay None.
SUBSETS = {
    "x-only": [0],
    "w0-only": [1],
    "some-weights": [2, 3],
    "biases-only": [4, 5, 6],
    "top-layer-only": [3, 6],
    "x-and-b0": [0, 4],
    "none": [],
}


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # gelu saves pre-activations
@pytest.mark.parametrize("subset", SUBSETS.values(), ids=SUBSETS.keys())
def test_only_requested_gradients(path, subset, activation):
    # 517 float64 rows of width 100: five row blocks, split over the threads.
    x, weights, biases = _inputs((7, 100, 1, 7), 517, F64, True, 3)
    needs = [i in subset for i in range(7)]
    ours, ref = _fns(activation, "sigmoid")
    assert_mlp_matches_torch(ours, ref, x, weights, biases, FLOOR[F64], needs, f"{path}, ")


def test_non_contiguous_input_and_expanded_grad(path):
    x, weights, biases = _inputs((9, 100, 7), 300, F32, True, 4)
    x = torch.randn(300, 18)[:, ::2]
    weights = [w.t().contiguous().t() for w in weights]
    assert not x.is_contiguous() and not weights[0].is_contiguous()
    params = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
    refs = [t.detach().double().requires_grad_() for t in params]
    # .sum() gives backward a grad_y expanded from one number (stride 0).
    fastmlp.mlp(params[0], params[1:3], params[3:]).sum().backward()
    mlp_ref(refs[0], refs[1:3], refs[3:]).sum().backward()
    for p, r in zip(params, refs, strict=True):
        assert rel_err(p.grad, r.grad) < 1e-5


def test_nan_and_inf_propagate_like_torch(path):
    x, weights, biases = _inputs((9, 11, 6, 3), 40, F32, True, 5)
    x[2, 3] = float("nan")
    weights[1][4, 0] = float("inf")
    y, grads, gy = _run(fastmlp.mlp, x, weights, biases)
    y_t, grads_t, _ = _run(mlp_ref, x, weights, biases, gy)
    assert torch.isnan(y[2]).all()
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
@pytest.mark.parametrize(
    "forward,backward", [("layered", "row_blocked"), ("row_blocked", "layered")]
)
def test_forward_on_one_path_backward_on_the_other(forward, backward, activation):
    # What forward saves (hidden) reads the same on both paths.
    x, weights, biases = _inputs((7, 100, 100, 7), 517, F64, True, 16)
    slope = -0.3 if activation == "leaky_relu" else 0.01
    kw = dict(activation=activation, output_activation="tanh", negative_slope=slope)
    leaves = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
    with force_cpu_path(forward):
        y = fastmlp.mlp(leaves[0], leaves[1:4], leaves[4:], **kw)
    gy = torch.randn_like(y)
    with force_cpu_path(backward):
        y.backward(gy)
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    mlp_ref(refs[0], refs[1:4], refs[4:], **kw).backward(gy)
    for i, (ours, ref) in enumerate(zip(leaves, refs, strict=True)):
        assert rel_err(ours.grad, ref.grad) < 1e-12, i


def test_vmap_over_the_input(path):
    # vmap of x alone folds the vmapped dimension into the rows of one fused call.
    x, weights, biases = _inputs((7, 100, 7), 4 * 33, F64, True, 17)
    x = x.reshape(4, 33, 7)
    ours, ref = _fns("silu", "none")
    got = torch.func.vmap(lambda xi: ours(xi, weights, biases))(x)
    torch.testing.assert_close(got, ref(x, weights, biases))
    grads = torch.func.vmap(torch.func.grad(lambda xi: ours(xi, weights, biases).sum()))(x)
    x_ = x.clone().requires_grad_()
    ref(x_, weights, biases).sum().backward()
    torch.testing.assert_close(grads, x_.grad)


def test_forcing_row_blocked_for_float16_raises_the_reason():
    x, weights, biases = _inputs((7, 7, 3), 5, BF16, True, 6)
    with force_cpu_path("row_blocked"):
        for dtype in (torch.float16,):
            args = (x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases])
            for mode in (torch.enable_grad, torch.no_grad):
                with (
                    mode(),
                    pytest.raises(
                        RuntimeError, match="forced to row_blocked.*float32, float64 and bfloat16"
                    ),
                ):
                    fastmlp.mlp(*args)
            with pytest.raises(RuntimeError, match="forced to row_blocked"):
                cpu_path([7, 7, 3], 5, dtype)
    # Outside the forcing the same call runs (layer by layer).
    assert fastmlp.mlp(x, weights, biases).shape == (5, 3)


def test_auto_runs_the_path_the_rule_names():
    # A narrow float32 shape (the rule: row_blocked) and a wide one (layered). The two
    # paths sum in another order, so their results differ in the last bits: auto must
    # give bitwise what the named path gives, the other path only the same up to rounding.
    told_apart = 0
    for sizes, want in (((100, 64, 64, 7), "row_blocked"), ((100, 1100, 7), "layered")):
        x, weights, biases = _inputs(sizes, 1000, F32, True, 7)
        assert cpu_path(sizes, 1000).path == want
        results = {}
        for name in PATHS:
            with force_cpu_path(name):
                y, grads, _ = _run(fastmlp.mlp, x, weights, biases, torch.ones(1000, 7))
                results[name] = [y, *grads]
        other = results["layered" if want == "row_blocked" else "row_blocked"]
        for ours, auto, theirs in zip(results[want], results["auto"], other, strict=True):
            assert torch.equal(ours, auto), f"auto did not run {want} for {sizes}"
            assert rel_err(theirs, ours) < 1e-5
        told_apart += not all(map(torch.equal, results[want], other))
    if told_apart < 2:
        pytest.skip("the two paths agree bitwise on this CPU: cannot tell which ran")


# --- inference: mlp_inference under no_grad / inference_mode ---------------------------

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


class _OpLog(TorchDispatchMode):
    """Names of the ops that reach the kernels (below autograd) while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _assert_bounded(name, ours, theirs, ref, dtype):
    assert ours.shape == ref.shape and ours.dtype == dtype, name
    err, err_torch = rel_err(ours, ref), rel_err(theirs, ref)
    assert err <= 2 * err_torch + FLOOR[dtype], (
        f"{name}: error {err:.3g} vs PyTorch's {err_torch:.3g} ({dtype})"
    )


# (sizes, batch, leading dims): small batches (auto: row_blocked even at 257 wide),
# several blocks, a wide batch (auto: layered), 3-d input, no rows.
INFER = [
    ((7, 100, 7), 1),
    ((257, 257, 7), 1),
    ((257, 257, 7), 3),
    ((100, 100, 1), 4099),
    ((257, 257, 7), 1100),
    ((1, 7, 100, 7, 1), 17),
    ((7, 100, 7), 0),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", INFER, ids=[f"{'-'.join(map(str, s))}-b{b}" for s, b in INFER])
def test_inference_matches_float64_and_runs_mlp_inference(path, shape, dtype, mode):
    skip_unless_runs(path, dtype)
    sizes, batch = shape
    seed = INFER.index(shape)
    x, weights, biases = _inputs(sizes, batch, dtype, seed % 2 == 0, seed)
    x = x.reshape(1, batch, sizes[0]) if seed % 3 == 0 else x  # leading dimensions too
    ours_fn, ref_fn = _fns("gelu" if seed % 2 else "relu", "sigmoid" if seed % 3 else "none")
    params = [t.requires_grad_() for t in [*weights, *(biases or [])]]  # as a model's
    n = len(weights)
    with MODES[mode](), _OpLog() as log:
        y = ours_fn(x, params[:n], params[n:] or None)
    assert "fastmlp::mlp_inference" in log.names and "fastmlp::mlp" not in log.names, log.names
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        theirs = ref_fn(x, params[:n], params[n:] or None)
        as64 = [t.double() for t in params]
        ref = ref_fn(x.double(), as64[:n], as64[n:] or None)
    _assert_bounded("y", y, theirs, ref, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_module_inference_matches_torch(path, mode):
    torch.manual_seed(0)
    model = fastmlp.MLP((7, 100, 257, 7), activation="silu", output_activation="sigmoid")
    x = torch.randn(4099, 7)
    with MODES[mode](), _OpLog() as log:
        y = model(x)
    assert "fastmlp::mlp_inference" in log.names and "fastmlp::mlp" not in log.names
    linears = model.linears()
    weights, biases = [m.weight for m in linears], [m.bias for m in linears]
    kw = dict(activation="silu", output_activation="sigmoid")
    with torch.no_grad():
        theirs = mlp_ref(x, weights, biases, **kw)
        ref = mlp_ref(x.double(), [w.double() for w in weights], [b.double() for b in biases], **kw)
    _assert_bounded("y", y, theirs, ref, F32)
    # Training right after inference (the engines keep scratch from call to call).
    y = model(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grad_mode_runs_mlp_not_mlp_inference(path):
    x, weights, biases = _inputs((7, 100, 7), 5, F32, True, 8)
    weights[0].requires_grad_()
    with _OpLog() as log:
        fastmlp.mlp(x, weights, biases)
    assert "fastmlp::mlp" in log.names and "fastmlp::mlp_inference" not in log.names


def test_mlp_inference_refuses_to_be_differentiated(path):
    x, weights, biases = _inputs((7, 100, 7), 5, F64, True, 9)
    op = torch.ops.fastmlp.mlp_inference
    y = op(x, weights, biases)  # nothing requires grad: fine
    torch.testing.assert_close(y, mlp_ref(x, weights, biases))
    for i in range(5):
        inputs = [t.clone() for t in [x, *weights, *biases]]
        inputs[i].requires_grad_()
        with pytest.raises(RuntimeError, match="mlp_inference is not differentiable"):
            op(inputs[0], inputs[1:3], inputs[3:])
        with torch.no_grad():  # no gradient recorded: allowed
            torch.testing.assert_close(op(inputs[0], inputs[1:3], inputs[3:]), y)


def test_mlp_inference_refuses_forward_ad_dual_tensors(path):
    x, weights, biases = _inputs((7, 100, 7), 5, F64, True, 10)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        for mode in (torch.enable_grad, torch.no_grad):
            with mode(), pytest.raises(RuntimeError, match="torch.func.jvp"):
                torch.ops.fastmlp.mlp_inference(dual, weights, biases)
        dual_w = fwAD.make_dual(weights[1], torch.randn_like(weights[1]))
        with torch.no_grad(), pytest.raises(RuntimeError, match="torch.func.jvp"):
            torch.ops.fastmlp.mlp_inference(x, [weights[0], dual_w], biases)


# --- threads: per-thread gradient sums, deterministic for a thread count ---------------


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [F32, F64], ids=_name)
def test_threads_match_float64_and_are_deterministic(path, threads, dtype):
    # 4099 rows of width <= 100: many row blocks, so each thread sums several.
    x, weights, biases = _inputs((7, 100, 100, 1), 4099, dtype, True, 11)
    ours, ref = _fns("gelu", "none")
    assert_mlp_matches_torch(ours, ref, x, weights, biases, FLOOR[dtype], what=f"{path}, ")
    first = _run(ours, x, weights, biases)
    second = _run(ours, x, weights, biases, first[2])
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b), f"two identical calls differ ({path}, {threads} threads)"


def test_one_and_two_threads_agree(path):
    x, weights, biases = _inputs((7, 100, 100, 7), 4099, F64, True, 12)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, grads, gy = _run(fastmlp.mlp, x, weights, biases, torch.ones(4099, 7))
            results.append([y, *grads])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < 1e-12


# --- opcheck, gradcheck, torch.compile on every path ----------------------------------


@pytest.mark.parametrize("dtype", [F32, F64], ids=_name)
def test_opcheck(path, dtype):
    x, weights, biases = _inputs((5, 7, 3), 6, dtype, True, 13)
    samples = [
        (x, weights, biases),
        (x, weights, []),
        (torch.randn(2, 3, 5).to(dtype), weights, biases, "gelu", "sigmoid"),
        (torch.randn(0, 5).to(dtype), weights[:1], biases[:1]),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastmlp.mlp_inference.default, args)
        torch.library.opcheck(torch.ops.fastmlp.mlp.default, args)
    grad = [t.detach().clone().requires_grad_() for t in [x, *weights, *biases]]
    torch.library.opcheck(torch.ops.fastmlp.mlp.default, (grad[0], grad[1:3], grad[3:]))
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    gy = torch.randn_like(y)
    for mask in ([True] * 5, [False, True, False, True, False], [False, False, True, False, True]):
        args = (gy, x if mask[1] else None, weights, hidden, mask)
        torch.library.opcheck(torch.ops.fastmlp.mlp_backward.default, args)


@pytest.mark.parametrize("kind", ["relu", "gelu-sigmoid", "leaky_relu-0.3-nobias"])
def test_gradcheck_float64(path, kind):
    activation, output, slope, bias = {
        "relu": ("relu", "none", 0.01, True),
        "gelu-sigmoid": ("gelu", "sigmoid", 0.01, True),
        "leaky_relu-0.3-nobias": ("leaky_relu", "none", -0.3, False),
    }[kind]
    x, weights, biases = _inputs((4, 5, 3, 2), 19, F64, bias, 14)
    ours, _ = _fns(activation, output, slope)
    params = [t.requires_grad_() for t in [x, *weights, *(biases or [])]]
    assert torch.autograd.gradcheck(lambda x, *p: ours(x, p[:3], p[3:] or None), params)


def _compiled_matches_eager(model, x, backend):
    torch._dynamo.reset()  # each test's model compiles afresh (MLP.forward is shared)
    graphs = []

    def recording(gm, example_inputs):  # the ops dynamo put in each graph, then backend
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(model, backend=recording, fullgraph=True)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    grads_c = torch.autograd.grad(y_c.square().sum(), list(model.parameters()))
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1 and "fastmlp.mlp" in graphs[0], graphs
    with torch.no_grad():
        y_c = compiled(x)
    assert len(graphs) == 2 and "fastmlp.mlp_inference" in graphs[1], graphs
    assert "fastmlp.mlp" not in graphs[1], graphs
    torch.testing.assert_close(y_c, y.detach())


def test_torch_compile_matches_eager(path):
    torch.manual_seed(0)
    model = fastmlp.MLP((7, 100, 257, 7), activation="gelu", output_activation="sigmoid")
    _compiled_matches_eager(model, torch.randn(300, 7), "aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager(path):
    torch.manual_seed(0)
    model = fastmlp.MLP((7, 100, 7), activation="silu")
    _compiled_matches_eager(model, torch.randn(300, 7), "inductor")


# --- bad input: the same clear errors on every path ------------------------------------

BAD = [
    ("dtype mix", lambda x, w, b: (x, [w[0].double(), w[1]], b), r"weights\[0\] must have x's"),
    ("bias dtype", lambda x, w, b: (x, w, [b[0], b[1].double()]), r"biases\[1\] must have x's"),
    ("in_features", lambda x, w, b: (x[:, :5], w, b), r"in_features mismatch: weights\[0\]"),
    ("chain", lambda x, w, b: (x, [w[0], w[1][:, :3]], b), r"weights\[1\]"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(path, make, message):
    x, weights, biases = _inputs((7, 100, 7), 5, F32, True, 15)
    args = make(x, weights, biases)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode(), pytest.raises(RuntimeError, match=message):
            fastmlp.mlp(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastmlp.mlp_inference(*args)

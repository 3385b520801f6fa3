"""fastmlp.ops.mlp, the whole-MLP op (CPU): numerics against PyTorch, the gradients
asked for and only those, opcheck, gradcheck, torch.compile, autocast, NaN, and the
errors for bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp.ops import mlp
from fastmlp.testing import assert_mlp_matches_torch, mlp_layers, mlp_ref
from fastmlp.testing import mlp_forward_backward as _run

BATCHES = (0, 1, 3, 64, 129)
WIDTHS = (1, 7, 513)
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Relative error of ours against float64 may be at most twice plain PyTorch's in the
# same dtype plus this floor (room for rounding where PyTorch is exact by chance).
# A wrong mask, a missing term or a gradient of the wrong layer is off by O(1).
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_matches_torch(x, weights, biases, needs=None):
    assert_mlp_matches_torch(mlp, mlp_ref, x, weights, biases, ERROR_FLOOR[x.dtype], needs)


GRID = list(itertools.product(range(1, 5), BATCHES, DTYPES, (True, False)))


@pytest.mark.parametrize(
    "layers,batch,dtype,bias",
    GRID,
    ids=[f"L{c[0]}-b{c[1]}-{str(c[2])[6:]}-{'bias' if c[3] else 'nobias'}" for c in GRID],
)
def test_forward_backward_matches_torch(layers, batch, dtype, bias):
    case = GRID.index((layers, batch, dtype, bias))
    # Every width at every position across the grid: rotate through 1, 7, 513.
    sizes = [WIDTHS[(case + i) % 3] for i in range(layers + 1)]
    gen = torch.Generator().manual_seed(case)
    weights, biases = mlp_layers(sizes, dtype, bias, gen)
    x = torch.randn(batch, sizes[0], generator=gen).to(dtype)
    assert_matches_torch(x, weights, biases)


# needs_input_grad subsets of a 3-layer MLP with biases: inputs are x, w0, w1, w2, b0,
# b1, b2. Each gradient asked for must match; each other one must stay None.
SUBSETS = {
    "x-only": [0],
    "w0-only": [1],
    "last-layer-only": [3, 6],
    "biases-only": [4, 5, 6],
    "middle-weight": [2],
    "x-and-b0": [0, 4],
    "none": [],
}


@pytest.mark.parametrize("subset", SUBSETS.values(), ids=SUBSETS.keys())
def test_only_requested_gradients_are_computed(subset):
    gen = torch.Generator().manual_seed(7)
    weights, biases = mlp_layers((13, 33, 9, 5), torch.float64, True, gen)
    x = torch.randn(17, 13, generator=gen, dtype=torch.float64)
    needs = [i in subset for i in range(7)]
    assert_matches_torch(x, weights, biases, needs)


def test_backward_op_computes_only_what_the_mask_asks():
    gen = torch.Generator().manual_seed(8)
    weights, biases = mlp_layers((6, 8, 8, 3), torch.float32, True, gen)
    x = torch.randn(5, 6, generator=gen)
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    gy = torch.randn_like(y)
    mask = [False, False, True, False, False, False, True]
    gx, gws, gbs = torch.ops.fastmlp.mlp_backward(gy, None, weights, hidden, mask)
    assert gx.numel() == 0 and gws[0].numel() == 0 and gws[2].numel() == 0
    assert gbs[0].numel() == 0 and gbs[1].numel() == 0
    assert gws[1].shape == weights[1].shape and gbs[2].shape == (3,)
    # x is needed only for weights[0]'s gradient.
    with pytest.raises(RuntimeError, match="x is required"):
        torch.ops.fastmlp.mlp_backward(gy, None, weights, hidden, [False, True] + [False] * 5)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5), (4, 1, 2, 5)])
def test_any_leading_dimensions(shape):
    weights, biases = mlp_layers((5, 6, 4), torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    assert mlp(x, weights, biases).shape == (*shape[:-1], 4)
    assert_matches_torch(x, weights, biases)


def test_zero_size_batch_gives_zero_gradients():
    weights, biases = mlp_layers((5, 6, 4), torch.float32)
    y, grads, _ = _run(mlp, torch.randn(0, 5), weights, biases)
    assert y.shape == (0, 4)
    for g, t in zip(grads, [torch.empty(0, 5), *weights, *biases], strict=True):
        assert g.shape == t.shape and (g == 0).all()


def test_non_contiguous_weights_and_input():
    weights, biases = mlp_layers((9, 11, 4), torch.float64)
    weights = [w.t().contiguous().t() for w in weights]  # transposed storage
    x = torch.randn(12, 18, dtype=torch.float64)[:, ::2]
    assert not x.is_contiguous() and not weights[0].is_contiguous()
    assert_matches_torch(x, weights, biases)


def test_nan_propagates_like_torch_relu():
    weights, biases = mlp_layers((9, 11, 6, 3), torch.float32)
    x = torch.randn(6, 9)
    x[2, 3] = float("nan")
    weights[1][4, 0] = float("inf")
    y, grads, gy = _run(mlp, x, weights, biases)
    y_t, grads_t, _ = _run(mlp_ref, x, weights, biases, gy)
    assert torch.isnan(y[2]).all()
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_gradient_is_zero_where_preactivation_is_exactly_zero():
    weights, biases = mlp_layers((5, 6, 3), torch.float32)
    weights[0][:3] = 0.0
    biases[0][:3] = 0.0  # hidden units 0..2: pre-activation exactly 0
    x = torch.randn(8, 5)
    y, grads, gy = _run(mlp, x, weights, biases)
    _, grads_t, _ = _run(mlp_ref, x, weights, biases, gy)
    gw0, gb0 = grads[1], grads[3]
    assert (gw0[:3] == 0).all() and (gb0[:3] == 0).all()
    for ours, theirs in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_results_are_deterministic():
    weights, biases = mlp_layers((130, 257, 65, 10), torch.float32)
    x = torch.randn(300, 130)
    first = _run(mlp, x, weights, biases)
    second = _run(mlp, x, weights, biases, first[2])
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def test_gradients_accumulate_into_existing_grad():
    weights, biases = mlp_layers((6, 5, 3), torch.float64)
    params = [t.clone().requires_grad_() for t in [*weights, *biases]]
    x = torch.randn(4, 6, dtype=torch.float64)
    for _ in range(2):
        mlp(x, params[:2], params[2:]).sum().backward()
    ref = [t.clone().requires_grad_() for t in [*weights, *biases]]
    (2 * mlp_ref(x, ref[:2], ref[2:]).sum()).backward()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)


def test_one_autograd_node_for_the_whole_mlp():
    weights, biases = mlp_layers((6, 5, 5, 3), torch.float32)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    y = mlp(torch.randn(2, 6), params[:3], params[3:])
    assert y.grad_fn.name().endswith("MlpFunction>")
    # Its inputs are the parameters themselves (AccumulateGrad nodes), no other node.
    nexts = [f for f, _ in y.grad_fn.next_functions if f is not None]
    assert len(nexts) == 6 and all(f.name() == "torch::autograd::AccumulateGrad" for f in nexts)


def test_gradcheck_float64():
    weights, biases = mlp_layers((4, 5, 3, 2), torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    assert torch.autograd.gradcheck(lambda x, *p: mlp(x, p[:3], p[3:]), (x, *params))
    assert torch.autograd.gradcheck(lambda x, *w: mlp(x, w), (x, *params[:3]))


def test_double_backward_raises_clear_error():
    weights, biases = mlp_layers((4, 5, 3), torch.float64)
    weights = [w.requires_grad_() for w in weights]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(mlp(x, weights, biases).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    weights, biases = mlp_layers((5, 7, 3), dtype)
    x = torch.randn(6, 5).to(dtype)
    grad = [t.detach().clone().requires_grad_() for t in [x, *weights, *biases]]
    samples = [
        (x, weights, biases),
        (x, weights, []),
        (grad[0], grad[1:3], grad[3:]),
        (torch.randn(2, 3, 5).to(dtype), weights, biases),
        (torch.randn(0, 5).to(dtype), weights[:1], biases[:1]),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastmlp.mlp.default, args)
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    gy = torch.randn_like(y)
    for mask in ([True] * 5, [False, True, False, True, False], [True, False, False], [False] * 5):
        args = (gy, x if mask[1] else None, weights, hidden, mask)
        torch.library.opcheck(torch.ops.fastmlp.mlp_backward.default, args)


def test_torch_compile_fullgraph():
    weights, biases = mlp_layers((20, 16, 16, 4), torch.float32)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    ref = [t.detach().clone().requires_grad_() for t in params]
    x = torch.randn(9, 20)

    def step(fn, p):
        loss = F.cross_entropy(fn(x, p[:3], p[3:]), torch.arange(9) % 4)
        loss.backward()
        return loss

    # fullgraph=True: any graph break (an op dynamo cannot trace) is an error.
    loss = step(torch.compile(mlp, fullgraph=True), params)
    torch.testing.assert_close(loss, step(mlp_ref, ref))
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)


def test_autocast_cpu_bfloat16():
    weights, biases = mlp_layers((12, 10, 6), torch.float32)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    x = torch.randn(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x, params[:2], params[2:])
        y_t = mlp_ref(x, params[:2], params[2:])
    assert y.dtype == y_t.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_t, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# --- bad input: a clear exception naming the argument, never a crash ----------

W = [torch.randn(4, 3), torch.randn(2, 4)]
B = [torch.randn(4), torch.randn(2)]
BAD_INPUTS = [
    ("no layers", (torch.randn(2, 3), [], []), "at least one layer"),
    ("bias count", (torch.randn(2, 3), W, B[:1]), "biases must be empty"),
    ("in_features", (torch.randn(2, 5), W, B), r"in_features mismatch: weights\[0\]"),
    ("chain", (torch.randn(2, 3), [W[0], torch.randn(2, 5)], B), r"weights\[1\]"),
    ("bias shape", (torch.randn(2, 3), W, [B[0], torch.randn(3)]), r"biases\[1\] must have"),
    ("weight rank", (torch.randn(2, 3), [torch.randn(3), W[1]], []), r"weights\[0\] must be 2-D"),
    ("x 0-D", (torch.tensor(1.0), W, B), "x must have at least 1"),
    ("int x", (torch.ones(2, 3, dtype=torch.int64), W, B), "x must be a floating"),
    ("bool weight", (torch.randn(2, 3), [W[0], W[1].bool()], []), r"weights\[1\] must be a float"),
    ("int bias", (torch.randn(2, 3), W, [B[0], B[1].int()]), r"biases\[1\] must be a float"),
    ("dtype mix", (torch.randn(2, 3), [W[0].double(), W[1]], []), r"weights\[0\] must have x's"),
    ("bias dtype", (torch.randn(2, 3), W, [B[0].double(), B[1]]), r"biases\[0\] must have x's"),
    ("zero width", (torch.randn(2, 3), [torch.randn(0, 3), torch.randn(2, 0)], []), "> 0"),
]


@pytest.mark.parametrize("what,args,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(what, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastmlp.mlp(*args)
    with pytest.raises(RuntimeError, match=message):
        mlp(*args)


def test_device_mix_with_meta_raises_clear_error():
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastmlp.mlp(torch.randn(2, 3), [torch.empty(4, 3, device="meta")], [])


def test_backward_op_rejects_bad_arguments():
    y, hidden = torch.ops.fastmlp.mlp(torch.randn(2, 3), W, B)
    gy = torch.randn_like(y)
    with pytest.raises(RuntimeError, match="output_mask must have"):
        torch.ops.fastmlp.mlp_backward(gy, None, W, hidden, [True, True])
    with pytest.raises(RuntimeError, match="hidden must hold"):
        torch.ops.fastmlp.mlp_backward(gy, None, W, [], [True, False, False])
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        torch.ops.fastmlp.mlp_backward(torch.randn(2, 5), None, W, hidden, [True, False, False])
    with pytest.raises(RuntimeError, match=r"hidden\[0\] must have shape"):
        torch.ops.fastmlp.mlp_backward(gy, None, W, [torch.randn(3, 4)], [True, False, False])


def test_exported_from_package():
    assert fastmlp.ops.mlp is mlp

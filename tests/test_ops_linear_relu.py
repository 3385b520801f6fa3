"""fastmlp.linear_relu (CPU): numerics against PyTorch, autograd, opcheck,
torch.compile, semantics at the edges and the errors for bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp.ops import linear_relu
from fastmlp.testing import (
    assert_error_bounded,
    forward_backward,
    layer_inputs,
    linear_relu_ref,
    magnitude_refs,
)

BATCHES = (0, 1, 3, 64, 129)
FEATURES = (1, 7, 512, 513, 784)
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Errors are bounded by PyTorch's own in the same dtype (fastmlp.testing.assert_error_bounded).
PRECISION = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def _inputs(batch, fan_in, fan_out, dtype, bias=True, seed=0):
    """(x, weight, bias) of one layer on the CPU (fastmlp.testing.layer_inputs)."""
    return layer_inputs(batch, fan_in, fan_out, dtype, bias=bias, seed=seed)[:3]


def assert_matches_torch(x, w, b):
    """fastmlp vs PyTorch in the same dtype, both measured against float64."""
    y, grads, gy = forward_backward(linear_relu, x, w, b)
    y_t, grads_t, _ = forward_backward(linear_relu_ref, x, w, b, gy)
    as64 = [t.double() if t is not None else None for t in (x, w, b)]
    y_64, grads_64, _ = forward_backward(linear_relu_ref, *as64, gy.double())
    magnitudes = magnitude_refs(x, w, b, gy)
    names = ("y", "grad_x", "grad_weight", "grad_bias")
    for name, ours, theirs, ref, mag in zip(
        names, [y, *grads], [y_t, *grads_t], [y_64, *grads_64], magnitudes, strict=True
    ):
        if ref is None:
            assert ours is None, name
            continue
        assert ours.dtype == x.dtype, name
        assert torch.isfinite(ours).all(), f"{name} has non-finite values"
        assert_error_bounded(name, ours, theirs, ref, mag, precision=PRECISION[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("fan_in,fan_out", list(itertools.product(FEATURES, FEATURES)))
def test_forward_backward_matches_torch(batch, fan_in, fan_out, dtype):
    assert_matches_torch(*_inputs(batch, fan_in, fan_out, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_bias(dtype):
    assert_matches_torch(*_inputs(65, 33, 17, dtype, bias=False))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5), (4, 1, 2, 5)])
def test_any_leading_dimensions(shape):
    x = torch.randn(*shape)
    w, b = torch.randn(6, 5), torch.randn(6)
    assert_matches_torch(x, w, b)
    assert linear_relu(x, w, b).shape == (*shape[:-1], 6)


@pytest.mark.parametrize("fan_in,fan_out", [(0, 4), (5, 0), (0, 0)])
def test_zero_features(fan_in, fan_out):
    # F.linear allows empty feature dimensions; so must we.
    for dtype in DTYPES:
        assert_matches_torch(*_inputs(3, fan_in, fan_out, dtype))


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_float16_on_cpu(dtype):
    assert_matches_torch(*_inputs(37, 21, 13, dtype))
    assert_matches_torch(*_inputs(1100, 9, 70, dtype))


def test_non_contiguous_inputs_and_weight_views():
    base_x = torch.randn(40, 2 * 33)
    x = base_x[::2, ::2]  # strided rows and columns
    w_t = torch.randn(33, 19)
    w = w_t.t()  # a transposed view
    b = torch.randn(38)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    assert_matches_torch(x, w, b)


def test_many_rows_use_several_backward_steps():
    # More rows than one backward step holds (the step size is 1024 rows).
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_torch(*_inputs(2500, 37, 45, dtype))


def test_nan_propagates_like_torch_relu():
    x, w, b = _inputs(6, 9, 11, torch.float32)
    x[2, 3] = float("nan")
    w[4, 0] = float("inf")
    y, (gx, gw, gb), gy = forward_backward(linear_relu, x, w, b)
    y_t, (gx_t, gw_t, gb_t), _ = forward_backward(linear_relu_ref, x, w, b, gy)
    assert torch.isnan(y[2]).all()
    for ours, theirs in [(y, y_t), (gx, gx_t), (gw, gw_t), (gb, gb_t)]:
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_gradient_is_zero_where_preactivation_is_exactly_zero():
    x, w, b = _inputs(8, 5, 6, torch.float32)
    w[:3] = 0.0
    b[:3] = 0.0  # columns 0..2: pre-activation exactly 0
    y, (gx, gw, gb), gy = forward_backward(linear_relu, x, w, b)
    y_t, (gx_t, gw_t, gb_t), _ = forward_backward(linear_relu_ref, x, w, b, gy)
    assert (y[:, :3] == 0).all()
    assert (gb[:3] == 0).all() and (gw[:3] == 0).all()
    for ours, theirs in [(gx, gx_t), (gw, gw_t), (gb, gb_t)]:
        torch.testing.assert_close(ours, theirs)


def test_results_are_deterministic():
    x, w, b = _inputs(300, 130, 257, torch.float32)
    first = forward_backward(linear_relu, x, w, b)
    second = forward_backward(linear_relu, x, w, b, first[2])
    assert torch.equal(first[0], second[0])
    for a, c in zip(first[1], second[1], strict=True):
        assert torch.equal(a, c)


def test_only_requested_gradients_are_computed():
    x, w, b = _inputs(4, 3, 5, torch.float32)
    w.requires_grad_()
    y = linear_relu(x, w, b)  # x and b need no gradient
    y.sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    ref_w = w.detach().clone().requires_grad_()
    linear_relu_ref(x, ref_w, b).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad)


def test_gradcheck_float64():
    x, w, b = (t.requires_grad_() for t in _inputs(5, 4, 3, torch.float64))
    assert torch.autograd.gradcheck(linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_relu(x, w), (x, w))


def test_double_backward_raises_clear_error():
    x, w, b = (t.requires_grad_() for t in _inputs(3, 4, 5, torch.float64))
    (gx,) = torch.autograd.grad(linear_relu(x, w, b).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x, w, b = _inputs(7, 5, 3, dtype)
    samples = [
        (x, w, b),
        (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()),
        (torch.randn(2, 3, 5, dtype=dtype), w, None),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastmlp.linear_relu.default, args)
    y = linear_relu(*_inputs(7, 5, 3, dtype)).detach()
    gy = torch.randn_like(y)
    # Every mask, those with two or more outputs not asked for included: each output
    # must be a tensor of its own (the schema declares no aliasing between them).
    for mask in itertools.product([True, False], repeat=3):
        mask = list(mask)
        args = (gy, y, x.detach() if mask[1] else None, w.detach() if mask[0] else None, mask)
        torch.library.opcheck(torch.ops.fastmlp.linear_relu_backward.default, args)


def test_torch_compile_fullgraph_mlp_forward_backward():
    torch.manual_seed(0)
    model = fastmlp.MLP((20, 16, 16, 4))
    reference = fastmlp.unfuse(fastmlp.MLP((20, 16, 16, 4)))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(9, 20)

    def step(m, x):
        loss = F.cross_entropy(m(x), torch.arange(9) % 4)
        loss.backward()  # compiled too: AOTAutograd traces the backward graph
        return loss

    # fullgraph=True: any graph break (an op dynamo cannot trace) is an error.
    loss = step(torch.compile(model, fullgraph=True), x)
    loss_ref = step(reference, x)
    torch.testing.assert_close(loss, loss_ref)
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_autocast_cpu_bfloat16():
    x, w, b = _inputs(16, 12, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_relu(x, w, b)
        y_t = linear_relu_ref(x, w, b)
    assert y.dtype == y_t.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_t, atol=2e-2, rtol=2e-2)


# --- bad input: a clear exception naming the argument, never a crash ----------

BAD_INPUTS = [
    ("dtype", (torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), None), "same dtype"),
    (
        "bias dtype",
        (torch.randn(2, 3), torch.randn(4, 3), torch.randn(4).double()),
        "bias and weight",
    ),
    ("in_features", (torch.randn(2, 5), torch.randn(4, 3), None), "in_features mismatch"),
    ("bias length", (torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)), "bias must have"),
    ("bias rank", (torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 4)), "bias must be 1-D"),
    ("weight rank", (torch.randn(2, 3), torch.randn(3), None), "weight must be 2-D"),
    ("weight 3-D", (torch.randn(2, 3), torch.randn(1, 4, 3), None), "weight must be 2-D"),
    ("x 0-D", (torch.tensor(1.0), torch.randn(4, 1), None), "x must have at least 1"),
    (
        "int x",
        (torch.ones(2, 3, dtype=torch.int64), torch.randn(4, 3), None),
        "x must be a floating",
    ),
    (
        "bool weight",
        (torch.randn(2, 3), torch.ones(4, 3, dtype=torch.bool), None),
        "weight must be a floating",
    ),
    (
        "int bias",
        (torch.randn(2, 3), torch.randn(4, 3), torch.ones(4, dtype=torch.int32)),
        "bias must be a floating",
    ),
]


@pytest.mark.parametrize("what,args,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(what, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastmlp.linear_relu(*args)
    with pytest.raises(RuntimeError, match=message):
        linear_relu(*args)


def test_bad_input_under_meta_tensors_raises_too():
    with pytest.raises(RuntimeError, match="in_features mismatch"):
        torch.ops.fastmlp.linear_relu(
            torch.empty(2, 5, device="meta"), torch.empty(4, 3, device="meta"), None
        )


@pytest.mark.cuda
def test_device_mismatch_raises_clear_error():
    with pytest.raises(RuntimeError, match="same device"):
        linear_relu(torch.randn(2, 3), torch.randn(4, 3, device="cuda"))


def test_device_mismatch_with_meta_raises_clear_error():
    with pytest.raises(RuntimeError, match="same device|device"):
        torch.ops.fastmlp.linear_relu(torch.randn(2, 3), torch.empty(4, 3, device="meta"), None)


def test_backward_op_rejects_bad_shapes():
    y = torch.rand(3, 4)
    with pytest.raises(RuntimeError, match="grad_y must have the shape"):
        torch.ops.fastmlp.linear_relu_backward(
            torch.rand(3, 5), y, None, None, [False, False, True]
        )
    with pytest.raises(RuntimeError, match="weight is required"):
        torch.ops.fastmlp.linear_relu_backward(
            torch.rand(3, 4), y, None, None, [True, False, False]
        )


def test_error_bound_of_the_test_kit_can_fail():
    """The kit's bound rejects a result far worse than PyTorch's (it is not vacuous)."""
    x, w, b, _ = layer_inputs(64, 32, 16, torch.float32)
    ref = linear_relu_ref(x.double(), w.double(), b.double())
    theirs = linear_relu_ref(x, w, b)
    assert_error_bounded("y", theirs, theirs, ref, precision="fp32")
    worse = theirs + 1e-3 * torch.randn_like(theirs)
    with pytest.raises(AssertionError, match="error .* vs PyTorch's"):
        assert_error_bounded("y", worse, theirs, ref, precision="fp32")

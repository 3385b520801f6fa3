"""fastmlp.apex.MLP, the drop-in for apex.mlp.MLP, tested the way apex tests its own
(NVIDIA/apex tests/L0/run_mlp/test_mlp.py, ported to the CPU, with CUDA twins): sizes, bias
on/off, activation none/relu/sigmoid after every layer, forward and backward equal to an
nn.Sequential reference whose weights are copied through ``mlp.weights`` / ``mlp.biases``,
input with and without requires_grad, no_grad forward; plus apex's attributes and init."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fastmlp.apex import MLP

MLP_SIZES = [480, 1024, 1024, 512, 256, 1]  # apex's
SMALL_SIZES = [13, 33, 7, 1]
BATCH = 129
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # apex's tests run with tf32_off
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _reference(mlp: MLP, sizes, bias: bool, activation: str, inplace: bool = False):
    """apex's own reference: nn.Linear layers (weights copied into mlp) and the activation
    after every one."""
    layers = []
    for i in range(mlp.num_layers):
        linear = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
        with torch.no_grad():
            mlp.weights[i].copy_(linear.weight)
            if bias:
                mlp.biases[i].copy_(linear.bias)
        layers.append(linear)
        if activation == "relu":
            layers.append(nn.ReLU(inplace=inplace))
        if activation == "sigmoid":
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def test_creation():
    mlp = MLP(MLP_SIZES)
    assert mlp.num_layers == 5 and mlp.mlp_sizes == MLP_SIZES and mlp.mlp_sizes is not MLP_SIZES
    assert mlp.bias == 1 and mlp.activation == 1
    assert [tuple(w.shape) for w in mlp.weights] == [
        (o, i) for i, o in zip(MLP_SIZES, MLP_SIZES[1:], strict=False)
    ]
    assert [tuple(b.shape) for b in mlp.biases] == [(o,) for o in MLP_SIZES[1:]]
    # apex's parameter names, so its checkpoints load.
    assert list(mlp.state_dict())[:4] == ["weight_0", "bias_0", "weight_1", "bias_1"]
    assert all(isinstance(p, nn.Parameter) for p in mlp.weights + mlp.biases)
    pairs = [p for pair in zip(mlp.weights, mlp.biases, strict=True) for p in pair]
    assert all(a is b for a, b in zip(mlp.parameters(), pairs, strict=True))
    assert MLP(MLP_SIZES, bias=False).biases == []
    assert "MLP sizes: [480, 1024" in repr(mlp)


@pytest.mark.parametrize("activation,code", [("none", 0), ("relu", 1), ("sigmoid", 2)])
def test_activation_codes_are_apexs(activation, code):
    assert MLP(SMALL_SIZES, activation=activation).activation == code


@pytest.mark.parametrize("activation", ["gelu", "tanh", "Relu", None])
def test_other_activations_raise_type_error_as_apex(activation):
    with pytest.raises(TypeError, match="activation must be 'none', 'relu' or 'sigmoid'"):
        MLP(SMALL_SIZES, activation=activation)


# Issue 29: these raised ZeroDivisionError, torch.empty's "takes 1 positional argument" or
# torch's negative-dimension error.
@pytest.mark.parametrize(
    ("sizes", "error", "message"),
    [
        ([5, 0, 3], ValueError, "mlp_sizes must list at least 2 positive layer widths, got 0 in"),
        ([5, -1], ValueError, "mlp_sizes must list at least 2 positive layer widths, got -1 in"),
        ([5], ValueError, "mlp_sizes must list at least 2 positive layer widths, got [5]"),
        ([5, 2.5], TypeError, "mlp_sizes must be integers, got 2.5 in [5, 2.5]"),
        ([5, True], TypeError, "mlp_sizes must be integers, got True in [5, True]"),
        ((5, "3"), TypeError, "mlp_sizes must be integers, got '3' in (5, '3')"),
        (5, TypeError, "mlp_sizes must be a sequence of integers, got 5"),
    ],
)
def test_bad_sizes_raise_one_clear_error(sizes, error, message):
    with pytest.raises(error) as info:
        MLP(sizes)
    assert str(info.value).startswith("fastmlp.apex.MLP: ") and message in str(info.value)


def test_sizes_as_apex_takes_them():
    numpy = pytest.importorskip("numpy")
    mlp = MLP((13, numpy.int64(7), 3))
    assert mlp.num_layers == 2 and [tuple(w.shape) for w in mlp.weights] == [(7, 13), (3, 7)]
    assert isinstance(mlp.mlp_sizes, tuple)  # kept as given, as apex does


def test_reset_parameters_is_apexs_normal_init():
    torch.manual_seed(0)
    mlp = MLP([300, 500, 200])
    for w in mlp.weights:
        std = math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
        assert abs(w.mean().item()) < 0.1 * std and abs(w.std().item() / std - 1) < 0.05
    for b in mlp.biases:
        assert abs(b.std().item() / math.sqrt(1.0 / b.shape[0]) - 1) < 0.2


@pytest.mark.parametrize("device", DEVICES)
def test_numeric(device):
    torch.manual_seed(1)
    mlp = MLP(MLP_SIZES).to(device)
    ref_mlp = _reference(mlp, MLP_SIZES, True, "relu").to(device)
    test_input = torch.empty(BATCH, MLP_SIZES[0], device=device).uniform_(-1.0, 1.0)
    test_input.requires_grad_()
    ref_input = test_input.clone().detach().requires_grad_()
    mlp_out = mlp(test_input)
    ref_out = ref_mlp(ref_input)
    torch.testing.assert_close(mlp_out, ref_out)
    mlp_out.mean().mul(10.0).backward()
    ref_out.mean().mul(10.0).backward()
    torch.testing.assert_close(test_input.grad, ref_input.grad)
    torch.testing.assert_close(mlp.biases[0].grad, ref_mlp[0].bias.grad)


CASES = list(itertools.product(("none", "relu", "sigmoid"), (True, False), (True, False)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "activation,bias,input_grad",
    CASES,
    ids=[f"{a}-{'bias' if b else 'nobias'}-{'xgrad' if g else 'noxgrad'}" for a, b, g in CASES],
)
def test_mlp(device, activation, bias, input_grad):
    torch.manual_seed(2)
    sizes = MLP_SIZES if device == "cuda" else SMALL_SIZES
    mlp = MLP(sizes, bias=bias, activation=activation).to(device)
    ref_mlp = _reference(mlp, sizes, bias, activation).to(device)
    test_input = torch.empty(BATCH, sizes[0], device=device).uniform_(-1.0, 1.0)
    test_input.requires_grad_(input_grad)
    ref_input = test_input.clone().detach().requires_grad_(input_grad)
    mlp_out = mlp(test_input)
    ref_out = ref_mlp(ref_input)
    torch.testing.assert_close(mlp_out, ref_out)
    mlp_out.mean().mul(10.0).backward()
    ref_out.mean().mul(10.0).backward()
    if input_grad:
        torch.testing.assert_close(test_input.grad, ref_input.grad)
    else:
        assert test_input.grad is None
    refs = [m for m in ref_mlp if isinstance(m, nn.Linear)]
    for i, lin in enumerate(refs):
        torch.testing.assert_close(mlp.weights[i].grad, lin.weight.grad)
        if bias:
            torch.testing.assert_close(mlp.biases[i].grad, lin.bias.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid"])
def test_autocast(device, activation):
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(3)
    mlp = MLP(SMALL_SIZES, activation=activation).to(device)
    ref_mlp = _reference(mlp, SMALL_SIZES, True, activation).to(device)
    x = torch.empty(BATCH, SMALL_SIZES[0], device=device).uniform_(-1.0, 1.0)
    with torch.autocast(device, dtype=dtype):
        mlp_out = mlp(x)
        ref_out = ref_mlp(x)
    assert mlp_out.dtype == ref_out.dtype == dtype
    torch.testing.assert_close(mlp_out, ref_out, atol=3e-2, rtol=3e-2)
    mlp_out.float().mean().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in mlp.weights)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device):
    torch.manual_seed(4)
    mlp = MLP(SMALL_SIZES).to(device)
    ref_mlp = _reference(mlp, SMALL_SIZES, True, "relu", inplace=True).to(device)
    test_input = torch.empty(BATCH, SMALL_SIZES[0], device=device).uniform_(-1.0, 1.0)
    with torch.no_grad():
        mlp_out = mlp(test_input)
        ref_out = ref_mlp(test_input.clone())
    assert not mlp_out.requires_grad
    torch.testing.assert_close(mlp_out, ref_out)
    # Without no_grad, the input needing no grad: the weights still get theirs.
    mlp(test_input).mean().mul(10.0).backward()
    ref_mlp(test_input.clone()).mean().mul(10.0).backward()
    torch.testing.assert_close(mlp.weights[0].grad, ref_mlp[0].weight.grad)


def test_weights_follow_the_module_through_to_and_load_state_dict():
    mlp = MLP(SMALL_SIZES).double()
    assert all(w.dtype == torch.float64 for w in mlp.weights)
    other = MLP(SMALL_SIZES).double()
    other.load_state_dict(mlp.state_dict())
    for a, b in zip(other.weights + other.biases, mlp.weights + mlp.biases, strict=True):
        assert torch.equal(a, b)
    x = torch.randn(3, SMALL_SIZES[0], dtype=torch.float64)
    torch.testing.assert_close(other(x), mlp(x))

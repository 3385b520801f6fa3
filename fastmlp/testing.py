"""The specification fastmlp's kernels are tested and benchmarked against, and the kit
the test and benchmark suites share (one import path for both): plain-PyTorch
references in float64, fresh random inputs, error bounds relative to PyTorch's own,
the TF32 switch and CUDA-graph capture.

Error bounds (DESIGN.md): errors are ``||result - float64 reference||`` relative to the
same products on absolute values (which bound dot-product rounding), and ours may be at
most twice plain PyTorch's in the same dtype plus a floor, so the tolerance follows the
hardware rather than a magic constant.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fastmlp import activations

__all__ = [
    "ERROR_FLOOR",
    "NeuralNetwork",
    "activation_ref",
    "allow_tf32",
    "assert_error_bounded",
    "assert_mlp_matches_torch",
    "capture_cuda_graph",
    "forward_backward",
    "layer_inputs",
    "linear_relu_ref",
    "magnitude_refs",
    "mlp_forward_backward",
    "mlp_layers",
    "mlp_ref",
    "rel_err",
    "scaled_err",
]

# The floor of the error bound per device and precision ("tf32": float32 with TF32
# matmuls): what rounding alone can add when PyTorch happens to be very accurate on one
# draw. GPU kernels accumulate in another order (tensor-core tiles, split-K), hence
# their looser floors.
ERROR_FLOOR = {
    "cpu": {"fp64": 1e-13, "fp32": 1e-6, "bf16": 1e-3, "fp16": 2e-4},
    "cuda": {"fp64": 1e-12, "fp32": 2e-6, "tf32": 2e-4, "bf16": 4e-3, "fp16": 1e-3},
}
#: A whole-MLP function as the checks call it: ``fn(x, weights, biases or None)``
#: (fastmlp.ops.mlp, :func:`mlp_ref`).
_MlpFn = Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None], torch.Tensor]
_T = TypeVar("_T")


class NeuralNetwork(nn.Module):
    """The model of the "Learn the Basics" tutorial (section 4), verbatim."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def linear_relu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """relu(x @ weight.T + bias): what fastmlp.linear_relu must compute."""
    return torch.relu(F.linear(x, weight, bias))


def mlp_layers(
    sizes: Sequence[int],
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Random weights and biases of an MLP with layer widths ``sizes``, at nn.Linear's
    init scale (pre-activations of both signs, about half the ReLUs active); biases None
    when not ``bias``. Drawn in float32 from ``generator``, then cast to ``dtype``."""
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
        scale = fan_in**-0.5
        weights.append((torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * scale)
        biases.append((torch.rand(fan_out, generator=generator) * 2 - 1) * scale)
    weights = [w.to(dtype) for w in weights]
    return weights, [b.to(dtype) for b in biases] if bias else None


def activation_ref(
    z: torch.Tensor, activation: str = "relu", negative_slope: float = 0.01
) -> torch.Tensor:
    """The activation named ``activation`` (a name of fastmlp.activations.NAMES) as
    torch.nn.functional computes it: what the fused ops must compute."""
    return activations.apply(z, activation, negative_slope)


def mlp_ref(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None = None,
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """What fastmlp.ops.mlp must compute: Linear layers, each but the last followed by
    ``activation`` (ReLU by default), the last by ``output_activation`` (none)."""
    h = x
    for i, w in enumerate(weights):
        h = F.linear(h, w, None if biases is None else biases[i])
        last = i + 1 == len(weights)
        h = activation_ref(h, output_activation if last else activation, negative_slope)
    return h


def mlp_forward_backward(
    fn: _MlpFn,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    grad_y: torch.Tensor | None = None,
    needs: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
    """``fn(x, weights, biases)`` (fastmlp.ops.mlp or :func:`mlp_ref`) forward and backward
    on fresh leaves; ``needs[i]`` says which of x, weights..., biases... require grad (all
    by default). Returns ``(y, grads in that order, grad_y)``."""
    inputs = [x, *weights, *(biases or [])]
    needs = [True] * len(inputs) if needs is None else needs
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
    n = len(weights)
    y = fn(leaves[0], leaves[1 : 1 + n], leaves[1 + n :] if biases is not None else None)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    if y.requires_grad:
        y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves], grad_y


def assert_mlp_matches_torch(
    fn: _MlpFn,
    ref_fn: _MlpFn,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    floor: float,
    needs: Sequence[bool] | None = None,
    what: str = "",
) -> None:
    """``fn`` (a whole-MLP op) forward and backward against ``ref_fn`` (its PyTorch
    reference) in float64: the output and every gradient asked for (``needs``, as in
    :func:`mlp_forward_backward`) may be off by at most twice what ``ref_fn`` in x's dtype
    is off, plus ``floor``; a gradient not asked for must stay None. ``what`` names the
    case in the failure message."""
    y, grads, gy = mlp_forward_backward(fn, x, weights, biases, needs=needs)
    y_t, grads_t, _ = mlp_forward_backward(ref_fn, x, weights, biases, gy, needs)
    as64 = [t.double() for t in weights], None if biases is None else [b.double() for b in biases]
    y_64, grads_64, _ = mlp_forward_backward(ref_fn, x.double(), *as64, gy.double(), needs)
    n = len(weights)
    names = ["y", "grad_x"] + [f"grad_w{i}" for i in range(n)] + [f"grad_b{i}" for i in range(n)]
    for name, ours, theirs, ref in zip(
        names, [y, *grads], [y_t, *grads_t], [y_64, *grads_64], strict=False
    ):
        if ref is None:
            assert ours is None, f"{name} was not asked for but computed"
            continue
        assert ours is not None, f"{name} missing"
        assert theirs is not None, f"{name} missing from {ref_fn} in {x.dtype}"
        assert ours.shape == ref.shape and ours.dtype == x.dtype, name
        err, err_torch = rel_err(ours, ref), rel_err(theirs, ref)
        assert err <= 2 * err_torch + floor, (
            f"{name}: error {err:.3g} vs PyTorch's {err_torch:.3g} ({what}{x.dtype}, "
            f"x {tuple(x.shape)}, widths {[tuple(w.shape) for w in weights]})"
        )


def layer_inputs(
    batch: int,
    fan_in: int,
    fan_out: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    bias: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fresh random ``(x, weight, bias, grad_y)`` for one layer, never zeros, drawn in
    float64 on the CPU from a seed mixed with the shape (the same call gives the same
    tensors on every device and dtype), scaled like nn.Linear's init so that about half
    the pre-activations are positive."""
    g = torch.Generator().manual_seed(seed * 7919 + batch * 31 + fan_in * 7 + fan_out)
    x = torch.randn(batch, fan_in, generator=g, dtype=torch.float64)
    w = torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / max(fan_in, 1) ** 0.5
    b = torch.randn(fan_out, generator=g, dtype=torch.float64) * 0.5
    gy = torch.randn(batch, fan_out, generator=g, dtype=torch.float64)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return cast(x), cast(w), cast(b) if bias else None, cast(gy)


def forward_backward(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
    """Runs fn forward and backward on fresh leaf copies; returns (y, grads, grad_y)."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    y = fn(*leaves)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    y.backward(grad_y)
    return y.detach(), [t.grad if t is not None else None for t in leaves], grad_y


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| computed in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def magnitude_refs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_y: torch.Tensor
) -> list[torch.Tensor | None]:
    """The same products on absolute values, in float64: the scale that bounds
    rounding error in a dot product. Errors are measured relative to these, so
    that a result that is small through cancellation does not look inexact.
    Returns those of (y, grad_x, grad_weight, grad_bias)."""
    x, w, gy = x.double().abs(), weight.double().abs(), grad_y.double().abs()
    b = None if bias is None else bias.double().abs()
    rows = math.prod(gy.shape[:-1])
    gy2 = gy.reshape(rows, gy.shape[-1])
    x2 = x.reshape(rows, x.shape[-1])
    grad_x = (gy2 @ w).reshape(*gy.shape[:-1], w.shape[1])
    return [
        F.linear(x, w, b),
        grad_x,
        gy2.t() @ x2,
        None if b is None else gy2.sum(0),
    ]


def scaled_err(a: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> float:
    """||a - ref|| / ||magnitude|| in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    diff = (a.double() - ref.double()).norm()
    return (diff / magnitude.double().norm().clamp_min(1e-300)).item()


def assert_error_bounded(
    name: str,
    ours: torch.Tensor,
    theirs: torch.Tensor,
    ref: torch.Tensor,
    magnitude: torch.Tensor | None = None,
    *,
    precision: str,
    factor: float = 2.0,
) -> None:
    """``ours`` is at most ``factor`` times as far from the float64 ``ref`` as plain
    PyTorch's ``theirs`` in the same precision, plus :data:`ERROR_FLOOR`, errors relative
    to ``magnitude`` (default: ``ref``). Also: same shape, finite where ``ref`` is."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    if ours.numel() == 0:
        return
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), (
        f"{name}: non-finite values where the reference is finite"
    )
    scale = ref if magnitude is None else magnitude
    err, err_torch = scaled_err(ours, ref, scale), scaled_err(theirs, ref, scale)
    floor = ERROR_FLOOR[ours.device.type][precision]
    assert err <= factor * err_torch + floor, (
        f"{name}: error {err:.3e} vs PyTorch's {err_torch:.3e} ({precision}, floor {floor:.0e}, "
        f"shape {tuple(ours.shape)})"
    )


@contextlib.contextmanager
def allow_tf32(on: bool) -> Iterator[None]:
    """Sets torch's CUDA TF32 matmul switch for the duration (fastmlp's ops read the same)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def capture_cuda_graph(step: Callable[[], _T], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, _T]:
    """Warms ``step`` up on a side stream (as torch.cuda.graphs requires), captures one
    call in a CUDA graph and returns ``(graph, outputs of the captured call)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs

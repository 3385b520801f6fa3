"""Typed Python wrappers over the ``torch.ops.fastmlp`` ops, with their fake
(meta) implementations.

The ops themselves are defined in C++ (csrc/schemas.cpp) and implemented
per backend (csrc/cpu, csrc/cuda). This module adds what PyTorch needs around
them: a ``register_fake`` for each op, so that ``torch.compile`` traces them
without graph breaks, and autocast handling. Autograd of the forward op is
registered in C++ (csrc/autograd.cpp); its backward is the
``linear_relu_backward`` op. The same holds for the whole-MLP op ``mlp`` and its
backward ``mlp_backward``. ``torch.func`` transforms, which cannot use that C++ autograd,
get the ops' kernels of :mod:`fastmlp.transforms`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NoReturn, SupportsIndex, overload

import torch

from fastmlp import (
    _C,  # noqa: F401  (loading the library registers the ops and autograd)
    activations,
)

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "check_activation",
    "linear_act",
    "linear_relu",
    "linear_relu_backward",
    "mlp",
    "mlp_backward",
    "saves_preactivation",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: The activations the ops take, by name (the table and its rules: fastmlp.activations).
ACTIVATIONS = activations.NAMES
check_activation = activations.check
apply_activation = activations.apply
saves_preactivation = activations.saves_preactivation


def _check_sizes(sizes: object, argument: str, op: str) -> tuple[int, ...]:
    """``sizes``, layer widths from input to output (``MLP(sizes)`` of fastmlp.nn and
    fastmlp.apex), as a tuple of ints, or one TypeError / ValueError that names ``op``,
    ``argument`` and the bad value."""
    try:
        items = list(sizes)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{op}: {argument} must be a sequence of integers, got {sizes!r}") from None

    def width(s: object) -> int:
        if isinstance(s, bool) or not isinstance(s, SupportsIndex):
            raise TypeError(f"{op}: {argument} must be integers, got {s!r} in {sizes!r}")
        try:
            return operator.index(s)  # ints and integer numpy scalars; 7.9 is refused
        except TypeError:
            raise TypeError(f"{op}: {argument} must be integers, got {s!r} in {sizes!r}") from None

    widths = tuple(map(width, items))
    bad = [s for s in widths if s <= 0]
    if len(widths) < 2 or bad:
        got = f"{bad[0]} in {sizes!r}" if bad else repr(sizes)
        raise ValueError(f"{op}: {argument} must list at least 2 positive layer widths, got {got}")
    return widths


def _check_negative_slope(negative_slope: object, op: str) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise ValueError(f"{op}: negative_slope must be a finite number, got {negative_slope!r}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"{op}: negative_slope must be a finite number, got {negative_slope!r}")
    return float(negative_slope)


def linear_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``relu(x @ weight.T + bias)`` in one fused op, differentiable.

    Args:
        x: input of shape ``(..., in_features)``, like ``torch.nn.functional.linear``.
        weight: ``(out_features, in_features)``.
        bias: optional ``(out_features,)``.

    Returns:
        Tensor of shape ``(..., out_features)``; equal to
        ``torch.relu(F.linear(x, weight, bias))`` up to floating-point rounding,
        NaN included.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as
    ``F.linear`` would be. Under ``torch.func`` transforms (grad, jacrev, jacfwd, vmap,
    ``vmap(grad(...))``) it computes as plain PyTorch does, see :mod:`fastmlp.transforms`.
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = _autocast(x, dtype), _autocast(weight, dtype), _autocast(bias, dtype)
    return torch.ops.fastmlp.linear_relu(x, weight, bias)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast asks for on x's device, or None when autocast is off there.
    Meta tensors (and other devices without autocast) have no autocast state to ask."""
    device_type = x.device.type
    # CPU and CUDA always have autocast state: skip the (slower) availability check.
    known = device_type in ("cpu", "cuda")
    if (known or torch.amp.is_autocast_available(device_type)) and torch.is_autocast_enabled(
        device_type
    ):
        return torch.get_autocast_dtype(device_type)
    return None


@overload
def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...
def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Like autocast's own cast for matmul-like ops: float64 is left alone.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def linear_relu_backward(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    output_mask: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`linear_relu`.

    ``y`` is the forward output (its sign is the ReLU mask); ``weight`` is needed
    only for ``grad_x`` and ``x`` only for ``grad_weight``. Gradients not asked for
    in ``output_mask`` are returned as ``None``.
    """
    grad_x, grad_weight, grad_bias = torch.ops.fastmlp.linear_relu_backward(
        grad_y, y, x, weight, list(output_mask)
    )
    want_x, want_weight, want_bias = output_mask
    return (
        grad_x if want_x else None,
        grad_weight if want_weight else None,
        grad_bias if want_bias else None,
    )


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` in one fused op, differentiable, for any of
    :data:`ACTIVATIONS` (``negative_slope`` is leaky_relu's).

    ReLU runs :func:`linear_relu`; the others the one-layer :func:`mlp` with
    ``output_activation=activation``. Semantics (NaN, inf, the gradient at 0) are those of
    the matching ``torch.nn.functional`` call in the input's dtype.
    """
    check_activation(activation, op="fastmlp.linear_act")
    negative_slope = _check_negative_slope(negative_slope, "fastmlp.linear_act")
    if activation == "relu":
        return linear_relu(x, weight, bias)
    return mlp(x, [weight], None if bias is None else [bias], "relu", activation, negative_slope)


def mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None = None,
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """A whole MLP in one op, differentiable as one autograd node.

    Computes ``h = act(F.linear(h, weights[l], biases[l]))`` for every layer but the
    last, and ``out_act(F.linear(...))`` for the last, from ``h = x``.

    Args:
        x: input of shape ``(..., in_features)``.
        weights: one ``(out_l, in_l)`` tensor per layer, ``in_0 = in_features`` and
            ``in_l = out_{l-1}``.
        biases: ``None`` (no biases) or one ``(out_l,)`` tensor per layer.
        activation: after every layer but the last, one of :data:`ACTIVATIONS`
            (default ``"relu"``).
        output_activation: after the last layer (default ``"none"``: the logits).
        negative_slope: leaky_relu's slope (finite), for either activation.

    Returns:
        Tensor of shape ``(..., out_features of the last layer)``, equal to the layer by
        layer PyTorch computation up to floating-point rounding, NaN included.

    Each activation is that of the matching ``torch.nn.functional`` call in the input's
    dtype (NaN and inf propagation, the gradient at 0). Backward (the ``mlp_backward`` op)
    computes, in one call, only the gradients asked for, from what forward saved: each
    hidden layer's output, or its pre-activation for gelu, gelu_tanh, silu (and leaky_relu
    with a negative slope). Under ``torch.autocast`` the inputs are cast to the autocast
    dtype, as ``F.linear`` would be. Under ``torch.func`` transforms (grad, jacrev, jacfwd,
    vmap, ``vmap(grad(...))``) it computes as plain PyTorch does, see
    :mod:`fastmlp.transforms`.

    With gradients off (``torch.no_grad()``, ``torch.inference_mode()``) it runs the op
    ``mlp_inference``, which saves nothing. On CPU either op runs on the path that
    :func:`fastmlp.engines.cpu_path` names for the shape and dtype (row-blocked or
    layer by layer; docs/cpu.md).
    """
    if activation != "relu":
        check_activation(activation)
    if output_activation != "none":
        check_activation(output_activation, "output_activation")
    if negative_slope != 0.01:
        negative_slope = _check_negative_slope(negative_slope, "fastmlp.mlp")
    biases = [] if biases is None else list(biases)
    weights = list(weights)
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x = _autocast(x, dtype)
        weights = [_autocast(w, dtype) for w in weights]
        biases = [_autocast(b, dtype) for b in biases]
    if not torch.is_grad_enabled() and not torch.jit.is_tracing():
        # Nothing will be differentiated: the op that saves nothing for backward.
        # (Not while torch.jit.trace records: its check reruns the model with grad on,
        # and the two graphs must hold the same op.)
        return torch.ops.fastmlp.mlp_inference(
            x, weights, biases, activation, output_activation, negative_slope
        )
    return torch.ops.fastmlp.mlp(x, weights, biases, activation, output_activation, negative_slope)[
        0
    ]


def mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    hidden: Sequence[torch.Tensor],
    output_mask: Sequence[bool],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Gradients ``(grad_x, grad_weights, grad_biases)`` of :func:`mlp` in one call.

    ``hidden`` is what ``torch.ops.fastmlp.mlp`` returned beside its output (called with
    the same activations); ``output_mask`` lists grad_x, then each weight, then each bias
    (when the MLP has biases). Gradients not asked for are ``None``.
    """
    check_activation(activation, op="fastmlp.mlp_backward")
    check_activation(output_activation, "output_activation", "fastmlp.mlp_backward")
    negative_slope = _check_negative_slope(negative_slope, "fastmlp.mlp_backward")
    mask = list(output_mask)
    n = len(weights)
    gx, gws, gbs = torch.ops.fastmlp.mlp_backward(
        grad_y,
        x,
        list(weights),
        list(hidden),
        mask,
        activation,
        output_activation,
        negative_slope,
    )
    return (
        gx if mask[0] else None,
        [g if m else None for g, m in zip(gws, mask[1 : 1 + n], strict=True)],
        [g if m else None for g, m in zip(gbs, mask[1 + n :], strict=True)],
    )


# --- fake implementations: shapes, dtypes and the argument checks -------------


def _check_dtype(t: torch.Tensor, name: str) -> None:
    torch._check(
        t.dtype in _SUPPORTED_DTYPES,
        lambda: (
            f"fastmlp.linear_relu: {name} must be a floating-point tensor "
            f"(float32, bfloat16, float16 or float64), got {t.dtype}"
        ),
    )


def _check_matches(t: torch.Tensor, t_name: str, other: torch.Tensor, other_name: str) -> None:
    pair = f"{t_name} and {other_name}"
    torch._check(
        t.dtype == other.dtype,
        lambda: (
            f"fastmlp.linear_relu: {pair} must have the same dtype, "
            f"got {t_name} {t.dtype} and {other_name} {other.dtype}"
        ),
    )
    torch._check(
        t.device == other.device,
        lambda: (
            f"fastmlp.linear_relu: {pair} must be on the same device, "
            f"got {t_name} on {t.device} and {other_name} on {other.device}"
        ),
    )


@torch.library.register_fake("fastmlp::linear_relu")
def _linear_relu_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_dtype(x, "x")
    _check_dtype(weight, "weight")
    torch._check(weight.dim() == 2, lambda: "fastmlp.linear_relu: weight must be 2-D")
    torch._check(x.dim() >= 1, lambda: "fastmlp.linear_relu: x must have at least 1 dimension")
    _check_matches(x, "x", weight, "weight")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: (
            f"fastmlp.linear_relu: in_features mismatch: x has {x.shape[-1]} "
            f"features but weight expects {weight.shape[1]}"
        ),
    )
    if bias is not None:
        _check_dtype(bias, "bias")
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: (
                f"fastmlp.linear_relu: bias must be 1-D with out_features = "
                f"{weight.shape[0]} elements"
            ),
        )
        _check_matches(bias, "bias", weight, "weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastmlp::linear_relu_backward")
def _linear_relu_backward_fake(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(
        grad_y.shape == y.shape,
        lambda: "fastmlp.linear_relu_backward: grad_y must have y's shape",
    )
    # Outputs not asked for are empty (0,) tensors, as in the C++ kernels.
    grad_x, grad_w, grad_b = (y.new_empty((0,)) for _ in range(3))
    if output_mask[0]:
        if weight is None:  # what torch._check(weight is not None, ...) raises
            raise RuntimeError("weight is required for grad_x")
        grad_x = y.new_empty((*y.shape[:-1], weight.shape[1]))
    if output_mask[1]:
        if x is None:
            raise RuntimeError("x is required for grad_weight")
        grad_w = y.new_empty((y.shape[-1], x.shape[-1]))
    if output_mask[2]:
        grad_b = y.new_empty((y.shape[-1],))
    return grad_x, grad_w, grad_b


def _check_mlp_layer(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    torch._check(
        t.dtype in _SUPPORTED_DTYPES,
        lambda: f"fastmlp.mlp: {name} must be a floating-point tensor, got {t.dtype}",
    )
    torch._check(t.dtype == x.dtype, lambda: f"fastmlp.mlp: {name} must have x's dtype {x.dtype}")
    torch._check(
        t.device == x.device, lambda: f"fastmlp.mlp: {name} must be on x's device {x.device}"
    )


def _check_activation_args(
    op: str, activation: str, output_activation: str, negative_slope: float
) -> None:
    # The fake's copy of the C++ checks (the wrappers raise ValueError before this).
    _check_activation_arg(op, "activation", activation)
    _check_activation_arg(op, "output_activation", output_activation)
    torch._check(
        math.isfinite(negative_slope),
        lambda: f"{op}: negative_slope must be finite, got {negative_slope}",
    )


def _check_activation_arg(op: str, argument: str, name: str) -> None:
    torch._check(
        name in ACTIVATIONS,
        lambda: f"{op}: {argument} must be one of {', '.join(ACTIVATIONS)}; got {name!r}",
    )


def _check_mlp_weights(
    i: int, w: torch.Tensor, bias: torch.Tensor | None, features: int, x: torch.Tensor
) -> None:
    """The fake's checks of layer ``i``: its weight ``w`` and ``bias`` (None without
    biases) for an input of ``features`` features."""
    _check_mlp_layer(w, f"weights[{i}]", x)
    torch._check(w.dim() == 2, lambda: f"fastmlp.mlp: weights[{i}] must be 2-D")
    torch._check(
        w.shape[1] == features,
        lambda: (
            f"fastmlp.mlp: in_features mismatch: weights[{i}] "
            f"has shape {tuple(w.shape)} but its input has {features} features"
        ),
    )
    if bias is not None:
        _check_mlp_layer(bias, f"biases[{i}]", x)
        torch._check(
            bias.shape == (w.shape[0],),
            lambda: f"fastmlp.mlp: biases[{i}] must have shape ({w.shape[0]},)",
        )


@torch.library.register_fake("fastmlp::mlp")
def _mlp_fake(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    _check_activation_args("fastmlp.mlp", activation, output_activation, negative_slope)
    torch._check(
        x.dtype in _SUPPORTED_DTYPES,
        lambda: f"fastmlp.mlp: x must be a floating-point tensor, got {x.dtype}",
    )
    torch._check(x.dim() >= 1, lambda: "fastmlp.mlp: x must have at least 1 dimension")
    torch._check(len(weights) > 0, lambda: "fastmlp.mlp: weights must list at least one layer")
    torch._check(
        len(biases) in (0, len(weights)),
        lambda: "fastmlp.mlp: biases must be empty (no biases) or hold one tensor per layer",
    )
    rows = math.prod(x.shape[:-1])
    features = x.shape[-1]
    hidden = []
    for i, w in enumerate(weights):
        _check_mlp_weights(i, w, biases[i] if biases else None, features, x)
        features = w.shape[0]
        # Hidden layers save (rows, out_l); with an output activation the last layer
        # saves its pre-activation too.
        if i + 1 < len(weights) or output_activation != "none":
            hidden.append(x.new_empty((rows, features)))
    return x.new_empty((*x.shape[:-1], features)), hidden


@torch.library.register_fake("fastmlp::mlp_inference")
def _mlp_inference_fake(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    return _mlp_fake(x, weights, biases, activation, output_activation, negative_slope)[0]


@torch.library.register_fake("fastmlp::mlp_backward")
def _mlp_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    hidden: Sequence[torch.Tensor],
    output_mask: Sequence[bool],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    _check_activation_args("fastmlp.mlp_backward", activation, output_activation, negative_slope)
    n = len(weights)
    torch._check(
        len(hidden) == n - 1 + (output_activation != "none"),
        lambda: (
            f"fastmlp.mlp_backward: hidden must hold {n - 1 + (output_activation != 'none')} "
            f"tensors, got {len(hidden)}"
        ),
    )
    torch._check(
        len(output_mask) in (1 + n, 1 + 2 * n),
        lambda: "fastmlp.mlp_backward: output_mask must have 1 + L or 1 + 2L entries",
    )
    grad_x = grad_y.new_empty((0,))
    if output_mask[0]:
        grad_x = grad_y.new_empty((*grad_y.shape[:-1], weights[0].shape[1]))
    # One tensor per output, also for those not asked for: outputs must not alias.
    grad_w = [
        grad_y.new_empty(w.shape) if m else grad_y.new_empty((0,))
        for w, m in zip(weights, output_mask[1 : 1 + n], strict=True)
    ]
    grad_b = [
        grad_y.new_empty((w.shape[0],)) if m else grad_y.new_empty((0,))
        for w, m in zip(weights, output_mask[1 + n :], strict=False)
    ]
    return grad_x, grad_w, grad_b


@torch.library.register_fake("fastmlp::mlp_sgd_step")
def _mlp_sgd_step_fake(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *options: object,
) -> torch.Tensor:
    # The parameters and buffers are updated in place; the output is the loss.
    torch._check(
        x.dim() == 2 and target.shape == (x.shape[0],),
        lambda: "fastmlp.mlp_sgd_step: x must be (batch, in_features), target (batch,)",
    )
    return x.new_empty(())


@torch.library.register_fake("fastmlp::mlp_adamw_step")
def _mlp_adamw_step_fake(
    x: torch.Tensor, target: torch.Tensor, *lists_and_options: object
) -> torch.Tensor:
    # The parameters, states and step counts are updated in place; the output is the loss.
    torch._check(
        x.dim() == 2 and target.shape == (x.shape[0],),
        lambda: "fastmlp.mlp_adamw_step: x must be (batch, in_features), target (batch,)",
    )
    return x.new_empty(())


# --- autograd ------------------------------------------------------------------
# linear_relu's autograd is registered in C++ (csrc/autograd.cpp) for speed; its
# backward calls the linear_relu_backward op. That op itself is not
# differentiable: asking for it (double backward) raises a clear error.


def _double_backward_unsupported(ctx: object, *grads: object) -> NoReturn:
    raise RuntimeError(
        "fastmlp's fused ops (linear_relu, mlp) do not support double backward "
        "(gradients of gradients); use the plain PyTorch layers (fastmlp.unfuse) for that"
    )


def _backward_setup_context(ctx: object, inputs: tuple[object, ...], output: object) -> None:
    pass


torch.library.register_autograd(
    "fastmlp::linear_relu_backward",
    _double_backward_unsupported,
    setup_context=_backward_setup_context,
)
torch.library.register_autograd(
    "fastmlp::mlp_backward",
    _double_backward_unsupported,
    setup_context=_backward_setup_context,
)

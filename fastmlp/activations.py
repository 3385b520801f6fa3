"""The activations the ops take, declared once: one :class:`ActivationKind` per name.

Everything Python knows about an activation is in its row of :data:`TABLE`, and every
module reads it from there: :mod:`fastmlp.ops` checks names and applies them,
:mod:`fastmlp.fusion` recognises and builds their ``torch.nn`` modules,
:mod:`fastmlp.export` lowers the forward and backward to ATen, and :mod:`fastmlp.testing`
takes its references from here. The C++ side has one list too (the X-macro in
``csrc/activation_kinds.h``); ``tests/test_activations.py`` fails when the two lists differ.
Adding an activation: docs/development.md, "Adding an activation".

Each activation is exactly the ``torch``/``torch.nn.functional`` call it names, NaN, inf and
the gradient at 0 included. Needs only torch (no compiled extension).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_NEGATIVE_SLOPE",
    "NAMES",
    "TABLE",
    "ActivationKind",
    "apply",
    "backward",
    "check",
    "from_module",
    "module_for",
    "saves_preactivation",
]

#: leaky_relu's slope where none is given (torch.nn.LeakyReLU's default).
DEFAULT_NEGATIVE_SLOPE = 0.01

aten = torch.ops.aten


@dataclass(frozen=True)
class ActivationKind:
    """One activation: its name, how PyTorch computes it, what its backward needs."""

    name: str
    #: ``forward(z, negative_slope)``: the torch call the fused ops must match.
    forward: Callable[[torch.Tensor, float], torch.Tensor]
    #: ``backward(grad, saved, negative_slope, saved_is_output)``: grad through the
    #: activation by PyTorch's own backward op; ``saved`` is the output or the
    #: pre-activation, as :attr:`saves_preactivation` says.
    backward: Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
    #: Whether a hidden layer saves its pre-activation for backward (else its output).
    #: leaky_relu: only when its slope is negative (then the output loses the sign).
    saves_preactivation: Callable[[float], bool]
    #: The ``torch.nn`` module that computes it, given the slope (None for "none").
    module: Callable[[float], nn.Module | None]


def _through_output(
    backward_op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]:
    """The backward of tanh or sigmoid: PyTorch's op takes the output."""

    def run(g: torch.Tensor, saved: torch.Tensor, slope: float, is_output: bool) -> torch.Tensor:
        return backward_op(g, saved if is_output else forward(saved))

    return run


def _relu_backward(
    g: torch.Tensor, saved: torch.Tensor, slope: float, is_output: bool
) -> torch.Tensor:
    # As threshold_backward: blocked where saved <= 0 (z or relu(z) alike), NaN passes.
    return torch.where(saved <= 0, torch.zeros_like(g), g)


def _gelu_backward(approximate: str) -> Callable[..., torch.Tensor]:
    def run(g: torch.Tensor, saved: torch.Tensor, slope: float, is_output: bool) -> torch.Tensor:
        return aten.gelu_backward(g, saved, approximate=approximate)

    return run


# The order is the C++ enum's (csrc/activation_kinds.h): the test compares them.
TABLE: dict[str, ActivationKind] = {
    a.name: a
    for a in (
        ActivationKind(
            "relu",
            lambda z, s: torch.relu(z),
            _relu_backward,
            lambda s: False,
            lambda s: nn.ReLU(),
        ),
        ActivationKind(
            "leaky_relu",
            lambda z, s: F.leaky_relu(z, s),
            lambda g, saved, s, is_output: aten.leaky_relu_backward(g, saved, s, is_output),
            lambda s: s < 0,
            lambda s: nn.LeakyReLU(s),
        ),
        ActivationKind(
            "tanh",
            lambda z, s: torch.tanh(z),
            _through_output(aten.tanh_backward, torch.tanh),
            lambda s: False,
            lambda s: nn.Tanh(),
        ),
        ActivationKind(
            "sigmoid",
            lambda z, s: torch.sigmoid(z),
            _through_output(aten.sigmoid_backward, torch.sigmoid),
            lambda s: False,
            lambda s: nn.Sigmoid(),
        ),
        ActivationKind(
            "none",
            lambda z, s: z,
            lambda g, saved, s, is_output: g,
            lambda s: False,
            lambda s: None,
        ),
        ActivationKind(
            "gelu",
            lambda z, s: F.gelu(z),
            _gelu_backward("none"),
            lambda s: True,
            lambda s: nn.GELU(),
        ),
        ActivationKind(
            "gelu_tanh",
            lambda z, s: F.gelu(z, approximate="tanh"),
            _gelu_backward("tanh"),
            lambda s: True,
            lambda s: nn.GELU(approximate="tanh"),
        ),
        ActivationKind(
            "silu",
            lambda z, s: F.silu(z),
            lambda g, saved, s, is_output: aten.silu_backward(g, saved),
            lambda s: True,
            lambda s: nn.SiLU(),
        ),
    )
}

#: The names, in the C++ enum's order: relu, leaky_relu, tanh, sigmoid, none (identity),
#: gelu (the erf form), gelu_tanh (``F.gelu(z, approximate="tanh")``), silu.
NAMES: tuple[str, ...] = tuple(TABLE)


def check(name: object, argument: str = "activation", op: str = "fastmlp.mlp") -> str:
    """``name`` if it is one of :data:`NAMES`, else a ValueError naming the argument and
    listing the valid names."""
    if not isinstance(name, str) or name not in TABLE:
        raise ValueError(
            f"{op}: {argument} must be one of {', '.join(map(repr, NAMES))}; got {name!r}"
        )
    return name


def apply(
    z: torch.Tensor, name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE
) -> torch.Tensor:
    """Activation ``name`` of ``z`` as PyTorch computes it (what the fused ops compute)."""
    return TABLE[check(name)].forward(z, negative_slope)


def backward(
    grad: torch.Tensor,
    saved: torch.Tensor,
    name: str,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    saved_is_output: bool = True,
) -> torch.Tensor:
    """``grad`` through activation ``name`` by PyTorch's own backward ops; ``saved`` is the
    activation's output when ``saved_is_output``, else its pre-activation."""
    return TABLE[check(name)].backward(grad, saved, negative_slope, saved_is_output)


def saves_preactivation(name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> bool:
    """Whether a hidden layer with activation ``name`` saves its pre-activation for the
    backward (else its output); the ops' saved hidden tensors follow this rule."""
    return TABLE[check(name)].saves_preactivation(negative_slope)


def module_for(name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> nn.Module | None:
    """The ``torch.nn`` module computing activation ``name`` (None for "none")."""
    return TABLE[check(name)].module(negative_slope)


# The modules with no argument, by exact class (GELU and LeakyReLU have arguments).
_BY_CLASS = {
    type(m): a.name
    for a in TABLE.values()
    if (m := a.module(DEFAULT_NEGATIVE_SLOPE)) is not None
    and type(m) not in (nn.GELU, nn.LeakyReLU)
}


def from_module(module: nn.Module) -> tuple[str, float | None] | None:
    """``(name, negative_slope)`` when ``module`` is exactly one of the table's modules (the
    slope only for LeakyReLU, and only a finite one), else None. Exact classes only: a
    subclass may have a forward of its own."""
    kind = type(module)
    if kind is nn.GELU and isinstance(module, nn.GELU):
        approximate = {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
        return None if approximate is None else (approximate, None)
    if kind is nn.LeakyReLU and isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        return ("leaky_relu", slope) if math.isfinite(slope) else None
    name = _BY_CLASS.get(kind)
    return None if name is None else (name, None)

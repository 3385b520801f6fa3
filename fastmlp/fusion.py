"""Which children of an ``nn.Sequential`` :func:`fastmlp.fuse` computes as one op: the
activation modules it recognises, a run (:class:`_FusableRun`: Linear layers with one activation
between them and optionally one after the last) and the plan of a Sequential (its
children with each run in place of the children it covers). Used by
:class:`fastmlp.nn.FusedSequential`, :func:`fastmlp.nn.fuse` and :class:`fastmlp.nn.MLP`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod

from fastmlp import activations
from fastmlp.ops import apply_activation, linear_act, linear_relu, mlp

__all__ = ["activation_module"]

_DEFAULT_SLOPE = activations.DEFAULT_NEGATIVE_SLOPE


def why_not_plain(module: nn.Module) -> str | None:
    """Why computing ``module`` inside a fused op would skip something it does when called
    (None when nothing would be skipped): a forward replaced on the instance (adapters,
    LoRA-style patches) or hooks of its own (``torch.nn.utils.prune``, the old
    ``weight_norm`` and ``spectral_norm`` recompute the weight in a forward pre-hook)."""
    d = module.__dict__
    if "forward" in d:
        return "its forward is replaced on the instance"
    if d["_forward_pre_hooks"] or d["_forward_hooks"]:
        return "it has forward hooks (prune, weight_norm, spectral_norm use them)"
    if d["_backward_hooks"] or d["_backward_pre_hooks"]:
        return "it has backward hooks"
    return None


def global_hooks() -> bool:
    """Whether module hooks are registered for every module
    (``torch.nn.modules.module.register_module_forward_hook`` and its kin): a fused run
    would skip them for its children, so nothing is fused while there are any."""
    return bool(
        _module_mod._global_forward_pre_hooks
        or _module_mod._global_forward_hooks
        or _module_mod._global_backward_pre_hooks
        or _module_mod._global_backward_hooks
    )


def _activation_of(module: nn.Module) -> tuple[str, float | None] | None:
    """``(name, negative_slope)`` of an activation module fuse() fuses (the slope only for
    LeakyReLU): exactly a class of the activations' table, with nothing to skip."""
    return None if why_not_plain(module) is not None else activations.from_module(module)


def activation_module(name: str, negative_slope: float = _DEFAULT_SLOPE) -> nn.Module | None:
    """The torch.nn module computing activation ``name`` (None for "none")."""
    return activations.module_for(name, negative_slope)


def _describe_activation(name: str, negative_slope: float) -> str:
    return repr(activation_module(name, negative_slope)) if name != "none" else "no activation"


@overload
def _param(linear: nn.Module, name: Literal["weight"]) -> torch.Tensor: ...
@overload
def _param(linear: nn.Module, name: Literal["bias"]) -> torch.Tensor | None: ...
def _param(linear: nn.Module, name: str) -> torch.Tensor | None:
    # linear.weight, read from _parameters when it is there (Module.__getattr__ costs
    # 0.7 us per read, a batch-1 forward's overhead); a parametrized or re-assigned
    # attribute falls back to the attribute itself.
    p = linear._parameters.get(name)
    return p if p is not None else getattr(linear, name)


@dataclass(frozen=True)
class _FusableRun:
    """Consecutive children of a Sequential computed as one whole-MLP op: Linear layers
    with the same activation between each pair, and optionally one after the last."""

    names: tuple[str, ...]  # every child the run covers, activations and no-ops included
    linears: tuple[nn.Linear, ...]
    activation: str = "relu"  # between the Linear layers
    output_activation: str = "none"  # after the last one
    negative_slope: float = _DEFAULT_SLOPE  # LeakyReLU's, for either

    @property
    def relu_last(self) -> bool:
        return self.output_activation == "relu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linears = self.linears
        # (The TorchScript exporter traces: is_tracing first, a tenth of the cost.)
        if (
            torch.jit.is_tracing()
            and torch.onnx.is_in_onnx_export()
            and (len(linears) > 1 or not self.relu_last)
        ):
            # The TorchScript ONNX exporter cannot express the whole-MLP op's list
            # arguments: export the same layers one by one, each activation as the
            # standard ONNX op (fastmlp.export).
            for i, lin in enumerate(linears):
                kind = self.activation if i + 1 < len(linears) else self.output_activation
                if kind == "relu":
                    x = linear_relu(x, lin.weight, lin.bias)
                else:
                    x = apply_activation(
                        F.linear(x, lin.weight, lin.bias), kind, self.negative_slope
                    )
            return x
        if len(linears) == 1:  # Linear + activation: the per-layer op
            lin = linears[0]
            return linear_act(x, lin.weight, lin.bias, self.output_activation, self.negative_slope)
        weights = [_param(lin, "weight") for lin in linears]
        biases = [_param(lin, "bias") for lin in linears]
        # Fusion plans only runs whose Linears all or none have a bias: all tensors or None.
        # (Not filtered with a walrus: torch.compile cannot trace one in a comprehension.)
        all_biases = None if biases[0] is None else cast(list[torch.Tensor], biases)
        return mlp(
            x, weights, all_biases, self.activation, self.output_activation, self.negative_slope
        )

    def describe(self) -> str:
        """What the run computes, for describe_fusion."""
        n, slope = len(self.linears), self.negative_slope
        text = f"{n} Linear layers"
        if n > 1 and self.activation != "relu":
            text += f", {_describe_activation(self.activation, slope)} between"
        if self.output_activation != "none" and (n > 1 or not self.relu_last):
            text += f", {_describe_activation(self.output_activation, slope)} after the last"
        return text


def _is_no_op(module: nn.Module) -> bool:
    # What may sit inside a run without changing it: torchvision.ops.MLP puts a
    # Dropout(p=0.0) after every layer.
    no_op = type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0)
    return no_op and why_not_plain(module) is None


def _plan(seq: nn.Sequential) -> list[nn.Module | _FusableRun]:
    """The Sequential's children, with each fusable run replaced by a _FusableRun.

    Only the exact classes of ``nn.Linear`` and of the activations fuse() knows are fused
    (a subclass may have its own forward), and only children without hooks or a forward
    replaced on the instance (:func:`why_not_plain`); nothing while global module hooks
    are registered. A run needs at least two Linears, or one
    followed by an activation, and the same bias presence throughout (the op takes biases
    for all layers or none).
    """
    items = list(seq._modules.items())
    if global_hooks():
        return [m for _, m in items]
    plan: list[nn.Module | _FusableRun] = []
    i = 0
    while i < len(items):
        run = _run_at(items, i)
        if run is None:
            plan.append(items[i][1])
            i += 1
        else:
            plan.append(run)
            i += len(run.names)
    return plan


def _skip_no_ops(items: list[tuple[str, nn.Module]], i: int) -> int:
    while i < len(items) and _is_no_op(items[i][1]):
        i += 1
    return i


def _gap(items: list[tuple[str, nn.Module]], i: int) -> tuple[str, float | None, int]:
    """What follows a Linear that ends at ``i``: the activation's name ("none" when there
    is none, only no-ops), LeakyReLU's slope, and where the gap ends."""
    i = _skip_no_ops(items, i)
    act = _activation_of(items[i][1]) if i < len(items) else None
    if act is None:
        return "none", None, i
    return act[0], act[1], _skip_no_ops(items, i + 1)


def fusable_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear fuse() may compute inside a run: the exact class (a
    subclass may have its own forward), nothing that the op would skip (why_not_plain)."""
    return type(module) is nn.Linear and why_not_plain(module) is None


def _run_at(items: list[tuple[str, nn.Module]], start: int) -> _FusableRun | None:
    if not fusable_linear(items[start][1]):
        return None
    has_bias = items[start][1].bias is not None

    def is_linear(j: int) -> bool:
        return (
            j < len(items)
            and fusable_linear(items[j][1])
            and (items[j][1].bias is not None) == has_bias
        )

    linears: list[nn.Linear] = []
    kind: str | None = None  # the activation between the Linears, once there are two
    slope: float | None = None
    out, out_slope = "none", None
    i = start
    while True:
        linear = items[i][1]
        assert isinstance(linear, nn.Linear)  # fusable_linear (start) or is_linear (later i)
        linears.append(linear)
        gap_kind, gap_slope, j = _gap(items, i + 1)
        if is_linear(j) and (kind is None or (gap_kind, gap_slope) == (kind, slope)):
            kind, slope, i = gap_kind, gap_slope, j
            continue
        # The run ends with this Linear; an activation right after it is the run's output
        # activation (one negative_slope serves both: LeakyReLUs must agree on it).
        if gap_kind != "none" and not (kind == gap_kind == "leaky_relu" and slope != gap_slope):
            out, out_slope, end = gap_kind, gap_slope, j
        else:
            end = _skip_no_ops(items, i + 1)
        break
    if len(linears) < 2 and out == "none":
        return None
    names = tuple(name for name, _ in items[start:end])
    negative_slope = next((s for s in (slope, out_slope) if s is not None), _DEFAULT_SLOPE)
    return _FusableRun(names, tuple(linears), kind or "relu", out, negative_slope)

"""Export of models that use fastmlp's ops: ONNX (both exporters) and portable ``.pt2``.

fastmlp's ops (``torch.ops.fastmlp.*``) exist only where the compiled extension is loaded.
An exported model that still names them cannot run where fastmlp is absent, and no ONNX
runtime knows them. This module gives every op two things, registered when ``fastmlp`` is
imported, so export works with the ordinary PyTorch calls:

* a pure-ATen **decomposition** (the op in terms of ``F.linear`` and, for each activation,
  its ``torch``/``F`` function: ``torch.relu``, ``F.gelu``, ``F.silu``, ...; the backward
  ops in terms of PyTorch's own activation backward ops). It goes into PyTorch's global
  decomposition table, which ``torch.onnx.export(..., dynamo=True)`` (the default
  exporter) consults for ops it has no ONNX function for: the fused layer comes out as
  ``Gemm``/``MatMul`` + the activation's standard op (``Relu``, ``LeakyRelu``, ``Tanh``,
  ``Sigmoid``, ``Gelu`` or its decomposition, SiLU as ``x * Sigmoid(x)``). The same table turns a
  ``torch.export`` program into a portable one: :func:`portable` (or
  ``ep.run_decompositions(fastmlp.export.decompositions())``) replaces every fastmlp op by
  ATen ops, so the saved ``.pt2`` loads with ``torch.export.load`` where fastmlp is not
  installed. (A bare ``ep.run_decompositions()`` decomposes only ops whose kernel is
  ``CompositeImplicitAutograd``; fastmlp's ops have real CPU/CUDA kernels, hence the table.)
* an ONNX **symbolic** for the TorchScript exporter (``torch.onnx.export(...,
  dynamo=False)``), built from standard ONNX ops (``Gemm`` for 2-D inputs, else ``MatMul``
  + ``Add``, then ``Relu``). Under that exporter fastmlp.nn computes a fused run of other
  activations layer by layer with ``F.linear`` and the activation's ``torch``/``F``
  function, which it exports to the same standard ops.

The exported graph computes what the fused kernels compute up to float rounding (the
kernels and the GEMM of an ONNX runtime sum in different orders).

Adding an op: write its decomposition as a
function of the op's arguments that calls only ATen ops (``torch.*``, ``F.*``), optionally
an ONNX symbolic for the TorchScript exporter, and add one :class:`OpExport` line to
:data:`OPS`. The tests in ``tests/test_export.py`` run every entry of :data:`OPS` against
the op itself. ``fastmlp::mlp_sgd_step`` and ``fastmlp::mlp_adamw_step`` (whole training
steps that update their arguments in place) are deliberately absent: they never appear in
an inference graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fastmlp import (
    _C,  # noqa: F401  (the ops must exist before they can be registered)
    activations,
)
from fastmlp.activations import apply as apply_activation
from fastmlp.activations import saves_preactivation

__all__ = ["OPS", "OpExport", "decompositions", "portable", "register"]

# The oldest opset our symbolics use: Gemm, MatMul, Add, Relu, Transpose are all in opset 9,
# and the TorchScript exporter uses a symbolic registered for opset 9 for any newer opset.
_SYMBOLIC_OPSET = 9


@dataclass(frozen=True)
class OpExport:
    """How one fastmlp op leaves PyTorch: its ATen decomposition and, optionally, an ONNX
    symbolic for the TorchScript exporter (``None``: only the dynamo exporter handles it)."""

    name: str  # "fastmlp::op_name"; the overload exported is ``.default``
    decomposition: Callable[..., Any]
    onnx_symbolic: Callable[..., Any] | None = None

    @property
    def overload(self) -> torch._ops.OpOverload:
        namespace, op = self.name.split("::")
        return getattr(getattr(torch.ops, namespace), op).default


# --- fastmlp::linear_relu -------------------------------------------------------------


def _linear_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.relu(F.linear(x, weight, bias))


def _linear_relu_symbolic(g: Any, x: Any, weight: Any, bias: Any) -> Any:
    from torch.onnx import symbolic_helper

    has_bias = not symbolic_helper._is_none(bias)
    if symbolic_helper._get_tensor_rank(x) == 2:
        # Gemm computes x @ weight.T (+ bias) in one node, as F.linear's own export does.
        inputs = (x, weight, bias) if has_bias else (x, weight)
        y = g.op("Gemm", *inputs, alpha_f=1.0, beta_f=1.0, transA_i=0, transB_i=1)
    else:
        y = g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0]))
        if has_bias:
            y = g.op("Add", y, bias)
    return g.op("Relu", y)


# --- fastmlp::linear_relu_backward ----------------------------------------------------


def _linear_relu_backward(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Same contract as the kernels: the ReLU mask is y > 0; gradients not asked for are
    # empty (0,) tensors.
    g = torch.where(y > 0, grad_y, torch.zeros_like(grad_y))
    empty = y.new_empty((0,))
    grad_x = g.matmul(weight) if output_mask[0] and weight is not None else empty
    flat = g.reshape(-1, g.shape[-1])
    grad_w = (
        flat.t().matmul(x.reshape(-1, x.shape[-1])) if output_mask[1] and x is not None else empty
    )
    grad_b = flat.sum(0) if output_mask[2] else empty
    return grad_x, grad_w, grad_b


# --- fastmlp::mlp and fastmlp::mlp_backward -------------------------------------------
# No ONNX symbolic: the TorchScript exporter cannot express the op's list arguments, so
# fastmlp.nn computes a fused run layer by layer while torch.onnx exports (same result).


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _act_backward(
    g: torch.Tensor, saved: torch.Tensor, kind: str, negative_slope: float, is_output: bool
) -> torch.Tensor:
    """``g`` through the activation's derivative, by PyTorch's own backward formulas;
    ``saved`` is the activation's output when ``is_output``, else its pre-activation."""
    return activations.backward(g, saved, kind, negative_slope, is_output)


def _mlp(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # The op's contract: the output, and what backward needs as (rows, out_l) tensors:
    # each hidden layer's output or pre-activation, and the last layer's pre-activation
    # when it has an output activation.
    pre = saves_preactivation(activation, negative_slope)
    h, hidden = _rows(x), []
    for i, w in enumerate(weights):
        z = F.linear(h, w, biases[i] if biases else None)
        if i + 1 < len(weights):
            h = apply_activation(z, activation, negative_slope)
            hidden.append(z if pre else h)
        else:
            h = apply_activation(z, output_activation, negative_slope)
            if output_activation != "none":
                hidden.append(z)
    return h.reshape(*x.shape[:-1], h.shape[-1]), hidden


def _mlp_inference(*args: Any, **kwargs: Any) -> torch.Tensor:
    # mlp's arguments; its output only (nothing saved).
    return _mlp(*args, **kwargs)[0]


def _mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weights: list[torch.Tensor],
    hidden: list[torch.Tensor],
    output_mask: list[bool],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    n = len(weights)
    pre = saves_preactivation(activation, negative_slope)
    has_bias = len(output_mask) == 1 + 2 * n
    grad_w = [grad_y.new_empty((0,)) for _ in range(n)]
    grad_b = [grad_y.new_empty((0,)) for _ in range(n if has_bias else 0)]
    g = _rows(grad_y)
    if output_activation != "none":
        g = _act_backward(g, hidden[n - 1], output_activation, negative_slope, False)
    for i in reversed(range(n)):
        if i + 1 < n:
            g = _act_backward(g, hidden[i], activation, negative_slope, not pre)
        if output_mask[1 + i]:
            if i == 0:
                if x is None:  # the kernels' check (csrc/checks.h)
                    raise RuntimeError(
                        "fastmlp.mlp_backward: x is required to compute weights[0]'s gradient "
                        "(output_mask[1] is true)"
                    )
                g_in = _rows(x)
            else:  # layer i's input: layer i-1's output, recomputed where z was saved
                g_in = (
                    apply_activation(hidden[i - 1], activation, negative_slope)
                    if pre
                    else hidden[i - 1]
                )
            grad_w[i] = g.t().matmul(g_in)
        if has_bias and output_mask[1 + n + i]:
            grad_b[i] = g.sum(0)
        if i > 0 or output_mask[0]:
            g = g.matmul(weights[i])
    grad_x = (
        g.reshape(*grad_y.shape[:-1], g.shape[-1]) if output_mask[0] else grad_y.new_empty((0,))
    )
    return grad_x, grad_w, grad_b


#: One entry per exportable fastmlp op.
OPS: tuple[OpExport, ...] = (
    OpExport("fastmlp::linear_relu", _linear_relu, _linear_relu_symbolic),
    OpExport("fastmlp::linear_relu_backward", _linear_relu_backward),
    OpExport("fastmlp::mlp", _mlp),
    OpExport("fastmlp::mlp_inference", _mlp_inference),
    OpExport("fastmlp::mlp_backward", _mlp_backward),
)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """``torch.export.default_decompositions()`` plus fastmlp's: pass it to
    ``ExportedProgram.run_decompositions`` to get a program of ATen ops only."""
    table = torch.export.default_decompositions()
    for entry in OPS:
        table[entry.overload] = entry.decomposition
    return table


def portable(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every fastmlp op replaced by ATen ops (and decomposed to core ATen,
    as ``run_decompositions()`` does): save it with ``torch.export.save`` and it loads and
    runs with ``torch.export.load`` where fastmlp is not installed."""
    return program.run_decompositions(decompositions())


_registered = False


def register() -> None:
    """Register every entry of :data:`OPS` with PyTorch (done on ``import fastmlp``;
    calling it again does nothing)."""
    global _registered
    if _registered:
        return
    from torch._decomp import decomposition_table, register_decomposition

    for entry in OPS:
        if entry.overload not in decomposition_table:
            register_decomposition(entry.overload)(entry.decomposition)
        if entry.onnx_symbolic is not None:
            torch.onnx.register_custom_op_symbolic(entry.name, entry.onnx_symbolic, _SYMBOLIC_OPSET)
    _registered = True


register()

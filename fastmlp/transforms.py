"""fastmlp's ops under ``torch.func`` transforms: grad, vjp, jacrev, jacfwd, jvp, vmap
(per-sample gradients: ``vmap(grad(...))``), functionalize.

The ops' autograd is a C++ ``torch::autograd::Function`` (csrc/autograd.cpp, for speed),
which functorch's transforms refuse, and the ops have no batching rules of their own. So
each op that :data:`fastmlp.export.OPS` decomposes gets one more kernel, registered when
``fastmlp`` is imported, on the dispatch key that PyTorch puts in front of every op only
while a transform is active (``FuncTorchDynamicLayerFrontMode``). It computes:

* under ``vmap`` of the input with the weights and biases shared (not vmapped), the fused
  op itself, with the vmapped dimension folded into the rows of one call;
* under any other transform (``grad``, ``jvp``, ``vmap`` over weights, ...), the op's
  pure-ATen decomposition, the very function :mod:`fastmlp.export` exports, which every
  transform supports; results equal plain PyTorch's up to rounding.

Outside transforms that dispatch key is not active: a call is the plain fused op, with no
check added. The ops' Python entry points and modules (``fastmlp.linear_relu``,
``fastmlp.mlp``, ``FusedLinearReLU``, ``MLP``, ``fuse()``) and direct calls of
``torch.ops.fastmlp.*`` all go through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Private functorch API, the same that torch.library.register_vmap is built on. A batching
# rule alone (register_vmap) cannot help the grad transforms, which reach the ops' C++
# autograd before any batching rule; a kernel in front of every transform serves them all.
from torch._C._functorch import TransformType, _add_batch_dim, _unwrap_batched
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

from fastmlp import _C  # noqa: F401  (the ops must exist before they can be registered)
from fastmlp.export import OPS

__all__ = ["register"]

_FRONT_KEY = "FuncTorchDynamicLayerFrontMode"


def _unbatched(t: torch.Tensor | None, level: int) -> torch.Tensor | None:
    """``t`` unwrapped at vmap ``level``, or None when it is vmapped there (or absent)."""
    if t is None:
        return None
    inner, bdim = _unwrap_batched(t, level)
    return inner if bdim is None else None


def _vmap_linear_relu(
    interpreter: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    level = interpreter.level()
    x_inner, x_bdim = _unwrap_batched(x, level)
    w = _unbatched(weight, level)
    b = _unbatched(bias, level)
    if x_bdim is None or w is None or (bias is not None and b is None):
        return None
    with interpreter.lower():
        y = torch.ops.fastmlp.linear_relu(x_inner.movedim(x_bdim, 0), w, b)
    return _add_batch_dim(y, 0, level)


def _vmap_mlp(
    interpreter: Any,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str = "relu",
    output_activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    level = interpreter.level()
    x_inner, x_bdim = _unwrap_batched(x, level)
    ws = [_unbatched(w, level) for w in weights]
    bs = [_unbatched(b, level) for b in biases]
    if x_bdim is None or any(t is None for t in ws + bs):
        return None
    x_inner = x_inner.movedim(x_bdim, 0)
    with interpreter.lower():
        y, hidden = torch.ops.fastmlp.mlp(
            x_inner, ws, bs, activation, output_activation, negative_slope
        )
    # The op returns what backward needs as (rows, width) tensors; per sample, rows are
    # those of one sample's input.
    batch, rows = x_inner.shape[0], math.prod(x_inner.shape[1:-1])
    hidden = [_add_batch_dim(h.reshape(batch, rows, h.shape[-1]), 0, level) for h in hidden]
    return _add_batch_dim(y, 0, level), hidden


# Ops computed by the fused op itself under vmap when only the input is vmapped.
_FUSED_VMAP: dict[str, Callable[..., Any]] = {
    "fastmlp::linear_relu": _vmap_linear_relu,
    "fastmlp::mlp": _vmap_mlp,
}


def _transform_kernel(name: str, decomposition: Callable[..., Any]) -> Callable[..., Any]:
    fused_vmap = _FUSED_VMAP.get(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if fused_vmap is not None:
            interpreter = retrieve_current_functorch_interpreter()
            if interpreter.key() == TransformType.Vmap:
                out = fused_vmap(interpreter, *args, **kwargs)
                if out is not None:
                    return out
        # The ATen ops it calls dispatch through the active transforms as usual.
        return decomposition(*args, **kwargs)

    return kernel


_registered = False
_lib: torch.library.Library | None = None


def register() -> None:
    """Register the transform kernel of every op in :data:`fastmlp.export.OPS` (done on
    ``import fastmlp``; calling it again does nothing)."""
    global _registered, _lib
    if _registered:
        return
    _lib = torch.library.Library("fastmlp", "IMPL")  # kept: dropping it unregisters
    for entry in OPS:
        op_name = entry.name.split("::")[1]
        _lib.impl(op_name, _transform_kernel(entry.name, entry.decomposition), _FRONT_KEY)
    _registered = True


register()

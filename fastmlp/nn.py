"""Modules built on the fused op: FusedLinearReLU, MLP, and fuse()/unfuse().

Everything here keeps plain PyTorch's parameter names and state_dict keys, so
checkpoints move freely between fastmlp models and ordinary ``nn.Linear`` /
``nn.ReLU`` models (the tutorial's ``NeuralNetwork`` included).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fastmlp.ops import linear_relu

__all__ = ["FusedLinearReLU", "MLP", "fuse", "unfuse"]


class FusedLinearReLU(nn.Linear):
    """``nn.Linear`` followed by ReLU, computed by one fused kernel.

    Same constructor, parameters, initialisation and state_dict keys as
    ``nn.Linear``; ``forward`` returns ``relu(x @ weight.T + bias)``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_relu(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activation=relu (fused)"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FusedLinearReLU:
        """A FusedLinearReLU that shares ``linear``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = linear.in_features
        fused.out_features = linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.train(linear.training)
        return fused

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's parameters (follow it with nn.ReLU)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features = self.in_features
        linear.out_features = self.out_features
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear


class MLP(nn.Module):
    """The tutorial's ``NeuralNetwork``, with fused hidden layers.

    ``sizes`` lists the layer widths from input to logits; every layer but the
    last is Linear+ReLU (fused), the last is a plain Linear. The default is the
    tutorial's 784-512-512-10. Submodule names match the tutorial
    (``flatten``, ``linear_relu_stack.0/.2/.4``), so
    ``NeuralNetwork().load_state_dict(MLP().state_dict())`` works with
    ``strict=True`` and the other way round.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (784, 512, 512, 10),
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"MLP sizes must list at least 2 positive layer widths, got {sizes}")
        self.sizes = sizes
        layers: list[tuple[str, nn.Module]] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            last = i == len(sizes) - 2
            cls = nn.Linear if last else FusedLinearReLU
            # Index 2*i: the tutorial's Sequential has a ReLU between Linears.
            layers.append((str(2 * i), cls(fan_in, fan_out, bias, device=device, dtype=dtype)))
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


def _is_exactly(module: nn.Module, cls: type) -> bool:
    return type(module) is cls


def fuse(module: nn.Module) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` directly followed by ``nn.ReLU``
    inside any ``nn.Sequential`` of ``module`` with one FusedLinearReLU that
    shares the Linear's parameters. Outputs are unchanged. Returns ``module``.

    The ReLU's slot becomes an ``nn.Identity`` so the Sequential's indices, and
    so the state_dict keys, stay the same.
    """
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        names = list(child._modules)
        for name, next_name in zip(names, names[1:], strict=False):
            first, second = child._modules[name], child._modules[next_name]
            if _is_exactly(first, nn.Linear) and isinstance(second, nn.ReLU):
                child._modules[name] = FusedLinearReLU.from_linear(first)
                child._modules[next_name] = nn.Identity()
    return module


def unfuse(module: nn.Module) -> nn.Module:
    """Turn a fastmlp model back into plain ``nn.Linear`` + ``nn.ReLU`` (sharing
    parameters), for export where the extension is not installed. Returns a new
    top-level module if ``module`` itself is a FusedLinearReLU, else ``module``
    changed in place.

    In a Sequential, a FusedLinearReLU followed by the ``nn.Identity`` that
    :func:`fuse` left becomes Linear, ReLU again; an MLP's stack is rebuilt with
    the tutorial's indices 0..4 (Linear, ReLU, Linear, ReLU, Linear).
    """
    if isinstance(module, FusedLinearReLU):
        return nn.Sequential(module.to_linear(), nn.ReLU())
    for child in list(module.modules()):
        for name, sub in list(child._modules.items()):
            if isinstance(sub, nn.Sequential):
                child._modules[name] = _unfuse_sequential(sub)
            elif isinstance(sub, FusedLinearReLU):
                child._modules[name] = nn.Sequential(sub.to_linear(), nn.ReLU())
    return module


def _unfuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    if not any(isinstance(m, FusedLinearReLU) for m in seq._modules.values()):
        return seq
    items = list(seq._modules.items())
    out: list[tuple[str, nn.Module]] = []
    skip_next = False
    for i, (name, sub) in enumerate(items):
        if skip_next:
            skip_next = False
            continue
        if not isinstance(sub, FusedLinearReLU):
            out.append((name, sub))
            continue
        out.append((name, sub.to_linear()))
        following = items[i + 1] if i + 1 < len(items) else None
        if following is not None and type(following[1]) is nn.Identity:
            out.append((following[0], nn.ReLU()))  # the slot fuse() emptied
            skip_next = True
        else:
            out.append((_relu_name(name, seq), nn.ReLU()))
    return nn.Sequential(OrderedDict(out))


def _relu_name(linear_name: str, seq: nn.Sequential) -> str:
    # MLP's stack is named 0, 2, 4: the ReLUs go back to 1, 3 as in the tutorial.
    if linear_name.isdigit() and str(int(linear_name) + 1) not in seq._modules:
        return str(int(linear_name) + 1)
    return f"{linear_name}_relu"

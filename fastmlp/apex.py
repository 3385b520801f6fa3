"""A drop-in for ``apex.mlp.MLP``: ``from fastmlp.apex import MLP``.

apex's fused MLP (NVIDIA/apex, ``apex/mlp/mlp.py``) with its exact signature and meaning,
computed by fastmlp's whole-MLP op on the CPU and on CUDA:

* ``MLP(mlp_sizes, bias=True, activation='relu')``: ``len(mlp_sizes) - 1`` Linear layers,
  each followed by the activation, the last one included (unlike :class:`fastmlp.MLP`,
  which leaves the logits alone); ``activation`` is ``'none'``, ``'relu'`` or
  ``'sigmoid'``, anything else raises ``TypeError`` as apex does;
* the attributes apex's users and tests read: ``num_layers``, ``mlp_sizes``, ``bias``
  (1 or 0) and ``activation`` (0 none, 1 relu, 2 sigmoid), and ``weights`` / ``biases``,
  lists of the ``nn.Parameter`` s ``weight_{i}`` / ``bias_{i}`` (the state_dict keys are
  apex's), so ``mlp.weights[0].data.copy_(linear.weight)`` works as in apex's tests;
* ``reset_parameters()`` as apex: weights ~ N(0, 2 / (fan_in + fan_out)), biases
  ~ N(0, 1 / fan_out).

Under ``torch.autocast`` the op casts its inputs to the autocast dtype (apex casts to
float16 through amp). Inputs may have any leading dimensions, not only ``(batch,
features)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import copy

import torch
from torch import nn

from fastmlp.ops import _check_sizes, mlp

__all__ = ["MLP"]

# apex's activation codes.
_ACTIVATIONS = {"none": 0, "relu": 1, "sigmoid": 2}
_NAMES = {code: name for name, code in _ACTIVATIONS.items()}


class MLP(nn.Module):
    """apex.mlp.MLP on fastmlp's whole-MLP op (see the module's docstring).

    Args:
        mlp_sizes: layer widths, input first: ``[1024, 1024, 1024]`` makes 2 layers of
            1024x1024. At least 2, each a positive integer, else a TypeError (not
            integers) or ValueError (fewer than 2, or one not positive) naming the width.
        bias: whether every layer has a bias.
        activation: ``'none'``, ``'relu'`` or ``'sigmoid'``, after every layer.
    """

    def __init__(
        self, mlp_sizes: Sequence[int], bias: bool = True, activation: str = "relu"
    ) -> None:
        super().__init__()
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise TypeError(
                f"fastmlp.apex.MLP: activation must be 'none', 'relu' or 'sigmoid' "
                f"(as apex.mlp.MLP), got {activation!r}"
            )
        widths = _check_sizes(mlp_sizes, "mlp_sizes", op="fastmlp.apex.MLP")
        self.num_layers = len(widths) - 1
        self.mlp_sizes = copy(mlp_sizes)
        self.bias = 1 if bias else 0
        self.activation = _ACTIVATIONS[activation]
        for i in range(self.num_layers):
            w = nn.Parameter(torch.empty(widths[i + 1], widths[i]))
            setattr(self, f"weight_{i}", w)
            if self.bias:
                setattr(self, f"bias_{i}", nn.Parameter(torch.empty(widths[i + 1])))
        self.reset_parameters()

    # Read from the registered parameters on every access (apex keeps Python lists), so
    # they stay the module's own parameters after .to(), load_state_dict or swaps.
    @property
    def weights(self) -> list[nn.Parameter]:
        return [getattr(self, f"weight_{i}") for i in range(self.num_layers)]

    @property
    def biases(self) -> list[nn.Parameter]:
        if not self.bias:
            return []
        return [getattr(self, f"bias_{i}") for i in range(self.num_layers)]

    def reset_parameters(self) -> None:
        """apex's initialisation: N(0, 2 / (fan_in + fan_out)) weights, N(0, 1 / fan_out)
        biases."""
        for weight in self.weights:
            std = math.sqrt(2.0 / float(weight.size(0) + weight.size(1)))
            nn.init.normal_(weight, 0.0, std)
        for bias in self.biases:
            nn.init.normal_(bias, 0.0, math.sqrt(1.0 / float(bias.size(0))))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = _NAMES[self.activation]
        biases = self.biases if self.bias else None
        return mlp(input, self.weights, biases, name, name)

    def extra_repr(self) -> str:
        return f"MLP sizes: {self.mlp_sizes}, Bias={self.bias}, activation={self.activation}"

"""The specification the kernels are tested against: plain PyTorch, in float64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NeuralNetwork(nn.Module):
    """The model of the "Learn the Basics" tutorial (section 4), verbatim."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def linear_relu_ref(x, weight, bias=None):
    """relu(x @ weight.T + bias): what fastmlp.linear_relu must compute."""
    return torch.relu(F.linear(x, weight, bias))


def mlp_ref(x, weights, biases=None):
    """What fastmlp.ops.mlp must compute: Linear+ReLU layers, the last without ReLU."""
    h = x
    for i, w in enumerate(weights):
        h = F.linear(h, w, None if biases is None else biases[i])
        if i + 1 < len(weights):
            h = torch.relu(h)
    return h


def forward_backward(fn, x, weight, bias, grad_y=None):
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


def magnitude_refs(x, weight, bias, grad_y):
    """The same products on absolute values, in float64: the scale that bounds
    rounding error in a dot product. Errors are measured relative to these, so
    that a result that is small through cancellation does not look inexact."""
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

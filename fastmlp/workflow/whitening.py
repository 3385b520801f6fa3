"""ZCA whitening of the input images, folded into the first layer for everything saved.

Training an MLP on whitened pixels (decorrelated, unit variance in every direction but the
weakest) makes the first layer's optimisation well conditioned, so SGD gets further per
epoch: on Fashion-MNIST, 784-512-512-10, 6 epochs of one-cycle SGD reached ~89.4% on raw
pixels and ~90.2% on whitened ones (seeds 0-1; the sweep is in docs/benchmarks.md). The
transform is affine, ``x -> (x - mean) @ matrix`` with a symmetric ``matrix``, so a first
layer ``W x' + b`` trained on whitened inputs equals ``(W matrix) x + (b - W matrix mean)``
on raw ones: :meth:`InputWhitening.fold` writes that into a copy of
the model, which then takes the ``ToTensor`` pixels every other part of fastmlp (and the
tutorial) feeds it. The architecture does not change.

This module never imports the compiled extension.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # fold's argument; this module never imports the extension
    from fastmlp.nn import MLP

__all__ = ["InputWhitening"]

#: Added to every eigenvalue of the pixel covariance (pixels in [0, 1]) before the inverse
#: square root: directions with less variance than this are scaled up by at most
#: 1/sqrt(EPS) (~3.2x) instead of blowing up noise. 0.1 beat 0.05 and 0.01 in the sweep.
EPS = 0.1
#: Images the covariance is estimated from (the first ones of the split): 784x784 is well
#: determined by 20,000 samples, and the estimate costs a third of using all 60,000.
COVARIANCE_SAMPLES = 20_000


class InputWhitening:
    """ZCA whitening ``x -> (x - mean) @ matrix`` of flattened images.

    ``mean`` has one entry per pixel, ``matrix`` is the symmetric ``(pixels, pixels)``
    inverse square root of the regularised pixel covariance. Make one from training images
    with :meth:`fit`; apply it with ``whitening(x)`` (any ``(N, ...)`` shape with
    ``pixels`` values per sample, kept); give a model trained on its output to
    :meth:`fold` to get the same model for raw pixels.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        if mean.dim() != 1 or matrix.shape != (mean.numel(), mean.numel()):
            raise ValueError(
                f"whitening needs a mean of shape (D,) and a (D, D) matrix, got "
                f"{tuple(mean.shape)} and {tuple(matrix.shape)}"
            )
        self.mean = mean
        self.matrix = matrix

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = EPS) -> InputWhitening:
        """The ZCA whitening of ``images`` (float, ``(N, ...)``, pixels in [0, 1]), from the
        first :data:`COVARIANCE_SAMPLES` of them; on their device, float32."""
        if not images.is_floating_point() or images.dim() < 2 or len(images) < 2:
            raise ValueError(
                f"whitening is estimated from at least 2 float images, got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if not eps > 0:
            raise ValueError(f"whitening eps must be > 0, got {eps}")
        flat = images.reshape(len(images), -1).float()
        mean = flat.mean(0)
        centred = flat[:COVARIANCE_SAMPLES] - mean
        # The covariance's GEMM in float32 (fast); its eigendecomposition in float64, where
        # the small eigenvalues keep their digits.
        cov = (centred.T @ centred).double() / len(centred)
        values, vectors = torch.linalg.eigh(cov)
        scale = (values.clamp_min(0) + eps).rsqrt()
        matrix = (vectors * scale) @ vectors.T
        return cls(mean, matrix.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"whitening expects {self.mean.numel()} values per sample, got {flat.shape[1]}"
            )
        # x @ M - mean @ M: one GEMM with the shift as its bias, no centred copy of x
        # (0.47-0.49 instead of 0.63-0.65 s for the 60,000 training images on 2 cores).
        shift = (self.mean @ self.matrix).neg_()
        return torch.addmm(shift, flat, self.matrix).reshape(x.shape)

    def fold(self, model: MLP) -> MLP:
        """A copy of ``model`` (trained on whitened inputs) that takes raw pixels: its first
        Linear becomes ``W @ matrix`` with bias ``b - W @ matrix @ mean`` (computed in
        float64). ``model`` needs ``linears()`` (a :class:`fastmlp.MLP`)."""
        if model.linears()[0].bias is None:  # nothing to absorb the mean: refuse, not fold wrong
            raise ValueError("folding whitening into a first layer needs its bias")
        folded = copy.deepcopy(model)
        first = folded.linears()[0]
        with torch.no_grad():
            weight = first.weight.double() @ self.matrix.to(first.weight.device).double()
            shift = weight @ self.mean.to(first.weight.device).double()
            first.weight.copy_(weight)
            first.bias.copy_(first.bias.double() - shift)
        return folded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint (``torch.load(weights_only=True)`` reads them)."""
        return {"mean": self.mean, "matrix": self.matrix}

    @classmethod
    def from_state_dict(cls, state: Any) -> InputWhitening:
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), torch.Tensor) for k in ("mean", "matrix")
        ):
            raise ValueError("not a whitening state (needs tensors 'mean' and 'matrix')")
        return cls(state["mean"], state["matrix"])

    def to(self, device: torch.device | str) -> InputWhitening:
        return InputWhitening(self.mean.to(device), self.matrix.to(device))

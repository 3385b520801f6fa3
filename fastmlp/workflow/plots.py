"""PNG figures: training curves, confusion matrix and the tutorial's 3x3 sample grid.

matplotlib is imported inside each function with the non-interactive ``Agg`` backend, so
training on a headless machine never needs a display and importing fastmlp stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_confusion", "save_curves", "save_samples"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def save_curves(epochs: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> Path:
    """Loss (train and test) and test accuracy per epoch, side by side."""
    plt = _pyplot()
    x = [e["epoch"] for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [e["train_loss"] for e in epochs], "o-", label="train (smoothed labels)")
    ax_loss.plot(x, [e["test_loss"] for e in epochs], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(x, [100 * e["test_accuracy"] for e in epochs], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def save_confusion(
    confusion: torch.Tensor, classes: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts in each cell."""
    plt = _pyplot()
    cm = confusion.cpu().numpy()
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    n = len(classes)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true")
    acc = cm.trace() / max(cm.sum(), 1)
    ax.set_title(f"Test confusion matrix (accuracy {100 * acc:.2f}%)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            color = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    return _save(fig, path)


def save_samples(
    images: torch.Tensor,
    titles: Sequence[str],
    path: str | os.PathLike[str],
    cols: int = 3,
) -> Path:
    """The tutorial's grid of labelled images; ``images`` is ``(N, 28, 28)`` (any dtype)."""
    plt = _pyplot()
    rows = -(-len(images) // cols)
    fig = plt.figure(figsize=(8, 8))
    for i, (img, title) in enumerate(zip(images, titles, strict=True), start=1):
        fig.add_subplot(rows, cols, i)
        plt.title(title)
        plt.axis("off")
        plt.imshow(img.squeeze().cpu().numpy(), cmap="gray")
    return _save(fig, path)

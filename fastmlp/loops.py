"""The tutorial's loops, fast: ``train_loop``, ``test_loop`` and ``evaluate``.

Same signatures and log lines as "Learn the Basics", and they accept a
``torch.utils.data.DataLoader`` as well as a :class:`fastmlp.loader.DeviceLoader`. Losses
and counts accumulate in device tensors; the host reads them once per epoch, and once every
``log_every`` steps for the progress line, so a GPU is never stalled per step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "EvalResult",
    "autocast",
    "evaluate",
    "progress_bar",
    "test_error_line",
    "test_loop",
    "train_loop",
]

LogFn = Callable[[str], None]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision="bf16"`` (weights stay fp32), else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def progress_bar(total: int, desc: str, enabled: bool, leave: bool = True) -> Any:
    """A tqdm bar, or ``None`` when disabled (tqdm is imported only when needed)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True)


def train_loop(
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    precision: str = "fp32",
    log_every: int = 100,
    log: LogFn | None = print,
    progress: bool = False,
) -> float:
    """One epoch, as in the tutorial: prints ``loss: …  [current/size]`` every ``log_every``
    batches (or shows a tqdm bar with ``progress=True``). Returns the mean batch loss.

    With a :class:`fastmlp.optim.FusedSGD` of ``model`` and an ``nn.CrossEntropyLoss``,
    each step is its ``train_step`` (one fused kernel on the CPU) instead of
    forward/backward/step.
    """
    model.train()
    device = _model_device(model)
    size = len(dataloader.dataset)  # type: ignore[attr-defined]
    fused_step = _fused_step(optimizer, model, loss_fn)
    bar = progress_bar(len(dataloader), "train", progress, leave=False)  # type: ignore[arg-type]
    total = torch.zeros((), device=device)
    batches = 0
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = fused_step(X, y) if fused_step is not None else loss_fn(model(X), y)
        if fused_step is None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
        batches += 1
        if log_every and batch % log_every == 0:
            # The only host sync inside the epoch, once every log_every steps.
            value = loss.item()
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            elif log is not None:
                # Samples so far over all processes (a sharded loader's global batch).
                current = batch * getattr(dataloader, "global_batch_size", len(X))
                log(f"loss: {value:>7f}  [{current:>5d}/{size:>5d}]")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return total.item() / max(batches, 1)


def _fused_step(
    optimizer: Any, model: nn.Module, loss_fn: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``optimizer.train_step`` when the optimizer can run the whole step itself (a
    :class:`fastmlp.optim.FusedSGD` of this model, with a plain mean cross-entropy loss);
    else ``None``. (Its kernel rejects negative targets, where ``ignore_index`` would skip
    them: Fashion-MNIST has none.)"""
    from fastmlp.optim import FusedSGD

    plain_cross_entropy = (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
    )
    # Under DDP the gradients must be all-reduced between backward and update, which the
    # fused kernel cannot do: DDP models always take the autograd step.
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if (
        isinstance(optimizer, FusedSGD)
        and optimizer.model is model
        and plain_cross_entropy
        and not ddp
    ):
        return functools.partial(optimizer.train_step, label_smoothing=loss_fn.label_smoothing)
    return None


@dataclass
class EvalResult:
    """Test-set accuracy (fraction), mean loss per sample and the 10x10 confusion matrix."""

    accuracy: float
    loss: float
    confusion: torch.Tensor  # [true, predicted] counts, int64 on CPU


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
    num_classes: int = 10,
) -> EvalResult:
    """Accuracy, per-sample mean cross-entropy and confusion matrix over ``dataloader``."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    for X, y in dataloader:
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(X)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=confusion.numel())
    model.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu()
    n = int(cm.sum())
    return EvalResult(
        accuracy=float(cm.diag().sum()) / max(n, 1),
        loss=float(loss_sum) / max(n, 1),
        confusion=cm,
    )


def test_loop(
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    precision: str = "fp32",
    log: LogFn | None = print,
) -> tuple[float, float]:
    """The tutorial's test loop: prints ``Test Error: Accuracy: …%, Avg loss: …``.

    Returns ``(accuracy as a fraction, average loss)``. The loss is the per-sample mean
    cross-entropy (the tutorial averages batch means, which differs only by a partial last
    batch); ``loss_fn`` is accepted for signature compatibility.
    """
    del loss_fn
    result = evaluate(model, dataloader, precision)
    if log is not None:
        log(test_error_line(result))
    return result.accuracy, result.loss


def test_error_line(result: EvalResult) -> str:
    """The tutorial's evaluation line, ``Test Error: Accuracy: …%, Avg loss: …``."""
    return (
        f"Test Error: \n Accuracy: {(100 * result.accuracy):>0.1f}%, Avg loss: {result.loss:>8f} \n"
    )

"""The tutorial's loops, fast: ``train_loop``, ``test_loop`` and ``evaluate``.

Same signatures and log lines as "Learn the Basics", and they accept a
``torch.utils.data.DataLoader`` as well as a :class:`fastmlp.workflow.loader.DeviceLoader`. Losses
and counts accumulate in device tensors; the host reads them once per epoch, and once every
``log_every`` steps for the progress line, so a GPU is never stalled per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmlp.protocols import (
    GlobalBatchSized,
    LossFn,
    StepFn,
    TrainStepProvider,
    WeightedBatchSource,
)

__all__ = [
    "EvalResult",
    "StepFn",
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
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    step: StepFn | None = None,
    precision: str = "fp32",
    log_every: int = 100,
    log: LogFn | None = print,
    progress: bool = False,
) -> float:
    """One epoch, as in the tutorial: prints ``loss: …  [current/size]`` every ``log_every``
    batches (or shows a tqdm bar with ``progress=True``). Returns the mean batch loss.

    Each batch takes one training step, the first of these that applies:

    * ``step(X, y)``, when given: the whole step (forward, loss, backward, update),
      returning the batch's loss;
    * the optimizer's own step for this model and loss, when it offers one (a
      :class:`fastmlp.protocols.TrainStepProvider`):
      ``optimizer.train_step_for(model, loss_fn)`` returns a step function or ``None``.
      A :class:`fastmlp.optim.FusedSGD` of ``model`` (not DDP-wrapped) with a plain mean
      ``nn.CrossEntropyLoss`` returns its ``train_step``: one fused kernel on the CPU;
    * the tutorial's autograd step: ``loss = loss_fn(model(X), y)``, then
      ``optimizer.zero_grad()``, ``loss.backward()``, ``optimizer.step()``.

    A step function runs inside the loop's autocast context (``precision="bf16"``), which
    FusedSGD's kernel reads; the autograd step keeps backward and the update outside it.
    ``scheduler.step()`` follows every step.

    Batch weights: when ``dataloader`` has ``weighted_batches()`` (a
    :class:`fastmlp.protocols.WeightedBatchSource`, as :class:`fastmlp.workflow.loader.DeviceLoader`
    is), the loop iterates that, and the autograd step multiplies each batch's loss by its
    weight: 1.0 except for the uneven pieces of a sharded loader's short last batch, where
    it makes DDP's average over ranks the mean over the global batch. A rank whose piece
    is empty (weight 0) still runs a backward that reaches every parameter, so DDP's
    gradient hooks fire on every rank. The mean returned is over the weighted losses. Step
    functions take unweighted batches: a batch weight other than 1 with a step function
    raises ``ValueError``.
    """
    model.train()
    device = _model_device(model)
    size = len(dataloader.dataset)  # type: ignore[attr-defined]
    if step is None and isinstance(optimizer, TrainStepProvider):
        step = optimizer.train_step_for(model, loss_fn)
    take_step = _step_taker(model, loss_fn, optimizer, step, device, precision)
    # Samples per step over all processes (a sharded loader's global batch), for the log.
    global_batch = (
        dataloader.global_batch_size if isinstance(dataloader, GlobalBatchSized) else None
    )
    bar = progress_bar(len(dataloader), "train", progress, leave=False)  # type: ignore[arg-type]
    total = torch.zeros((), device=device)
    batches_done = 0
    for batch, (X, y, weight) in enumerate(_weighted_batches(dataloader)):
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = take_step(batch, X, y, weight)
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
        batches_done += 1
        if log_every and batch % log_every == 0:
            # The only host sync inside the epoch, once every log_every steps.
            value = loss.item()
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            elif log is not None:
                current = batch * (len(X) if global_batch is None else global_batch)
                log(f"loss: {value:>7f}  [{current:>5d}/{size:>5d}]")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return total.item() / max(batches_done, 1)


def _weighted_batches(
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Iterable[tuple[torch.Tensor, torch.Tensor, float]]:
    """The loader's batches as ``(X, y, weight)``: its own weights when it has them (a
    :class:`fastmlp.protocols.WeightedBatchSource`), else weight 1.0 for every batch."""
    if isinstance(dataloader, WeightedBatchSource):
        return dataloader.weighted_batches()
    return ((X, y, 1.0) for X, y in dataloader)


#: One training step of :func:`train_loop`: ``take(batch_index, X, y, weight)`` -> loss.
_TakeStep = Callable[[int, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _step_taker(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    step: StepFn | None,
    device: torch.device,
    precision: str,
) -> _TakeStep:
    """How :func:`train_loop` takes each step: ``step`` (unweighted batches only) when
    there is one, else the tutorial's autograd step on the weighted loss."""
    if step is not None:
        step_fn = step

        def take_given_step(
            batch: int, X: torch.Tensor, y: torch.Tensor, weight: float
        ) -> torch.Tensor:
            if weight != 1.0:
                raise ValueError(
                    f"batch {batch} has weight {weight:g} (a sharded loader's uneven last "
                    "batch), but step functions take unweighted batches: train without "
                    "step= (the autograd step weights the loss), or with drop_last=True"
                )
            with autocast(device, precision):
                return step_fn(X, y)

        return take_given_step

    def take_autograd_step(
        batch: int, X: torch.Tensor, y: torch.Tensor, weight: float
    ) -> torch.Tensor:
        with autocast(device, precision):
            loss = _weighted_loss(loss_fn, model(X), y, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return take_autograd_step


def _weighted_loss(
    loss_fn: LossFn,
    output: torch.Tensor,
    target: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """``loss_fn(output, target) * weight``; a zero that depends on every parameter for an
    empty batch (whose mean loss would be NaN, and NaN times 0 is still NaN)."""
    if weight == 1.0:
        return loss_fn(output, target)  # no extra op: single-process runs are unchanged
    if target.shape[0] == 0:
        return output.sum() * 0.0
    return loss_fn(output, target) * weight


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
    loss_fn: LossFn | None = None,
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

"""The duck-typed interfaces of the training loop, declared in one place.

:func:`fastmlp.workflow.loops.train_loop` takes any optimizer and any iterable of batches, and uses
more of them when they offer it. What it looks for is declared here as
:class:`typing.Protocol` classes, so that type checkers, readers and other implementations
see the contract; the loop tests them with ``isinstance`` (each is ``runtime_checkable``,
and a check looks up one attribute, once per epoch):

* :class:`TrainStepProvider`: an optimizer with ``train_step_for(model, loss_fn)``, which
  returns a whole training step of its own (a :data:`StepFn`) or ``None``;
  :class:`fastmlp.optim.FusedSGD` is one.
* :class:`WeightedBatchSource`: a loader with ``weighted_batches()``, yielding
  ``(X, y, weight)``; :class:`fastmlp.workflow.loader.DeviceLoader` is one.
* :class:`GlobalBatchSized`: a loader that knows the batch over all processes
  (``global_batch_size``), for the progress line's sample count.
* :class:`LossClosure`: what ``optimizer.step(closure)`` calls; ``FusedSGD.step``
  recognises the closure its own ``train_step`` made (see there).

Workflow layer: this module needs only torch, never the compiled extension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "GlobalBatchSized",
    "LossClosure",
    "LossFn",
    "StepFn",
    "TrainStepProvider",
    "WeightedBatchSource",
]

#: A loss: ``loss_fn(output, target)`` -> a 0-d tensor (``nn.CrossEntropyLoss()`` is one).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: A whole training step on one batch ``(X, y)``: forward, loss, backward and update;
#: returns the batch's loss (see :func:`fastmlp.workflow.loops.train_loop`).
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class TrainStepProvider(Protocol):
    """An optimizer that may take the whole training step itself."""

    def train_step_for(self, model: nn.Module, loss_fn: LossFn) -> StepFn | None:
        """The step for ``train_loop(..., model, loss_fn, self)``, or ``None`` when the
        loop must take its own autograd step."""
        ...


@runtime_checkable
class WeightedBatchSource(Protocol):
    """A loader whose batches carry a loss weight (a sharded loader's uneven last batch)."""

    def weighted_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """The epoch's batches as ``(X, y, weight)``, the same batches as iterating."""
        ...


@runtime_checkable
class GlobalBatchSized(Protocol):
    """A loader that knows its batch size summed over all processes."""

    global_batch_size: int


class LossClosure(Protocol):
    """The closure of ``optimizer.step(closure)``: clears the gradients, computes the loss
    and its gradients, returns the loss."""

    def __call__(self) -> torch.Tensor: ...

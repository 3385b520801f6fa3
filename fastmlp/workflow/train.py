"""Training: ``fit`` runs an experiment described by a :class:`TrainConfig`.

``TrainConfig`` (what a run computes, its presets and the resume rule) lives in
:mod:`fastmlp.workflow.config`; the tutorial's ``train_loop``/``test_loop`` live in
:mod:`fastmlp.workflow.loops`; both are re-exported here. ``fit`` runs a whole experiment:
data on the device, the fused MLP, optimizer and schedule, bf16 autocast if asked, per-epoch
metrics, plots and atomic checkpoints (:mod:`fastmlp.workflow.checkpoint`) that resume
bit-identically on CPU.

Losses and accuracies accumulate in device tensors; the host reads them once per epoch (and
once every ``log_every`` steps for the progress line), so a GPU is never stalled per step.

Under ``torchrun`` every process runs ``fit``: DistributedDataParallel over a process group
from :mod:`fastmlp.workflow.distributed`, a sharded loader, evaluation summed over ranks, and files
written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import torch
from torch import nn

from fastmlp import hardware
from fastmlp.hardware import resolve_device
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data, distributed
from fastmlp.workflow.config import PRESETS, TrainConfig, resume_config
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.loops import (
    EvalResult,
    evaluate,
    progress_bar,
    test_error_line,
    test_loop,
    train_loop,
)
from fastmlp.workflow.rundir import RunDir
from fastmlp.workflow.whitening import InputWhitening

if TYPE_CHECKING:  # the library is imported where a model is built, not with this module
    from fastmlp.nn import MLP

__all__ = [
    "PRESETS",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "TrainingDiverged",
    "build_model",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "test_loop",
    "train_loop",
]

LogFn = Callable[[str], None]
# train_loop, test_loop, evaluate and EvalResult live in loops; re-exported here so
# `from fastmlp.workflow.train import train_loop, test_loop` reads like the tutorial. TrainConfig
# and PRESETS live in config, re-exported so `from fastmlp.workflow.train import TrainConfig, fit`
# keeps working. resolve_device lives in fastmlp.hardware, re-exported for the same reason.


def build_model(
    sizes: Iterable[int] = (784, 512, 512, 10), device: Any = "cpu", **architecture: Any
) -> MLP:
    """The fused MLP (:class:`fastmlp.nn.MLP`) in the tutorial's layout, on ``device``:
    with ReLU, or as ``architecture`` says (MLP's ``activation``, ``output_activation``,
    ``negative_slope``, ``bias``: what a checkpoint's ``"architecture"`` records).

    A model that does not fit in memory raises :class:`MemoryError` naming the layer that
    did not fit, its size and what the whole model's weights take."""
    from fastmlp.nn import MLP  # needs the compiled extension; fastmlp.workflow.train does not

    sizes = tuple(sizes)
    try:
        return MLP(sizes=sizes, **architecture).to(device)
    except RuntimeError as e:  # CUDA's torch.OutOfMemoryError is a RuntimeError too
        asked = hardware.allocation_bytes(e)
        if asked is None:
            raise
        where = "cpu" if "CPUAllocator" in str(e) else str(device)
        raise MemoryError(_too_big(sizes, where, asked)) from None


def _too_big(sizes: tuple[int, ...], where: str, asked: int) -> str:
    """Which layer of the ``sizes`` MLP an allocation of ``asked`` bytes on ``where`` was for
    (fp32 weights, out x in), and what to do."""
    shapes = list(zip(sizes[1:], sizes[:-1], strict=True))
    total = sum(o * i + o for o, i in shapes) * 4  # weights and biases
    what = f"an allocation of {hardware.format_bytes(asked)} ({asked} bytes)"
    for k, (o, i) in enumerate(shapes, start=1):
        if o * i * 4 == asked:
            what = f"layer {k}'s {o}x{i} weights ({hardware.format_bytes(asked)}, {asked} bytes)"
            break
    return (
        f"not enough memory on {where} for the {'-'.join(map(str, sizes))} MLP: {what} did "
        f"not fit; its weights alone take {hardware.format_bytes(total)}, and training needs "
        "several times that (gradients, optimizer state); use smaller --hidden widths"
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW as the config says.

    SGD is a :class:`fastmlp.optim.FusedSGD` (a ``torch.optim.SGD``), Adam and AdamW a
    :class:`fastmlp.optim.FusedAdam` / :class:`~fastmlp.optim.FusedAdamW` (a
    ``torch.optim.Adam`` / ``AdamW``): when ``train_loop`` is given this very ``model`` it
    runs each step as one fused kernel on the CPU.
    """
    from fastmlp.optim import FusedAdam, FusedAdamW, FusedSGD

    if cfg.optimizer == "sgd":
        return FusedSGD(
            model,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    opt_cls = FusedAdam if cfg.optimizer == "adam" else FusedAdamW
    return opt_cls(model, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedule over the whole run, or ``None`` for a constant rate.

    Short one-cycle runs: the warm-up gets at least 1.5 steps (``OneCycleLR`` needs its
    rising phase to span more than one step; 4 steps at 25% would be exactly one), i.e.
    ``warmup`` becomes ``max(warmup, 1.5 / total_steps)``. A run of a single step has no
    room for a cycle and uses the constant peak rate ``lr``.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        if total < 2:
            return None
        pct = max(cfg.warmup, 1.5 / total)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


@dataclass
class FitResult:
    """What :func:`fit` leaves behind."""

    model: nn.Module
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_accuracy: float = 0.0
    out_dir: Path | None = None
    rank: int = 0  # this process's rank; only rank 0 writes out_dir
    world_size: int = 1


def _versions() -> dict[str, str]:
    import torchvision

    try:
        from importlib.metadata import version

        fastmlp_version = version("fastmlp")
    except Exception:  # running from a source tree that was never installed
        fastmlp_version = "unknown"
    return {
        "fastmlp": fastmlp_version,
        "torch": str(torch.__version__),  # TorchVersion would need pickle
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf or exceeded ``TrainConfig.max_loss``; the run
    stopped before saving the diverged epoch."""


def _is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def fit(
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    log: LogFn | None = print,
) -> FitResult:
    """Train the fused MLP on Fashion-MNIST and evaluate after every epoch.

    ``out_dir`` (if given) receives ``metrics.json``, ``curves.png``, ``confusion.png``,
    ``last.pt`` (every epoch) and ``best.pt`` (best test accuracy so far). ``resume`` is a
    ``last.pt`` to continue from: its saved config is used, and the result is bit-identical
    on CPU to an uninterrupted run; ``config`` then only says where the run goes (its
    ``device``, ``data`` and ``backend``: :func:`fastmlp.workflow.config.resume_config`).
    ``stop_after`` ends this call after that many total epochs, as if interrupted.
    ``progress`` defaults to tqdm bars on a terminal.

    ``epochs`` with ``resume`` continues the run to that many epochs in total (at least
    the epochs already trained). With the ``none`` schedule the run simply goes on; a
    ``cosine`` or ``onecycle`` schedule is laid out again over the new total: from the next
    step on, the learning rate (and one-cycle's momentum) is exactly what a run planned
    for ``epochs`` from the start would use at that step. For a run that had finished its
    schedule this raises the rate again from its final minimum (a warm restart).

    ``out_dir`` belongs to this call while it runs (:class:`fastmlp.workflow.rundir.RunDir`): a
    second run on it fails at once, and one that holds an earlier run's results is refused
    unless ``resume`` lies in it or ``overwrite`` is true (the old results are deleted).

    A loss that turns NaN/inf or exceeds ``config.max_loss`` raises
    :class:`TrainingDiverged` before that epoch is saved: ``last.pt`` keeps the last good
    epoch. ``metrics.json`` is always standard JSON (a non-finite value would be ``null``).

    Launched by ``torchrun`` (see :mod:`fastmlp.workflow.distributed`), every process calls ``fit``
    with the same arguments: the process group is created here and destroyed on the way
    out (or an existing one is used), the model is wrapped in DistributedDataParallel,
    each rank trains on its slice of every global batch of ``batch_size * world_size``
    samples, test results are summed over ranks, and rank 0 alone logs and writes
    ``out_dir``. Every rank reads ``resume`` itself, so it must be reachable from all of
    them. The returned ``model`` is the plain (unwrapped) module on every rank.

    Ctrl-C raises ``KeyboardInterrupt`` and, while ``fit`` runs in the main thread where
    SIGTERM has its default handler, SIGTERM raises
    :class:`fastmlp.workflow.distributed.Terminated` (a ``KeyboardInterrupt``): the checkpoints
    already saved stay whole, no temporary file is left, and ``resume`` continues the run.
    """
    state: dict[str, Any] | None = None
    extended = False
    if resume is not None:
        state = ckpt.load_training_checkpoint(resume)
        saved = _saved_config(state, resume)
        given = vars(config) if config is not None else None
        cfg = resume_config(saved, given, epochs, done=int(state["epoch"]), source=str(resume))
        extended = cfg.epochs != saved.epochs
    elif epochs is not None:
        raise ValueError("epochs= is for resume=; set TrainConfig.epochs for a new run")
    else:
        cfg = config if config is not None else TrainConfig()
    env = distributed.detect_env()  # None: one process, no process group
    device = distributed.device_for_rank(resolve_device(cfg.device), env)
    main = env is None or env.rank == 0
    claim: Any = contextlib.nullcontext()
    if out_dir is not None and main:
        claim = RunDir(out_dir, resume=resume, overwrite=overwrite)
    # SIGTERM (kill, a job scheduler, torchrun) stops the run like Ctrl-C: cleanly, resumable.
    with (
        distributed.sigterm_raises_interrupt(),
        claim,
        distributed.process_group(cfg.backend, device) as ctx,
    ):
        return _fit(cfg, ctx, device, out_dir, state, resume, stop_after, progress, log, extended)


def _saved_config(state: dict[str, Any], path: str | os.PathLike[str]) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path} cannot be resumed: bad config: {e}") from None


@dataclass
class _TrainingRun:
    """What one :func:`fit` call trains with: made by ``_build``, advanced by every epoch."""

    cfg: TrainConfig
    ctx: distributed.Context
    device: torch.device
    precision: str  # as resolved: fp32 or bf16
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    train_samples: int  # in the training split, after --train-samples
    model: MLP
    net: nn.Module  # the model, or DistributedDataParallel around it (_distribute)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    whitening: InputWhitening | None  # what the loaders apply (cfg.whiten), else None
    record: dict[str, Any]  # the config as checkpoints and metrics.json keep it
    meta: dict[str, Any]  # where it ran (device, machine, versions), for metrics.json
    say: LogFn
    progress: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = 0.0
    start: int = 0  # epochs trained before this call
    last_eval: EvalResult | None = None


def _fit(
    cfg: TrainConfig,
    ctx: distributed.Context,
    device: torch.device,
    out_dir: str | os.PathLike[str] | None,
    state: dict[str, Any] | None,
    resume: str | os.PathLike[str] | None,
    stop_after: int | None,
    progress: bool | None,
    log: LogFn | None,
    extended: bool = False,
) -> FitResult:
    """:func:`fit` inside its process group, stage by stage: build the run, restore it from
    the checkpoint, wrap it for DDP, then train and save one epoch at a time, and finish."""
    main = ctx.is_main
    progress = main and (_is_tty() if progress is None else progress)
    say: LogFn = (lambda s: None) if log is None or progress or not main else log
    if state is not None:
        _check_world_size(state, ctx, resume)
    out = Path(out_dir) if out_dir is not None else None  # claimed by fit() on rank 0

    run = _build(cfg, ctx, device, say, progress, state)
    if state is not None:
        _restore(run, state, resume, extended)
    _distribute(run)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    epoch_bar = progress_bar(cfg.epochs, "epochs", progress)
    if epoch_bar is not None:
        epoch_bar.update(run.start)
    for epoch in range(run.start, end):
        accuracy = _train_epoch(run, epoch, out)["test_accuracy"]
        is_best = accuracy > run.best
        run.best = max(run.best, accuracy)
        if epoch_bar is not None:
            epoch_bar.set_postfix(acc=f"{accuracy:.4f}", best=f"{run.best:.4f}")
            epoch_bar.update(1)
        if out is not None and main:
            _save(run, out, epoch + 1, is_best)
    if epoch_bar is not None:
        epoch_bar.close()
    return _finish(run, out)


def _check_world_size(
    state: dict[str, Any], ctx: distributed.Context, path: str | os.PathLike[str] | None
) -> None:
    trained_by = int(state["config"].get("world_size", 1))
    if trained_by != ctx.world_size:
        raise ValueError(
            f"{path} was trained by {trained_by} process(es) and this run has "
            f"{ctx.world_size}: the global batch, steps per epoch and schedule depend on "
            f"it; resume with {trained_by} process(es)"
        )


def _build(
    cfg: TrainConfig,
    ctx: distributed.Context,
    device: torch.device,
    say: LogFn,
    progress: bool,
    state: dict[str, Any] | None = None,
) -> _TrainingRun:
    """Data on the device (whitened for ``cfg.whiten``: as saved in ``state`` when resuming,
    so the run continues on exactly the same inputs), its loaders, the model, optimizer,
    schedule and loss, and the config and machine as the outputs record them."""
    if ctx.distributed and device.type == "cpu" and ctx.local_world_size > 1:
        distributed.split_cpu_threads(ctx)
    inputs = _build_inputs(cfg, ctx, device, state)
    # "auto" becomes bf16 only where the hardware computes it natively; an explicit bf16
    # on a CPU that emulates it runs, with a warning (fastmlp.hardware).
    precision = hardware.resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.sizes, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(inputs.train_loader))
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.CrossEntropyLoss(
        label_smoothing=cfg.label_smoothing
    )
    return _TrainingRun(
        cfg=cfg,
        ctx=ctx,
        device=device,
        precision=precision,
        train_loader=inputs.train_loader,
        test_loader=inputs.test_loader,
        train_samples=inputs.train_samples,
        model=model,
        net=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        whitening=inputs.whitening,
        record=_run_record(cfg, ctx, precision),
        meta=_run_meta(device, inputs.preprocess_seconds),
        say=say,
        progress=progress,
    )


class _Inputs(NamedTuple):
    """What :func:`_build_inputs` makes: the loaders and how their data was prepared."""

    train_loader: DeviceLoader
    test_loader: DeviceLoader
    train_samples: int  # in the training split, after --train-samples
    whitening: InputWhitening | None
    preprocess_seconds: float  # whitening estimated and applied (0 without it)


class _Shard(TypedDict):
    """The :class:`DeviceLoader` arguments both splits' loaders share: this rank's shard."""

    rank: int
    world_size: int
    device: torch.device
    transform: Callable[[torch.Tensor], torch.Tensor] | None


def _build_inputs(
    cfg: TrainConfig,
    ctx: distributed.Context,
    device: torch.device,
    state: dict[str, Any] | None,
) -> _Inputs:
    """Both splits on the device, checked against the global batch, whitened for
    ``cfg.whiten``, in this rank's (sharded) loaders."""
    train_x, train_y = data.load_split(True, cfg.data)
    if cfg.train_samples is not None:
        train_x, train_y = train_x[: cfg.train_samples], train_y[: cfg.train_samples]
    global_batch = cfg.batch_size * ctx.world_size
    if global_batch > len(train_y):
        raise ValueError(
            f"batch size {global_batch} is larger than the {len(train_y)} training samples; "
            f"use --batch-size {len(train_y) // ctx.world_size} or less"
        )
    test_x, test_y = data.load_split(False, cfg.data)
    t0 = time.perf_counter()
    whitening = _whitening(cfg, train_x, device, state, ctx)
    shard = _Shard(rank=ctx.rank, world_size=ctx.world_size, device=device, transform=whitening)
    train_loader = DeviceLoader(
        train_x,
        train_y,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        augment=cfg.augment,
        max_shift=cfg.max_shift,
        **shard,
    )
    test_loader = DeviceLoader(test_x, test_y, cfg.eval_batch_size, **shard)
    # Not part of any epoch's seconds, so recorded on its own (0 without whitening).
    preprocess_seconds = time.perf_counter() - t0 if whitening is not None else 0.0
    return _Inputs(train_loader, test_loader, len(train_y), whitening, preprocess_seconds)


def _run_record(cfg: TrainConfig, ctx: distributed.Context, precision: str) -> dict[str, Any]:
    """The config as checkpoints and metrics.json keep it.

    It keeps the device as asked ("auto"; the device actually used is in the meta), and
    records the process-group backend in use (as asked without one) and the world size,
    which a resume must match."""
    return {
        **asdict(cfg),
        "sizes": list(cfg.sizes),
        "backend": ctx.backend or cfg.backend,
        "world_size": ctx.world_size,
        "precision_used": precision,  # "precision" is as asked (auto, fp32, bf16)
    }


def _run_meta(device: torch.device, preprocess_seconds: float) -> dict[str, Any]:
    """Where the run ran, for metrics.json."""
    return {
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "machine": hardware.describe(device),  # CPU model and ISA flags: bf16 speed
        "preprocess_seconds": preprocess_seconds,  # whitening estimated and applied
        "versions": _versions(),
    }


def _whitening(
    cfg: TrainConfig,
    train_x: torch.Tensor,
    device: torch.device,
    state: dict[str, Any] | None,
    ctx: distributed.Context,
) -> InputWhitening | None:
    """The run's input whitening: the checkpoint's when resuming, else estimated from the
    training images (uint8) on ``device``; ``None`` unless ``cfg.whiten``. Under torchrun
    every rank uses rank 0's (ranks with other thread counts could round differently)."""
    if not cfg.whiten:
        return None
    if state is not None:
        return InputWhitening.from_state_dict(state["whitening"]).to(device)
    whitening = InputWhitening.fit(train_x.to(device).float().div_(255.0))
    if ctx.distributed:
        for tensor in (whitening.mean, whitening.matrix):
            torch.distributed.broadcast(tensor, src=0)
    return whitening


def _saved_model(run: _TrainingRun) -> nn.Module:
    """The model as saved and returned: for raw pixels (whitening folded in) either way."""
    return run.whitening.fold(run.model) if run.whitening is not None else run.model


def _restore(
    run: _TrainingRun, state: dict[str, Any], path: str | os.PathLike[str] | None, extended: bool
) -> None:
    """Continue from a training checkpoint: its model, optimizer, random generators and
    history; its schedule as saved, or for a run ``extended`` to more epochs laid out again
    over the new total."""
    cfg, say = run.cfg, run.say
    scheduler = None if extended else run.scheduler
    ckpt.restore_training(state, run.model, run.optimizer, scheduler, str(path))
    run.history = list(state["metrics"])
    run.best, run.start = float(state["best_accuracy"]), state["epoch"]
    say(f"Resuming from {path} after epoch {run.start}")
    if run.start >= cfg.epochs:
        say(
            f"{path} has already trained all {cfg.epochs} epochs: nothing to do "
            "(continue it with --epochs N)"
        )
    if extended and run.scheduler is not None:
        _replay_schedule(run.optimizer, run.scheduler, run.start * len(run.train_loader))
        say(
            f"Extending the {cfg.schedule} schedule to {cfg.epochs} epochs: from "
            f"epoch {run.start + 1} the learning rate follows the {cfg.epochs}-epoch schedule"
        )


def _distribute(run: _TrainingRun) -> None:
    """Under torchrun: DistributedDataParallel around the model (the loader's per-batch
    weights keep the loss the global batch's mean; see ``DeviceLoader.weighted_batches``).
    After the restore: DDP makes every rank start from rank 0's parameters."""
    ctx, model, device = run.ctx, run.model, run.device
    net: nn.Module = model
    if ctx.distributed:
        # DDP broadcasts rank 0's parameters now and averages gradients in buckets while
        # backward runs (the fused op's weight grads arrive through ordinary AccumulateGrad
        # hooks). The optimizer keeps stepping `model`'s parameters: DDP shares them.
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run.net = net


def _train_epoch(run: _TrainingRun, epoch: int, out: Path | None) -> dict[str, float]:
    """Train one epoch, stop if it diverged, evaluate, and append the epoch's history row."""
    cfg, ctx, device = run.cfg, run.ctx, run.device
    train_loader, net, loss_fn = run.train_loader, run.net, run.loss_fn
    optimizer, scheduler = run.optimizer, run.scheduler
    precision, say, progress = run.precision, run.say, run.progress
    say(f"Epoch {epoch + 1}\n-------------------------------")
    train_loader.set_epoch(epoch)
    t0 = time.perf_counter()
    with flush_denormals():
        train_loss = train_loop(
            train_loader,
            net,
            loss_fn,
            optimizer,
            scheduler,
            precision=precision,
            log=say,
            progress=progress,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    train_loss = distributed.mean_over_ranks(train_loss, ctx)
    _check_diverged(train_loss, epoch + 1, cfg, out if ctx.is_main else None)
    run.last_eval = _evaluate(run.model, run.test_loader, ctx)
    say(test_error_line(run.last_eval))
    steps = len(train_loader)
    drop_last = train_loader.drop_last
    trained = steps * train_loader.global_batch_size if drop_last else run.train_samples
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "test_loss": run.last_eval.loss,
        "test_accuracy": run.last_eval.accuracy,
        "seconds": seconds,
        "samples_per_s": trained / seconds,
    }
    run.history.append(row)
    return row


def _save(run: _TrainingRun, out: Path, epoch: int, is_best: bool) -> None:
    """``last.pt`` (and ``best.pt`` for a new best) and ``metrics.json`` after ``epoch``."""
    state = ckpt.training_state(
        model=_saved_model(run),
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        epoch=epoch,
        config=run.record,
        metrics=run.history,
        best_accuracy=run.best,
        versions=run.meta["versions"],
        trained_model=run.model if run.whitening is not None else None,
        whitening=run.whitening.state_dict() if run.whitening is not None else None,
    )
    metrics = {"config": run.record, "epochs": run.history, "best_test_accuracy": run.best}
    try:
        ckpt.save_checkpoint(state, out / "last.pt")
        if is_best:
            ckpt.save_checkpoint(state, out / "best.pt")
        ckpt.save_json({**metrics, **run.meta}, out / "metrics.json")
    except ckpt.CheckpointWriteError as e:
        again = (
            f"continue with: fastmlp train --resume {out / 'last.pt'}"
            if (out / "last.pt").is_file()
            else "then start again"
        )
        raise ckpt.CheckpointWriteError(
            f"{e}; epoch {epoch} is not fully saved; free space, {again}"
        ) from None


def _finish(run: _TrainingRun, out: Path | None) -> FitResult:
    """Plots, the summary line, and (under torchrun) a wait for rank 0's files."""
    ctx = run.ctx
    if out is not None and run.history:
        from fastmlp.workflow import plots

        if run.last_eval is None:  # resumed a finished run: nothing trained, plot the saved model
            run.last_eval = _evaluate(run.model, run.test_loader, ctx)
        if ctx.is_main:
            plots.save_curves(run.history, out / "curves.png")
            plots.save_confusion(run.last_eval.confusion, data.CLASSES, out / "confusion.png")
    if run.history:
        seconds = [h["seconds"] for h in run.history]
        final = run.history[-1]["test_accuracy"]
        run.say(
            f"Done! best test accuracy {100 * run.best:.2f}% (final {100 * final:.2f}%), "
            f"{sum(seconds):.1f} s of training, {_median(seconds):.2f} s/epoch (median)"
        )
    if ctx.distributed:
        torch.distributed.barrier()  # no rank returns before rank 0's files are written
    return FitResult(
        model=_saved_model(run),
        epochs=run.history,
        best_accuracy=run.best,
        out_dir=out,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


@contextlib.contextmanager
def flush_denormals() -> Any:
    """Floats below 1.2e-38 (denormals) count as zero on this thread while the block runs,
    then the previous mode returns.

    Why: SGD's momentum buffer of a ReLU unit that stopped firing decays by the momentum
    every step and passes through the denormal range, where x86 arithmetic is many times
    slower (~12% on ``--preset fast``'s epochs: docs/benchmarks.md). Values that small
    change no prediction. ``torch.set_flush_denormal`` has no getter: a denormal that reads
    as zero shows the mode is already on.
    """
    was_on = bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def _check_diverged(loss: float, epoch: int, cfg: TrainConfig, out: Path | None) -> None:
    """Raise :class:`TrainingDiverged` for a NaN/inf loss or one above ``cfg.max_loss``."""
    if math.isfinite(loss) and (cfg.max_loss is None or loss <= cfg.max_loss):
        return
    what = "is not finite" if not math.isfinite(loss) else f"exceeds --max-loss {cfg.max_loss:g}"
    if out is not None and (out / "last.pt").is_file():
        kept = f"{out / 'last.pt'} keeps epoch {epoch - 1}, the last good one"
    else:
        kept = "no checkpoint was saved"
    raise TrainingDiverged(
        f"training diverged in epoch {epoch}: mean train loss {loss:.4g} {what}; {kept}; "
        f"try a lower --lr (this run: {cfg.lr:g})"
    )


def _replay_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int
) -> None:
    """Bring a freshly made ``scheduler`` (for the extended total) to step ``steps`` from the
    schedule's start, so the learning rate is what a run planned for the new total has
    there. The optimizer state loaded from the checkpoint holds the old schedule's rate;
    chainable schedules (cosine) step from the current rate, so start them from the
    initial one."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": no optimizer step is due here.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def _evaluate(model: nn.Module, loader: DeviceLoader, ctx: distributed.Context) -> EvalResult:
    """:func:`evaluate` on this rank's shard, summed over ranks: the same result everywhere.

    Always in fp32, whatever precision trains: the weights are fp32 (bf16 training keeps
    fp32 master weights), so the accuracy recorded for a checkpoint is the one a user gets
    by loading it into the tutorial's fp32 model (``fastmlp evaluate``)."""
    return distributed.eval_result_over_ranks(evaluate(model, loader, "fp32"), ctx)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else 0.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()

"""Several processes, one model: PyTorch's own distributed engine, as torchrun sets it up.

``fastmlp train`` (and :func:`fastmlp.workflow.train.fit`) run unchanged under ``torchrun``: the
launcher exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`detect_env` reads them, :func:`process_group` initializes the
default process group from them (gloo on CPU, NCCL on CUDA unless told otherwise) and
destroys it again however the run ends. Without any of those variables nothing here does
anything: one process, no process group, exactly as before.

The pieces training needs on top of ``DistributedDataParallel`` live here too: sums over
ranks (:func:`all_reduce_sum`; the mean of a number, :func:`mean_over_ranks`; a whole
evaluation result, :func:`eval_result_over_ranks`) and the CPU thread split between
ranks that share a machine (:func:`split_cpu_threads`). The loss weights that keep an
uneven last batch exact come with the batches
(:meth:`fastmlp.workflow.loader.DeviceLoader.weighted_batches`;
:func:`fastmlp.workflow.loops.train_loop` applies them).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from fastmlp.workflow.loops import EvalResult

__all__ = [
    "BACKENDS",
    "ENV_VARS",
    "Context",
    "DistEnv",
    "Terminated",
    "all_reduce_sum",
    "detect_env",
    "device_for_rank",
    "eval_result_over_ranks",
    "mean_over_ranks",
    "process_group",
    "resolve_backend",
    "sigterm_raises_interrupt",
    "split_cpu_threads",
]

#: What torchrun exports to every worker; all five are needed to join a process group.
ENV_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Any of these marks the process as one of several; MASTER_* alone is only an address.
_TRIGGERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: ``auto`` picks NCCL for CUDA devices and gloo for the CPU.
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistEnv:
    """The launcher's description of this process, read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank 0 of 1 with ``backend=None`` in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # the process group's backend; None: no process group

    @property
    def distributed(self) -> bool:
        """True when a process group exists (even one of a single rank)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    text = environ[name]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} must be {bound}")
    return value


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The distributed launch described by ``environ`` (default ``os.environ``), if any.

    Returns ``None`` when none of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` is set: a plain
    single-process run. When some are set, all of :data:`ENV_VARS` must be, with consistent
    values; otherwise a :class:`ValueError` names what is missing or wrong (a half-configured
    environment would otherwise hang in rendezvous or silently train alone).
    ``LOCAL_WORLD_SIZE`` (processes on this machine) is optional and defaults to
    ``WORLD_SIZE``, as on a single machine.
    """
    env = os.environ if environ is None else environ
    present = [v for v in _TRIGGERS if v in env]
    if not present:
        return None
    missing = [v for v in ENV_VARS if not env.get(v)]
    if missing:
        raise ValueError(
            f"incomplete distributed environment: {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. torchrun sets all of "
            f"{', '.join(ENV_VARS)}; unset {', '.join(present)} to train in one process."
        )
    world_size = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0, world_size - 1)
    local_world_size = (
        _int_var(env, "LOCAL_WORLD_SIZE", 1, world_size)
        if env.get("LOCAL_WORLD_SIZE")
        else world_size
    )
    local_rank = _int_var(env, "LOCAL_RANK", 0, local_world_size - 1)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=env["MASTER_ADDR"],
        master_port=_int_var(env, "MASTER_PORT", 1, 65535),
    )


def device_for_rank(device: torch.device, env: DistEnv | None) -> torch.device:
    """One GPU per process: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``.

    An explicit index (``cuda:1``) is kept as given; CPU devices are shared by all ranks.
    """
    index: int | None = device.index  # torch types it int, but a bare "cuda" has None
    if device.type != "cuda" or index is not None:
        return device
    if env is None:
        if dist.is_available() and dist.is_initialized():  # the caller chose the GPU
            return torch.device("cuda", torch.cuda.current_device())
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={env.local_rank} needs GPU {env.local_rank} but only {count} "
            f"{'is' if count == 1 else 'are'} visible: start at most {count} processes per "
            "machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", env.local_rank)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is NCCL for CUDA devices and gloo for the CPU; checks the choice is usable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed support")
    name = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if name == "nccl" and device.type != "cuda":
        raise ValueError("backend 'nccl' needs CUDA devices; use gloo on the CPU")
    available = dist.is_nccl_available() if name == "nccl" else dist.is_gloo_available()
    if not available:
        raise ValueError(f"backend {name!r} is not available in this PyTorch build")
    return name


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised inside :func:`sigterm_raises_interrupt` as an interrupt (Ctrl-C)."""


@contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``), so it
    takes the same clean way out as Ctrl-C: ``finally`` blocks run, a checkpoint being
    written is abandoned without leaving its temporary file, the output folder is released.

    Python's default for SIGTERM is to die on the spot, skipping all of that. ``kill``, job
    schedulers and torchrun send it (torchrun starts workers in their own sessions: Ctrl-C
    reaches only the launcher, which passes SIGINT on, but it stops the survivors of a failed
    rank, and the whole job when it is itself terminated, with SIGTERM). The handler is
    installed only in the main thread and only over the default one, so a handler of the
    caller's own is untouched; the previous one is back when the block ends.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    return int(text) if text.isdigit() else default


@contextmanager
def process_group(backend: str = "auto", device: torch.device | str = "cpu") -> Iterator[Context]:
    """The default process group for the duration of a ``with`` block.

    * A process group that already exists (initialized by the caller) is used as it is and
      left for its owner to destroy.
    * Otherwise, without launcher variables (:func:`detect_env` is ``None``): a single
      process, ``Context()``; nothing is initialized.
    * Otherwise the group is initialized from the environment (``init_method="env://"``,
      which also joins torchrun's own store) with ``backend`` (see
      :func:`resolve_backend`) and destroyed when the block ends: on success, on an
      exception, on Ctrl-C, and on SIGTERM, which is turned into ``KeyboardInterrupt``
      inside the block (:func:`sigterm_raises_interrupt`).
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        yield Context(
            rank=dist.get_rank(),
            world_size=world,
            local_rank=_env_int("LOCAL_RANK", 0),
            local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
            backend=str(dist.get_backend()),
        )
        return
    env = detect_env()
    if env is None:
        yield Context()
        return
    name = resolve_backend(backend, device)
    with sigterm_raises_interrupt():
        # NCCL binds the process to its GPU at init (device_id) instead of guessing later.
        extra: dict[str, Any] = {"device_id": device} if name == "nccl" else {}
        dist.init_process_group(
            name, init_method="env://", rank=env.rank, world_size=env.world_size, **extra
        )
        try:
            yield Context(
                rank=env.rank,
                world_size=env.world_size,
                local_rank=env.local_rank,
                local_world_size=env.local_world_size,
                backend=name,
            )
        finally:
            dist.destroy_process_group()


def split_cpu_threads(ctx: Context) -> int:
    """Give each of the ``LOCAL_WORLD_SIZE`` ranks on this machine an equal share of its cores.

    Called for CPU training with several local ranks: PyTorch would otherwise start as many
    threads per process as the machine has cores (oversubscribed N times), and torchrun's
    default ``OMP_NUM_THREADS=1`` leaves most cores of a large machine idle. Returns the
    number of threads set.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(ctx.local_world_size, 1))
    torch.set_num_threads(threads)
    return threads


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a copy; ``tensor`` itself is kept).

    Identical on every rank. NCCL reduces on the GPU, so the sum travels through the current
    CUDA device there; the result comes back on ``tensor``'s device.
    """
    if not ctx.distributed:
        return tensor.clone()
    comm = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else "cpu"
    buf = tensor.detach().to(comm, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def mean_over_ranks(value: float, ctx: Context) -> float:
    """The mean of ``value`` over all ranks (``value`` itself in a single process)."""
    if ctx.world_size == 1:
        return value
    total = all_reduce_sum(torch.tensor([value], dtype=torch.float64), ctx)
    return float(total[0]) / ctx.world_size


def eval_result_over_ranks(result: EvalResult, ctx: Context) -> EvalResult:
    """One rank's :class:`fastmlp.workflow.loops.EvalResult` (on its shard) combined over all ranks:
    the whole test set's accuracy, mean loss and confusion matrix, identical everywhere."""
    if ctx.world_size == 1:
        return result
    n = int(result.confusion.sum())
    # One collective: the loss sum and the counts (exact in float64 up to 2**53).
    local = torch.cat(
        [torch.tensor([result.loss * n], dtype=torch.float64), result.confusion.flatten()]
    )
    total = all_reduce_sum(local, ctx)
    cm = total[1:].round().long().view_as(result.confusion)
    count = max(int(cm.sum()), 1)
    return dataclasses.replace(
        result, accuracy=float(cm.diag().sum()) / count, loss=float(total[0]) / count, confusion=cm
    )

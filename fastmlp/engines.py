"""Which engine fastmlp's whole-MLP ops run, on the CPU and on a GPU, and why.

**CPU.** Three paths implement ``fastmlp::mlp``, ``mlp_inference`` and ``mlp_backward``:
``layered`` (layer by layer over the whole batch, each layer's GEMM split over threads
by output features, bias and activation fused in), ``row_blocked`` (a block of rows goes
through every layer before the next block, so its activations stay in cache; backward
likewise) and ``aten`` (eager PyTorch's own ops, bit for bit). The first call of each
shape class measures every path that can run it and keeps the fastest for the process
(:func:`set_cpu_tuning`; ``FASTMLP_CPU_TUNE=off`` keeps the built-in rule of
``csrc/cpu/paths/rule.cpp``, whose crossovers are stated there and in docs/cpu.md).
:func:`cpu_path` says which path a shape takes and why (rule, measured or forced);
``FASTMLP_CPU_PATH=layered|row_blocked|aten`` (read once per process) and
:func:`set_cpu_path` force one for the process, :func:`force_cpu_path` for the calling
thread within a ``with`` block (tests run every path so). All paths compute the same
function; results differ only by rounding.

**CUDA.**

Three engines implement the ops on CUDA: ``custom`` (fastmlp's own tensor-core
kernels), ``cublaslt`` (cuBLASLt GEMMs with fastmlp's mask and ReLU passes) and
``aten`` (plain ATen ops, correct on every GPU). A fast engine is used by default
(``FASTMLP_CUDA_ENGINE=auto``) only where a recorded GPU run has validated it for
that GPU generation and precision: the validated-engine table in
``csrc/cuda/engine_rule.cpp``, which ``scripts/gpu_check.sh`` fills from a run whose
tests all passed. Everywhere else ``auto`` runs ``aten``.

``FASTMLP_CUDA_ENGINE=custom|cublaslt|aten`` forces an engine; an unvalidated one
runs with a warning, once per process for each engine, GPU generation and
precision. The variable is read once per process; :func:`set_cuda_engine` and
:func:`cuda_engine` switch it at run time (tests use them).

The rule is host code compiled into every build, so :func:`cuda_engine_report`
also answers for a given compute capability on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastmlp import _C  # noqa: F401  (registers torch.ops.fastmlp._cuda_*)

__all__ = [
    "CPU_PATHS",
    "CPU_PHASES",
    "CpuPathChoice",
    "cpu_float_gemm",
    "cpu_path",
    "cpu_path_report",
    "check_cpu_path_environment",
    "clear_measured_cpu_paths",
    "cpu_tuning",
    "force_cpu_path",
    "set_cpu_tuning",
    "requested_cpu_path",
    "set_cpu_path",
    "ENGINES",
    "ENGINE_PRECISIONS",
    "EngineChoice",
    "cuda_engine",
    "cuda_engine_report",
    "engine_choice",
    "format_report",
    "requested_cuda_engine",
    "set_cuda_engine",
    "validated_engines",
]

ENGINES = ("auto", "custom", "cublaslt", "aten")
# The precisions the engine table and rule know (not the training precisions,
# hardware.TRAIN_PRECISIONS). float32 is "fp32" (exact) or "tf32", as
# torch.backends.cuda.matmul.allow_tf32 says.
ENGINE_PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp64")

# The product the report asks about by default: the tutorial MLP's 512x512
# hidden layer at batch 64 (2*M*N*K flops).
_DEFAULT_FLOPS = 2.0 * 64 * 512 * 512


@dataclass(frozen=True)
class EngineChoice:
    """The engine one precision would use, and why.

    ``reason`` is ``"validated"`` (a recorded GPU run proved it), ``"fallback"``
    (nothing validated applies: ``aten``) or ``"forced"`` (FASTMLP_CUDA_ENGINE).
    """

    precision: str
    engine: str
    reason: str
    detail: str


CPU_PATHS = ("auto", "layered", "row_blocked", "aten")
# What an MLP call computes: forward saving for backward, forward only (no_grad,
# inference_mode), or backward.
CPU_PHASES = ("train", "inference", "backward")


@dataclass(frozen=True)
class CpuPathChoice:
    """The CPU path one phase of an MLP call takes, and why (``"forced"`` when forced).

    ``source`` is ``"forced"``, ``"measured"`` (the fastest path timed at the first call of
    this shape class in this process) or ``"rule"`` (the built-in rule: before a call of
    this shape class was measured, or with tuning off)."""

    phase: str
    path: str
    reason: str
    source: str = "rule"


def set_cpu_path(name: str | None) -> None:
    """Run the CPU whole-MLP ops on path ``name`` (one of :data:`CPU_PATHS`) from now on
    in this whole process, every thread; ``None`` or ``"auto"`` goes back to the rule. A
    thread inside :func:`force_cpu_path` keeps the path forced there."""
    torch.ops.fastmlp._set_cpu_path(_check_path(name))


def _check_path(name: str | None) -> str | None:
    if name is not None and name not in CPU_PATHS:
        raise ValueError(f"CPU path must be one of {', '.join(CPU_PATHS)}; got {name!r}")
    return name


def requested_cpu_path() -> str:
    """The CPU path forced for the calling thread: by :func:`force_cpu_path` on this
    thread, else for the process (``FASTMLP_CPU_PATH`` or :func:`set_cpu_path`); else
    ``"auto"``."""
    return torch.ops.fastmlp._cpu_requested_path()


def check_cpu_path_environment() -> None:
    """Raise ``ValueError`` (one line) if ``FASTMLP_CPU_PATH`` is set to something other than
    a CPU path, or ``FASTMLP_CPU_TUNE`` to something other than on or off. Commands call it
    first, so that a typo stops them before any work; the ops would raise at their first
    call otherwise."""
    value = os.environ.get("FASTMLP_CPU_PATH", "")
    if value and value not in CPU_PATHS:
        raise ValueError(
            f"FASTMLP_CPU_PATH={value!r} is not a CPU path: expected one of "
            f"{', '.join(CPU_PATHS)} (or unset)"
        )
    tune = os.environ.get("FASTMLP_CPU_TUNE", "")
    if tune not in ("", "on", "off"):
        raise ValueError(f"FASTMLP_CPU_TUNE={tune!r}: expected on or off (or unset)")


@contextlib.contextmanager
def force_cpu_path(name: str) -> Iterator[None]:
    """Context manager: run the CPU whole-MLP ops called from this thread on path ``name``
    (``"auto"``: the rule, whatever the process forces), then restore what this thread had.

    It is thread-local: contexts in other threads, entered or left in any order, neither
    see nor undo it, and nested contexts restore the outer one. A backward runs the path
    forced where ``backward()`` is called. :func:`set_cpu_path` forces a path for the
    whole process instead."""
    previous = torch.ops.fastmlp._set_thread_cpu_path(_check_path(name))
    try:
        yield
    finally:
        torch.ops.fastmlp._set_thread_cpu_path(previous)


def cpu_float_gemm() -> str:
    """What computes the row-blocked path's float32 GEMMs here: ``"onednn_brgemm"``
    (oneDNN's micro-kernel inside torch, the fast case), ``"mkl_sgemm"`` or ``"none"``
    (this torch has neither: the row-blocked path cannot run float32)."""
    return torch.ops.fastmlp._cpu_float_gemm()


def cpu_path(
    widths: Sequence[int],
    batch: int,
    dtype: torch.dtype = torch.float32,
    phase: str = "train",
) -> CpuPathChoice:
    """The path the CPU ops take for an MLP of ``widths`` (in_features, then each layer's
    out_features) over ``batch`` rows of ``dtype``, in ``phase`` (one of
    :data:`CPU_PHASES`), and why. Raises if a path is forced that cannot run ``dtype``."""
    if phase not in CPU_PHASES:
        raise ValueError(f"phase must be one of {', '.join(CPU_PHASES)}; got {phase!r}")
    widths, batch = _checked_widths(widths), _checked_batch(batch)
    path, reason, source = torch.ops.fastmlp._cpu_path(batch, widths, dtype, phase)
    return CpuPathChoice(phase, path, reason, source)


def set_cpu_tuning(on: bool) -> None:
    """Whether the first call of each shape class measures every CPU path and keeps the
    fastest (on by default; ``FASTMLP_CPU_TUNE=off`` starts a process with it off). Off:
    the built-in rule, whose choice is the same from run to run. Paths measured earlier
    in the process stay chosen while it is on (:func:`clear_measured_cpu_paths`)."""
    torch.ops.fastmlp._set_cpu_tuning(bool(on))


def cpu_tuning() -> bool:
    """Whether CPU paths are measured at the first call of a shape class."""
    return bool(torch.ops.fastmlp._cpu_tuning())


def clear_measured_cpu_paths() -> None:
    """Forget the paths measured in this process: the next call of each shape class is
    measured again."""
    torch.ops.fastmlp._clear_measured_cpu_paths()


# The rule takes widths and rows as C++ int64s: a larger Python int cannot be passed.
_INT64_MAX = 2**63 - 1


def _checked_widths(widths: Sequence[int]) -> list[int]:
    """``widths`` as ints, or the ValueError :func:`cpu_path` raises (and the report
    command prints after ``argument --widths:``)."""
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(
            "widths must list in_features and each layer's out_features (at least 2 "
            f"positive numbers); got {widths}"
        )
    if max(widths) > _INT64_MAX:
        raise ValueError(
            f"widths must be at most 2**63 - 1 (the C++ rule takes int64); got {max(widths)}"
        )
    return widths


def _checked_batch(batch: int) -> int:
    """``batch`` as an int, or the ValueError :func:`cpu_path` raises."""
    batch = int(batch)
    if batch < 0:
        raise ValueError(f"batch must be >= 0; got {batch}")
    if batch > _INT64_MAX:
        raise ValueError(f"batch must be at most 2**63 - 1 (the C++ rule takes int64); got {batch}")
    return batch


def cpu_path_report(
    widths: Sequence[int], batch: int, dtype: torch.dtype = torch.float32
) -> list[CpuPathChoice]:
    """:func:`cpu_path` for each of :data:`CPU_PHASES`."""
    return [cpu_path(widths, batch, dtype, phase) for phase in CPU_PHASES]


def set_cuda_engine(name: str | None) -> None:
    """Use engine ``name`` (one of :data:`ENGINES`) from now on in this process;
    ``None`` reads ``FASTMLP_CUDA_ENGINE`` again. Also re-arms the one-time
    warnings about unvalidated engines."""
    if name is not None and name not in ENGINES:
        raise ValueError(f"CUDA engine must be one of {', '.join(ENGINES)}; got {name!r}")
    torch.ops.fastmlp._set_cuda_engine(name)


def requested_cuda_engine() -> str:
    """The engine this process asked for (``FASTMLP_CUDA_ENGINE`` or :func:`set_cuda_engine`)."""
    return torch.ops.fastmlp._cuda_requested_engine()


@contextlib.contextmanager
def cuda_engine(name: str) -> Iterator[None]:
    """Context manager: run with engine ``name``, then go back to ``FASTMLP_CUDA_ENGINE``."""
    set_cuda_engine(name)
    try:
        yield
    finally:
        set_cuda_engine(None)


def validated_engines() -> list[str]:
    """The recorded table as ``"<capability> <precision> <engine> <max_flops>"`` lines,
    capability as major*10+minor (90: H100/H200). Empty until a GPU run validates one."""
    return list(torch.ops.fastmlp._cuda_validated_engines())


def engine_choice(
    capability: int,
    precision: str,
    flops: float = _DEFAULT_FLOPS,
    fits_custom: bool = True,
    table: Sequence[str] | None = None,
) -> EngineChoice:
    """The rule the ops apply, for one case: compute ``capability`` (major*10+minor),
    ``precision`` (one of :data:`ENGINE_PRECISIONS`), a product of ``flops`` (2*M*N*K).
    ``table`` replaces the recorded one (entries as :func:`validated_engines` prints them)."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(ENGINE_PRECISIONS)}; got {precision!r}"
        )
    engine, reason, detail = torch.ops.fastmlp._cuda_engine_choice(
        int(capability),
        precision,
        float(flops),
        bool(fits_custom),
        None if table is None else list(table),
    )
    return EngineChoice(precision, engine, reason, detail)


def cuda_engine_report(
    device: torch.device | str | int | None = None,
    *,
    capability: tuple[int, int] | None = None,
    flops: float = _DEFAULT_FLOPS,
) -> list[EngineChoice]:
    """Which engine each precision would use on ``device`` (default: the current CUDA
    device), or on a GPU of compute ``capability`` such as ``(9, 0)``, for a product of
    ``flops`` (default: the tutorial MLP's hidden layer at batch 64), and why."""
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "cuda_engine_report: no CUDA device here; pass capability=(major, minor) "
                "to ask about a GPU generation"
            )
        capability = torch.cuda.get_device_capability(device)
    cc = capability[0] * 10 + capability[1]
    return [engine_choice(cc, p, flops) for p in ENGINE_PRECISIONS]


def format_report(report: Sequence[EngineChoice]) -> str:
    """The report as a small aligned table."""
    rows = [("precision", "engine", "reason", "detail")]
    rows += [(c.precision, c.engine, c.reason, c.detail) for c in report]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    )


def _widths_arg(text: str) -> list[int]:
    """``--widths``: comma-separated positive integers, at least 2, each an int64."""
    import argparse

    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:  # an item such as "", "6.5" or "x"
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    try:
        return _checked_widths(widths)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batch_arg(text: str) -> int:
    """``--batch``: an integer from 0 to 2**63 - 1."""
    import argparse

    try:
        batch = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of rows (an integer >= 0), got {text!r}"
        ) from None
    try:
        return _checked_batch(batch)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import re

    from fastmlp import hardware  # the workflow layer, for the CPU's name only

    parser = argparse.ArgumentParser(
        prog="python -m fastmlp.engines",
        description="Which engine fastmlp's whole-MLP ops run here, and why: the CPU path "
        "for an MLP shape, then the CUDA engine of each precision.",
    )
    # "--widths -5,10": a word starting with "-" and a digit is a value, not a flag (as in
    # fastmlp.workflow.cli; Python 3.11's argparse takes only "-5" or "-.5" so).
    parser._negative_number_matcher = re.compile(r"-\.?\d")
    parser.add_argument(
        "--widths",
        type=_widths_arg,
        default="784,512,512,10",
        help="in_features and each layer's out_features, comma-separated positive integers "
        "(default: the tutorial MLP, 784,512,512,10)",
    )
    parser.add_argument(
        "--batch", type=_batch_arg, default=64, help="rows per call, >= 0 (default 64)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="the dtype the ops compute in (default float32)",
    )
    args = parser.parse_args(argv)
    widths = args.widths
    dtype = getattr(torch, args.dtype)
    try:
        check_cpu_path_environment()
        report = cpu_path_report(widths, args.batch, dtype)
    except (ValueError, RuntimeError) as e:  # a bad or impossible forced path
        print(f"{parser.prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"CPU: {hardware.describe_cpu(hardware.describe())}, {torch.get_num_threads()} threads")
    print(f"FASTMLP_CPU_PATH: {requested_cpu_path()}")
    tune = "on" if cpu_tuning() else "off"
    print(f"FASTMLP_CPU_TUNE: {tune} (measure the paths at a shape's first call)")
    print(f"row-blocked float32 GEMMs: {cpu_float_gemm()}")
    print(f"CPU path for widths {widths}, batch {args.batch}, {args.dtype}:")
    rows = [(c.phase, c.path, f"({c.source}) {c.reason}") for c in report]
    width = max(len(r[0]) for r in rows)
    path_width = max(len(r[1]) for r in rows)
    for phase, path, reason in rows:
        print(f"  {phase.ljust(width)}  {path.ljust(path_width)}  {reason}")
    print()
    print(f"FASTMLP_CUDA_ENGINE: {requested_cuda_engine()}")
    print(f"validated entries: {validated_engines() or 'none'}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"device: {name} (compute capability {torch.cuda.get_device_capability()})")
        print(format_report(cuda_engine_report()))
    else:
        print("no CUDA device; for an H100/H200 (compute capability 9.0):")
        print(format_report(cuda_engine_report(capability=(9, 0))))
    return 0


if __name__ == "__main__":  # python -m fastmlp.engines: the report for this machine
    raise SystemExit(_main())

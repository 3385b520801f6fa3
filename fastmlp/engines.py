"""Which engine fastmlp's CUDA ops run on a GPU, and why.

Three engines implement the ops on CUDA: ``custom`` (fastmlp's own tensor-core
kernels), ``cublaslt`` (cuBLASLt GEMMs with fastmlp's mask and ReLU passes) and
``aten`` (plain ATen ops, correct on every GPU). A fast engine is used by default
(``FASTMLP_CUDA_ENGINE=auto``) only where a recorded GPU run has validated it for
that GPU generation and precision: the validated-engine table in
``csrc/cuda_engines.cpp``, which ``scripts/gpu_check.sh`` fills from a run whose
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastmlp import _C  # noqa: F401  (registers torch.ops.fastmlp._cuda_*)

__all__ = [
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


if __name__ == "__main__":  # python -m fastmlp.engines: the report for this machine's GPU
    print(f"FASTMLP_CUDA_ENGINE: {requested_cuda_engine()}")
    print(f"validated entries: {validated_engines() or 'none'}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"device: {name} (compute capability {torch.cuda.get_device_capability()})")
        print(format_report(cuda_engine_report()))
    else:
        print("no CUDA device; for an H100/H200 (compute capability 9.0):")
        print(format_report(cuda_engine_report(capability=(9, 0))))

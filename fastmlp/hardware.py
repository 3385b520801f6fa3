"""What this machine's hardware does fast, and the precision that fits it.

bfloat16 is only fast where the hardware computes it natively. On x86 CPUs that means
AVX512-BF16 or AMX: measured on this workplace's machines, a 2048^3 bf16 ``torch.mm``
ran about 2x faster than fp32 on an AMD EPYC with AVX512-BF16, and about 4x *slower*
on an Intel Xeon (Ice Lake) without it, where oneDNN emulates bf16. So ``"auto"``
precision picks bf16 on the CPU only where it is native, and on CUDA where the GPU
supports it (Ampere and newer), and fp32 everywhere else. Every benchmark report and
``metrics.json`` records :func:`describe` next to its numbers, since bf16 numbers mean
nothing without knowing which kind of CPU made them.
"""

from __future__ import annotations

import platform
import re
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

__all__ = [
    "TRAIN_PRECISIONS",
    "CpuInfo",
    "allocation_bytes",
    "cpu_info",
    "cpu_has_native_bf16",
    "cuda_has_bf16",
    "describe",
    "describe_cpu",
    "format_bytes",
    "resolve_device",
    "resolve_precision",
]

# What `fastmlp train --precision` accepts (not the engine table's precisions,
# engines.ENGINE_PRECISIONS).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
# The CPU flags that decide how fast fp32 and bf16 GEMMs run (as /proc/cpuinfo names them).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: tuple[str, ...]  # the ISA_FLAGS this CPU has


@cache
def cpu_info() -> CpuInfo:
    """The CPU model and which of :data:`ISA_FLAGS` it has (from /proc/cpuinfo on Linux)."""
    model, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return CpuInfo(
        model or platform.processor() or platform.machine() or "unknown CPU",
        tuple(f for f in ISA_FLAGS if f in flags),
    )


def _torch_cpu_probe(name: str) -> bool:
    # Private torch functions (torch 2.x): absent or failing means "not known to be native".
    probe = getattr(torch.cpu, name, None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001  (any failure of a private probe: assume not native)
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as torch sees it."""
    return _torch_cpu_probe("_is_avx512_bf16_supported") or _torch_cpu_probe(
        "_is_amx_tile_supported"
    )


def cuda_has_bf16(device: torch.device | None = None) -> bool:
    """Whether the GPU supports bfloat16 natively (compute capability 8.0 and newer)."""
    if not torch.cuda.is_available():
        return False
    index = device.index if device is not None and device.index is not None else None
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_device(device: str) -> torch.device:
    """``auto`` means the GPU when there is one; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            have = f"cuda:0 to cuda:{count - 1}" if count > 1 else "cuda:0"
            raise ValueError(
                f"device {device!r} requested but this machine has {count} CUDA GPU(s) ({have})"
            )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The precision to train in: ``"auto"`` becomes bf16 where the hardware computes it
    natively and fp32 elsewhere; an explicit ``"bf16"`` on a CPU without native bf16 is
    kept but warned about (once per process), since it runs several times slower."""
    if requested not in TRAIN_PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(TRAIN_PRECISIONS)}; got {requested!r}"
        )
    device = torch.device(device)
    if device.type == "cpu":
        native = cpu_has_native_bf16()
    elif device.type == "cuda":
        native = cuda_has_bf16(device)
    else:
        native = False
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and device.type == "cpu" and not native:
        _warn_slow_bf16()
    return requested


@cache  # once per process
def _warn_slow_bf16() -> None:
    warnings.warn(
        f"precision bf16 on a CPU without native bfloat16 ({cpu_info().model}: no AVX512-BF16 "
        "or AMX) runs several times slower than fp32; --precision auto picks fp32 here",
        RuntimeWarning,
        stacklevel=3,
    )


def describe_cpu(machine: dict[str, Any]) -> str:
    """One line naming a :func:`describe` record's CPU and what decides its fp32/bf16
    speed, e.g. ``AMD EPYC (avx2, fma; bf16 not native)``."""
    isa = ", ".join(machine["cpu_isa"]) or "no AVX2"
    native = "native bf16" if machine["cpu_native_bf16"] else "bf16 not native"
    return f"{machine['cpu']} ({isa}; {native})"


def describe(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The hardware facts a measurement needs beside it: CPU model, ISA flags, whether bf16
    is native, thread count, and the GPU when ``device`` is CUDA."""
    cpu = cpu_info()
    out = {
        "cpu": cpu.model,
        "cpu_isa": list(cpu.flags),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
    }
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["gpu"] = torch.cuda.get_device_name(index)
        out["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
    return out


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}


def allocation_bytes(e: BaseException) -> int | None:
    """The bytes a failed allocation asked for, when ``e`` is PyTorch's out-of-memory error
    (the CPU allocator's ``can't allocate memory: you tried to allocate N bytes``, or CUDA's
    ``torch.OutOfMemoryError``: ``Tried to allocate 1.5 GiB``); ``None`` for other errors."""
    text = str(e)
    exact = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if exact:
        return int(exact.group(1))
    cuda = re.search(r"Tried to allocate ([\d.]+) ([KMGTP]?i?B)", text)
    if cuda and cuda.group(2) in _UNITS:
        return round(float(cuda.group(1)) * _UNITS[cuda.group(2)])
    if isinstance(e, torch.OutOfMemoryError):
        return 0  # out of memory, size not stated
    return None


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a number >= 1: ``37.3 GiB``."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}"
    return f"{n} bytes"

"""The CPU paths measured on this machine, kept on disk between processes.

Each process measures the CPU paths at the first call of a shape class and keeps the
fastest (docs/cpu.md, "Measured choice"). That costs a few timed calls per shape class and
process; ``fastmlp tune`` measures the shapes a user names once and writes the choices
here, and ``import fastmlp`` reads them back, so later processes start with them (as
FFTW's wisdom). Only this machine's entries are used: the file is keyed by a fingerprint of
the CPU (model, ISA flags), the ISA limits set in the environment (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``), torch's and fastmlp's versions; the
thread count is part of every shape class.

The file is ``$FASTMLP_CACHE_DIR/cpu_paths.json`` (default ``$XDG_CACHE_HOME/fastmlp``,
else ``~/.cache/fastmlp``). It is versioned (``format``), written whole to a temporary file
and renamed over the old one (a reader sees the old or the new file, never half of one),
by one writer at a time (a lock file), and safe to delete. A file that cannot be read or
does not parse is ignored with a one-line warning; ``FASTMLP_CPU_TUNE=off`` ignores it
altogether (the built-in rule only).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "cache_file", "entries_for_this_machine", "fingerprint", "load", "save"]

#: The file layout's version; a file of another version is ignored (and rewritten by the
#: next ``fastmlp tune``).
FORMAT = 1
#: Machines (fingerprints) kept in one file, the most recently written first: a home
#: folder shared by several machines, or torch upgrades, do not grow it without bound.
MAX_MACHINES = 16
FILE_NAME = "cpu_paths.json"
_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


class CacheProblem(ValueError):
    """Why the cache file cannot be used (one line)."""


def cache_file() -> Path:
    """Where the measured paths are kept (see the module docstring)."""
    folder = os.environ.get("FASTMLP_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        folder = os.path.join(base, "fastmlp")
    return Path(folder) / FILE_NAME


def fingerprint() -> str:
    """This machine and software, as the cache keys them: a measurement made under another
    fingerprint says nothing about this one."""
    from fastmlp import __version__, hardware

    cpu = hardware.cpu_info()
    limits = {name: os.environ.get(name, "") for name in _ISA_LIMITS}
    parts = [f"cpu={cpu.model}", f"isa={','.join(cpu.flags)}", f"torch={torch.__version__}"]
    parts += [f"fastmlp={__version__}"] + [f"{k}={v}" for k, v in limits.items() if v]
    return "; ".join(parts)


def _read(path: Path) -> dict[str, Any]:
    """The file's contents, checked; an empty cache when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"format": FORMAT, "machines": {}}
    except (OSError, UnicodeDecodeError) as e:
        raise CacheProblem(f"cannot read it ({e.__class__.__name__}: {e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CacheProblem(f"it is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CacheProblem(f"it is not a format-{FORMAT} cache (format {found!r})")
    machines = data.get("machines")
    if not isinstance(machines, dict) or not all(
        isinstance(entries, dict)
        and all(
            isinstance(key, str)
            and isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and isinstance(e.get("times"), str)
            for key, e in entries.items()
        )
        for entries in machines.values()
    ):
        raise CacheProblem("its entries are not {shape class: {path, times}} tables")
    return data


def _warn(path: Path, why: str) -> None:
    warnings.warn(
        f"fastmlp: ignoring the CPU path cache {path}: {why} (delete it, or run "
        "`fastmlp tune` to write it again)",
        RuntimeWarning,
        stacklevel=3,
    )


def entries_for_this_machine(path: Path | None = None) -> dict[str, dict[str, str]]:
    """The cached ``{shape class: {"path", "times"}}`` of this fingerprint (raises
    :class:`CacheProblem` when the file cannot be used)."""
    data = _read(cache_file() if path is None else path)
    entries: dict[str, dict[str, str]] = data["machines"].get(fingerprint(), {})
    return entries


def load(path: Path | None = None) -> int:
    """Hands this machine's cached choices to the CPU ops (their shape classes take them
    from now on, as if measured in this process); returns how many. A file that cannot be
    used is ignored with one warning."""
    try:
        path = cache_file() if path is None else path
    except RuntimeError as e:  # Path.home() with no home folder to be found
        warnings.warn(f"fastmlp: no CPU path cache: {e}", RuntimeWarning, stacklevel=2)
        return 0
    try:
        entries = entries_for_this_machine(path)
    except CacheProblem as e:
        _warn(path, str(e))
        return 0
    loaded = 0
    for key, entry in entries.items():
        try:
            torch.ops.fastmlp._load_measured_cpu_path(key, entry["path"], entry["times"])
        except RuntimeError as e:  # a path this build does not know: ignore that entry
            _warn(path, str(e).splitlines()[0])
            continue
        loaded += 1
    return loaded


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (POSIX advisory lock on a file beside the cache)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the rename alone keeps files whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def measured_in_this_process() -> dict[str, dict[str, str]]:
    """The CPU ops' measured choices of this process, ``{shape class: {path, times}}``."""
    out = {}
    for line in torch.ops.fastmlp._measured_cpu_paths():
        key, path, times = line.split("\t")
        out[key] = {"path": path, "times": times}
    return out


def save(path: Path | None = None) -> int:
    """Writes this process's measured choices into the cache, beside what it holds for
    this and other machines (this process's entries win); returns how many entries this
    machine has there now. Raises OSError when the file cannot be written. An unusable old
    file is replaced (with a warning)."""
    path = cache_file() if path is None else path
    new = measured_in_this_process()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            data = _read(path)
        except CacheProblem as e:
            _warn(path, f"{e}; writing a new one")
            data = {"format": FORMAT, "machines": {}}
        me = fingerprint()
        mine = {**data["machines"].pop(me, {}), **new}
        machines = {me: mine, **data["machines"]}  # most recently written first
        data = {"format": FORMAT, "machines": dict(list(machines.items())[:MAX_MACHINES])}
        _write_atomically(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    return len(mine)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def tune(
    sizes: tuple[int, ...],
    batches: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    activation: str = "relu",
) -> list[Any]:
    """Measures every CPU path at each batch and dtype of the MLP ``sizes`` (a training
    step's forward and backward, and inference), afresh: what this process measured before
    is forgotten. Returns the :class:`fastmlp.engines.CpuPathChoice` of each
    (batch, dtype, phase), in that order; :func:`save` writes them to disk."""
    from fastmlp import engines, testing
    from fastmlp.ops import mlp

    was_on = engines.cpu_tuning()
    engines.set_cpu_tuning(True)
    engines.clear_measured_cpu_paths()
    choices = []
    try:
        for dtype in dtypes:
            for batch in batches:
                gen = torch.Generator().manual_seed(batch)
                weights, biases = testing.mlp_layers(sizes, dtype, True, gen)
                x = torch.randn(batch, sizes[0], generator=gen, dtype=dtype)
                for t in (*weights, *(biases or [])):
                    t.requires_grad_(True)
                mlp(x, weights, biases, activation).sum().backward()
                with torch.inference_mode():
                    mlp(x, weights, biases, activation)
                choices += [
                    engines.cpu_path(sizes, batch, dtype, phase) for phase in engines.CPU_PHASES
                ]
    finally:
        engines.set_cpu_tuning(was_on)
    return choices

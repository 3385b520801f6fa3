"""Saving and loading checkpoints: atomic writes, safe loads, plain-PyTorch model state.

A checkpoint is a dict saved with :func:`torch.save` whose ``"model"`` entry is an ordinary
``state_dict`` with the tutorial's key names (``linear_relu_stack.0.weight``, ...), and whose
``"architecture"`` entry says what model those weights are for (:func:`architecture`: layer
sizes, activation, output activation, negative slope, bias). :func:`model_checkpoint` makes
one of a :class:`fastmlp.MLP`; :func:`load_model` builds the model back. A training
checkpoint (``last.pt``, ``best.pt``: :func:`training_state` builds it, :func:`restore_training`
puts it back) also holds ``"format"``, ``"optimizer"``, ``"scheduler"``, ``"epoch"``, ``"rng"``,
``"config"``, ``"metrics"``, ``"best_accuracy"`` and ``"versions"``. Everything in it is tensors
and plain Python values, so ``torch.load(path, weights_only=True)`` reads it without running
any pickled code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

from fastmlp.workflow.data import CLASSES, IMAGE_SIZE, file_problem
from fastmlp.workflow.whitening import InputWhitening

if TYPE_CHECKING:  # the library is looked up in sys.modules at run time (architecture)
    from fastmlp.nn import MLP

__all__ = [
    "ARCHITECTURE_KEYS",
    "Architecture",
    "FORMAT",
    "CheckpointError",
    "CheckpointWriteError",
    "TRAINING_KEYS",
    "UnsafeCheckpointError",
    "architecture",
    "check_model_state",
    "check_training_checkpoint",
    "extract_state_dict",
    "load_checkpoint",
    "load_error",
    "load_model",
    "load_training_checkpoint",
    "model_checkpoint",
    "restore_training",
    "rng_state",
    "save_checkpoint",
    "save_json",
    "set_rng_state",
    "sizes_from_state_dict",
    "training_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects; loading it could run arbitrary code."""


class CheckpointWriteError(CheckpointError):
    """A file could not be written (full disk, I/O error); the previous version is intact."""


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` with :func:`torch.save` to ``path``.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and the
    file is renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows); then the
    folder is fsynced so the rename itself survives a power cut. A crash or kill at any
    point leaves either the old file or the new one, never a mix. A failed write (a full
    disk, an I/O error) raises :class:`CheckpointWriteError` naming the file and the cause,
    after removing the temporary file; the old file is untouched.
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` as standard JSON: non-finite floats (NaN, inf), which
    ``json`` would write as the invalid literals ``NaN``/``Infinity``, become ``null``."""
    text = json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n"
    return _atomic_write(Path(path), lambda f: f.write(text.encode()))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def _atomic_write(path: Path, write: Callable[[Any], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # The reason first, while the partial file still takes its space on the disk.
        error = _write_error(path, e) if isinstance(e, OSError | RuntimeError) else None
        # Also on KeyboardInterrupt: never leave half-written temporaries behind.
        Path(tmp).unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise
    _fsync_dir(path.parent)
    return path


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    # torch.save reports a failed write of its zip writer as a RuntimeError ("[enforce fail
    # at inline_container.cc:672] . unexpected pos ..."): the OSError that the file object's
    # write raised (ENOSPC on a full disk) is its __context__. Name that cause; without one,
    # a disk with (almost) no space left is the likely cause.
    cause = _os_error(e)
    if cause is not None and cause.strerror:
        reason = cause.strerror
    else:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = -1
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = f"no space left on device ({free} bytes free)" if 0 <= free < 2**20 else first
    kept = "the previous version is unchanged" if path.exists() else "nothing was written"
    return CheckpointWriteError(f"cannot write {path}: {reason}; {kept}")


def _os_error(e: BaseException | None) -> OSError | None:
    """``e`` or the first OSError it was raised from or while handling."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its rename is durable enough
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    map_location: str | torch.device | None = "cpu",
) -> Any:
    """Load what :func:`save_checkpoint` (or any ``torch.save``) wrote, safely by default.

    With ``trusted=False`` the file is read with ``weights_only=True``: tensors and plain
    values only. A file carrying pickled objects (for example a whole ``nn.Module`` saved
    with ``torch.save(model)``) raises :class:`UnsafeCheckpointError`; pass
    ``trusted=True`` only for files from a source you trust. Missing, truncated or corrupt
    files raise :class:`CheckpointError` naming the file, as does a whole model whose class
    cannot be imported here (one pickled from a script's ``__main__``, say): the error
    names the class and says that a ``state_dict`` of the model loads without it.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem == "not found":
        raise CheckpointError(f"checkpoint not found: {path}")
    if problem is not None:
        inside = path / "last.pt"
        hint = f"; did you mean {inside}?" if path.is_dir() and inside.is_file() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {problem}{hint}")
    # torch.save has written zip archives since PyTorch 1.6; anything else is either an
    # ancient legacy file or damage, and torch's own error for it talks about pickles.
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({size} bytes, not a "
            "torch.save zip archive)"
        )
    # Check every member's CRC first: damage inside the pickle would otherwise look like
    # an unsafe checkpoint, and damage inside tensor data would load without complaint.
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from e
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt: checksum mismatch in {damaged}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:
        msg = str(e)
        if not trusted and "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            what = f" (it contains {found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects{what}; loading it could run "
                "arbitrary code. Refusing. Load it only if you trust its source: "
                "trusted=True in Python, --trust on the command line."
            ) from None
        missing = _missing_class(path, e) if trusted else None
        if missing is not None:
            raise CheckpointError(
                f"{path} holds a whole pickled model whose {missing} cannot be imported "
                "here; the file is fine, but torch.save(model) stores only the class's name, "
                "not its code. Load it where that class is defined, or save "
                "model.state_dict() there instead: fastmlp loads a state_dict without the class"
            ) from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or truncated: {first}") from e


def _missing_class(path: Path, e: Exception) -> str | None:
    """``class NeuralNetwork (from __main__)`` when unpickling ``path`` failed with ``e``
    because a class it names cannot be found here: a model pickled from a script
    (``__main__``) loaded elsewhere, or one whose module is not installed. ``None`` for
    other failures."""
    name: str | None = None
    if isinstance(e, ModuleNotFoundError) and e.name:
        module = e.name
    elif isinstance(e, AttributeError):
        text = str(e)
        found = re.match(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'", text)
        if found is not None:
            name, module = found.groups()
        else:  # the wording of newer Pythons' pickle
            found = re.match(r"module '([\w.]+)' has no attribute '([\w.]+)'", text)
            if found is None:
                return None
            module, name = found.groups()
    else:
        return None
    # The globals the pickle names, read without running it: the class's module as pickled
    # (__main__, where the error names the module that is __main__ in this process).
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    for full in names:
        owner, _, attr = full.rpartition(".")
        if attr == name or (name is None and (owner + ".").startswith(module + ".")):
            return f"class {attr} (from {owner})"
    return f"class {name} (from {module})" if name else f"class from module {module}"


#: The training checkpoint's layout; :func:`check_training_checkpoint` refuses any other.
FORMAT = "fastmlp-checkpoint-1"

#: What ``fastmlp.workflow.train.fit`` needs to continue a run from a checkpoint.
TRAINING_KEYS = ("model", "optimizer", "epoch", "config", "metrics", "best_accuracy", "rng")


def rng_state() -> dict[str, Any]:
    """The global random generators' state (CPU, and every GPU when there is one)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned (GPU state only where there are GPUs)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    config: dict[str, Any],
    metrics: list[dict[str, float]],
    best_accuracy: float,
    versions: dict[str, str],
    trained_model: torch.nn.Module | None = None,
    whitening: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The training checkpoint after ``epoch`` epochs: everything a resume needs to continue
    bit-identically (the random generators' state is taken now), plain values only.

    ``model`` is what users load: a model for raw pixels, its :func:`architecture` recorded
    next to its weights when it is a :class:`fastmlp.MLP`. A run on whitened inputs also
    keeps the weights as trained (``trained_model``, which the optimizer's state belongs to)
    and its ``whitening``; resuming continues from those."""
    extra: dict[str, Any] = {}
    if trained_model is not None or whitening is not None:
        if trained_model is None or whitening is None:
            raise ValueError("trained_model and whitening are saved together")
        extra = {"trained_model": trained_model.state_dict(), "whitening": whitening}
    recorded = architecture(model)
    if recorded is not None:
        extra["architecture"] = recorded
    return {
        **extra,
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": config,
        "metrics": metrics,
        "best_accuracy": best_accuracy,
        "rng": rng_state(),
        "versions": versions,
    }


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`load_checkpoint` (safe mode) and :func:`check_training_checkpoint`: a training
    checkpoint with every part a resume needs, or a :class:`CheckpointError` naming the gap."""
    state = load_checkpoint(path)
    check_training_checkpoint(state, path)
    return state


def restore_training(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    path: str | os.PathLike[str],
) -> None:
    """Load a training checkpoint's model, optimizer, scheduler (when ``scheduler`` is given
    and one was saved) and random generators. State that does not fit the objects built from
    the checkpoint's config raises :class:`CheckpointError` naming ``path``."""
    try:
        # The weights the optimizer's state belongs to: as trained (on whitened inputs) when
        # the run whitened, else the saved model itself.
        model.load_state_dict(state.get("trained_model", state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} cannot be resumed: its state does not fit its config ({load_error(e)})"
        ) from None
    set_rng_state(state["rng"])


def check_training_checkpoint(state: Any, path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` (loaded from ``path``) has everything
    a resume needs, so a resume fails before training with the missing part named."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a training checkpoint (a {type(state).__name__}); resume from "
            "the last.pt of a fastmlp train run"
        )
    # A dict without "format" (made by hand, say) is judged by its keys alone.
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(
            f"{path} cannot be resumed: it is a {state['format']!r} checkpoint and this "
            f"fastmlp reads {FORMAT!r}"
        )
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        evaluable = "model" in state or all(isinstance(v, torch.Tensor) for v in state.values())
        hint = f"; it can still be evaluated: fastmlp evaluate {path}" if evaluable else ""
        raise CheckpointError(
            f"{path} cannot be resumed: it lacks {', '.join(repr(k) for k in missing)} "
            f"(resume from the last.pt of a fastmlp train run){hint}"
        )
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(f"{path} cannot be resumed: its 'rng' entry is damaged")
    if not isinstance(state["config"], dict) or not isinstance(state["epoch"], int):
        raise CheckpointError(f"{path} cannot be resumed: its 'config' or 'epoch' is damaged")
    # The model's own faults (meta tensors, other classes) named before any training starts.
    saved_sizes = state["config"].get("sizes")
    if not isinstance(saved_sizes, list | tuple):
        saved_sizes = None
    for key in ("model", "trained_model"):
        if key not in state:
            continue
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path} cannot be resumed: its {key!r} entry is damaged")
        check_model_state(extract_state_dict(state[key]), path, saved_sizes, key=key)
    _check_resumable_architecture(state, path)
    if state["config"].get("whiten"):
        try:
            InputWhitening.from_state_dict(state.get("whitening"))  # the check a resume uses
            damaged = not isinstance(state.get("trained_model"), dict)
        except ValueError:
            damaged = True
        if damaged:
            raise CheckpointError(
                f"{path} cannot be resumed: its run whitened the inputs but its "
                "'trained_model' or 'whitening' entry is missing or damaged"
            )


def _check_resumable_architecture(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A resume rebuilds the tutorial's ReLU MLP (with bias) from the config's sizes: refuse
    a checkpoint whose recorded architecture is another, which it would train as ReLU."""
    recorded = _recorded_architecture(state, path)
    if recorded is None:
        return  # older checkpoints: fastmlp train has only ever trained the ReLU MLP
    activation = recorded.get("activation", "relu")
    output_activation = recorded.get("output_activation")
    bias = recorded.get("bias", True)
    if (activation, output_activation, bias) != ("relu", None, True):
        raise CheckpointError(
            f"{path} cannot be resumed: its model is an MLP with activation {activation!r}, "
            f"output_activation {output_activation!r} and {'bias' if bias else 'no bias'}; "
            "fastmlp train trains the tutorial's ReLU MLP (it can still be evaluated: "
            f"fastmlp evaluate {path})"
        )


def load_error(e: BaseException) -> str:
    """The reason in a ``load_state_dict`` error, on one line: its first detail (``size
    mismatch for linear_relu_stack.4.weight: ...``), not the header ``Error(s) in loading
    state_dict for MLP:`` that comes before it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return lines[1].rstrip(".") + more
    return lines[0] if lines else type(e).__name__


def check_model_state(
    state: dict[str, Any],
    path: str | os.PathLike[str],
    sizes: Any = None,
    *,
    key: str = "model",
) -> tuple[int, ...]:
    """The layer widths of the Fashion-MNIST MLP ``state`` (a ``state_dict`` read from
    ``path``), checked before any weights are copied: :class:`CheckpointError` names the
    problem when it holds meta tensors (shapes without values), is not an MLP in the
    tutorial's layout, does not take 784 inputs to 10 outputs, or (for ``sizes``, the widths
    its config records; ``key`` is its entry) has other widths than its config says."""
    _check_not_meta(state, path)
    try:
        found = sizes_from_state_dict(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    inputs, outputs = IMAGE_SIZE * IMAGE_SIZE, len(CLASSES)
    if found[0] != inputs or found[-1] != outputs:
        raise CheckpointError(
            f"{path} holds a {found[0]}-input, {found[-1]}-output model; Fashion-MNIST needs "
            f"{inputs} inputs ({IMAGE_SIZE}x{IMAGE_SIZE}) and {outputs} outputs (its classes): "
            "use a checkpoint of a Fashion-MNIST model"
        )
    if sizes is not None and tuple(sizes) != found:
        raise CheckpointError(
            f"{path} cannot be resumed: its {key!r} has layer sizes {'-'.join(map(str, found))} "
            f"but its config says {'-'.join(map(str, sizes))}"
        )
    return found


def _check_not_meta(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    meta = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
        raise CheckpointError(
            f"{path} holds meta tensors ({meta[0]}{more}): shapes without values, saved from "
            "a model that never had weights (built on device='meta'); save the state_dict of "
            "a model with real weights"
        )


_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel/DDP wrappers


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` inside whatever was loaded.

    Accepts a fastmlp checkpoint (``{"model": state_dict, ...}``), a bare ``state_dict``
    (what the tutorial saves with ``torch.save(model.state_dict(), ...)``) or a whole
    ``nn.Module`` (``torch.save(model)``, needs ``trusted=True`` to load). Key prefixes
    added by ``torch.compile`` or ``DataParallel`` are removed.
    """
    if isinstance(obj, torch.nn.Module):
        state: Any = obj.state_dict()
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise CheckpointError(
            "not a model checkpoint: expected a dict with a 'model' state_dict, a state_dict "
            f"or an nn.Module, got {type(obj).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def sizes_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Layer widths of an MLP ``state_dict`` in tutorial layout, e.g. ``(784, 512, 512, 10)``.

    Linear layers sit at even indices of ``linear_relu_stack`` (an activation between
    them), or at consecutive ones (none between them: ``MLP(activation="none")``).
    """
    weights: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"linear_relu_stack\.(\d+)\.weight", key)
        if m:
            weights[int(m.group(1))] = value
    if not weights:
        raise CheckpointError(
            "state_dict has no 'linear_relu_stack.<i>.weight' entries; not an MLP in the "
            f"tutorial's layout (keys: {', '.join(list(state)[:4])}...)"
        )
    order = sorted(weights)
    step = order[1] - order[0] if len(order) > 1 else 2
    if step not in (1, 2) or order != list(range(0, step * len(order), step)):
        raise CheckpointError(f"unexpected layer indices in state_dict: {order}")
    sizes = [int(weights[order[0]].shape[1])]
    for i in order:
        w = weights[i]
        if w.dim() != 2 or w.shape[1] != sizes[-1]:
            raise CheckpointError(
                f"linear_relu_stack.{i}.weight has shape {tuple(w.shape)}, expected "
                f"(*, {sizes[-1]})"
            )
        sizes.append(int(w.shape[0]))
    return tuple(sizes)


# --- The architecture next to the weights, and the model built back from a checkpoint -----

#: The entries of a checkpoint's ``"architecture"``: :class:`fastmlp.MLP`'s arguments.
ARCHITECTURE_KEYS = ("sizes", "activation", "output_activation", "negative_slope", "bias")


class Architecture(TypedDict):
    """What :func:`architecture` records (the keys of :data:`ARCHITECTURE_KEYS`)."""

    sizes: list[int]
    activation: str
    output_activation: str | None
    negative_slope: float
    bias: bool


def architecture(model: nn.Module) -> Architecture | None:
    """What builds ``model`` again, as plain values: ``{"sizes": [784, 512, 512, 10],
    "activation": "relu", "output_activation": None, "negative_slope": 0.01, "bias": True}``
    (:class:`fastmlp.MLP`'s arguments), or ``None`` when ``model`` is no fastmlp.MLP or its
    layers were changed after it was built (then only the model itself says what it is)."""
    library = sys.modules.get("fastmlp.nn")  # an MLP exists only once that is imported
    if library is None:
        return None
    mlp_class: type[MLP] = library.MLP
    if not isinstance(model, mlp_class):
        return None
    linears = model.linears()
    recorded: Architecture = {
        "sizes": list(model.sizes),
        "activation": model.activation,
        "output_activation": model.output_activation,
        "negative_slope": model.negative_slope,
        "bias": all(linear.bias is not None for linear in linears),
    }
    # Built again on the meta device (no memory): the same layers, parameters and shapes?
    rebuilt = mlp_class(**recorded, device="meta")

    def layout(m: MLP) -> list[Any]:
        settings = ("negative_slope", "approximate")  # LeakyReLU's, GELU's
        layers = [(type(c), *(getattr(c, a, None) for a in settings)) for c in m.linear_relu_stack]
        return layers + [(k, tuple(v.shape)) for k, v in m.state_dict().items()]

    return recorded if layout(rebuilt) == layout(model) else None


def model_checkpoint(model: nn.Module) -> dict[str, Any]:
    """``{"model": model.state_dict(), "architecture": architecture(model)}``: a checkpoint
    of ``model`` that :func:`load_model` (and ``fastmlp evaluate``/``predict``) builds back
    as it was, with its activation. Save it with :func:`save_checkpoint`; the tutorial's
    model loads its ``"model"`` entry as before. (No ``"architecture"`` for a model that is
    no :class:`fastmlp.MLP`.)"""
    recorded = architecture(model)
    state: dict[str, Any] = {"model": model.state_dict()}
    if recorded is not None:
        state["architecture"] = recorded
    return state


def load_model(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    device: str | torch.device = "cpu",
    note: Callable[[str], object] | None = None,
) -> nn.Module:
    """The model a checkpoint holds, float32 on ``device`` in eval mode, ready to run on
    ``(N, 1, 28, 28)`` images (what ``fastmlp evaluate`` and ``predict`` run):

    * a whole model (``torch.save(model)``, read only with ``trusted=True``): that object
      itself, whatever its class, if it maps 28x28 images (or 784 features: it is then
      preceded by a Flatten) to 10 logits;
    * weights with their :func:`architecture` (what ``fastmlp train`` and
      :func:`model_checkpoint` write): a :class:`fastmlp.MLP` built from it;
    * weights alone (the tutorial's ``torch.save(model.state_dict())``, or a checkpoint of
      an older fastmlp): the tutorial's MLP with ReLU, in the widths of the weights, and
      ``note`` (default: :func:`warnings.warn`) is called once to say so.

    Problems raise :class:`CheckpointError` naming ``path``.
    """
    obj = load_checkpoint(path, trusted=trusted)
    device = torch.device(device)
    if isinstance(obj, nn.Module):
        return _whole_model(obj, path, device)
    state = extract_state_dict(obj)
    sizes = check_model_state(state, path)
    recorded = _recorded_architecture(obj, path)
    if recorded is not None and tuple(recorded["sizes"]) != sizes:
        raise CheckpointError(
            f"{path} records an architecture of layer sizes "
            f"{'-'.join(map(str, recorded['sizes']))} but holds weights of "
            f"{'-'.join(map(str, sizes))}"
        )
    model = _build(recorded or {"sizes": sizes}, device, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: state_dict does not fit the MLP: {load_error(e)}") from None
    if recorded is None:
        message = (
            f"{path} holds weights without their architecture: running them as the "
            f"tutorial's {'-'.join(map(str, sizes))} MLP with ReLU, which is wrong for a model "
            "trained with another activation (save "
            "fastmlp.workflow.checkpoint.model_checkpoint(model) to keep it)"
        )
        if note is None:
            warnings.warn(message, stacklevel=2)
        else:
            note(message)
    return model.eval()


def _recorded_architecture(obj: Any, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``"architecture"`` entry of a checkpoint ``obj``, checked; ``None`` without one."""
    if not isinstance(obj, dict) or "architecture" not in obj:
        return None
    recorded = obj["architecture"]
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sizes"), list | tuple):
        raise CheckpointError(f"{path}: its 'architecture' entry is damaged")
    unknown = [k for k in recorded if k not in ARCHITECTURE_KEYS]
    if unknown:
        raise CheckpointError(
            f"{path} records an architecture this fastmlp cannot build (unknown "
            f"{', '.join(map(repr, unknown))}: written by a newer fastmlp?)"
        )
    return recorded


def _build(recorded: dict[str, Any], device: torch.device, path: str | os.PathLike[str]) -> Any:
    from fastmlp.workflow.train import build_model  # builds a fastmlp.MLP: needs the extension

    try:
        return build_model(device=device, **recorded)
    except (TypeError, ValueError) as e:  # fastmlp.MLP's own checks of its arguments
        raise CheckpointError(f"{path} records an architecture that cannot be built: {e}") from None


def _whole_model(model: nn.Module, path: str | os.PathLike[str], device: torch.device) -> Any:
    """A whole pickled model, as it is: float32 on ``device`` in eval mode, checked to map
    28x28 images or 784 features (then with a Flatten in front) to 10 logits."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    _check_not_meta(dict(model.state_dict()), path)
    model = model.float().to(device).eval()
    images = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    problems: list[str] = []
    for x in (images, images.flatten(1)):
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:  # whatever a model raises for input it does not take
            problems.append(load_error(e))
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (2, len(CLASSES)):
            return nn.Sequential(nn.Flatten(), model).eval() if x.dim() == 2 else model
        tensor = isinstance(out, torch.Tensor)
        got = f"shape {tuple(out.shape)}" if tensor else f"a {type(out).__name__}"
        problems.insert(0, f"it returns {got} for input of shape {tuple(x.shape)}")
    raise CheckpointError(
        f"{path} holds a whole {type(model).__name__} that does not map 28x28 images (or 784 "
        f"features) to {len(CLASSES)} logits, one per Fashion-MNIST class: {problems[0]}"
    )

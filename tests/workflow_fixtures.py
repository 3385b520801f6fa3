"""Helpers shared by the workflow tests (data, train, checkpoint, cli).

Kept out of conftest.py so the workflow tests stay self-contained; test modules import
what they need from here.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import io
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from fastmlp.testing import NeuralNetwork  # noqa: F401  (re-exported for the workflow tests)
from fastmlp.workflow import data

REAL_DATA = data.DEBIAN_DIR
needs_real_data = pytest.mark.skipif(
    not all(
        (REAL_DATA / f"{s}.gz").is_file()
        for s in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ),
    reason=f"real Fashion-MNIST not installed in {REAL_DATA} "
    "(apt-get install -y dataset-fashion-mnist; .ci/run does this)",
)

FILES = {
    "train_images": ("train-images-idx3-ubyte", (60000, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", (60000,)),
    "test_images": ("t10k-images-idx3-ubyte", (10000, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", (10000,)),
}


def idx_bytes(values: torch.Tensor, magic_type: int = 0x08) -> bytes:
    """Serialize a uint8 tensor as an IDX file (header + raw bytes)."""
    header = struct.pack(">HBB", 0, magic_type, values.dim())
    header += struct.pack(f">{values.dim()}I", *values.shape)
    return header + values.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, values: torch.Tensor, gz: bool = False) -> Path:
    raw = idx_bytes(values)
    # compresslevel=1: these files are large and the tests care about format, not size.
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return path


def fake_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    return images, labels


def write_fake_dataset(folder: Path, gz: bool = False) -> dict[str, torch.Tensor]:
    """Full-size synthetic Fashion-MNIST (random pixels, labels 0..9 cycling) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = fake_split(60000, 0)
    te_x, te_y = fake_split(10000, 1)
    tensors = {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y}
    for key, (stem, _) in FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), tensors[key], gz=gz)
    return tensors


_TRAINED: dict[str, Any] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real-data training run, shared by every test in the session that needs one.

    Two epochs without augmentation comfortably beat 80% test accuracy.
    """
    if "out" not in _TRAINED:
        from fastmlp.workflow.train import TrainConfig, fit

        out = tmp_path_factory.mktemp("trained")
        cfg = TrainConfig(
            epochs=2, batch_size=256, augment=False, seed=0, device="cpu", data=str(REAL_DATA)
        )
        _TRAINED["result"] = fit(cfg, out, log=None, progress=False)
        _TRAINED["out"] = out
    return _TRAINED["out"]


def trained_result() -> Any:
    return _TRAINED["result"]


def deny_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make ``path`` unreadable, as ``chmod 000`` does for anyone but root: the mode is set,
    and for root (whom it does not stop) opening the file raises what the system would,
    ``PermissionError`` (EACCES)."""
    path.chmod(0)
    if os.geteuid() != 0:
        return
    real_open = builtins.open

    def guarded(file: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(file, str | os.PathLike) and Path(file).absolute() == path.absolute():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # what pathlib's read_bytes uses

"""Each unclear case a user hit becomes one line that says what is wrong and what to do:
exit 1 (2 for a bad command line), no traceback, nothing lost."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from workflow_fixtures import REAL_DATA, deny_reading, needs_real_data, write_fake_dataset

import fastmlp
from fastmlp.nn import MLP
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import cli, data, rundir
from fastmlp.workflow import train as train_mod
from fastmlp.workflow.cli import main
from fastmlp.workflow.config import TrainConfig

QUICK = ["--data", str(REAL_DATA), "--device", "cpu", "--quiet", "--train-samples", "1000"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def no_data(*args: object, **kw: object) -> None:
    raise AssertionError("the data was loaded: the error came after training started")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--seed", str(2**70)], "--seed: expected a seed from 0 to"),
        (["--batch-size", str(10**9)], "larger than the 60000 training samples"),
        (["--batch-size", "1001", "--train-samples", "1000"], "use --batch-size 1000 or less"),
        (["--max-shift", "100"], "--max-shift: expected pixels from 0 to 27"),
        (["--max-loss", "-1"], "--max-loss: expected a positive number or 'none'"),
    ],
)
def test_bad_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    expected: str,
) -> None:
    monkeypatch.setattr(data, "load_split", no_data)
    code, out, err = run(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert code == 2 and expected in one_line(err) and out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        (str(2**70), "hidden layer widths must be at most 16777216 (2**24: two such layers"),
        ("-5,5", "hidden layer widths must be positive, got -5 (in '-5,5')"),
    ],
)
def test_hidden_widths_out_of_bounds_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    hidden: str,
    expected: str,
) -> None:
    monkeypatch.setattr(data, "load_split", no_data)
    code, out, err = run(capsys, "train", "--hidden", hidden, "--out", str(tmp_path / "run"))
    line = one_line(err)
    assert code == 2 and f"argument --hidden: {expected}" in line and out == ""


def tiny_data(train: bool = True, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    n = 1000 if train else 100
    return torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n) % 10


def test_a_model_too_large_for_memory_names_its_layer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Layer 3 would hold 2**48 fp32 weights (1 PiB): more than any address space, so the
    # allocation fails on every machine, after layer 2's 64 MiB were allocated.
    monkeypatch.setattr(data, "load_split", tiny_data)
    argv = ["train", "--hidden", "1,16777216,16777216", "--out", str(tmp_path / "run")]
    code, _, err = run(capsys, *argv, "--device", "cpu", "--quiet")
    line = one_line(err)
    assert code == 1 and "not enough memory on cpu for the 784-1-16777216-16777216-10 MLP" in line
    assert "layer 3's 16777216x16777216 weights (1.0 PiB, 1125899906842624 bytes)" in line
    assert "use smaller --hidden widths" in line
    assert not (tmp_path / "run").exists()


def test_out_of_memory_elsewhere_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_memory(*args: object, **kw: object) -> None:
        raise RuntimeError(  # what PyTorch's CPU allocator raises
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate "
            "memory)"
        )

    monkeypatch.setattr(train_mod, "fit", no_memory)
    code, _, err = run(capsys, "train", "--device", "cpu", "--out", str(tmp_path / "run"))
    line = one_line(err)
    assert code == 1 and "out of memory: an allocation of 37.3 GiB (40000000000 bytes)" in line
    assert "use a smaller --batch-size or smaller --hidden widths" in line

    # evaluate has no --hidden; Python's own MemoryError carries no size.
    def python_out_of_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(cli, "_load_model", python_out_of_memory)
    code, _, err = run(capsys, "evaluate", "model.pt")
    assert code == 1 and one_line(err) == (
        "fastmlp evaluate: error: out of memory: an allocation failed; use a smaller --batch-size"
    )


def test_out_is_an_existing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    code, _, err = run(capsys, "train", "--out", str(f), "--device", "cpu")
    assert code == 1 and "is a file, not a folder" in one_line(err)
    assert f.read_text() == "keep"


def test_read_only_out_is_found_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path: object, *args: object, **kw: object) -> int:
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rundir.os, "open", read_only)
    monkeypatch.setattr(data, "load_split", no_data)
    code, _, err = run(capsys, "train", "--out", str(out), "--device", "cpu")
    assert code == 1 and "is not writable (Read-only file system)" in one_line(err)


def test_unreadable_data_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    write_fake_dataset(folder)
    deny_reading(monkeypatch, folder / "t10k-labels-idx1-ubyte")
    code, _, err = run(capsys, "samples", "--test", "--data", str(folder), "--out", "x.png")
    line = one_line(err)
    assert code == 1
    assert line == (
        f"fastmlp samples: error: cannot read {folder / 't10k-labels-idx1-ubyte'}: "
        "permission denied"
    )


def test_fastmlp_data_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTMLP_DATA", "/nonexistent")
    code, _, err = run(capsys, "samples", "--out", "x.png")
    line = one_line(err)
    assert code == 1 and "FASTMLP_DATA=/nonexistent: no such folder" in line
    assert "unset it" in line


@pytest.mark.parametrize("outputs", [5, 20])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_checkpoint_with_other_than_10_outputs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, outputs: int, command: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save(MLP((784, 32, outputs)).state_dict(), path)
    extra = ["image.png"] if command == "predict" else []
    code, _, err = run(capsys, command, str(path), *extra)
    assert code == 1 and f"{outputs}-output model" in one_line(err) and "10 outputs" in err


def _training_checkpoint(path: Path, model_state: dict[str, torch.Tensor]) -> Path:
    """A training checkpoint as fastmlp train writes it, with ``model_state`` as its model."""
    model = MLP()
    state = ckpt.training_state(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        epoch=1,
        config={**dataclasses.asdict(TrainConfig(epochs=2)), "sizes": [784, 512, 512, 10]},
        metrics=[],
        best_accuracy=0.5,
        versions={},
    )
    return ckpt.save_checkpoint({**state, "model": model_state}, path)


@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_checkpoint_of_meta_tensors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
) -> None:
    monkeypatch.setattr(data, "load_split", no_data)
    meta = MLP().to("meta").state_dict()
    if command == "resume":
        path = _training_checkpoint(tmp_path / "last.pt", meta)
        argv = ["train", "--resume", str(path)]
    else:
        path = tmp_path / "model.pt"
        torch.save(meta, path)
        argv = [command, str(path), *(["image.png"] if command == "predict" else [])]
    code, _, err = run(capsys, *argv)
    line = one_line(err)
    assert code == 1 and f"{path} holds meta tensors (linear_relu_stack.0.weight" in line
    assert "save the state_dict of a model with real weights" in line


def test_resume_of_a_checkpoint_with_7_classes_says_so_like_evaluate(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data, "load_split", no_data)
    path = _training_checkpoint(tmp_path / "last.pt", MLP((784, 512, 512, 7)).state_dict())
    code, _, err = run(capsys, "train", "--resume", str(path))
    assert code == 1 and f"{path} holds a 784-input, 7-output model" in one_line(err)
    assert "10 outputs (its classes)" in err
    code, _, evaluate_err = run(capsys, "evaluate", str(path))
    assert code == 1 and evaluate_err == err.replace("fastmlp train", "fastmlp evaluate")


def test_resume_of_a_checkpoint_without_rng(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = MLP()
    state = {
        "model": model.state_dict(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "epoch": 1,
        "config": {"epochs": 2},
        "metrics": [],
        "best_accuracy": 0.5,
    }
    ckpt.save_checkpoint(state, tmp_path / "last.pt")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "last.pt"))
    line = one_line(err)
    assert code == 1 and "cannot be resumed: it lacks 'rng'" in line
    assert f"fastmlp evaluate {tmp_path / 'last.pt'}" in line


def test_meta_tensors_through_linear_relu() -> None:
    x = torch.empty(3, 7, device="meta")
    w = torch.empty(5, 7, device="meta")
    y = fastmlp.linear_relu(x, w, torch.empty(5, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 5)
    assert MLP().to("meta")(torch.empty(2, 1, 28, 28, device="meta")).shape == (2, 10)


def test_fused_sgd_on_an_empty_batch() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fastmlp.FusedSGD(model, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match=r"non-empty batch, got x of shape \(0, 1, 28, 28\)"):
        opt.train_step(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing changed, no NaN written


def test_predict_reports_the_bad_image_and_still_answers_for_the_good(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from PIL import Image

    path = tmp_path / "model.pt"
    torch.save(ckpt.model_checkpoint(MLP()), path)  # weights and architecture: no note
    good = tmp_path / "good.png"
    Image.new("L", (40, 40), 30).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, out, err = run(capsys, "predict", str(path), str(bad), str(good))
    assert code == 1
    assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    assert "cannot read image" in one_line(err) and str(bad) in err


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that says it is ``width`` x ``height`` (1-bit gray) and holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_predict_reports_an_image_too_large_and_answers_the_others(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from PIL import Image

    path = tmp_path / "model.pt"
    torch.save(ckpt.model_checkpoint(MLP()), path)  # weights and architecture: no note
    bomb = _png_header(tmp_path / "bomb.png", 20000, 20000)  # 400M pixels: PIL refuses it
    gray = tmp_path / "gray.png"
    Image.new("L", (40, 40), 30).save(gray)
    code, out, err = run(capsys, "predict", str(path), str(bomb), str(gray))
    assert code == 1 and out.startswith(f"{gray}: ") and len(out.strip().splitlines()) == 1
    line = one_line(err)
    assert f"cannot read image {bomb}: too large to decode" in line and "scale it down" in line


@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize("failure", ["oserror", "zip-writer"])
def test_full_disk_during_a_save_keeps_the_last_good_checkpoint(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    out = tmp_path / "run"
    saves = {"n": 0}
    real_save = torch.save

    def filling_disk(obj: object, f: object) -> None:
        saves["n"] += 1
        if saves["n"] <= 2:  # epoch 1: last.pt and best.pt
            return real_save(obj, f)
        f.write(b"partial")  # type: ignore[attr-defined]
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        # What torch's zip writer raises on a full disk.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", filling_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    code, _, err = run(capsys, "train", "--epochs", "2", "--out", str(out), *QUICK)
    line = one_line(err)
    assert code == 1
    assert "no space left on device" in line.lower() and "previous version is unchanged" in line
    assert f"fastmlp train --resume {out / 'last.pt'}" in line
    monkeypatch.undo()
    assert ckpt.load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


def test_training_diverged_error_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverged(*args: object, **kw: object) -> None:
        raise train_mod.TrainingDiverged("training diverged in epoch 3: ...")

    monkeypatch.setattr(train_mod, "fit", diverged)
    code, _, err = run(capsys, "train", "--device", "cpu", "--out", "x")
    assert code == 1 and one_line(err) == "fastmlp train: error: training diverged in epoch 3: ..."

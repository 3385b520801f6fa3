"""Checkpoints: atomic saves that survive a kill, safe loads, plain-PyTorch model state."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from workflow_fixtures import NeuralNetwork, deny_reading

from fastmlp.nn import MLP
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow.cli import main


def state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((4, 4), value)}, "epoch": int(value), "note": "plain"}


def test_save_load_roundtrip(tmp_path: Path) -> None:
    p = ckpt.save_checkpoint(state(3.0), tmp_path / "sub" / "last.pt")
    loaded = ckpt.load_checkpoint(p)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.full((4, 4), 3.0))
    # The documented contract: plain torch.load with weights_only=True reads it.
    assert torch.load(p, weights_only=True)["note"] == "plain"
    assert [f.name for f in p.parent.iterdir()] == ["last.pt"]  # no temporaries left


def test_failed_save_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = ckpt.save_checkpoint(state(1.0), tmp_path / "last.pt")

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk full; the previous version"):
        ckpt.save_checkpoint(state(2.0), p)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(p)["epoch"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


_fdopen = os.fdopen


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: a longer write fails with ENOSPC, as
    write(2) does on a full disk."""

    def __init__(self, fd: int, room: int) -> None:
        self.file = _fdopen(fd, "wb", buffering=0)
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        data = bytes(b)  # type: ignore[call-overload]
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data) or 0

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()
        super().close()


@pytest.mark.parametrize("room", [100, 5000])  # inside the zip header; in the data
def test_full_disk_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    # torch.save's zip writer turns the write's OSError into "[enforce fail at
    # inline_container.cc:672] . unexpected pos ..."; the message names the real cause,
    # whatever the free space reads once the partial file is gone.
    p = ckpt.save_checkpoint(state(1.0), tmp_path / "last.pt")
    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: _FullDisk(fd, room))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=10**12))
    big = {"model": {"w": torch.zeros(10_000)}, "epoch": 2}
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_checkpoint(big, p)
    assert str(e.value) == (
        f"cannot write {p}: No space left on device; the previous version is unchanged"
    )
    monkeypatch.undo()
    assert ckpt.load_checkpoint(p)["epoch"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


# The child saves version 1, then starts saving version 2 and is SIGKILLed while the bytes
# are written but before the rename (the sleep stands in for a slow disk). Then the same
# again at a random moment of a tight save loop.
_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from fastmlp.workflow import checkpoint as ckpt
    path = sys.argv[1]
    big = {"model": {"w": torch.zeros(1_000_000)}, "epoch": 1}
    ckpt.save_checkpoint(big, path)
    if sys.argv[2] == "at-fsync":
        real_fsync = os.fsync
        def slow_fsync(fd):
            print("SAVING", flush=True)
            time.sleep(60)
            real_fsync(fd)
        os.fsync = slow_fsync
        ckpt.save_checkpoint({"model": {"w": torch.ones(1_000_000)}, "epoch": 2}, path)
    else:
        print("SAVING", flush=True)
        i = 2
        while True:
            ckpt.save_checkpoint({"model": {"w": torch.full((1_000_000,), float(i))},
                                  "epoch": i}, path)
            i += 1
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
@pytest.mark.parametrize("when", ["at-fsync", "random"])
def test_kill_during_save_leaves_a_valid_checkpoint(tmp_path: Path, when: str) -> None:
    path = tmp_path / "last.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), when], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "SAVING"
        if when == "random":
            import time

            time.sleep(0.3)  # several saves in flight by now
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    loaded = ckpt.load_checkpoint(path)
    if when == "at-fsync":
        assert loaded["epoch"] == 1  # the old checkpoint survived intact
        leftovers = [f.name for f in tmp_path.iterdir() if f.name != "last.pt"]
        assert leftovers and all(n.endswith(".tmp") for n in leftovers)
    epoch = loaded["epoch"]
    expected = 0.0 if epoch == 1 else float(epoch)
    assert torch.equal(loaded["model"]["w"], torch.full((1_000_000,), expected))
    # A later save in the same folder works despite the abandoned temporary.
    ckpt.save_checkpoint(state(5.0), path)
    assert ckpt.load_checkpoint(path)["epoch"] == 5


def test_pickled_objects_are_refused_unless_trusted(tmp_path: Path) -> None:
    p = tmp_path / "model.pth"
    model = MLP()
    torch.save(model, p)  # the tutorial's whole-model save
    with pytest.raises(ckpt.UnsafeCheckpointError, match="pickled Python objects.*--trust"):
        ckpt.load_checkpoint(p)
    loaded = ckpt.load_checkpoint(p, trusted=True)
    assert type(loaded) is MLP
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(
        ckpt.extract_state_dict(loaded)["linear_relu_stack.4.bias"],
        getattr(model.linear_relu_stack, "4").bias,
    )


def _pickle_of_a_class_gone(path: Path, module: str) -> Path:
    """A whole model saved with ``torch.save(model)`` whose class lived in ``module`` (the
    tutorial's script run as ``__main__``, or a module of the user's) and is not there
    now: what loading it in another process finds."""

    class NeuralNetwork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flatten = nn.Flatten()
            self.linear = nn.Linear(784, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.flatten(x))

    NeuralNetwork.__module__ = module
    NeuralNetwork.__qualname__ = "NeuralNetwork"
    with pytest.MonkeyPatch.context() as m:  # only while saving: pickle looks the class up
        if module == "__main__":
            m.setattr(sys.modules["__main__"], "NeuralNetwork", NeuralNetwork, raising=False)
        else:
            owner = types.ModuleType(module)
            owner.NeuralNetwork = NeuralNetwork  # type: ignore[attr-defined]
            m.setitem(sys.modules, module, owner)
        torch.save(NeuralNetwork(), path)
    return path


@pytest.mark.parametrize("module", ["__main__", "my_models"])
def test_pickled_model_whose_class_is_gone_is_not_called_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], module: str
) -> None:
    path = _pickle_of_a_class_gone(tmp_path / "model.pth", module)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path, trusted=True)
    message = str(e.value)
    assert message.startswith(
        f"{path} holds a whole pickled model whose class NeuralNetwork (from {module}) "
        "cannot be imported here"
    ), message
    assert "model.state_dict()" in message and "\n" not in message
    assert "corrupt" not in message and "truncated" not in message
    # The command says the same on one line.
    assert main(["evaluate", str(path), "--trust"]) == 1
    assert capsys.readouterr().err == f"fastmlp evaluate: error: {message}\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: good[:100], "truncated"),
        (lambda good: b"", "truncated or not a PyTorch checkpoint"),
        (lambda good: b"hello world" * 50, "not a PyTorch checkpoint"),
        (lambda good: good[:-30], "truncated"),
        (lambda good: good[:80] + b"\xff" * 8 + good[88:], "corrupt: checksum mismatch"),
        (lambda good: good[:200] + b"\xff" * 8 + good[208:], "corrupt"),
        (lambda good: good[:-400] + b"\xff" * 8 + good[-392:], "corrupt"),
    ],
)
def test_damaged_files_give_clear_errors(tmp_path: Path, content, message: str) -> None:
    good = tmp_path / "good.pt"
    ckpt.save_checkpoint(state(1.0), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content(good.read_bytes()))
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        ckpt.load_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("case", ["folder", "symlink-loop", "broken-symlink", "unreadable"])
def test_checkpoints_that_cannot_be_read_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    run = tmp_path / "run"
    ckpt.save_checkpoint(state(1.0), run / "last.pt")
    path, expected = {
        "folder": (run, f"it is a folder, not a file; did you mean {run / 'last.pt'}?"),
        "symlink-loop": (
            tmp_path / "loop.pt",
            "it is a symlink loop (too many levels of symbolic links)",
        ),
        "broken-symlink": (tmp_path / "gone.pt", "it is a broken symlink to nowhere.pt"),
        "unreadable": (run / "last.pt", "permission denied"),
    }[case]
    if case == "symlink-loop":
        path.symlink_to(path.name)  # loop.pt -> loop.pt
    elif case == "broken-symlink":
        path.symlink_to("nowhere.pt")
    elif case == "unreadable":
        deny_reading(monkeypatch, path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path)
    assert str(e.value) == f"cannot read checkpoint {path}: {expected}"


def test_tutorial_model_loads_fastmlp_state_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fused = MLP()
    tutorial = NeuralNetwork()
    # The documented one-liner: the "model" entry is the tutorial's state_dict.
    ckpt.save_checkpoint({"model": fused.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    tutorial.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True)["model"])
    x = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(tutorial(x), fused(x))
    # And the other way: a state_dict saved the tutorial's way, loaded into fastmlp.
    torch.save(NeuralNetwork().state_dict(), tmp_path / "model_weights.pth")
    sd = ckpt.extract_state_dict(ckpt.load_checkpoint(tmp_path / "model_weights.pth"))
    assert ckpt.sizes_from_state_dict(sd) == (784, 512, 512, 10)
    back = MLP()
    back.load_state_dict(sd)
    tutorial.load_state_dict(sd)
    torch.testing.assert_close(back(x), tutorial(x))


def test_extract_state_dict_strips_wrapper_prefixes() -> None:
    sd = {f"_orig_mod.{k}": v for k, v in MLP().state_dict().items()}
    assert set(ckpt.extract_state_dict(sd)) == set(MLP().state_dict())
    with pytest.raises(ckpt.CheckpointError, match="not a model checkpoint"):
        ckpt.extract_state_dict([1, 2])
    with pytest.raises(ckpt.CheckpointError, match="tutorial's layout"):
        ckpt.sizes_from_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_sizes_from_state_dict_other_widths() -> None:
    assert ckpt.sizes_from_state_dict(MLP((784, 64, 32, 16, 10)).state_dict()) == (
        784,
        64,
        32,
        16,
        10,
    )


def _objects(hidden: int = 8) -> tuple[MLP, torch.optim.Optimizer, object]:
    model = MLP((784, hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)


def _train_state(model: MLP, opt: torch.optim.Optimizer, sched: object) -> dict[str, object]:
    return ckpt.training_state(
        model=model,
        optimizer=opt,
        scheduler=sched,  # type: ignore[arg-type]
        epoch=1,
        config={"epochs": 2},
        metrics=[{"epoch": 1, "test_accuracy": 0.5}],
        best_accuracy=0.5,
        versions={"torch": str(torch.__version__)},
    )


def test_training_state_saves_and_restores_everything_a_resume_needs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, opt, sched = _objects()
    for _ in range(3):  # momentum buffers and a scheduler that has moved
        model(torch.rand(4, 784)).sum().backward()
        opt.step()
        sched.step()
    state = _train_state(model, opt, sched)
    next_draw = torch.rand(5)  # what the generator gives after the state was taken
    ckpt.save_checkpoint(state, tmp_path / "last.pt")
    loaded = ckpt.load_training_checkpoint(tmp_path / "last.pt")
    assert loaded["format"] == ckpt.FORMAT == "fastmlp-checkpoint-1"
    assert set(ckpt.TRAINING_KEYS) <= set(loaded)
    model2, opt2, sched2 = _objects()
    ckpt.restore_training(loaded, model2, opt2, sched2, tmp_path / "last.pt")  # type: ignore[arg-type]
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert torch.equal(
        opt.state_dict()["state"][0]["momentum_buffer"],
        opt2.state_dict()["state"][0]["momentum_buffer"],
    )
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(5), next_draw)


def test_training_checkpoints_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = _train_state(*_objects(hidden=8))
    with pytest.raises(
        ckpt.CheckpointError, match="last.pt cannot be resumed: its state does"
    ) as e:
        ckpt.restore_training(state, *_objects(hidden=16), path)  # type: ignore[arg-type]
    # The reason itself, not load_state_dict's header line ("Error(s) in loading ...:").
    assert "size mismatch for linear_relu_stack.0.weight" in str(e.value)
    assert "\n" not in str(e.value)
    ckpt.save_checkpoint({**state, "format": "fastmlp-checkpoint-2"}, path)
    with pytest.raises(ckpt.CheckpointError, match="'fastmlp-checkpoint-2' checkpoint and this"):
        ckpt.load_training_checkpoint(path)


# --- The architecture next to the weights --------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(sizes=(784, 16, 10), activation="leaky_relu", negative_slope=0.2),
        dict(sizes=(784, 16, 16, 10), bias=False, activation="silu"),
        dict(sizes=(784, 16, 16, 10), activation="none", output_activation="sigmoid"),
        dict(sizes=(784, 10), output_activation="gelu_tanh"),
    ],
)
def test_load_model_builds_the_recorded_architecture(tmp_path: Path, kw: dict) -> None:
    torch.manual_seed(0)
    model = MLP(**kw)
    path = ckpt.save_checkpoint(ckpt.model_checkpoint(model), tmp_path / "model.pt")
    loaded = ckpt.load_model(path)
    assert type(loaded) is MLP and not loaded.training
    assert ckpt.architecture(loaded) == ckpt.architecture(model)
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


def test_architecture_is_none_where_the_model_itself_must_say_what_it_is() -> None:
    assert ckpt.architecture(NeuralNetwork()) is None
    changed = MLP((784, 16, 10))
    changed.linear_relu_stack[1] = nn.Tanh()  # no longer the ReLU MLP its arguments say
    assert ckpt.architecture(changed) is None
    assert "architecture" not in ckpt.model_checkpoint(changed)


def test_weights_alone_load_as_the_relu_mlp_with_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tutorial = NeuralNetwork()
    torch.save(tutorial.state_dict(), tmp_path / "model_weights.pth")
    with pytest.warns(UserWarning, match="without their architecture.*784-512-512-10 MLP"):
        loaded = ckpt.load_model(tmp_path / "model_weights.pth")
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), tutorial(x))


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        ("tanh", "its 'architecture' entry is damaged"),
        ({"sizes": [784, 16, 10], "activation": "swish"}, "cannot be built: .*'swish'"),
        ({"sizes": [784, 16, 10], "dropout": 0.5}, "unknown 'dropout'"),
        ({"sizes": [784, 32, 10], "activation": "tanh"}, "784-32-10 but holds .*784-16-10"),
    ],
)
def test_damaged_architectures_are_named(tmp_path: Path, recorded: object, message: str) -> None:
    state = {"model": MLP((784, 16, 10)).state_dict(), "architecture": recorded}
    path = ckpt.save_checkpoint(state, tmp_path / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match=message) as e:
        ckpt.load_model(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 7)), r"it returns shape \(2, 7\)"),
        (nn.Linear(28, 10), r"it returns shape \(2, 1, 28, 10\)"),
        (nn.Sequential(nn.Linear(100, 10)), "mat1 and mat2 shapes cannot be multiplied"),
    ],
)
def test_whole_models_that_do_not_classify_images_are_named(
    tmp_path: Path, model: nn.Module, message: str
) -> None:
    torch.save(model, tmp_path / "model.pth")
    with pytest.raises(ckpt.CheckpointError, match=message) as e:
        ckpt.load_model(tmp_path / "model.pth", trusted=True)
    assert "does not map 28x28 images (or 784 features) to 10 logits" in str(e.value)


def test_whole_model_runs_as_it_is_in_float32_and_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 10)
    )
    torch.save(model.to(torch.bfloat16), tmp_path / "model.pth")
    loaded = ckpt.load_model(tmp_path / "model.pth", trusted=True)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.float().eval()(x))  # no dropout: eval mode


def test_resume_refuses_a_model_that_fit_would_not_rebuild(tmp_path: Path) -> None:
    model = MLP((784, 8, 10), activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = _train_state(model, opt, None)
    assert state["architecture"]["activation"] == "tanh"
    path = ckpt.save_checkpoint(state, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_training_checkpoint(path)
    assert str(e.value) == (
        f"{path} cannot be resumed: its model is an MLP with activation 'tanh', "
        "output_activation None and bias; fastmlp train trains the tutorial's ReLU MLP "
        f"(it can still be evaluated: fastmlp evaluate {path})"
    )
    # Its own ReLU MLP resumes as before.
    relu = MLP((784, 8, 10))
    ckpt.save_checkpoint(_train_state(relu, torch.optim.SGD(relu.parameters(), lr=0.1), None), path)
    assert ckpt.load_training_checkpoint(path)["architecture"]["activation"] == "relu"

"""Runs a user can trust: divergence stops loudly, metrics.json is valid JSON, a resumed
run can be extended, short schedules work, and no run overwrites another's results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from workflow_fixtures import REAL_DATA, needs_real_data, write_fake_dataset

from fastmlp.nn import MLP
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import distributed
from fastmlp.workflow import train as train_mod
from fastmlp.workflow.cli import main
from fastmlp.workflow.train import TrainConfig, TrainingDiverged, fit, make_scheduler

QUICK = ["--data", str(REAL_DATA), "--device", "cpu", "--quiet", "--train-samples", "1000"]


def small(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        epochs=2, batch_size=250, train_samples=2000, device="cpu", data=str(REAL_DATA)
    )
    return TrainConfig(**{**base, **kw})


def strict_json(path: Path) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON literal {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


# --- divergence -----------------------------------------------------------------------


def test_metrics_json_writes_non_finite_values_as_null(tmp_path: Path) -> None:
    ckpt.save_json({"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": 2}}, tmp_path / "m")
    assert strict_json(tmp_path / "m") == {"a": None, "b": [1.0, None, None], "c": {"d": 2}}


@pytest.mark.slow
@needs_real_data
def test_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_mod.train_loop
    calls = {"n": 0}

    def nan_in_epoch_2(*args: object, **kw: object) -> float:
        calls["n"] += 1
        loss = real(*args, **kw)  # type: ignore[arg-type]
        return math.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(train_mod, "train_loop", nan_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="epoch 2: mean train loss nan is not finite") as e:
        fit(small(epochs=3), out, log=None, progress=False)
    assert f"{out / 'last.pt'} keeps epoch 1" in str(e.value)
    assert ckpt.load_checkpoint(out / "last.pt")["epoch"] == 1
    metrics = strict_json(out / "metrics.json")
    assert [m["epoch"] for m in metrics["epochs"]] == [1]  # type: ignore[index]


@needs_real_data
def test_exploding_loss_exits_non_zero(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--lr", "9.9", "--schedule", "none", "--epochs", "2", "--out", str(out)]
    code = main([*argv, *QUICK])
    _, err = capsys.readouterr()
    line = one_line(err)
    assert code == 1 and "training diverged in epoch 1" in line and "exceeds --max-loss 100" in line
    assert "try a lower --lr" in line and not (out / "last.pt").exists()


# --- resume to more epochs --------------------------------------------------------------


@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize("schedule", ["none", "onecycle", "cosine"])
def test_resume_extends_a_finished_run(tmp_path: Path, schedule: str) -> None:
    cfg = small(epochs=1, schedule=schedule, lr=0.05)
    straight = fit(small(epochs=2, schedule=schedule, lr=0.05), tmp_path / "a", log=None)
    fit(cfg, tmp_path / "b", log=None, progress=False)
    extended = fit(
        None, tmp_path / "b", resume=tmp_path / "b" / "last.pt", epochs=2, log=None, progress=False
    )
    assert [e["epoch"] for e in extended.epochs] == [1, 2]
    a = ckpt.load_checkpoint(tmp_path / "a" / "last.pt")
    b = ckpt.load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["epoch"] == 2 and b["config"]["epochs"] == 2
    # From the resume on, the schedule is the 2-epoch one: both end at the same rate.
    for key in ("lr", "momentum"):
        assert b["optimizer"]["param_groups"][0][key] == a["optimizer"]["param_groups"][0][key]
    if schedule == "none":  # nothing depends on the total: the very same run
        for k, v in straight.model.state_dict().items():
            assert torch.equal(v, extended.model.state_dict()[k]), k


@pytest.mark.slow
@needs_real_data
def test_cli_resume_with_epochs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--quiet"]) == 0
    printed, err = capsys.readouterr()
    assert "epoch 2:" in printed and "ignoring" not in err
    assert [e["epoch"] for e in strict_json(out / "metrics.json")["epochs"]] == [1, 2]  # type: ignore[index]
    code = main(["train", "--resume", str(out / "last.pt"), "--epochs", "1", "--quiet"])
    line = one_line(capsys.readouterr()[1])
    assert code == 1 and "already trained 2 epochs" in line and "--epochs 3 or more" in line


# --- SIGTERM ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c(tmp_path: Path) -> None:
    # `kill`, a job scheduler or torchrun's SIGTERM used to end the run on the spot: exit
    # 143 with no message, and a save in progress left its .tmp file behind.
    folder = tmp_path / "data"
    write_fake_dataset(folder)
    out = tmp_path / "run"
    argv = ["--epochs", "1000", "--train-samples", "1000", "--batch-size", "100"]
    argv += ["--data", str(folder), "--device", "cpu", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmlp", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(1200):  # the first epoch saved: up to 2 minutes on a busy machine
            if (out / "metrics.json").is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143  # 128 + SIGTERM, as the shell reports a terminated job
    last = out / "last.pt"
    assert err.strip() == (
        f"fastmlp train: interrupted by SIGTERM; continue with: fastmlp train --resume {last}"
    )
    assert not list(out.glob(".*.tmp"))
    epoch = ckpt.load_training_checkpoint(last)["epoch"]
    assert epoch >= 1
    # Resumable: one more epoch from where it stopped.
    assert main(["train", "--resume", str(last), "--epochs", str(epoch + 1), "--quiet"]) == 0
    assert ckpt.load_checkpoint(last)["epoch"] == epoch + 1


def test_sigterm_handler_only_over_the_default_and_only_while_it_runs() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(distributed.Terminated), distributed.sigterm_raises_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # or the signal kills
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    received: list[int] = []

    def own(signum: int, frame: object) -> None:  # a library user's handler
        received.append(signum)

    signal.signal(signal.SIGTERM, own)
    try:
        with distributed.sigterm_raises_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(50):
                if received:
                    break
                time.sleep(0.1)
        assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seen: list[object] = []

    def in_a_thread() -> None:  # signal handlers belong to the main thread: nothing to do
        with distributed.sigterm_raises_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert seen == [signal.SIG_DFL]


# --- short schedules --------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_short_schedules_step_through(steps: int, schedule: str) -> None:
    model = MLP((784, 8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = make_scheduler(opt, TrainConfig(epochs=1, schedule=schedule), steps)
    for _ in range(steps):
        opt.step()
        if sched is not None:
            sched.step()
        lr = opt.param_groups[0]["lr"]
        assert math.isfinite(lr) and 0 <= lr <= 0.1


@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize(
    "argv", [["--train-samples", "1000"], ["--batch-size", "15000", "--train-samples", "60000"]]
)
def test_short_one_cycle_runs_train(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    common = ["--data", str(REAL_DATA), "--device", "cpu", "--quiet", "--no-augment"]
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "r"), *common, *argv])
    assert code == 0, capsys.readouterr()[1]
    assert "epoch 1:" in capsys.readouterr()[0]


# --- one run per output folder ------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys
    from fastmlp.workflow.rundir import RunDir
    with RunDir(sys.argv[1]):
        print("HOLDING", flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.slow
@needs_real_data
def test_second_train_on_the_same_out_fails_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "HOLDING"
        code = main(["train", "--epochs", "1", "--out", str(out), *QUICK])
        line = one_line(capsys.readouterr()[1])
        assert code == 1
        assert f"output folder {out} is in use by another run (pid {other.pid}" in line
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(timeout=60)
    assert not (out / "last.pt").exists()


@pytest.mark.slow
@needs_real_data
def test_runs_never_overwrite_each_other(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-120000")  # same second
    for _ in range(2):
        assert main(["train", "--epochs", "1", *QUICK]) == 0
    printed = capsys.readouterr()[0]
    assert "outputs in runs/20260101-120000\n" in printed
    assert "outputs in runs/20260101-120000-2\n" in printed
    for name in ("20260101-120000", "20260101-120000-2"):
        assert (tmp_path / "runs" / name / "last.pt").is_file()
    # An explicit --out with an earlier run's results: refused, kept, or replaced on request.
    out = tmp_path / "runs" / "20260101-120000"
    before = (out / "last.pt").read_bytes()
    code = main(["train", "--epochs", "1", "--seed", "5", "--out", str(out), *QUICK])
    line = one_line(capsys.readouterr()[1])
    assert code == 1 and "already holds an earlier run" in line and "--overwrite" in line
    assert (out / "last.pt").read_bytes() == before
    code = main(["train", "--epochs", "1", "--seed", "5", "--out", str(out), "--overwrite", *QUICK])
    assert code == 0
    assert ckpt.load_checkpoint(out / "last.pt")["config"]["seed"] == 5

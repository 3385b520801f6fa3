"""Training on the real data: accuracy, outputs, exact resume, the tutorial's loops."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from workflow_fixtures import REAL_DATA, NeuralNetwork, needs_real_data, trained_result, trained_run

from fastmlp import checkpoint as ckpt
from fastmlp import data
from fastmlp.config import resume_config, resume_ignores
from fastmlp.loader import DeviceLoader
from fastmlp.train import PRESETS, TrainConfig, build_model, fit, resolve_device, train_loop
from fastmlp.train import test_loop as tutorial_test_loop  # not a pytest test

PNG = b"\x89PNG\r\n\x1a\n"


def small(**kw: object) -> TrainConfig:
    """A few thousand samples: enough to exercise everything in a second or two."""
    base: dict[str, object] = dict(
        epochs=2, batch_size=250, train_samples=3000, device="cpu", data=str(REAL_DATA)
    )
    return TrainConfig(**{**base, **kw})


@needs_real_data
def test_metrics_record_the_precision_asked_and_used_and_the_machine(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from fastmlp import hardware

    metrics = json.loads((trained_run(tmp_path_factory) / "metrics.json").read_text())
    assert metrics["config"]["precision"] == "auto"  # the default
    assert metrics["config"]["precision_used"] == hardware.resolve_precision("auto", "cpu")
    assert metrics["machine"] == hardware.describe("cpu")
    assert metrics["machine"]["cpu"] == hardware.cpu_info().model


@needs_real_data
def test_short_run_beats_80_percent_and_writes_outputs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    out = trained_run(tmp_path_factory)
    result = trained_result()
    assert result.best_accuracy > 0.80
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["optimizer"] == "sgd"
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert set(e) >= {
            "epoch",
            "train_loss",
            "test_loss",
            "test_accuracy",
            "seconds",
            "samples_per_s",
        }
        assert 0 < e["test_accuracy"] <= 1 and e["seconds"] > 0 and e["samples_per_s"] > 0
    assert metrics["epochs"][-1]["test_accuracy"] > 0.80
    assert metrics["device"] == "cpu" and "torch" in metrics["versions"]
    for name in ("curves.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == PNG
    last = torch.load(out / "last.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and "optimizer" in last and "scheduler" in last
    assert set(last["model"]) == set(NeuralNetwork().state_dict())
    assert best["best_accuracy"] == pytest.approx(result.best_accuracy)


@needs_real_data
def test_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg = small(epochs=3, augment=True, max_shift=2, seed=7)  # every RNG path
    straight = fit(cfg, tmp_path / "straight", log=None, progress=False)
    fit(cfg, tmp_path / "split", stop_after=1, log=None, progress=False)
    assert ckpt.load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    resumed = fit(
        None, tmp_path / "split", resume=tmp_path / "split" / "last.pt", log=None, progress=False
    )
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [
        {k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")}
        for e in straight.epochs
    ]
    assert strip == [
        {k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")}
        for e in resumed.epochs
    ]
    saved = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2, 3]


@needs_real_data
@pytest.mark.parametrize(
    "kw",
    [
        dict(optimizer="adamw", lr=2e-3, schedule="cosine", precision="bf16"),
        dict(optimizer="adam", lr=1e-3, schedule="none", label_smoothing=0.0, augment=False),
    ],
)
def test_other_optimizers_schedules_and_bf16_learn(kw: dict[str, object]) -> None:
    result = fit(small(epochs=1, **kw), None, log=None, progress=False)
    assert result.epochs[0]["test_accuracy"] > 0.5  # chance is 0.1; 3000 samples, 1 epoch
    assert result.model.linear_relu_stack[0].weight.dtype == torch.float32  # master weights


@needs_real_data
def test_tutorial_loops_log_format_with_a_dataloader(capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision.transforms import ToTensor

    ds = data.FashionMNIST(REAL_DATA, train=True, transform=ToTensor(), download=False)
    subset = torch.utils.data.Subset(ds, range(1000))
    loader = torch.utils.data.DataLoader(subset, batch_size=64)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = train_loop(loader, model, torch.nn.CrossEntropyLoss(), optimizer, log_every=10)
    acc, test_loss = tutorial_test_loop(loader, model, torch.nn.CrossEntropyLoss())
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("loss:")]
    assert re.fullmatch(r"loss: \d\.\d{6}  \[    0/ 1000\]", lines[0])
    assert re.fullmatch(r"loss: \d\.\d{6}  \[  640/ 1000\]", lines[1])
    assert re.search(r"Test Error: \n Accuracy: \d+\.\d%, Avg loss: \d\.\d{6} \n", out)
    assert loss > 0 and 0 <= acc <= 1 and test_loss > 0


def test_device_loader_feeds_the_tutorial_model() -> None:
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    loader = DeviceLoader(images, labels, batch_size=100, shuffle=True)
    model = NeuralNetwork()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_loop(loader, model, torch.nn.CrossEntropyLoss(), optimizer, log=None)
    acc, _ = tutorial_test_loop(loader, model, log=None)
    assert loss > 0 and 0 <= acc <= 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(epochs=0), "epochs"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(lr=-1.0), "learning rate"),
        (dict(schedule="step"), "schedule"),
        (dict(precision="fp16"), "precision"),
        (dict(weight_decay=1.0), "weight decay must be in \\[0, 1\\)"),  # as the CLI says
        (dict(label_smoothing=1.0), "label smoothing"),
        (dict(lr=10.0), "learning rate must be in \\(0, 10\\), got 10.0"),  # --lr's range
        (dict(max_shift=28), "max shift must be between 0 and 27 pixels, got 28"),
        (dict(max_loss=0.0), "max loss must be > 0 \\(or None\\)"),
        (dict(train_samples=0), "train samples must be >= 1"),
        (dict(optimizer="sgdw"), "unknown optimizer 'sgdw' \\(choose from sgd, adam, adamw\\)"),
    ],
)
def test_config_validation(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_presets() -> None:
    tutorial = TrainConfig.from_preset("tutorial")
    # The tutorial's hyperparameters: plain SGD at 1e-3, batch 64, 10 epochs, nothing added.
    assert (tutorial.optimizer, tutorial.lr, tutorial.momentum) == ("sgd", 1e-3, 0.0)
    assert (tutorial.batch_size, tutorial.epochs, tutorial.schedule) == (64, 10, "none")
    assert tutorial.label_smoothing == 0.0 and tutorial.weight_decay == 0.0
    assert not tutorial.augment and tutorial.precision == "fp32" and tutorial.preset == "tutorial"
    assert tutorial.sizes == TrainConfig().sizes  # the tutorial's 784-512-512-10
    mine = TrainConfig.from_preset("tutorial", epochs=3, device="cpu")  # overrides win
    assert (mine.epochs, mine.device, mine.lr) == (3, "cpu", 1e-3)
    assert TrainConfig().preset is None
    for name in PRESETS:  # every preset is a valid config
        assert TrainConfig.from_preset(name).preset == name
    with pytest.raises(ValueError, match="unknown preset 'fastest' \\(choose from tutorial"):
        TrainConfig.from_preset("fastest")
    # A checkpoint's config (from before presets, or with one) rebuilds.
    assert TrainConfig.from_dict({**asdict(tutorial), "world_size": 1}) == tutorial
    old = {k: v for k, v in asdict(TrainConfig()).items() if k != "preset"}
    assert TrainConfig.from_dict(old) == TrainConfig()


def test_resume_config_changes_only_where_the_run_goes() -> None:
    saved = TrainConfig(epochs=4, lr=0.05, device="cpu", data="/saved", backend="gloo")
    given = dict(lr=0.5, batch_size=64, device="cuda", data=None, backend="auto")
    cfg = resume_config(saved, given, done=2)
    assert cfg == replace(saved, device="cuda", backend="auto")  # data None: the saved one
    assert resume_ignores(given) == ["batch_size", "lr"]
    assert resume_config(saved, None, epochs=6, done=4).epochs == 6
    with pytest.raises(ValueError, match="x.pt has already trained 4 epochs, more than --epochs 3"):
        resume_config(saved, epochs=3, done=4, source="x.pt")


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device|unsupported device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")

"""Training on the real data: accuracy, outputs, exact resume, the tutorial's loops."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from workflow_fixtures import REAL_DATA, NeuralNetwork, needs_real_data, trained_result, trained_run

from fastmlp.nn import MLP
from fastmlp.optim import FusedSGD
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data
from fastmlp.workflow.config import resume_config, resume_ignores
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.train import (
    PRESETS,
    TrainConfig,
    build_model,
    fit,
    resolve_device,
    train_loop,
)
from fastmlp.workflow.train import test_loop as tutorial_test_loop  # not a pytest test

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


@pytest.mark.slow
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
    loss_fn, batch_losses = _recording_cross_entropy()
    loss = train_loop(loader, model, loss_fn, optimizer, log_every=10)
    acc, test_loss = tutorial_test_loop(loader, model, torch.nn.CrossEntropyLoss())
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("loss:")]
    assert lines == [
        f"loss: {batch_losses[0]:>7f}  [    0/ 1000]",
        f"loss: {batch_losses[10]:>7f}  [  640/ 1000]",
    ]
    assert re.search(r"Test Error: \n Accuracy: \d+\.\d%, Avg loss: \d\.\d{6} \n", out)
    assert len(batch_losses) == 16  # 15 batches of 64 and one of 40
    assert loss == pytest.approx(sum(batch_losses) / 16, rel=1e-6)
    expected_acc, expected_loss = _recount(model, loader)
    assert acc == expected_acc and test_loss == pytest.approx(expected_loss, rel=1e-6)


def test_device_loader_feeds_the_tutorial_model() -> None:
    """Training lowers the loss on a fixed set (random labels: it can only memorise), and
    the numbers returned are the ones the model gives."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    loader = DeviceLoader(images, labels, batch_size=100, shuffle=True)
    model = NeuralNetwork()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn, batch_losses = _recording_cross_entropy()
    epoch_losses = []
    for _ in range(4):
        batch_losses.clear()
        epoch_losses.append(train_loop(loader, model, loss_fn, optimizer, log=None))
        assert epoch_losses[-1] == pytest.approx(sum(batch_losses) / 3, rel=1e-6)
    assert all(b < a for a, b in zip(epoch_losses, epoch_losses[1:], strict=False)), epoch_losses
    acc, test_loss = tutorial_test_loop(loader, model, log=None)
    expected_acc, expected_loss = _recount(model, loader)
    assert acc == expected_acc and test_loss == pytest.approx(expected_loss, rel=1e-6)


def _recording_cross_entropy() -> tuple[Any, list[float]]:
    """Cross-entropy that records each batch's loss (as a float)."""
    losses: list[float] = []
    ce = torch.nn.CrossEntropyLoss()

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ce(logits, y)
        losses.append(loss.item())
        return loss

    return loss_fn, losses


@torch.no_grad()
def _recount(model: torch.nn.Module, loader: Any) -> tuple[float, float]:
    """Accuracy and per-sample mean cross-entropy of ``model`` over ``loader``, counted here."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for X, y in loader:
        logits = model(X)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return correct / n, loss / n


# ---------------------------------------------------------------- the step protocol


def _tiny(seed: int = 0) -> tuple[DeviceLoader, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=g)
    torch.manual_seed(seed)
    return DeviceLoader(images, labels, batch_size=16), MLP((784, 12, 10))


def _tutorial_epoch(loader: Any, model: torch.nn.Module, loss_fn: Any, opt: Any) -> None:
    for X, y in loader:
        loss = loss_fn(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_step_function_takes_every_step() -> None:
    loader, model = _tiny()
    before = copy.deepcopy(model.state_dict())
    opt = FusedSGD(model, lr=0.1)  # would offer its fused step; step= comes first
    seen: list[torch.Tensor] = []

    def step(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(y)
        return torch.tensor(float(len(seen)))

    loss = train_loop(loader, model, torch.nn.CrossEntropyLoss(), opt, step=step, log=None)
    assert torch.equal(torch.cat(seen), loader.y)  # every batch, in order
    assert loss == pytest.approx((1 + 2 + 3) / 3)  # the mean of what step returned
    for key, value in model.state_dict().items():  # nothing else stepped
        assert torch.equal(value, before[key]), key


def test_an_optimizer_without_train_step_for_gets_the_autograd_step() -> None:
    loader, model = _tiny()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_loop(loader, model, loss_fn, opt, log=None)
    _tutorial_epoch(loader, twin, loss_fn, twin_opt)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fused_sgd_steps_its_own_model_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FusedSGD of the model takes its fused step; one of another model (or with another
    loss) leaves the loop to the autograd step, which then steps nothing of this model."""
    loader, model = _tiny()
    fused_calls: list[int] = []
    real = FusedSGD.train_step

    def counting(self: FusedSGD, *a: Any, **kw: Any) -> torch.Tensor:
        fused_calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(FusedSGD, "train_step", counting)
    train_loop(loader, model, torch.nn.CrossEntropyLoss(), FusedSGD(model, lr=0.1), log=None)
    assert len(fused_calls) == 3
    assert all(p.grad is None for p in model.parameters())  # the fused kernel made no .grad

    other = MLP((784, 12, 10))
    before = copy.deepcopy(model.state_dict())
    train_loop(loader, model, torch.nn.CrossEntropyLoss(), FusedSGD(other, lr=0.1), log=None)
    assert len(fused_calls) == 3  # no fused step for a model it does not own
    assert all(p.grad is not None for p in model.parameters())  # autograd ran backward
    for key, value in model.state_dict().items():  # ... and `other`'s optimizer stepped other
        assert torch.equal(value, before[key]), key

    smoothing = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    train_loop(loader, model, smoothing, FusedSGD(model, lr=0.1), log=None)
    assert len(fused_calls) == 6  # label smoothing is the kernel's
    train_loop(loader, model, torch.nn.functional.cross_entropy, FusedSGD(model, lr=0.1), log=None)
    assert len(fused_calls) == 6  # any other loss_fn: autograd


def test_a_step_function_refuses_weighted_batches() -> None:
    """A sharded loader's uneven last batch needs the autograd step's loss weighting."""
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.randint(0, 10, (5,)), 2, rank=0, world_size=2)
    model = MLP((784, 12, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(())

    with pytest.raises(ValueError, match="batch 1 has weight 0.* step functions take unweighted"):
        train_loop(loader, model, torch.nn.CrossEntropyLoss(), opt, step=step, log=None)


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


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_a_missing_gpu_is_named_as_asked(monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    have = {0: "no CUDA GPU is available", 1: "this machine has 1 CUDA GPU(s) (cuda:0)"}
    have[2] = "this machine has 2 CUDA GPU(s) (cuda:0 to cuda:1)"
    with pytest.raises(ValueError) as e:
        resolve_device("cuda:3")
    assert str(e.value) == f"device 'cuda:3' requested but {have[gpus]}"


def test_flush_denormals_restores_the_previous_mode() -> None:
    from fastmlp.workflow.train import flush_denormals

    def tiny() -> float:  # a denormal through one multiply: 0 while they are flushed
        return (torch.tensor([1e-39]) * 1.0).item()

    assert tiny() != 0.0
    with flush_denormals():
        assert tiny() == 0.0
    assert tiny() != 0.0
    torch.set_flush_denormal(True)
    try:
        with flush_denormals():
            pass
        assert tiny() == 0.0  # it was on before: still on
    finally:
        torch.set_flush_denormal(False)

"""The ``fastmlp`` command: each subcommand, and errors as one line with a non-zero exit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from workflow_fixtures import (
    REAL_DATA,
    NeuralNetwork,
    needs_real_data,
    trained_run,
    write_fake_dataset,
    write_idx,
)

import fastmlp
from fastmlp.nn import MLP
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data
from fastmlp.workflow import train as train_mod
from fastmlp.workflow.cli import UsageError, build_parser, main
from fastmlp.workflow.config import OPTIONS, Option
from fastmlp.workflow.data import load_image
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.loops import evaluate


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["train", "--epochs", "0"],
        ["train", "--epochs", "many"],
        ["train", "--lr", "abc"],
        ["train", "--lr", "nan"],
        ["train", "--momentum", "1.5"],
        ["train", "--optimizer", "rmsprop"],
        ["train", "--schedule", "step"],
        ["train", "--precision", "fp16"],
        ["train", "--batch-size", "-3"],
        ["train", "--no-such-flag"],
        ["evaluate"],
        ["predict", "model.pt"],
        ["samples", "--seed", "x"],
    ],
)
def test_bad_command_lines(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err)
    assert out == ""


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "samples"])
def test_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"usage: fastmlp {command}" in out
    if command == "train":
        for flag in (
            "--data",
            "--out",
            "--epochs",
            "--batch-size",
            "--optimizer",
            "--lr",
            "--momentum",
            "--schedule",
            "--label-smoothing",
            "--precision",
            "--device",
            "--seed",
            "--resume",
        ):
            assert flag in out


def test_train_help_shows_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside "--no-nesterov"
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    for opt in OPTIONS:
        if opt.flag is None:  # eval_batch_size; preset (--preset is made by hand)
            continue
        assert opt.flag in out
        if opt.default is not None:
            assert f"default {opt.text(opt.default)}" in out, opt.flag
    assert "(default 512,512)" in out and "(default 100)" in out  # --hidden, --max-loss
    assert "--eval-batch-size" not in out
    tutorial = (
        "tutorial: --optimizer sgd --lr 0.001 --momentum 0 --no-nesterov --batch-size 64 "
        "--epochs 10 --schedule none --label-smoothing 0 --weight-decay 0 --no-augment "
        "--precision fp32"
    )
    assert tutorial in out


def _candidates(opt: Option) -> list[object]:
    """Values on and around the ends of an option's range, or its choices and a bad one."""
    if opt.choices is not None:
        return [*opt.choices, "bogus"]
    assert opt.range is not None
    low, high = opt.range.low, opt.range.high
    if opt.kind is int:
        ends = [low - 1, low, low + 1] + ([high - 1, high, high + 1] if high != math.inf else [])
        return ends
    inside = [low + 1e-9, (low + high) / 2 if high != math.inf else low + 1]
    return [low - 0.5, low, *inside, high - 1e-9, high, high + 0.5]


@pytest.mark.parametrize(
    "opt", [o for o in OPTIONS if o.flag and (o.range or o.choices)], ids=lambda o: o.flag
)
def test_flags_accept_exactly_what_the_config_accepts(opt: Option) -> None:
    parser = build_parser()
    for value in _candidates(opt):
        try:
            train_mod.TrainConfig(**{opt.name: value})
            config_ok = True
        except ValueError:
            config_ok = False
        try:
            parser.parse_args(["train", opt.flag, str(value)])  # type: ignore[arg-type]
            flag_ok = True
        except UsageError:
            flag_ok = False
        if isinstance(value, float) and not math.isfinite(value):
            assert not flag_ok, value  # the command line wants a finite number
        else:
            assert flag_ok == config_ok, (opt.flag, value, flag_ok, config_ok)
    if opt.kind is float:
        with pytest.raises(UsageError, match=f"argument {opt.flag}: expected"):
            parser.parse_args(["train", opt.flag, "nan"])


@pytest.mark.parametrize(
    "text", ["512,512", "7", "0", "-5", "-5,5", "5,-5", "16777216", "16777217", str(2**70)]
)
def test_hidden_accepts_exactly_what_the_config_accepts(text: str) -> None:
    widths = tuple(int(w) for w in text.split(","))
    try:
        train_mod.TrainConfig(sizes=(784, *widths, 10))
        config_error = None
    except ValueError as e:
        config_error = str(e)
    try:
        args = build_parser().parse_args(["train", "--hidden", text])
        flag_error = None
    except UsageError as e:
        flag_error = str(e)
    if config_error is None:
        assert flag_error is None and args.sizes == (784, *widths, 10)
    else:  # the same reason, negative widths included (not "expected one argument")
        assert flag_error is not None and config_error in flag_error, (config_error, flag_error)
    positive, small = min(widths) >= 1, max(widths) <= 2**24
    assert (config_error is None) == (positive and small)


def test_preset_fills_in_the_config_and_flags_override_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, object] = {}

    def fake_fit(config: object, out: object, **kw: object) -> train_mod.FitResult:
        seen["config"], seen["resume"] = config, kw["resume"]
        return train_mod.FitResult(model=torch.nn.Identity())

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    argv = ["train", "--preset", "tutorial", "--epochs", "2", "--augment", "--out", str(tmp_path)]
    assert run(capsys, *argv)[0] == 0
    expected = train_mod.TrainConfig.from_preset("tutorial", epochs=2, augment=True)
    assert seen["config"] == expected and expected.lr == 1e-3
    code, _, err = run(
        capsys, "train", "--resume", str(tmp_path / "last.pt"), "--preset", "tutorial"
    )
    assert code == 2 and "--preset cannot be used with --resume" in err
    assert_one_line_error(err)


def test_invalid_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "--device", "tpu", "--out", str(tmp_path))
    assert code == 1
    assert_one_line_error(err)


def test_missing_and_unsafe_checkpoints(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "evaluate", str(tmp_path / "missing.pt"))
    assert code == 1 and "checkpoint not found" in err
    assert_one_line_error(err)
    torch.save(MLP(), tmp_path / "whole.pt")
    code, _, err = run(capsys, "predict", str(tmp_path / "whole.pt"), "x.png")
    assert code == 1 and "--trust" in err
    assert_one_line_error(err)
    (tmp_path / "junk.pt").write_bytes(b"\0" * 100)
    code, _, err = run(capsys, "evaluate", str(tmp_path / "junk.pt"))
    assert code == 1 and "not a PyTorch checkpoint" in err


@pytest.mark.slow
def test_no_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlp.workflow.cli", "evaluate", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_data_not_found(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "samples", "--data", str(tmp_path / "nowhere"))
    assert code == 1
    assert "Looked in" in err and "apt-get install dataset-fashion-mnist" in err
    assert "Traceback" not in err


@needs_real_data
def test_samples_grid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_png = tmp_path / "grid.png"
    code, out, _ = run(capsys, "samples", "--out", str(out_png), "--seed", "0")
    assert code == 0 and str(out_png) in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_real_data
def test_train_stop_and_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = [
        "--data",
        str(REAL_DATA),
        "--train-samples",
        "2000",
        "--batch-size",
        "200",
        "--device",
        "cpu",
        "--quiet",
    ]
    code, out, _ = run(
        capsys, "train", "--epochs", "2", "--stop-after", "1", "--out", str(tmp_path), *common
    )
    assert code == 0 and "epoch 1:" in out
    code, out, err = run(
        capsys,
        "train",
        "--resume",
        str(tmp_path / "last.pt"),
        "--quiet",
        "--lr",
        "5",
        "--hidden",
        "64",
    )
    assert code == 0 and "epoch 2:" in out
    assert "ignoring --lr, --hidden" in err  # each named by its flag
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["config"]["lr"] == 0.1  # the saved config won


@needs_real_data
def test_preset_run_records_its_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--data", str(REAL_DATA), "--train-samples", "640", "--device", "cpu", "--quiet"]
    code, out, _ = run(
        capsys, "train", "--preset", "tutorial", "--epochs", "1", "--out", str(tmp_path), *argv
    )
    assert code == 0 and "epoch 1:" in out
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["preset"] == "tutorial" and config["lr"] == 1e-3 and config["batch_size"] == 64
    assert config["train_samples"] == 640  # the flag over the preset


@pytest.mark.slow
@needs_real_data
def test_evaluate_checkpoints(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    best = trained_run(tmp_path_factory) / "best.pt"
    code, out, _ = run(capsys, "evaluate", str(best), "--data", str(REAL_DATA))
    assert code == 0 and "Test Error:" in out
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 80
    # A state_dict saved the tutorial's way evaluates too (untrained: near chance).
    torch.save(NeuralNetwork().state_dict(), tmp_path / "model_weights.pth")
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "model_weights.pth"))
    assert code == 0 and "test accuracy" in out
    # A whole pickled model needs --trust, and works with it.
    torch.save(MLP(), tmp_path / "model.pth")
    assert run(capsys, "evaluate", str(tmp_path / "model.pth"))[0] == 1
    assert run(capsys, "evaluate", str(tmp_path / "model.pth"), "--trust")[0] == 0


@needs_real_data
def test_predict_resized_and_inverted_images(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from PIL import Image

    best = trained_run(tmp_path_factory) / "best.pt"
    model = MLP()
    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    images, labels = data.load_split(False, REAL_DATA, download=False)
    with torch.no_grad():
        probs = torch.softmax(model(images[:200].float() / 255), 1)
    confident = ((probs.argmax(1) == labels[:200]) & (probs.max(1).values > 0.95)).nonzero()
    i = int(confident[0, 0])
    img = Image.fromarray(images[i].numpy(), mode="L")
    big = tmp_path / "big.png"
    img.resize((112, 112), Image.Resampling.BICUBIC).save(big)
    # Dark object on a white page, as a photo or a drawing would be, in RGB JPEG.
    inverted = tmp_path / "inverted.jpg"
    Image.fromarray(255 - images[i].numpy(), mode="L").resize((90, 90)).convert("RGB").save(
        inverted, quality=95
    )
    # Up- then down-sampling blurs a little; the image must come back close to the original.
    assert (load_image(big)[0] - images[i].float() / 255).abs().mean() < 0.03
    code, out, _ = run(capsys, "predict", str(best), str(big), str(inverted), "--top", "2")
    assert code == 0
    name = data.labels_map[int(labels[i])]
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.split(": ", 1)[1].startswith(name + " "), line
    (tmp_path / "not-an-image.png").write_text("hello")
    code, _, err = run(capsys, "predict", str(best), str(tmp_path / "not-an-image.png"))
    assert code == 1 and "cannot read image" in err
    code, _, err = run(capsys, "predict", str(best), str(tmp_path / "missing.png"))
    assert code == 1 and "image not found" in err


@pytest.mark.parametrize("value", ["ROW_BLOCKED", "row_blocked ", "fastest"])
def test_bad_cpu_path_environment_stops_a_command_first(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    value: str,
) -> None:
    # Before: `fastmlp train` raised only after loading the data and its first step.
    monkeypatch.setenv("FASTMLP_CPU_PATH", value)
    monkeypatch.setattr(data, "load_split", _must_not_load)
    code, out, err = run(capsys, "train", "--epochs", "1", "--out", str(tmp_path))
    assert code == 1 and out == ""
    assert_one_line_error(err)
    assert f"FASTMLP_CPU_PATH={value!r} is not a CPU path" in err


def _must_not_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the data was loaded before the environment was checked")


# --- Which model evaluate and predict run ------------------------------------------------
# A checkpoint says what to run: a whole pickled model is run as it is, a checkpoint that
# records its architecture is built from it, and bare weights are run as the tutorial's
# ReLU MLP with one note saying so.


def _images(folder: Path, n: int = 3) -> list[str]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8)
        path = folder / f"image{i}.png"
        Image.fromarray(pixels.numpy(), mode="L").save(path)
        paths.append(str(path))
    return paths


def _predictions(model: nn.Module, images: list[str], flat: bool = False) -> str:
    """What ``fastmlp predict --top 10`` prints for ``images`` if it runs ``model`` (on
    784 features each if ``flat``)."""
    batch = torch.stack([load_image(path) for path in images])
    with torch.no_grad():
        probs = torch.softmax(model.eval()(batch.flatten(1) if flat else batch).float(), dim=1)
    lines = []
    for path, p in zip(images, probs, strict=True):
        values, indices = p.topk(10)
        ranked = ", ".join(
            f"{data.labels_map[int(i)]} {v:.1%}"
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        )
        lines.append(f"{path}: {ranked}\n")
    return "".join(lines)


def _whole_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    flat_sigmoid = nn.Sequential(nn.Linear(784, 32), nn.Sigmoid(), nn.Linear(32, 10))
    return {
        "MLP-tanh": MLP((784, 32, 32, 10), activation="tanh"),
        "MLP-sigmoid": MLP((784, 32, 10), activation="sigmoid"),
        "MLP-gelu": MLP((784, 32, 10), activation="gelu"),
        "MLP-none-tanh-output": MLP((784, 32, 10), activation="none", output_activation="tanh"),
        "fused-Sequential-tanh": fastmlp.fuse(
            nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
        ),
        "plain-784-features-sigmoid": flat_sigmoid,  # no Flatten: takes (N, 784)
        "tutorial-NeuralNetwork": NeuralNetwork(),
    }


@pytest.mark.parametrize("name", list(_whole_models()))
def test_predict_runs_a_whole_pickled_model_as_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    model = _whole_models()[name]
    torch.save(model, tmp_path / "model.pth")  # the tutorial's whole-model save
    images = _images(tmp_path)
    code, out, err = run(
        capsys, "predict", str(tmp_path / "model.pth"), *images, "--top", "10", "--trust"
    )
    assert (code, err) == (0, "")
    assert out == _predictions(model, images, flat=name.startswith("plain-784"))


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fake-fashion-mnist")
    write_fake_dataset(folder)
    return folder


def _label_test_split_with(model: nn.Module, folder: Path) -> None:
    """Make ``model``'s answers the test labels: it scores (about) 100% on them, and any
    other model (the same weights with ReLU) far less."""
    images, _ = data.load_split(False, folder, download=False)
    with torch.no_grad():
        labels = model.eval()(images.float().unsqueeze(1) / 255).argmax(1)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels.to(torch.uint8))


def test_evaluate_runs_a_whole_pickled_model_as_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_data: Path
) -> None:
    torch.manual_seed(0)
    model = MLP((784, 64, 10), activation="tanh")
    _label_test_split_with(model, fake_data)
    torch.save(model, tmp_path / "model.pth")
    argv = ["evaluate", str(tmp_path / "model.pth"), "--data", str(fake_data), "--trust"]
    code, out, err = run(capsys, *argv, "--device", "cpu", "--precision", "fp32")
    assert (code, err) == (0, "")
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 99.9, out
    images, labels = data.load_split(False, fake_data, download=False)
    r = evaluate(model, DeviceLoader(images, labels, 2000))
    assert f"mean loss {r.loss:.4f}" in out


def _training_checkpoint(path: Path, model: MLP) -> Path:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.training_state(
        model=model,
        optimizer=opt,
        scheduler=None,
        epoch=1,
        config={"epochs": 2, "sizes": list(model.sizes)},
        metrics=[],
        best_accuracy=0.5,
        versions={},
    )
    return ckpt.save_checkpoint(state, path)


@pytest.mark.parametrize("saved", ["training-checkpoint", "model-checkpoint"])
def test_checkpoints_that_record_the_architecture_run_their_activation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved: str
) -> None:
    torch.manual_seed(0)
    model = MLP((784, 32, 32, 10), activation="tanh", output_activation="sigmoid")
    path = tmp_path / "model.pt"
    if saved == "training-checkpoint":
        _training_checkpoint(path, model)
    else:
        ckpt.save_checkpoint(ckpt.model_checkpoint(model), path)
    loaded = torch.load(path, weights_only=True)  # plain values only, as before
    assert loaded["architecture"] == {
        "sizes": [784, 32, 32, 10],
        "activation": "tanh",
        "output_activation": "sigmoid",
        "negative_slope": 0.01,
        "bias": True,
    }
    # Next to plain weights with the tutorial's keys, which a plain model still loads.
    fastmlp.unfuse(MLP((784, 32, 32, 10))).load_state_dict(loaded["model"])
    images = _images(tmp_path)
    code, out, err = run(capsys, "predict", str(path), *images, "--top", "10")
    assert (code, err) == (0, "")
    assert out == _predictions(model, images)


@pytest.mark.parametrize("saved", ["state_dict", "old-training-checkpoint"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_weights_without_an_architecture_run_as_the_tutorial_relu_mlp_with_a_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_data: Path, saved: str, command: str
) -> None:
    torch.manual_seed(0)
    model = NeuralNetwork()
    path = tmp_path / "model.pt"
    if saved == "state_dict":
        torch.save(model.state_dict(), path)  # the tutorial's save
    else:  # what fastmlp train wrote before checkpoints recorded the architecture
        fused = MLP()
        fused.load_state_dict(model.state_dict())
        _training_checkpoint(path, fused)
        old = torch.load(path, weights_only=True)
        del old["architecture"]
        ckpt.save_checkpoint(old, path)
    images = _images(tmp_path)
    if command == "predict":
        code, out, err = run(capsys, "predict", str(path), *images, "--top", "10")
        assert out == _predictions(model, images)
    else:
        code, out, err = run(capsys, "evaluate", str(path), "--data", str(fake_data))
        assert "test accuracy" in out
    assert code == 0
    assert err == (
        f"fastmlp {command}: note: {path} holds weights without their architecture: running "
        "them as the tutorial's 784-512-512-10 MLP with ReLU, which is wrong for a model trained "
        "with another activation (save fastmlp.workflow.checkpoint.model_checkpoint(model) to "
        "keep it)\n"
    )


def test_train_records_the_architecture_and_evaluate_builds_from_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_data: Path
) -> None:
    argv = ["--data", str(fake_data), "--device", "cpu", "--quiet", "--train-samples", "200"]
    argv += ["--batch-size", "100", "--epochs", "1", "--hidden", "16", "--out", str(tmp_path)]
    code, out, _ = run(capsys, "train", *argv)
    assert code == 0 and "epoch 1:" in out
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert saved["architecture"] == {
            "sizes": [784, 16, 10],
            "activation": "relu",
            "output_activation": None,
            "negative_slope": 0.01,
            "bias": True,
        }
    code, out, err = run(capsys, "evaluate", str(tmp_path / "best.pt"), "--data", str(fake_data))
    assert (code, err) == (0, "") and "test accuracy" in out

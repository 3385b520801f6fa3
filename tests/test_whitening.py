"""Input whitening: the transform, its fold into the first layer, and runs that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from workflow_fixtures import REAL_DATA, NeuralNetwork, needs_real_data

import fastmlp
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.loops import evaluate
from fastmlp.workflow.train import TrainConfig, fit
from fastmlp.workflow.whitening import InputWhitening


def _correlated_images(n: int = 4000, side: int = 5, seed: int = 0) -> torch.Tensor:
    """Images whose pixels are strongly correlated and of very different variances."""
    g = torch.Generator().manual_seed(seed)
    d = side * side
    mixing = torch.randn(d, d, generator=g) * torch.linspace(0.2, 1.0, d)
    return (torch.rand(n, d, generator=g) @ mixing + 3.0).reshape(n, side, side)


def test_whitened_pixels_are_decorrelated_with_unit_variance() -> None:
    x = _correlated_images()
    white = InputWhitening.fit(x, eps=1e-8)(x).reshape(len(x), -1).double()
    assert white.shape == (len(x), 25)
    assert torch.allclose(white.mean(0), torch.zeros(25, dtype=torch.double), atol=1e-4)
    cov = white.T @ white / len(white)
    assert torch.allclose(cov, torch.eye(25, dtype=torch.double), atol=2e-3)


def test_eps_limits_the_gain_of_weak_directions() -> None:
    # A pixel that never varies must not be scaled by 1/sqrt(0): with eps its gain is at
    # most 1/sqrt(eps).
    x = _correlated_images()
    x[:, 0, 0] = 0.5
    matrix = InputWhitening.fit(x, eps=0.1).matrix.double()
    assert torch.isfinite(matrix).all()
    assert torch.linalg.eigvalsh(matrix).max() <= 0.1**-0.5 + 1e-4


@pytest.mark.slow
def test_fold_gives_the_same_model_for_raw_pixels() -> None:
    x = _correlated_images(n=600, side=28).float()
    whitening = InputWhitening.fit(x)
    torch.manual_seed(0)
    model = fastmlp.MLP((784, 64, 32, 10))
    folded = whitening.fold(model)
    assert folded is not model
    expected = model(whitening(x)).double()
    got = folded(x).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    # The trained model itself is untouched, and every layer but the first is shared as is.
    assert not torch.equal(folded.linears()[0].weight, model.linears()[0].weight)
    for a, b in zip(folded.linears()[1:], model.linears()[1:], strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # The same layout and keys as the trained model; these sizes are not the tutorial's, so
    # its model refuses the state (the full-size case is test_a_whitened_run_saves_...).
    assert set(folded.state_dict()) == set(model.state_dict())
    with pytest.raises(RuntimeError):
        NeuralNetwork().load_state_dict(folded.state_dict())


def test_bad_input_is_refused_with_a_clear_error() -> None:
    x = _correlated_images()
    with pytest.raises(ValueError, match="float images"):
        InputWhitening.fit(x.to(torch.uint8))
    with pytest.raises(ValueError, match="eps"):
        InputWhitening.fit(x, eps=0.0)
    whitening = InputWhitening.fit(x)
    with pytest.raises(ValueError, match="expects 25 values per sample, got 16"):
        whitening(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="needs its bias"):
        whitening.fold(fastmlp.MLP((25, 8, 3), bias=False))
    with pytest.raises(ValueError, match="whitening state"):
        InputWhitening.from_state_dict({"mean": whitening.mean})


def test_state_dict_round_trip() -> None:
    whitening = InputWhitening.fit(_correlated_images())
    again = InputWhitening.from_state_dict(whitening.state_dict())
    x = _correlated_images(seed=1)
    assert torch.equal(again(x), whitening(x))


def _cfg(**kw: object) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=250,
        train_samples=3000,
        device="cpu",
        data=str(REAL_DATA),
        whiten=True,
        augment=False,
        seed=3,
        precision="fp32",  # the comparisons are at fp32 rounding; auto is bf16 on some CPUs
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.slow
@needs_real_data
def test_a_whitened_run_saves_a_model_for_raw_pixels(tmp_path: Path) -> None:
    result = fit(_cfg(), tmp_path / "run", log=None, progress=False)
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    assert set(saved["model"]) == set(NeuralNetwork().state_dict())
    assert set(saved["whitening"]) == {"mean", "matrix"}
    # What fastmlp evaluate does with the file: the tutorial's model, raw ToTensor pixels.
    model = NeuralNetwork()
    model.load_state_dict(saved["model"])
    test = DeviceLoader(*data.load_split(False, str(REAL_DATA)), batch_size=2000)
    raw = evaluate(model, test)
    recorded = result.epochs[-1]
    # The same model up to float rounding: at most a few of 10,000 predictions may flip.
    assert abs(raw.accuracy - recorded["test_accuracy"]) <= 3e-4
    assert raw.loss == pytest.approx(recorded["test_loss"], rel=1e-3)
    assert raw.accuracy > 0.3  # it learned (chance: 0.1)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["whiten"] is True and metrics["preprocess_seconds"] > 0
    # fit returns the model for raw pixels too.
    returned = evaluate(result.model, test)
    assert returned.accuracy == pytest.approx(raw.accuracy, abs=3e-4)


@pytest.mark.slow
@needs_real_data
def test_a_whitened_run_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = _cfg(epochs=3)
    straight = fit(cfg, tmp_path / "straight", log=None, progress=False)
    fit(cfg, tmp_path / "split", stop_after=1, log=None, progress=False)
    resumed = fit(
        None, tmp_path / "split", resume=tmp_path / "split" / "last.pt", log=None, progress=False
    )
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("trained_model", "whitening"):
        x = ckpt.load_checkpoint(tmp_path / "straight" / "last.pt")[name]
        y = ckpt.load_checkpoint(tmp_path / "split" / "last.pt")[name]
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key)


@pytest.mark.slow
@needs_real_data
def test_a_whitened_checkpoint_without_its_training_state_is_refused(tmp_path: Path) -> None:
    fit(_cfg(epochs=1), tmp_path / "run", log=None, progress=False)
    state = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    del state["trained_model"]
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(ckpt.CheckpointError, match="'trained_model' or 'whitening'"):
        fit(None, tmp_path / "again", resume=tmp_path / "damaged.pt", log=None, progress=False)

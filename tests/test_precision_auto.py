"""``--precision auto`` on every CPU class: the hardware probe is forced both ways, so
the bf16 path and the fp32 path are both trained on every machine (AVX2-only, AVX-512
without BF16, AVX-512 with BF16), and the accuracy a run records is what its checkpoint
scores in the tutorial's fp32 model.

bf16 on a CPU without it is emulated (slow), so the runs here are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from workflow_fixtures import REAL_DATA, needs_real_data

from fastmlp import hardware
from fastmlp.testing import NeuralNetwork
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data
from fastmlp.workflow.config import TrainConfig
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.loops import evaluate
from fastmlp.workflow.train import fit

pytestmark = [needs_real_data, pytest.mark.filterwarnings("ignore:precision bf16:RuntimeWarning")]


def _cfg(precision: str) -> TrainConfig:
    return TrainConfig(
        epochs=2,
        batch_size=128,
        train_samples=1500,
        lr=0.2,
        momentum=0.9,
        device="cpu",
        data=str(REAL_DATA),
        seed=11,
        precision=precision,
    )


def _fit(precision: str, out: Path, native: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    result = fit(_cfg(precision), out, log=None, progress=False)
    used = json.loads((out / "metrics.json").read_text())["config"]["precision_used"]
    return result, used


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_auto_trains_as_the_precision_it_picks(native, tmp_path, monkeypatch):
    auto, used = _fit("auto", tmp_path / "auto", native, monkeypatch)
    picked = "bf16" if native else "fp32"
    assert used == picked
    explicit, used_explicit = _fit(picked, tmp_path / "explicit", native, monkeypatch)
    assert used_explicit == picked
    # The same run, bit for bit: auto is only a choice of precision.
    assert _same_weights(auto.model, explicit.model)
    assert [e["train_loss"] for e in auto.epochs] == [e["train_loss"] for e in explicit.epochs]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_recorded_accuracy_is_what_the_checkpoint_scores_in_fp32(precision, tmp_path):
    result = fit(_cfg(precision), tmp_path / "run", log=None, progress=False)
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    model = NeuralNetwork()  # the tutorial's model, fp32, eager PyTorch
    model.load_state_dict(saved["model"])
    test = DeviceLoader(*data.load_split(False, str(REAL_DATA)), batch_size=1000)
    scored = evaluate(model, test)
    recorded = result.epochs[-1]
    # The same fp32 weights through fastmlp's op and through eager PyTorch: rounding in
    # the last bits may flip at most a prediction or two of 10,000. An evaluation under bf16
    # autocast (what training used to record) moved the accuracy by up to ~1e-3.
    assert abs(scored.accuracy - recorded["test_accuracy"]) <= 2e-4
    assert scored.loss == pytest.approx(recorded["test_loss"], rel=1e-5)
    # It learned, in either precision (chance: 0.1).
    assert scored.accuracy > 0.5
    assert result.epochs[1]["train_loss"] < result.epochs[0]["train_loss"]

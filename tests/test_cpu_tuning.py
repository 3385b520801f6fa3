"""The "aten" CPU path (eager PyTorch's own ops) and the measured path choice: the first
call of a shape class times every runnable path and keeps the fastest (cpu/paths/rule.h).
Issue 31, item 2."""

from __future__ import annotations

import threading

import pytest
import torch

import fastmlp
from fastmlp import engines
from fastmlp.nn import unfuse


@pytest.fixture
def tuning():
    """Measurement on, nothing measured yet, nothing forced on this thread."""
    before = engines.cpu_tuning()
    engines.clear_measured_cpu_paths()
    engines.set_cpu_tuning(True)
    try:
        with engines.force_cpu_path("auto"):
            yield
    finally:
        engines.set_cpu_tuning(before)
        engines.clear_measured_cpu_paths()


def _twins(widths, activation="relu", dtype=torch.float32):
    torch.manual_seed(0)
    fused = fastmlp.MLP(widths, activation=activation, dtype=dtype)
    eager = unfuse(fastmlp.MLP(widths, activation=activation, dtype=dtype))
    eager.load_state_dict(fused.state_dict())
    return fused, eager


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aten_path_is_bitwise_eager(activation, dtype):
    fused, eager = _twins((20, 33, 17, 5), activation, dtype)
    x = torch.randn(37, 20, dtype=dtype)
    with engines.force_cpu_path("aten"):
        y = fused(x)
        y.square().sum().backward()
        with torch.inference_mode():
            y_inf = fused(x)
    y_eager = eager(x)
    y_eager.square().sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(y_inf, y_eager)
    for p, q in zip(fused.parameters(), eager.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_first_call_measures_and_later_calls_take_the_fastest(tuning):
    widths = [24, 48, 48, 6]
    fused, _ = _twins(tuple(widths))
    x = torch.randn(300, 24)
    before = engines.cpu_path(widths, 300)
    assert before.source == "rule" and "measured at this shape's first call" in before.reason
    y = fused(x)
    y.sum().backward()
    for phase in ("train", "backward"):
        choice = engines.cpu_path(widths, 300, phase=phase)
        assert choice.source == "measured", choice
        assert all(p in choice.reason for p in ("layered", "row_blocked", "aten", "ms"))
    # The same shape class (rows up to the next power of two) takes the recorded path.
    assert engines.cpu_path(widths, 257).path == engines.cpu_path(widths, 300).path
    assert engines.cpu_path(widths, 600).source == "rule"
    # What a later call computes is bitwise what the recorded path computes.
    chosen = engines.cpu_path(widths, 300).path
    again = fused(x)
    with engines.force_cpu_path(chosen):
        forced = fused(x)
    assert torch.equal(again, forced)
    torch.testing.assert_close(y, again)


def test_measured_results_match_every_path(tuning):
    fused, eager = _twins((16, 40, 40, 3), "gelu")
    x = torch.randn(129, 16)
    y = fused(x)
    y.square().sum().backward()
    with torch.inference_mode():
        y_inf = fused(x)
    y_eager = eager(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(y_inf, y_eager)
    for p, q in zip(fused.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_tuning_off_keeps_the_rule(tuning):
    engines.set_cpu_tuning(False)
    widths = [24, 48, 6]
    fused, _ = _twins(tuple(widths))
    fused(torch.randn(50, 24))
    choice = engines.cpu_path(widths, 50)
    assert choice.source == "rule" and "measured" not in choice.reason


def test_forced_path_is_never_measured(tuning):
    widths = [24, 48, 6]
    fused, _ = _twins(tuple(widths))
    with engines.force_cpu_path("layered"):
        fused(torch.randn(50, 24))
    assert engines.cpu_path(widths, 50).source == "rule"


def test_threads_measuring_one_shape_at_once_agree(tuning):
    fused, eager = _twins((24, 64, 64, 6))
    x = torch.randn(200, 24)
    want = eager(x).detach()
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with torch.no_grad():
                out.append(fused(x))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(out) == 4
    for y in out:
        torch.testing.assert_close(y, want)
    assert engines.cpu_path([24, 64, 64, 6], 200, phase="inference").source == "measured"


@pytest.mark.parametrize("value", ["maybe", "ON"])
def test_bad_tuning_environment_is_refused_first(monkeypatch, value):
    monkeypatch.setenv("FASTMLP_CPU_TUNE", value)
    with pytest.raises(ValueError, match=f"FASTMLP_CPU_TUNE={value!r}"):
        engines.check_cpu_path_environment()

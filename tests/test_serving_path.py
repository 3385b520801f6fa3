"""The serving path (issue 33): an inference call of ``fastmlp.MLP`` or of a fused
Sequential planned as one run goes straight to ``mlp_inference``, skipping the module
calls in between. It must compute what the module calls compute, and see every change a
user can make between calls: parameters changed in place (an optimizer step,
load_state_dict, ``w.add_``) or re-assigned, a parametrization, hooks, a child replaced;
and one model called from several threads at once."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import nn as fnn

SIZES = (12, 9, 9, 5)


@pytest.fixture
def served(monkeypatch):
    """Counts the calls that took the serving path."""
    calls = []
    real = fnn._serve

    def spy(x, args):
        calls.append(x.shape)
        return real(x, args)

    monkeypatch.setattr(fnn, "_serve", spy)
    return calls


def _module_calls(model, x):
    """What the MLP computes through its plan's steps (the serving path's way round)."""
    with torch.inference_mode():
        h = model.flatten(x)
        for step in model.linear_relu_stack._current_plan()[1]:
            h = step(h)
        return h


def _model(activation="relu", bias=True):
    torch.manual_seed(0)
    return fastmlp.MLP(SIZES, activation=activation, bias=bias).eval()


@pytest.mark.parametrize("activation,bias", [("relu", True), ("gelu", False), ("tanh", True)])
@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_the_serving_path_computes_what_the_module_calls_compute(served, activation, bias, context):
    model = _model(activation, bias)
    plain = fastmlp.unfuse(_model(activation, bias))
    for x in (torch.randn(1, 3, 4), torch.randn(7, 12), torch.randn(0, 12)):
        with context():
            y = model(x)
        with torch.no_grad():
            expected = plain(x)
        torch.testing.assert_close(y, expected)
    assert len(served) == 3  # every call took it
    with torch.inference_mode():
        x = torch.randn(5, 12)  # an inference tensor
        assert torch.equal(model(x), _module_calls(model, x))


def test_training_calls_do_not_take_it(served):
    model = _model().train()
    x = torch.randn(4, 12)
    model(x).sum().backward()
    assert not served and model.linears()[0].weight.grad is not None


def test_in_place_changes_of_the_parameters_are_seen(served):
    model, plain = _model(), fastmlp.unfuse(_model())
    x = torch.randn(6, 12)

    def check():
        with torch.inference_mode():
            y = model(x)
        with torch.no_grad():
            torch.testing.assert_close(y, plain(x))

    check()
    for m in (model, plain):  # an optimizer step
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().sum().backward()
        opt.step()
    check()
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    plain.load_state_dict(state)
    check()
    with torch.no_grad():
        model.linears()[1].weight.add_(1)
        [m for m in plain.modules() if isinstance(m, nn.Linear)][1].weight.add_(1)
    check()
    assert len(served) == 4


def test_re_assigned_parameters_and_parametrizations_are_seen():
    from torch.nn.utils import parametrize

    model = _model()
    x = torch.randn(3, 12)
    lin = model.linears()[0]
    lin.weight = nn.Parameter(torch.zeros_like(lin.weight))
    with torch.inference_mode():
        y = model(x)
    assert torch.equal(y, _module_calls(model, x))
    lin.bias = nn.Parameter(lin.bias.detach() + 3)
    with torch.inference_mode():
        assert torch.equal(model(x), _module_calls(model, x))

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model.linears()[1], "weight", Doubled())
    with torch.inference_mode():
        got = model(x)
    plain = fastmlp.unfuse(model)
    with torch.no_grad():
        torch.testing.assert_close(got, plain(x))


@pytest.mark.parametrize("where", ["flatten", "stack", "layer", "global"])
def test_hooks_are_run_not_skipped(served, where):
    # A hook on the MLP's Flatten or stack runs (the stack may still serve: its own call
    # ran the hook); one on a layer, or a global one, unfuses: nothing serves.
    model = _model()
    seen = []

    def hook(module, args, output):
        seen.append(type(module).__name__)

    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        target = {
            "flatten": model.flatten,
            "stack": model.linear_relu_stack,
            "layer": model.linears()[1],
        }[where]
        handle = target.register_forward_hook(hook)
    x = torch.randn(2, 12)
    try:
        with torch.inference_mode():
            got = model(x)
    finally:
        handle.remove()
    assert seen
    assert len(served) == (1 if where in ("flatten", "stack") else 0)
    with torch.no_grad():
        torch.testing.assert_close(got, fastmlp.unfuse(_model())(x))
    with torch.inference_mode():
        model(x)
    assert len(served) == (2 if where in ("flatten", "stack") else 1)


def test_a_replaced_child_is_seen():
    model = _model()
    x = torch.randn(4, 12)
    with torch.inference_mode():
        model(x)
    model.linear_relu_stack[1] = nn.Tanh()
    with torch.inference_mode():
        got = model(x)
    plain = fastmlp.unfuse(model)
    with torch.no_grad():
        torch.testing.assert_close(got, plain(x))


def test_autocast_and_tracing_take_the_module_calls(served):
    model = _model()
    x = torch.randn(3, 12)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    assert not served
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    # What was recorded is the op that the trace's check (rerun with grad on) records too.
    graph = str(traced.inlined_graph)
    assert "fastmlp::mlp(" in graph and "mlp_inference" not in graph
    torch.testing.assert_close(traced(x), model(x))


def test_a_fused_sequential_serves_too(served):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 3))
    plain = fastmlp.unfuse(fastmlp.fuse(nn.Sequential(*[m for m in seq])))
    fastmlp.fuse(seq)
    x = torch.randn(5, 6)
    with torch.inference_mode():
        y = seq(x)
    torch.testing.assert_close(y, plain(x).detach())
    assert len(served) == 1
    seq.append(nn.Flatten())  # two steps now: no serving path
    with torch.inference_mode():
        seq(x)
    assert len(served) == 1


def test_threads_calling_one_model_get_their_own_results():
    model = _model()
    inputs = [torch.randn(1 + i % 5, 12) for i in range(16)]
    expected = [_module_calls(model, x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            with torch.inference_mode():
                for _ in range(50):
                    results[i] = model(inputs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, y in enumerate(expected):
        assert torch.equal(results[i], y)


def test_a_pickled_model_serves_after_loading(tmp_path, served):
    model = _model()
    x = torch.randn(2, 12)
    with torch.inference_mode():
        y = model(x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(x), y)
    assert len(served) == 2

"""fuse() never skips what a module does when called: hooks (torch.nn.utils.prune,
weight_norm, spectral_norm, user hooks), a forward replaced on the instance (adapters), and
settings changed after the first call (Dropout.p). Issue 29, items 1, 3 and 4."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fastmlp.nn import describe_fusion, fuse
from fastmlp.optim import FusedSGD


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _twins(change) -> tuple[nn.Sequential, nn.Sequential]:
    """Two copies of one model, ``change`` applied to each under the same seed (spectral_norm
    draws its vectors), the second fused after it."""
    plain, fused = _model(), _model()
    for m in (plain, fused):
        torch.manual_seed(1)
        change(m)
    fuse(fused)
    return plain, fused


def _same_forward_and_grads(plain: nn.Module, fused: nn.Module) -> None:
    x = torch.randn(5, 4)
    y_plain, y_fused = plain(x), fused(x)
    torch.testing.assert_close(y_fused, y_plain)
    y_plain.square().sum().backward()
    y_fused.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_prune_hook_is_honoured_after_fuse():
    # The example: the pruned layer's weight is recomputed from weight_orig.
    plain, fused = _twins(lambda m: prune.identity(m[4], "weight"))
    for m in (plain, fused):
        with torch.no_grad():
            m[4].weight_orig.zero_()
    _same_forward_and_grads(plain, fused)
    assert any("left 4" in line and "forward hooks" in line for line in describe_fusion(fused))


def test_random_pruning_mask_applies_in_the_fused_model():
    plain, fused = _twins(lambda m: prune.random_unstructured(m[2], "weight", amount=0.5))
    _same_forward_and_grads(plain, fused)


def test_spectral_norm_layer_trains_when_fused():
    plain, fused = _twins(lambda m: nn.utils.spectral_norm(m[2]))
    plain.eval(), fused.eval()  # no power iteration: both compute the same weight
    _same_forward_and_grads(plain, fused)
    assert fused[2].weight_orig.grad is not None


def test_old_weight_norm_backward_twice_when_fused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
        plain, fused = _twins(lambda m: nn.utils.weight_norm(m[0]))
    x = torch.randn(3, 4)
    for _ in range(2):  # fused, the second backward raised "backward through the graph"
        fused(x).sum().backward()
        plain(x).sum().backward()
    torch.testing.assert_close(fused[0].weight_g.grad, plain[0].weight_g.grad)


def test_instance_forward_patch_is_honoured():
    # The adapter / LoRA pattern: a Linear's forward replaced on the instance.
    def change(m: nn.Module) -> None:
        m[4].forward = lambda x, f=m[4].forward: f(x) * 0

    plain, fused = _twins(change)
    x = torch.randn(5, 4)
    assert torch.equal(fused(x), torch.zeros(5, 2))
    _same_forward_and_grads(plain, fused)
    assert any("replaced on the instance" in line for line in describe_fusion(fused))


def test_hook_added_after_the_first_call_unfuses_that_layer():
    model = fuse(_model())
    x = torch.randn(5, 4)
    before = model(x)
    calls = []
    handle = model[2].register_forward_hook(lambda mod, args, out: calls.append(1) or out * 2)
    after = model(x)
    assert calls == [1]
    assert not torch.allclose(after, before)
    handle.remove()
    torch.testing.assert_close(model(x), before)  # fused again once the hook is gone
    assert calls == [1]


def test_hooked_activation_is_not_skipped():
    model = fuse(_model())
    x = torch.randn(5, 4)
    model[1].register_forward_hook(lambda mod, args, out: out + 1)
    plain = _model()
    plain[1].register_forward_hook(lambda mod, args, out: out + 1)
    torch.testing.assert_close(model(x), plain(x))


def test_global_module_hooks_disable_fusion_while_registered():
    model = fuse(_model())
    x = torch.randn(5, 4)
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append(type(mod).__name__)
    )
    try:
        model(x)
        assert seen.count("Linear") == 3 and seen.count("ReLU") == 2
        assert all("global module hooks" in line for line in describe_fusion(model))
    finally:
        handle.remove()
    assert any(line.startswith("fused") for line in describe_fusion(model))


def test_changed_dropout_p_is_seen_by_the_cached_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 2))
    fuse(model)
    x = torch.randn(64, 4)
    model.train()
    model(x)  # plans with the Dropout skipped
    model[2].p = 0.9
    torch.manual_seed(2)
    got = model(x)
    plain = nn.Sequential(*model)  # the same children, unfused
    torch.manual_seed(2)
    torch.testing.assert_close(got, plain(x))
    model.eval()
    torch.testing.assert_close(model(x), plain.eval()(x))


@pytest.mark.parametrize("amount", [0.0, 0.5])
def test_fused_sgd_step_runs_the_prune_hook(amount: float):
    from fastmlp.nn import MLP

    torch.manual_seed(0)
    model, twin = MLP((6, 5, 3)), MLP((6, 5, 3))
    twin.load_state_dict(model.state_dict())
    opt = FusedSGD(model, lr=0.1)  # made first: it holds the Parameter prune renames
    for m in (model, twin):
        torch.manual_seed(3)
        prune.random_unstructured(m.linears()[0], "weight", amount=amount)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    assert not opt.fused_step_applies(x)
    opt.train_step(x, y)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    ref.zero_grad()
    nn.functional.cross_entropy(twin(x), y).backward()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)

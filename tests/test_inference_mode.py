"""Forward under ``torch.inference_mode()`` and ``torch.no_grad()`` with several threads:
every op, module and dtype gives plain PyTorch's answer and saves nothing, and a training
call after an inference-mode call still works (the kernels keep scratch buffers from one
call to the next).

The kernels split work over ``at::parallel_for``, whose worker threads do not carry the
caller's inference mode; these tests run with at least 2 threads (the CI machines have 2
cores) and shapes large enough that the work is split.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastmlp
from fastmlp.testing import NeuralNetwork, linear_relu_ref, mlp_ref

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def several_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    scale = ref.double().abs().max().clamp_min(1)
    err = float((ours.double() - ref.double()).abs().max() / scale)
    assert err <= TOL[dtype], f"max error {err:.3g} ({dtype})"


def _sequential(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 257), nn.ReLU(), nn.Linear(257, 10)
    ).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_ops(dtype, mode, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(129, 300, generator=g).to(dtype)
    w1 = (torch.randn(513, 300, generator=g) * 0.05).to(dtype).requires_grad_()
    w2 = (torch.randn(7, 513, generator=g) * 0.05).to(dtype).requires_grad_()
    b1 = torch.randn(513, generator=g).to(dtype).requires_grad_() if bias else None
    b2 = torch.randn(7, generator=g).to(dtype).requires_grad_() if bias else None
    with MODES[mode]():
        y1 = fastmlp.linear_relu(x, w1, b1)
        y = fastmlp.mlp(x, [w1, w2], None if b1 is None else [b1, b2])
        y1_ref = linear_relu_ref(x, w1, b1)
        y_ref = mlp_ref(x, [w1, w2], None if b1 is None else [b1, b2])
    for ours, ref in ((y1, y1_ref), (y, y_ref)):
        assert not ours.requires_grad and ours.grad_fn is None
        assert ours.is_inference() == (mode == "inference_mode")
        _close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_ops_on_inference_tensors(dtype):
    """The backward ops called directly (as a functional caller may) on inference tensors."""
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        x = torch.randn(129, 300, generator=g).to(dtype)
        w = (torch.randn(513, 300, generator=g) * 0.05).to(dtype)
        w2 = (torch.randn(7, 513, generator=g) * 0.05).to(dtype)
        y = fastmlp.linear_relu(x, w)
        gy = torch.randn(129, 513, generator=g).to(dtype)
        gx, gw, _ = torch.ops.fastmlp.linear_relu_backward(gy, y, x, w, [True, True, False])
        mask = (y > 0).to(dtype)
        _close(gx, (gy * mask) @ w, dtype)
        _close(gw, (gy * mask).t() @ x, dtype)
        h = fastmlp.linear_relu(x, w)
        gy2 = torch.randn(129, 7, generator=g).to(dtype)
        grad_x, grad_w, _ = torch.ops.fastmlp.mlp_backward(gy2, x, [w, w2], [h], [True, True, True])
        g_h = (gy2 @ w2) * (h > 0).to(dtype)
        _close(grad_x, g_h @ w, dtype)
        _close(grad_w[1], gy2.t() @ h, dtype)


def _modules(dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "MLP": fastmlp.MLP().to(dtype),
        "FusedLinearReLU": fastmlp.FusedLinearReLU(784, 300).to(dtype),
        "fuse(Sequential)": fastmlp.fuse(_sequential(dtype)),
        "fuse(tutorial)": fastmlp.fuse(NeuralNetwork().to(dtype)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_modules(dtype, mode):
    images = torch.rand(200, 1, 28, 28).to(dtype)
    for name, model in _modules(dtype).items():
        x = images if name in ("MLP", "fuse(tutorial)") else images.flatten(1)
        if name == "MLP":
            plain = NeuralNetwork().to(dtype)
            plain.load_state_dict(model.state_dict())
        else:
            plain = fastmlp.unfuse(copy.deepcopy(model))
        with MODES[mode]():
            out = model(x)
            ref = plain(x)
        assert not out.requires_grad, name
        assert out.is_inference() == (mode == "inference_mode"), name
        _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_training_after_inference_mode(dtype):
    """The kernels keep scratch buffers from one call to the next (per calling thread).
    Buffers first made by an inference-mode call must be ordinary tensors, or the next
    training call's in-place writes into them fail. A deep MLP's backward under
    inference_mode fills many buffers; the whole-step kernel and autograd then reuse them."""
    g = torch.Generator().manual_seed(3)
    sizes = (784,) + (512,) * 8 + (10,)
    with torch.inference_mode():
        x = torch.rand(256, 784, generator=g).to(dtype)
        weights = [
            (torch.randn(o, i, generator=g) * i**-0.5).to(dtype)
            for i, o in zip(sizes[:-1], sizes[1:], strict=False)
        ]
        hidden, h = [], x
        for w in weights[:-1]:
            h = fastmlp.linear_relu(h, w)
            hidden.append(h)
        gy = torch.randn(256, 10, generator=g).to(dtype)
        torch.ops.fastmlp.mlp_backward(gy, x, weights, hidden, [True] * (1 + len(weights)))

    torch.manual_seed(4)
    model = fastmlp.MLP(dtype=dtype)
    reference = NeuralNetwork().to(dtype)
    reference.load_state_dict(model.state_dict())
    opt = fastmlp.FusedSGD(model, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    images, target = torch.rand(256, 1, 28, 28).to(dtype), torch.randint(0, 10, (256,))
    for _ in range(2):
        loss = opt.train_step(images, target)
        ref_opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(reference(images), target)
        ref_loss.backward()
        ref_opt.step()
        _close(loss, ref_loss.detach(), dtype)
    nn.functional.cross_entropy(model(images), target).backward()  # the autograd path too
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        _close(p.detach(), q.detach(), dtype)


def _lightning_style_flow(model: nn.Module, opt: torch.optim.Optimizer, batches) -> dict:
    """What PyTorch Lightning's Trainer does with a model, without Lightning: a sanity
    validation before training, training epochs each followed by validation, then
    ``test`` and ``predict``; validation, test and predict run under inference_mode."""

    def run_eval(stage: str) -> dict:
        model.eval()
        with torch.inference_mode():
            losses, correct, n = [], 0, 0
            for x, y in batches[stage]:
                logits = model(x)
                losses.append(nn.functional.cross_entropy(logits, y))
                correct += int((logits.argmax(1) == y).sum())
                n += len(y)
        model.train()
        return {"loss": torch.stack(losses).mean(), "accuracy": correct / n}

    record = {"sanity": run_eval("val")}
    for epoch in range(2):
        for x, y in batches["train"]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        record[f"val{epoch}"] = run_eval("val")
    record["test"] = run_eval("test")
    model.eval()
    with torch.inference_mode():
        record["predict"] = [model(x).argmax(1) for x, _ in batches["test"]]
    return record


def test_lightning_style_fit_validate_test_predict():
    g = torch.Generator().manual_seed(5)

    def split(n_batches: int, size: int):
        return [
            (torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n_batches)
        ]

    batches = {"train": split(6, 64), "val": split(2, 100), "test": split(2, 77)}
    torch.manual_seed(6)
    ours = fastmlp.MLP()
    plain = NeuralNetwork()
    plain.load_state_dict(ours.state_dict())
    got = _lightning_style_flow(ours, torch.optim.SGD(ours.parameters(), lr=0.1), batches)
    want = _lightning_style_flow(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches)
    for stage in ("sanity", "val0", "val1", "test"):
        torch.testing.assert_close(got[stage]["loss"], want[stage]["loss"], rtol=1e-4, atol=0)
        assert got[stage]["accuracy"] == pytest.approx(want[stage]["accuracy"], abs=0.02)
    agree = torch.cat(got["predict"]) == torch.cat(want["predict"])
    assert agree.float().mean() >= 0.98
    for p, q in zip(ours.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)

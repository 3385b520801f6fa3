"""FusedAdamW / FusedAdam: the whole-step kernel against eager PyTorch with
torch.optim.AdamW / torch.optim.Adam.

The reference is the tutorial's step, ``cross_entropy(model(x), y); zero_grad();
backward(); step()``, on an unfused copy of the same model with torch's optimizer.

Tolerances. float64 checks the maths: after 100 steps every parameter and state tensor
agrees to rtol 1e-10 / atol 1e-12 (measured: 1e-14). float32 is compared step by step,
torch's side set to the fused side's parameters and state before each of the 100 steps:
run freely, two float32 runs part chaotically (Adam divides each gradient by its own
running RMS, so an element whose true gradient is near zero gets an update of up to
``lr`` in a direction set by rounding noise; torch's own float32 run ends up to 20% of the
distance travelled away from its float64 run after 100 steps on the tutorial MLP, and
the fused run likewise). Per step: the loss to rtol/atol 1e-6 (measured <= 4.8e-7), each
parameter within 0.05 lr of torch's element-wise (measured <= 0.009 lr: the elements
whose gradient is at rounding level), its update within 1e-3 of torch's in relative
norm (measured <= 7e-5), the moments within 1e-5 in relative norm (measured <= 5e-7),
and the step counts equal.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp.optim import FusedAdam, FusedAdamW, mlp_linears
from fastmlp.testing import NeuralNetwork

TUTORIAL = (784, 512, 512, 10)
SIZES = [TUTORIAL, (7, 13, 5, 3), (5, 1, 4), (33, 129, 17, 9, 5), (20, 10)]
KINDS = {"adamw": (FusedAdamW, torch.optim.AdamW), "adam": (FusedAdam, torch.optim.Adam)}
OPTIONS = {
    "wd0": {"weight_decay": 0.0},
    "wd": {"weight_decay": 0.1},
    "amsgrad": {"weight_decay": 1e-2, "amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6},
}
TOL64 = {"rtol": 1e-10, "atol": 1e-12}
LR = 1e-3
FAST = ("adamw", "wd")  # the tutorial-size case of the 100-step tests that is not slow


def _cases(sizes_list):
    """(sizes, kind, options) for the 100-step comparisons: every combination, those of the
    tutorial's MLP but AdamW with weight decay marked slow (each takes 10-25 s with its
    float64 reference on a loaded 2-core machine)."""
    return [
        pytest.param(
            sizes,
            kind,
            options,
            id=f"{'-'.join(map(str, sizes))}-{kind}-{name}",
            marks=[pytest.mark.slow] if sizes == TUTORIAL and (kind, name) != FAST else [],
        )
        for sizes in sizes_list
        for kind in KINDS
        for name, options in OPTIONS.items()
    ]


def _eager_step(model, opt, x, y, label_smoothing=0.0):
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _pair(kind, sizes, dtype, bias=True, lr=LR, **options):
    fused_cls, torch_cls = KINDS[kind]
    model = fastmlp.MLP(sizes, bias=bias).to(dtype)
    ref = fastmlp.unfuse(copy.deepcopy(model))
    return (
        model,
        fused_cls(model, lr=lr, **options),
        ref,
        torch_cls(ref.parameters(), lr=lr, **options),
    )


def _batch(batch, sizes, dtype, gen):
    x = torch.randn(batch, sizes[0], generator=gen, dtype=dtype)
    return x, torch.randint(0, sizes[-1], (batch,), generator=gen)


def _assert_same_state(model, opt, ref, ref_opt, tol):
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            assert state[key].dtype == value.dtype and state[key].device == value.device, key
            torch.testing.assert_close(state[key], value, **tol)


@pytest.mark.parametrize(("sizes", "kind", "options"), _cases(SIZES))
def test_matches_torch_over_100_steps_in_float64(sizes, kind, options):
    gen = torch.Generator().manual_seed(len(sizes))
    model, opt, ref, ref_opt = _pair(kind, sizes, torch.float64, **options)
    for step in range(100):
        x, y = _batch(64 if sizes == TUTORIAL else 5 + step % 7, sizes, torch.float64, gen)
        smoothing = 0.1 * (step % 2)
        assert opt.fused_step_applies(x)
        loss = opt.train_step(x, y, label_smoothing=smoothing)
        torch.testing.assert_close(loss, _eager_step(ref, ref_opt, x, y, smoothing), **TOL64)
        assert loss.dtype == torch.float64 and loss.dim() == 0 and not loss.requires_grad
    _assert_same_state(model, opt, ref, ref_opt, TOL64)
    assert all(float(opt.state[p]["step"]) == 100 for p in model.parameters())


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("sizes", "kind", "options"), _cases(SIZES[:2] + SIZES[3:4]))
def test_matches_torch_step_by_step_over_100_steps_in_float32(sizes, kind, options):
    """Before each step torch's model and optimizer are set to the fused one's parameters
    and state (through state_dict, which this also checks); then each takes the step.
    Tolerances and why: the module docstring."""
    torch.manual_seed(len(sizes))
    gen = torch.Generator().manual_seed(len(sizes))
    model, opt, ref, ref_opt = _pair(kind, sizes, torch.float32, **options)
    for step in range(100):
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                q.copy_(p)
        if step:
            ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        before = [q.detach().clone() for q in ref.parameters()]
        x, y = _batch(64, sizes, torch.float32, gen)
        loss = opt.train_step(x, y)
        torch.testing.assert_close(loss, _eager_step(ref, ref_opt, x, y), rtol=1e-6, atol=1e-6)
        for p, q, start in zip(model.parameters(), ref.parameters(), before, strict=True):
            assert (p - q).abs().max().item() <= 0.05 * LR, step
            assert _relative(p - start, q - start) <= 1e-3, step
            for key, value in ref_opt.state[q].items():
                if key == "step":
                    assert torch.equal(opt.state[p][key], value)
                else:
                    assert _relative(opt.state[p][key], value) <= 1e-5, (step, key)


@pytest.mark.parametrize("kind", KINDS)
def test_without_bias_on_image_batches_of_the_tutorial_network(kind):
    gen = torch.Generator().manual_seed(2)
    for model in (fastmlp.MLP((12, 9, 4), bias=False).double(), NeuralNetwork().double()):
        fused_cls, torch_cls = KINDS[kind]
        ref = copy.deepcopy(model)
        opt, ref_opt = fused_cls(model, lr=LR), torch_cls(ref.parameters(), lr=LR)
        shape, classes = ((3, 4), 4) if isinstance(model, fastmlp.MLP) else ((1, 28, 28), 10)
        for _ in range(3):
            x = torch.rand(6, *shape, generator=gen, dtype=torch.float64)
            y = torch.randint(0, classes, (6,), generator=gen)
            assert opt.fused_step_applies(x)
            torch.testing.assert_close(opt.train_step(x, y), _eager_step(ref, ref_opt, x, y))
        _assert_same_state(model, opt, ref, ref_opt, TOL64)


def _state_keys(opt):
    sd = opt.state_dict()
    return [sorted(s) for s in sd["state"].values()], sorted(sd["param_groups"][0])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_moves_to_torch_adamw_and_back(amsgrad):
    """Fused steps, then torch AdamW from the state_dict, then fused again from torch's
    state_dict: the same as torch AdamW throughout (float64)."""
    gen = torch.Generator().manual_seed(3)
    options = {"weight_decay": 0.05, "amsgrad": amsgrad}
    model, opt, ref, ref_opt = _pair("adamw", (10, 8, 3), torch.float64, **options)
    batches = [_batch(6, (10, 3), torch.float64, gen) for _ in range(9)]
    for x, y in batches[:3]:
        opt.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
    assert _state_keys(opt) == _state_keys(ref_opt)
    plain = torch.optim.AdamW(model.parameters(), lr=LR, **options)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in batches[3:6]:
        _eager_step(model, plain, x, y)
        _eager_step(ref, ref_opt, x, y)
    _assert_same_state(model, plain, ref, ref_opt, TOL64)
    again = FusedAdamW(model, lr=LR, **options)
    again.load_state_dict(copy.deepcopy(plain.state_dict()))
    for x, y in batches[6:]:
        again.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
    _assert_same_state(model, again, ref, ref_opt, TOL64)
    assert all(float(again.state[p]["step"]) == 9 for p in model.parameters())
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, torch.optim.Adam)
    assert again.param_groups[0]["decoupled_weight_decay"]


def test_adam_state_loads_torch_adam_state():
    gen = torch.Generator().manual_seed(4)
    model, opt, ref, ref_opt = _pair("adam", (10, 8, 3), torch.float64, weight_decay=0.1)
    batches = [_batch(6, (10, 3), torch.float64, gen) for _ in range(4)]
    twin = copy.deepcopy(ref)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=LR, weight_decay=0.1)
    for x, y in batches[:2]:
        _eager_step(twin, twin_opt, x, y)
        _eager_step(ref, ref_opt, x, y)
    model.load_state_dict(twin.state_dict())
    opt.load_state_dict(twin_opt.state_dict())
    for x, y in batches[2:]:
        opt.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
    _assert_same_state(model, opt, ref, ref_opt, TOL64)


@pytest.mark.parametrize(
    "case",
    ["tanh-model", "maximize", "fp16-autocast", "two-groups", "frozen", "gelu-mlp"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_falls_back_to_the_autograd_step(kind, case):
    """Whatever the fused kernel cannot run, train_step does exactly torch's eager step."""
    torch.manual_seed(0)
    options = {"maximize": True} if case == "maximize" else {}
    if case == "tanh-model":
        model = NeuralNetwork()
        model.linear_relu_stack[1] = nn.Tanh()
    elif case == "gelu-mlp":
        model = fastmlp.MLP((12, 9, 4), activation="gelu")
    else:
        model = fastmlp.MLP((12, 9, 4))
    fused_cls, torch_cls = KINDS[kind]
    ref = fastmlp.unfuse(copy.deepcopy(model))
    opt = fused_cls(model, lr=0.01, **options)
    ref_opt = torch_cls(ref.parameters(), lr=0.01, **options)
    if case == "frozen":
        for m in (model, ref):
            m.linear_relu_stack[0].weight.requires_grad_(False)
    if case == "two-groups":
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
        ref_opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    n_in = 28 * 28 if case == "tanh-model" else 12
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, n_in, generator=gen), torch.randint(0, 4, (5,), generator=gen)
        with torch.autocast("cpu", dtype=torch.float16, enabled=case == "fp16-autocast"):
            assert not opt.fused_step_applies(x)
            loss = opt.train_step(x, y)
            ref_loss = _eager_step(ref, ref_opt, x, y)
        torch.testing.assert_close(loss, ref_loss)
    _assert_same_state(model, opt, ref, ref_opt, {})


@pytest.mark.filterwarnings("error")  # a scheduler must see the fused step as a step
def test_follows_one_cycle_lr_and_betas_and_runs_step_hooks():
    """OneCycleLR cycles Adam's beta1 as momentum; the kernel reads both every step."""
    calls = []
    gen = torch.Generator().manual_seed(5)
    model, opt, ref, ref_opt = _pair("adamw", (10, 8, 3), torch.float64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=6)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.01, total_steps=6)
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(6):
        x, y = _batch(4, (10, 3), torch.float64, gen)
        opt.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
        sched.step()
        ref_sched.step()
    _assert_same_state(model, opt, ref, ref_opt, TOL64)
    assert calls == ["pre", "post"] * 6


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
        ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
        ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_raise_value_errors_like_torch(kind, options, match):
    fused_cls, torch_cls = KINDS[kind]
    with pytest.raises(ValueError, match=match):
        torch_cls(fastmlp.MLP((4, 3)).parameters(), **options)
    with pytest.raises(ValueError, match=match):
        fused_cls(fastmlp.MLP((4, 3)), **options)


def test_rejects_parameters_instead_of_a_model():
    with pytest.raises(TypeError, match="FusedAdamW takes the model"):
        FusedAdamW(fastmlp.MLP((4, 3)).parameters())  # type: ignore[arg-type]


def test_defaults_are_torchs():
    model = fastmlp.MLP((4, 3))
    for fused_cls, torch_cls in KINDS.values():
        group = fused_cls(model).param_groups[0]
        ref_group = torch_cls(model.parameters()).param_groups[0]
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in ref_group.items() if k != "params"
        }


def test_leaves_no_gradients_invalidates_saved_graphs_and_is_deterministic():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fastmlp.MLP((50, 40, 30, 10))
        opt = FusedAdamW(model, lr=0.01, amsgrad=True)
        gen = torch.Generator().manual_seed(1)
        x, y = _batch(33, (50, 10), torch.float32, gen)
        F.cross_entropy(model(x), y).backward()
        pending = F.cross_entropy(model(x), y)  # saved the weights before the update
        for _ in range(3):
            opt.train_step(*_batch(33, (50, 10), torch.float32, gen))
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            pending.backward()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(4, 6), torch.tensor([0, 1, 3, 2]), r"target\[2\] = 3 is not a class index"),
        (torch.randn(4, 6), torch.zeros(4, dtype=torch.int32), "target must be int64"),
        (torch.randn(0, 6), torch.zeros(0, dtype=torch.long), "non-empty batch"),
        (torch.randn(4, 7), torch.zeros(4, dtype=torch.long), r"weights\[0\] must have shape"),
    ],
    ids=["class-too-large", "int32-target", "empty", "features"],
)
def test_bad_batches_raise_and_change_nothing(x, y, match):
    model = fastmlp.MLP((6, 5, 3))
    opt = FusedAdamW(model, lr=0.1)
    opt.train_step(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    with pytest.raises(RuntimeError, match=match):
        opt.train_step(x, y)
    after = (model.state_dict(), opt.state_dict())
    for name, value in before[0].items():
        assert torch.equal(value, after[0][name]), name
    for i, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[1]["state"][i][key]), (i, key)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_op_passes_opcheck(amsgrad):
    """Schema (in-place annotations), fake kernel and dispatch agree (torch.library.opcheck)."""
    model = fastmlp.MLP((6, 5, 3)).double()
    weights = [lin.weight.detach().clone() for lin in mlp_linears(model)]
    biases = [lin.bias.detach().clone() for lin in mlp_linears(model)]
    params = [p for pair in zip(weights, biases, strict=True) for p in pair]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else []
    steps = [torch.tensor(0.0) for _ in params]
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    args = (
        x,
        y,
        weights,
        biases,
        m,
        v,
        vmax,
        steps,
        [],
        1e-3,
        0.9,
        0.999,
        1e-8,
        1e-2,
        True,
        amsgrad,
        0.1,
        None,
    )
    torch.library.opcheck(torch.ops.fastmlp.mlp_adamw_step.default, args)


def _relative_error(params, ref64):
    return [
        ((p.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        for p, r in zip(params, ref64, strict=True)
    ]


@pytest.mark.parametrize("sizes", [TUTORIAL, (33, 129, 17, 9, 5)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_step_is_as_accurate_as_pytorch_autocast(sizes, kind):
    """Under CPU bf16 autocast the kernel runs bfloat16 GEMMs on float32 master weights
    and float32 moments. Its error against a float64 run must be no worse than eager
    PyTorch's under the same autocast (each parameter, after 5 steps)."""
    gen = torch.Generator().manual_seed(len(sizes))
    model, opt, ref, ref_opt = _pair(kind, sizes, torch.float32, weight_decay=1e-2)
    ref64 = copy.deepcopy(ref).double()
    opt64 = type(ref_opt)(ref64.parameters(), lr=LR, weight_decay=1e-2)
    for _ in range(5):
        x, y = _batch(64, sizes, torch.float32, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert opt.fused_step_applies(x)
            loss = opt.train_step(x, y, label_smoothing=0.1)
            ref_loss = _eager_step(ref, ref_opt, x, y, 0.1)
        _eager_step(ref64, opt64, x.double(), y, 0.1)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    fused_err = _relative_error(model.parameters(), ref64.parameters())
    autocast_err = _relative_error(ref.parameters(), ref64.parameters())
    for fused, eager in zip(fused_err, autocast_err, strict=True):
        assert fused <= 2 * eager + 1e-6, (fused_err, autocast_err)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())


def test_train_loop_takes_the_fused_step(monkeypatch):
    from fastmlp.workflow.loader import DeviceLoader
    from fastmlp.workflow.loops import train_loop

    calls = []
    real = FusedAdamW.train_step

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(FusedAdamW, "train_step", counting)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    model = fastmlp.MLP()
    loader = DeviceLoader(images, labels, batch_size=10, shuffle=False)
    train_loop(loader, model, nn.CrossEntropyLoss(), FusedAdamW(model), log=None)
    assert len(calls) == 4
    assert FusedAdamW(model).train_step_for(model, F.cross_entropy) is None  # not plain CE


# ------------------------------------------------------------------ the training workflow


def test_make_optimizer_gives_the_fused_adam_optimizers():
    from fastmlp.workflow.config import TrainConfig
    from fastmlp.workflow.train import make_optimizer

    model = fastmlp.MLP()
    for name, cls in (("adamw", FusedAdamW), ("adam", FusedAdam), ("sgd", fastmlp.FusedSGD)):
        opt = make_optimizer(model, TrainConfig(optimizer=name, lr=0.01, weight_decay=0.02))
        assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 0.02
        assert opt.train_step_for(model, nn.CrossEntropyLoss()) is not None


def _fake_data(tmp_path: Path) -> Path:
    from workflow_fixtures import write_fake_dataset

    folder = tmp_path / "data"
    write_fake_dataset(folder)
    return folder


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_resume_through_the_training_loop_is_bit_identical(tmp_path, optimizer):
    """fit() with FusedAdamW/FusedAdam, interrupted after epoch 1 and resumed from
    last.pt, ends bit for bit where the run without a break ends."""
    from fastmlp.workflow import checkpoint as ckpt
    from fastmlp.workflow.train import TrainConfig, fit

    cfg = TrainConfig(
        optimizer=optimizer,
        lr=3e-3,
        epochs=3,
        batch_size=100,
        train_samples=500,
        schedule="onecycle",
        device="cpu",
        data=str(_fake_data(tmp_path)),
        seed=3,
        precision="fp32",
    )
    straight = fit(cfg, tmp_path / "straight", log=None, progress=False)
    fit(cfg, tmp_path / "split", stop_after=1, log=None, progress=False)
    state = ckpt.load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["epoch"] == 1
    step = state["optimizer"]["state"][0]["step"]
    assert torch.is_tensor(step) and float(step) == 5  # 500 samples / batch 100
    assert set(state["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = fit(
        None, tmp_path / "split", resume=tmp_path / "split" / "last.pt", log=None, progress=False
    )
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_torch_adamw_checkpoint_resumes_with_fused_adamw(tmp_path):
    """A run's optimizer state written by torch.optim.AdamW (as fastmlp saved before the
    fused AdamW) loads into the fused one, and the reverse."""
    model = fastmlp.MLP((12, 9, 4))
    gen = torch.Generator().manual_seed(8)
    plain = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(2):
        _eager_step(model, plain, *_batch(5, (12, 4), torch.float32, gen))
    torch.save({"model": model.state_dict(), "optimizer": plain.state_dict()}, tmp_path / "a.pt")
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    fused_model = fastmlp.MLP((12, 9, 4))
    fused_model.load_state_dict(saved["model"])
    fused = FusedAdamW(fused_model, lr=LR)
    fused.load_state_dict(saved["optimizer"])
    fused.train_step(*_batch(5, (12, 4), torch.float32, gen))
    assert float(fused.state[fused_model.linears()[0].weight]["step"]) == 3
    back = torch.optim.AdamW(fused_model.parameters(), lr=LR)
    back.load_state_dict(fused.state_dict())
    assert float(back.state[fused_model.linears()[0].weight]["step"]) == 3


def _one_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def test_ddp_models_take_the_autograd_step(monkeypatch):
    """As FusedSGD: DDP must all-reduce the gradients between backward and update, so a
    DDP-wrapped model gets no fused step from train_step_for."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastmlp.workflow import distributed

    _one_rank_env(monkeypatch)
    with distributed.process_group("gloo", "cpu"):
        model = fastmlp.MLP((784, 16, 10))
        opt = FusedAdamW(model)
        loss_fn = nn.CrossEntropyLoss()
        assert opt.train_step_for(model, loss_fn) is not None
        assert opt.train_step_for(DDP(model), loss_fn) is None

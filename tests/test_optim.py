"""FusedSGD: the whole-step kernel against eager PyTorch + torch.optim.SGD.

The reference is the tutorial's step, ``loss_fn(model(x), y); zero_grad(); backward();
step()``, on an unfused copy of the same model. float64 checks the maths tightly;
float32 checks that rounding stays at float32's level.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp.optim import FusedSGD, mlp_linears
from fastmlp.testing import NeuralNetwork

SIZES = [(784, 512, 512, 10), (7, 13, 5, 3), (5, 1, 4), (33, 129, 17, 9, 5), (20, 10)]
OPTIONS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"weight_decay": 0.1},
]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {}}


def _eager_step(model, opt, x, y, label_smoothing=0.0):
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _pair(sizes, dtype, bias=True, **options):
    model = fastmlp.MLP(sizes, bias=bias).to(dtype)
    ref = fastmlp.unfuse(copy.deepcopy(model))
    return (
        model,
        FusedSGD(model, lr=0.05, **options),
        ref,
        torch.optim.SGD(ref.parameters(), lr=0.05, **options),
    )


def _batch(batch, sizes, dtype, gen):
    x = torch.randn(batch, sizes[0], generator=gen, dtype=dtype)
    return x, torch.randint(0, sizes[-1], (batch,), generator=gen)


def _assert_same_state(model, opt, ref, ref_opt, tol):
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)
        buf = opt.state[p].get("momentum_buffer")
        ref_buf = ref_opt.state[q].get("momentum_buffer")
        assert (buf is None) == (ref_buf is None)
        if buf is not None:
            torch.testing.assert_close(buf, ref_buf, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [1, 3, 64, 129])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "momentum", "nesterov-wd", "wd"])
def test_matches_eager_sgd(dtype, sizes, batch, options):
    gen = torch.Generator().manual_seed(batch * 31 + len(sizes))
    model, opt, ref, ref_opt = _pair(sizes, dtype, **options)
    for step in range(3):
        x, y = _batch(batch, sizes, dtype, gen)
        smoothing = 0.1 * step
        assert opt.fused_step_applies(x)
        loss = opt.train_step(x, y, label_smoothing=smoothing)
        ref_loss = _eager_step(ref, ref_opt, x, y, smoothing)
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
        assert loss.dtype == dtype and loss.dim() == 0 and not loss.requires_grad
    _assert_same_state(model, opt, ref, ref_opt, TOL[dtype])


def test_without_bias_and_with_image_batches():
    gen = torch.Generator().manual_seed(0)
    model, opt, ref, ref_opt = _pair((784, 64, 10), torch.float64, bias=False, momentum=0.5)
    for _ in range(2):
        x = torch.rand(17, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (17,), generator=gen)
        torch.testing.assert_close(opt.train_step(x, y), _eager_step(ref, ref_opt, x, y))
    _assert_same_state(model, opt, ref, ref_opt, TOL[torch.float64])


def test_tutorial_network_layout_is_fused():
    torch.manual_seed(0)
    net = NeuralNetwork()
    ref = copy.deepcopy(net)
    opt, ref_opt = FusedSGD(net, lr=1e-3), torch.optim.SGD(ref.parameters(), lr=1e-3)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    assert mlp_linears(net) is not None and opt.fused_step_applies(x)
    torch.testing.assert_close(opt.train_step(x, y), _eager_step(ref, ref_opt, x, y))
    _assert_same_state(net, opt, ref, ref_opt, {})


def test_fused_model_layout_after_fuse():
    net = NeuralNetwork()
    linears = [m for m in net.linear_relu_stack if type(m) is nn.Linear]
    fastmlp.fuse(net)
    assert mlp_linears(net) == linears


def test_mlp_linears_of_an_mlp_are_its_linears():
    model = fastmlp.MLP((7, 13, 5, 3))
    assert mlp_linears(model) == model.linears()
    assert [lin.out_features for lin in model.linears()] == [13, 5, 3]
    model.unused = nn.Dropout()  # its forward is MLP's: an extra child changes nothing
    assert mlp_linears(model) == model.linears()


class _ScaledMLP(fastmlp.MLP):
    def forward(self, x):
        return super().forward(x) / 2


class _RenamedNetwork(nn.Module):
    """The tutorial's layout under other names: nothing says what its forward computes."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.stack = fastmlp.unfuse(fastmlp.MLP((4, 5, 3))).linear_relu_stack

    def forward(self, x):
        return self.stack(self.flat(x))


@pytest.mark.parametrize("kind", ["mlp", "fused-tutorial"])
def test_fused_models_train_with_train_step_and_in_a_user_loop(kind):
    torch.manual_seed(0)
    model = fastmlp.MLP() if kind == "mlp" else fastmlp.fuse(NeuralNetwork())
    ref = fastmlp.unfuse(copy.deepcopy(model))
    opt = FusedSGD(model, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.rand(16, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        if step % 2 == 0:
            assert opt.fused_step_applies(x)
            loss = opt.train_step(x, y)
        else:  # the user's own loop, through the whole-MLP op's autograd
            loss = _eager_step(model, opt, x, y)
        torch.testing.assert_close(loss, _eager_step(ref, ref_opt, x, y))
    _assert_same_state(model, opt, ref, ref_opt, {})


def test_user_loop_with_adamw_matches_eager():
    torch.manual_seed(0)
    model = fastmlp.MLP((12, 9, 9, 4))
    ref = fastmlp.unfuse(copy.deepcopy(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = _batch(8, (12, 4), torch.float32, gen)
        torch.testing.assert_close(_eager_step(model, opt, x, y), _eager_step(ref, ref_opt, x, y))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def _with(model, **children):
    for name, child in children.items():
        setattr(model, name, child)
    return model


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),  # not the MLP layout
        fastmlp.unfuse(fastmlp.MLP((4, 5, 3))).linear_relu_stack.append(nn.ReLU()),
        _ScaledMLP((4, 5, 3)),
        _RenamedNetwork(),
        _with(fastmlp.MLP((4, 5, 3)), flatten=nn.Flatten(0)),
        _with(NeuralNetwork(), flatten=nn.Flatten(1, 2)),
    ],
    ids=["sequential", "relu-after-logits", "mlp-own-forward", "renamed", "flatten0", "flatten12"],
)
def test_other_models_are_not_taken_for_mlps(model):
    assert mlp_linears(model) is None


@pytest.mark.parametrize(
    "case",
    [
        "tanh-model",
        "dampening",
        "maximize",
        "fp16-autocast",
        "two-groups",
        "frozen",
        "gelu-mlp",
        "leaky-relu-mlp",
        "linear-mlp",
        "relu-output-mlp",
    ],
)
def test_falls_back_to_the_autograd_step(case):
    """Whatever the fused kernel cannot run, train_step still does exactly the eager step.
    The kernel computes ReLU MLPs only: an MLP with another activation, or with an output
    activation, takes the autograd step."""
    torch.manual_seed(0)
    options: dict = {}
    mlp_options = {
        "gelu-mlp": {"activation": "gelu"},
        "leaky-relu-mlp": {"activation": "leaky_relu", "negative_slope": 0.2},
        "linear-mlp": {"activation": "none"},
        "relu-output-mlp": {"output_activation": "relu"},
    }
    if case == "tanh-model":
        model = NeuralNetwork()
        model.linear_relu_stack[1] = nn.Tanh()
    elif case in mlp_options:
        model = fastmlp.MLP((12, 9, 4), **mlp_options[case])
    else:
        model = fastmlp.MLP((12, 9, 4))
        options = {"dampening": {"momentum": 0.9, "dampening": 0.5}, "maximize": {"maximize": True}}
        options = options.get(case, {})
    ref = fastmlp.unfuse(copy.deepcopy(model))
    opt = FusedSGD(model, lr=0.1, **options)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, **options)
    if case == "frozen":
        for m in (model, ref):
            m.linear_relu_stack[0].weight.requires_grad_(False)
    if case == "two-groups":
        extra = nn.Parameter(torch.zeros(1))
        opt.add_param_group({"params": [extra]})
        ref_opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    n_in = 28 * 28 if case == "tanh-model" else 12
    x, y = torch.randn(5, n_in), torch.randint(0, 4, (5,))
    assert not (case != "fp16-autocast" and opt.fused_step_applies(x))
    with torch.autocast("cpu", dtype=torch.float16, enabled=case == "fp16-autocast"):
        assert not opt.fused_step_applies(x)
        loss = opt.train_step(x, y)
        ref_loss = _eager_step(ref, ref_opt, x, y)
    torch.testing.assert_close(loss, ref_loss)
    _assert_same_state(model, opt, ref, ref_opt, {})


def test_is_an_sgd_whose_state_moves_to_and_from_torch_sgd():
    """Fused steps, then torch SGD from its state_dict, equals torch SGD throughout."""
    gen = torch.Generator().manual_seed(3)
    model, opt, ref, ref_opt = _pair((10, 8, 3), torch.float64, momentum=0.9, nesterov=True)
    batches = [_batch(6, (10, 3), torch.float64, gen) for _ in range(6)]
    for x, y in batches[:3]:
        opt.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
    plain = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    plain.load_state_dict(opt.state_dict())
    for x, y in batches[3:]:
        _eager_step(model, plain, x, y)
        _eager_step(ref, ref_opt, x, y)
    _assert_same_state(model, plain, ref, ref_opt, TOL[torch.float64])
    assert isinstance(opt, torch.optim.SGD)


@pytest.mark.filterwarnings("error")  # a scheduler must see the fused step as a step
def test_follows_a_learning_rate_schedule_and_runs_step_hooks():
    calls = []
    gen = torch.Generator().manual_seed(4)
    model, opt, ref, ref_opt = _pair((10, 8, 3), torch.float64, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=5)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.5, total_steps=5)
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(5):
        x, y = _batch(4, (10, 3), torch.float64, gen)
        opt.train_step(x, y)
        _eager_step(ref, ref_opt, x, y)
        sched.step()
        ref_sched.step()
    _assert_same_state(model, opt, ref, ref_opt, TOL[torch.float64])
    assert calls == ["pre", "post"] * 5


def test_step_gets_the_batch_as_a_real_closure():
    """The fused step reaches step() as its closure argument (no state set around the
    call): hooks see it, and calling it is the ordinary SGD closure, the tutorial's
    zero_grad, cross-entropy and backward on the optimizer's model."""
    gen = torch.Generator().manual_seed(6)
    model, opt, ref, ref_opt = _pair((10, 8, 3), torch.float64)
    closures = []
    opt.register_step_pre_hook(lambda _opt, args, kwargs: closures.append(args[1:]))  # no self
    x, y = _batch(4, (10, 3), torch.float64, gen)
    opt.train_step(x, y, label_smoothing=0.1)
    _eager_step(ref, ref_opt, x, y, 0.1)  # ref is now where model is
    [(closure,)] = closures
    loss = closure()
    ref_opt.zero_grad()
    ref_loss = F.cross_entropy(ref(x), y, label_smoothing=0.1)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])
    opt.step()  # a plain step() afterwards is SGD's, with those gradients
    ref_opt.step()
    _assert_same_state(model, opt, ref, ref_opt, TOL[torch.float64])


@pytest.mark.parametrize(
    ("loss_fn", "fused"),
    [
        (nn.CrossEntropyLoss(), True),
        (nn.CrossEntropyLoss(label_smoothing=0.2), True),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), False),
        (nn.CrossEntropyLoss(reduction="sum"), False),
        (nn.CrossEntropyLoss(ignore_index=1), False),
        (type("MyLoss", (nn.CrossEntropyLoss,), {})(), False),
        (F.cross_entropy, False),
    ],
    ids=["plain", "smoothing", "class-weights", "sum", "ignore-index", "subclass", "function"],
)
def test_train_step_for_offers_the_fused_step_only_for_plain_cross_entropy(loss_fn, fused):
    """What train_loop takes as its step: train_step, with the loss's label smoothing."""
    gen = torch.Generator().manual_seed(7)
    model, opt, ref, ref_opt = _pair((10, 8, 3), torch.float64, momentum=0.9)
    step = opt.train_step_for(model, loss_fn)
    assert (step is not None) == fused
    assert opt.train_step_for(ref, loss_fn) is None  # not its model
    if step is not None:
        x, y = _batch(4, (10, 3), torch.float64, gen)
        smoothing = loss_fn.label_smoothing
        torch.testing.assert_close(step(x, y), _eager_step(ref, ref_opt, x, y, smoothing))
        _assert_same_state(model, opt, ref, ref_opt, TOL[torch.float64])


def test_leaves_no_gradients_and_invalidates_saved_graphs():
    model = fastmlp.MLP((6, 5, 3))
    opt = FusedSGD(model, lr=0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    pending = F.cross_entropy(model(x), y)  # saved the weights before the update
    opt.train_step(x, y)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pending.backward()


def test_is_deterministic():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fastmlp.MLP((50, 40, 30, 10))
        opt = FusedSGD(model, lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.train_step(*_batch(33, (50, 10), torch.float32, gen))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_nan_input_gives_nan_loss_like_pytorch():
    model, opt, ref, ref_opt = _pair((6, 5, 3), torch.float32)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    x[1, 2] = float("nan")
    loss, ref_loss = opt.train_step(x, y), _eager_step(ref, ref_opt, x, y)
    assert loss.isnan() and ref_loss.isnan()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.isnan(), q.isnan())


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(4, 6), torch.tensor([0, 1, 3, 2]), r"target\[2\] = 3 is not a class index"),
        (torch.randn(4, 6), torch.tensor([0, -1, 1, 2]), r"target\[1\] = -1"),
        (torch.randn(4, 6), torch.zeros(4, dtype=torch.int32), "target must be int64"),
        (torch.randn(4, 6), torch.zeros(3, dtype=torch.long), r"target must be .* shape \(4,\)"),
        (torch.randn(0, 6), torch.zeros(0, dtype=torch.long), "non-empty batch"),
        (torch.randn(4, 7), torch.zeros(4, dtype=torch.long), r"weights\[0\] must have shape"),
    ],
    ids=["class-too-large", "negative-class", "int32-target", "short-target", "empty", "features"],
)
def test_bad_batches_raise_and_change_nothing(x, y, match):
    model = fastmlp.MLP((6, 5, 3))
    opt = FusedSGD(model, lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=match):
        opt.train_step(x, y)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_rejects_parameters_instead_of_a_model():
    with pytest.raises(TypeError, match="takes the model"):
        FusedSGD(fastmlp.MLP((4, 3)).parameters(), lr=0.1)  # type: ignore[arg-type]


def test_op_passes_opcheck():
    """Schema (in-place annotations), fake kernel and dispatch agree (torch.library.opcheck)."""
    model = fastmlp.MLP((6, 5, 3)).double()
    weights = [lin.weight.detach().clone() for lin in mlp_linears(model)]
    biases = [lin.bias.detach().clone() for lin in mlp_linears(model)]
    buffers = [torch.zeros_like(p) for pair in zip(weights, biases, strict=True) for p in pair]
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    args = (x, y, weights, biases, buffers, [], 0.1, 0.9, 1e-3, True, 0.1, None)
    torch.library.opcheck(torch.ops.fastmlp.mlp_sgd_step.default, args)


def _relative_error(params, ref64):
    return [
        ((p.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        for p, r in zip(params, ref64, strict=True)
    ]


@pytest.mark.parametrize("sizes", [(784, 512, 512, 10), (7, 13, 5, 3), (33, 129, 17, 9, 5)])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}])
def test_bf16_autocast_step_is_as_accurate_as_pytorch_autocast(sizes, options):
    """Under CPU bf16 autocast the fused kernel runs bfloat16 GEMMs on float32 master
    weights. Its error against a float64 run must be no worse than eager PyTorch's under
    the same autocast (each parameter, after 5 steps), with the loss close to autocast's."""
    gen = torch.Generator().manual_seed(len(sizes))
    model, opt, ref, ref_opt = _pair(sizes, torch.float32, **options)
    ref64 = copy.deepcopy(ref).double()
    opt64 = torch.optim.SGD(ref64.parameters(), lr=0.05, **options)
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
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_copies_follow_parameters_changed_elsewhere():
    """The kernel keeps bf16 copies of the weights between fused steps; a change made
    outside it (here load_state_dict) must be seen by the next fused step, which must then
    equal, bit for bit, the step of a fresh optimizer (fresh copies) in the same state."""
    torch.manual_seed(0)
    model = fastmlp.MLP((12, 9, 4))
    opt = FusedSGD(model, lr=0.05, momentum=0.5)
    gen = torch.Generator().manual_seed(5)
    batches = [_batch(8, (12, 4), torch.float32, gen) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in batches[:2]:
            opt.train_step(x, y)
        model.load_state_dict(fastmlp.MLP((12, 9, 4)).state_dict())  # behind its back
        twin = copy.deepcopy(model)
        twin_opt = FusedSGD(twin, lr=0.05, momentum=0.5)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # own buffers
        opt.train_step(*batches[2])
        twin_opt.train_step(*batches[2])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)

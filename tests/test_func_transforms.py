"""torch.func transforms of fastmlp's ops and modules (fastmlp.transforms): grad over the
parameters, jacrev, jacfwd, vmap of the forward, per-sample gradients vmap(grad(...)),
vmap over stacked parameters and grad of vmap, each against plain PyTorch (nn.Linear and
nn.ReLU with the same weights, under the same transform); that the normal path and vmap
with shared weights still run the fused ops; and torch.jit.script's clear refusal."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import fastmlp
from fastmlp.nn import FusedLinearReLU

WIDTHS = (7, 13, 13, 5)  # not multiples of any tile
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


class _Stack(nn.Module):
    """Linear layers whose parameters are passed to ``fn(x, weights, biases)``: lets the
    functions (fastmlp.mlp, fastmlp.linear_relu, the raw ops) and their plain-PyTorch
    twins take part in functional_call like the modules do."""

    def __init__(self, fn: Callable, widths: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:], strict=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [lin.weight for lin in self.layers]
        biases = None if self.layers[0].bias is None else [lin.bias for lin in self.layers]
        return self.fn(x, weights, biases)


class _PlainLinearReLU(nn.Linear):
    """nn.Linear then ReLU, with FusedLinearReLU's parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _mlp_ref(x, weights, biases):
    for i, w in enumerate(weights):
        x = F.linear(x, w, None if biases is None else biases[i])
        if i + 1 < len(weights):
            x = torch.relu(x)
    return x


def _op_mlp(x, weights, biases):
    return torch.ops.fastmlp.mlp(x, weights, [] if biases is None else biases)[0]


def _linear_relu(x, weights, biases):
    return fastmlp.linear_relu(x, weights[0], None if biases is None else biases[0])


def _op_linear_relu(x, weights, biases):
    return torch.ops.fastmlp.linear_relu(x, weights[0], None if biases is None else biases[0])


def _linear_relu_ref(x, weights, biases):
    return torch.relu(F.linear(x, weights[0], None if biases is None else biases[0]))


def _tutorial_stack(bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=False)):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers)


def _case(name: str, bias: bool) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(fastmlp model, plain-PyTorch model with the same parameters, one sample's shape)."""
    if name == "MLP":  # nn.Flatten first: one sample is (1, in_features), as in the tutorial
        ours = fastmlp.MLP(WIDTHS, bias=bias)
        return ours, fastmlp.unfuse(copy.deepcopy(ours)), (1, WIDTHS[0])
    if name == "fuse":
        plain = nn.Sequential(_tutorial_stack(bias), nn.ReLU())  # a ReLU after the last too
        return fastmlp.fuse(copy.deepcopy(plain)), plain, (WIDTHS[0],)
    if name == "FusedLinearReLU":
        ours = FusedLinearReLU(WIDTHS[0], WIDTHS[1], bias=bias)
        return ours, _PlainLinearReLU(WIDTHS[0], WIDTHS[1], bias=bias), (WIDTHS[0],)
    fn, ref, widths = {
        "mlp": (fastmlp.mlp, _mlp_ref, WIDTHS),
        "ops.mlp": (_op_mlp, _mlp_ref, WIDTHS),
        "linear_relu": (_linear_relu, _linear_relu_ref, WIDTHS[:2]),
        "ops.linear_relu": (_op_linear_relu, _linear_relu_ref, WIDTHS[:2]),
    }[name]
    ours = _Stack(fn, widths, bias)
    plain = copy.deepcopy(ours)
    plain.fn = ref
    return ours, plain, (widths[0],)


CASES = ["MLP", "fuse", "FusedLinearReLU", "mlp", "ops.mlp", "linear_relu", "ops.linear_relu"]


@pytest.fixture(params=CASES)
def case_name(request):
    return request.param


@pytest.fixture(params=[True, False], ids=["bias", "nobias"])
def bias(request):
    return request.param


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param


@pytest.fixture
def models(case_name, bias, dtype):
    torch.manual_seed(0)
    ours, plain, sample = _case(case_name, bias)
    # Biases drawn away from nn.Linear's init so that about half the units are active.
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    plain.load_state_dict(ours.state_dict())
    return ours.to(dtype), plain.to(dtype), sample


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _assert_close(ours, theirs, dtype, what):
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), what
        for k in ours:
            _assert_close(ours[k], theirs[k], dtype, f"{what}[{k}]")
        return
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    torch.testing.assert_close(ours, theirs, **TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("batch", [1, 5])
def test_grad_over_parameters(models, dtype, batch):
    ours, plain, sample = models
    x = torch.randn(batch, *sample, dtype=dtype)

    def loss(model):
        return lambda p: functional_call(model, p, (x,)).square().sum()

    _assert_close(grad(loss(ours))(_params(ours)), grad(loss(plain))(_params(plain)), dtype, "grad")


@pytest.mark.parametrize("jac", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("batch", [1, 5])
def test_jacobian_of_input(models, dtype, jac, batch):
    ours, plain, sample = models
    x = torch.randn(batch, *sample, dtype=dtype)
    _assert_close(jac(ours)(x), jac(plain)(x), dtype, jac.__name__)


@pytest.mark.parametrize("batch", [1, 5])
def test_vmap_of_forward(models, dtype, batch):
    ours, plain, sample = models
    xs = torch.randn(batch, 3, *sample, dtype=dtype)  # vmapped over dim 1, not 0
    y = vmap(ours, in_dims=1)(xs)
    _assert_close(y, vmap(plain, in_dims=1)(xs), dtype, "vmap")
    # Plain autograd through vmap (the parameters require grad): same gradients.
    y.square().sum().backward()
    vmap(plain, in_dims=1)(xs).square().sum().backward()
    grads = {k: p.grad for k, p in ours.named_parameters()}
    _assert_close(grads, {k: p.grad for k, p in plain.named_parameters()}, dtype, "backward")


@pytest.mark.parametrize("batch", [1, 5])
def test_per_sample_gradients(models, dtype, batch):
    ours, plain, sample = models
    xs = torch.randn(batch, *sample, dtype=dtype)
    targets = torch.randn(batch, *ours(xs[:1]).shape[1:], dtype=dtype)

    def per_sample(model):
        def loss(p, x, t):
            return (functional_call(model, p, (x[None],))[0] - t).square().sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(_params(model), xs, targets)

    _assert_close(per_sample(ours), per_sample(plain), dtype, "per-sample grad")


def test_vmap_over_stacked_parameters(models, dtype):
    """Model ensembling: the weights themselves are vmapped (the decomposition's path)."""
    ours, plain, sample = models
    x = torch.randn(5, *sample, dtype=dtype)

    def ensemble(model):
        copies = [copy.deepcopy(model) for _ in range(3)]
        for i, c in enumerate(copies):
            with torch.no_grad():
                for p in c.parameters():
                    p.mul_(1 + i / 4)
        params, _ = stack_module_state(copies)
        return vmap(lambda p: functional_call(model, p, (x,)))(params)

    _assert_close(ensemble(ours), ensemble(plain), dtype, "ensemble")


def test_grad_of_vmap(models, dtype):
    ours, plain, sample = models
    xs = torch.randn(5, *sample, dtype=dtype)

    def loss(model):
        return lambda p: vmap(lambda x: functional_call(model, p, (x,)))(xs).square().sum()

    _assert_close(grad(loss(ours))(_params(ours)), grad(loss(plain))(_params(plain)), dtype, "grad")


# --- the fused ops still run where they can --------------------------------------------


class _OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python key."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_outside_transforms_the_fused_ops_run():
    model = fastmlp.MLP(WIDTHS)
    x = torch.randn(5, WIDTHS[0])
    with _OpLog() as log:
        model(x).sum().backward()
    assert "fastmlp.mlp.default" in log.ops and "fastmlp.mlp_backward.default" in log.ops
    assert not any(op.startswith(("aten.addmm", "aten.mm", "aten.linear")) for op in log.ops)


@pytest.mark.parametrize("case_name", ["MLP", "FusedLinearReLU"])
def test_vmap_with_shared_weights_runs_the_fused_op_once(case_name):
    model, _, sample = _case(case_name, bias=True)
    xs = torch.randn(5, *sample)
    with _OpLog() as log:
        vmap(model)(xs)
    fused = [op for op in log.ops if op.startswith("fastmlp.")]
    assert fused == [f"fastmlp.{'mlp' if case_name == 'MLP' else 'linear_relu'}.default"]


def test_under_grad_the_decomposition_runs():
    model = fastmlp.MLP(WIDTHS)
    x = torch.randn(5, WIDTHS[0])
    with _OpLog() as log:
        grad(lambda p: functional_call(model, p, (x,)).sum())(_params(model))
    assert not any(op.startswith("fastmlp.") for op in log.ops)


# --- torch.jit.script --------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = FusedLinearReLU(WIDTHS[0], WIDTHS[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastmlp.MLP(WIDTHS),
        lambda: FusedLinearReLU(WIDTHS[0], WIDTHS[1]),
        lambda: fastmlp.fuse(_tutorial_stack(bias=True)),
        lambda: fastmlp.fuse(nn.Sequential(_tutorial_stack(bias=True), nn.Tanh())),
        _Holder,
    ],
    ids=["MLP", "FusedLinearReLU", "fuse", "fuse-nested", "inside-a-module"],
)
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_jit_script_refuses_with_the_ways_that_work(make):
    model = make()
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError) as info:  # script is deprecated
        torch.jit.script(model)
    message = str(info.value)
    assert "\n" not in message and "torch.jit.script cannot compile fastmlp's" in message
    assert "torch.jit.trace" in message and "torch.export" in message
    # What it points to works: trace records the fused ops.
    x = torch.randn(5, WIDTHS[0])
    traced = torch.jit.trace(model, x)
    assert "fastmlp::" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x))

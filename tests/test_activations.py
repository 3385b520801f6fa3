"""Every activation (issue 23) through the ops (fastmlp.mlp, fastmlp.linear_act, the raw
ops), the modules (MLP, fuse/unfuse, describe_fusion) and torch.func, against a float64
reference with the error bounded by PyTorch's own in the same dtype: odd widths, batch
0/1/3/129, fp32/bf16/fp64, bias or not, needs_input_grad subsets, NaN/inf and the
gradient at 0, opcheck, gradcheck, torch.compile(fullgraph=True), CPU bf16 autocast, and
the errors for bad names. Export of every activation is in tests/test_export.py."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import activations
from fastmlp.nn import MLP, FusedSequential, describe_fusion, fuse, unfuse
from fastmlp.ops import ACTIVATIONS, linear_act, mlp
from fastmlp.testing import activation_ref, assert_mlp_matches_torch, mlp_layers, mlp_ref
from fastmlp.testing import mlp_forward_backward as _run

# (activation, negative_slope): leaky_relu with a negative slope saves its pre-activation.
KINDS = [(a, 0.01) for a in ACTIVATIONS] + [("leaky_relu", -0.3)]
KIND_IDS = [a if s == 0.01 else f"{a}{s}" for a, s in KINDS]
BATCHES = (0, 1, 3, 129)
WIDTHS = (1, 7, 513)
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# float64: where PyTorch's float64 reference happens to be exact, ours still differs by
# summation order; through a width-1 bottleneck with cancellation that was 6.6e-12
# relative (grad_x, activation none, 3 layers, batch 1). A wrong mask, term or layer is off
# by O(1), so 1e-10 still catches every real mistake.
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _fns(activation, output_activation, slope):
    kw = dict(activation=activation, output_activation=output_activation, negative_slope=slope)
    return functools.partial(mlp, **kw), functools.partial(mlp_ref, **kw)


def assert_matches_torch(x, weights, biases, activation, output_activation, slope, needs=None):
    ours_fn, ref_fn = _fns(activation, output_activation, slope)
    what = f"{activation}/{output_activation}, "
    floor = ERROR_FLOOR[x.dtype]
    assert_mlp_matches_torch(ours_fn, ref_fn, x, weights, biases, floor, needs, what)


# Per activation: every batch and dtype; layers 1..3, bias and the output activation
# (none, or the same as the hidden one) rotate with the case, widths rotate through 1/7/513.
GRID = [
    (kind, batch, dtype)
    for kind, batch, dtype in itertools.product(range(len(KINDS)), BATCHES, DTYPES)
]


@pytest.mark.parametrize(
    "kind,batch,dtype",
    GRID,
    ids=[f"{KIND_IDS[k]}-b{b}-{str(d)[6:]}" for k, b, d in GRID],
)
def test_forward_backward_matches_torch(kind, batch, dtype):
    case = GRID.index((kind, batch, dtype))
    activation, slope = KINDS[kind]
    layers, bias = 1 + case % 3, case % 2 == 0
    output_activation = activation if (case // 2) % 2 else "none"
    sizes = [WIDTHS[(case + i) % 3] for i in range(layers + 1)]
    gen = torch.Generator().manual_seed(case)
    weights, biases = mlp_layers(sizes, dtype, bias, gen)
    x = torch.randn(batch, sizes[0], generator=gen).to(dtype)
    torch.manual_seed(case)  # grad_y too: a failure reproduces whatever ran before
    assert_matches_torch(x, weights, biases, activation, output_activation, slope)


@pytest.mark.parametrize("output_activation", ACTIVATIONS)
def test_output_activation_after_relu_layers(output_activation):
    gen = torch.Generator().manual_seed(3)
    weights, biases = mlp_layers((13, 33, 9, 5), torch.float32, True, gen)
    x = torch.randn(17, 13, generator=gen)
    assert_matches_torch(x, weights, biases, "relu", output_activation, 0.2)


SUBSETS = {
    "x-only": [0],
    "w0-only": [1],
    "middle-weight": [2],
    "last-layer-only": [3, 6],
    "biases-only": [4, 5, 6],
    "none": [],
}


@pytest.mark.parametrize("subset", SUBSETS.values(), ids=SUBSETS.keys())
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_only_requested_gradients_are_computed(kind, subset):
    activation, slope = kind
    gen = torch.Generator().manual_seed(7)
    weights, biases = mlp_layers((13, 33, 9, 5), torch.float64, True, gen)
    x = torch.randn(17, 13, generator=gen, dtype=torch.float64)
    needs = [i in subset for i in range(7)]
    assert_matches_torch(x, weights, biases, activation, activation, slope, needs)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags'
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_nan_and_inf_propagate_like_torch(kind):
    activation, slope = kind
    weights, biases = mlp_layers(
        (9, 11, 6, 3), torch.float32, True, torch.Generator().manual_seed(1)
    )
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))
    x[2, 3] = float("nan")
    x[4, 1] = float("inf")
    x[5, 0] = -float("inf")
    weights[1][4, 0] = float("inf")
    ours_fn, ref_fn = _fns(activation, activation, slope)
    y, grads, gy = _run(ours_fn, x, weights, biases)
    # PyTorch's own F.gelu disagrees with itself at +inf: on contiguous float32/bfloat16
    # CPU tensors it runs oneDNN, which gives NaN, elsewhere (float64, non-contiguous,
    # oneDNN off) its ATen kernel, which gives inf. fastmlp computes ATen's formula (inf,
    # as float64 and the math do): compare with that kernel.
    with torch.backends.mkldnn.flags(enabled=False):
        y_t, grads_t, _ = _run(ref_fn, x, weights, biases, gy)
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_gradient_at_zero_preactivation_is_torchs(kind):
    activation, slope = kind
    weights, biases = mlp_layers((5, 6, 4), torch.float64, True, torch.Generator().manual_seed(4))
    for w, b in zip(weights, biases, strict=True):
        w[:2] = 0.0
        b[:2] = 0.0  # units 0 and 1 of each layer: pre-activation exactly 0
    x = torch.randn(8, 5, dtype=torch.float64)
    ours_fn, ref_fn = _fns(activation, activation, slope)
    y, grads, gy = _run(ours_fn, x, weights, biases)
    y_t, grads_t, _ = _run(ref_fn, x, weights, biases, gy)
    for ours, theirs in zip([y, *grads], [y_t, *grads_t], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_gradcheck_float64(kind):
    activation, slope = kind
    weights, biases = mlp_layers(
        (4, 5, 3, 2), torch.float64, True, torch.Generator().manual_seed(5)
    )
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    for out in ("none", activation):
        fn = functools.partial(mlp, activation=activation, output_activation=out)
        fn = functools.partial(fn, negative_slope=slope)
        assert torch.autograd.gradcheck(lambda x, *p, f=fn: f(x, p[:3], p[3:]), (x, *params))
        assert torch.autograd.gradcheck(lambda x, *w, f=fn: f(x, w), (x, *params[:3]))


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_opcheck(kind, dtype):
    activation, slope = kind
    weights, biases = mlp_layers((5, 7, 3), dtype, True, torch.Generator().manual_seed(6))
    x = torch.randn(6, 5).to(dtype)
    grad = [t.detach().clone().requires_grad_() for t in [x, *weights, *biases]]
    for out in ("none", activation):
        acts = (activation, out, slope)
        for args in [
            (x, weights, biases),
            (grad[0], grad[1:3], grad[3:]),
            (torch.randn(2, 3, 5).to(dtype), weights, []),
            (torch.randn(0, 5).to(dtype), weights[:1], biases[:1]),
        ]:
            torch.library.opcheck(torch.ops.fastmlp.mlp.default, (*args, *acts))
        y, hidden = torch.ops.fastmlp.mlp(x, weights, biases, *acts)
        assert len(hidden) == 1 + (out != "none")
        gy = torch.randn_like(y)
        for mask in ([True] * 5, [False, True, False, True, False], [False] * 5):
            args = (gy, x if mask[1] else None, weights, hidden, mask, *acts)
            torch.library.opcheck(torch.ops.fastmlp.mlp_backward.default, args)


def test_hidden_saves_what_each_activation_needs():
    # The output for relu/tanh/sigmoid/none/leaky_relu (slope >= 0), the pre-activation
    # for gelu/gelu_tanh/silu and leaky_relu with a negative slope (as fastmlp.activations
    # says: the check that C++ and Python agree); with an output
    # activation, one more entry: the last layer's pre-activation.
    weights, biases = mlp_layers(
        (4, 6, 5, 3), torch.float64, True, torch.Generator().manual_seed(9)
    )
    x = torch.randn(7, 4, dtype=torch.float64)
    for activation, slope in KINDS:
        for out in ("none", "sigmoid"):
            _, hidden = torch.ops.fastmlp.mlp(x, weights, biases, activation, out, slope)
            z0 = F.linear(x, weights[0], biases[0])
            h0 = activation_ref(z0, activation, slope)
            z1 = F.linear(h0, weights[1], biases[1])
            h1 = activation_ref(z1, activation, slope)
            # The kernels' rule (saves_output in C++) must be the Python table's.
            pre = activations.saves_preactivation(activation, slope)
            want = [z0, z1] if pre else [h0, h1]
            if out != "none":
                want.append(F.linear(h1, weights[2], biases[2]))
            assert len(hidden) == len(want), (activation, out)
            for h, w in zip(hidden, want, strict=True):
                torch.testing.assert_close(h, w, msg=f"{activation}/{out}")


def test_torch_compile_fullgraph_every_activation():
    weights, biases = mlp_layers(
        (20, 16, 16, 4), torch.float32, True, torch.Generator().manual_seed(2)
    )
    params = [t.requires_grad_() for t in [*weights, *biases]]
    ref = [t.detach().clone().requires_grad_() for t in params]
    x, target = torch.randn(9, 20), torch.arange(9) % 4

    def loss(fn, p):
        # Every activation in one graph (one compile, no recompiles).
        total = 0
        for activation, slope in KINDS:
            y = fn(x, p[:3], p[3:], activation, activation, slope)
            total = total + F.cross_entropy(y, target)
        return total

    # fullgraph=True: any graph break (an op dynamo cannot trace) is an error.
    got = torch.compile(functools.partial(loss, mlp), fullgraph=True)(params)
    want = loss(mlp_ref, ref)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_autocast_cpu_bfloat16(kind):
    activation, slope = kind
    weights, biases = mlp_layers((12, 10, 6), torch.float32, True, torch.Generator().manual_seed(3))
    params = [t.requires_grad_() for t in [*weights, *biases]]
    x = torch.randn(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x, params[:2], params[2:], activation, activation, slope)
        y_t = mlp_ref(x, params[:2], params[2:], activation, activation, slope)
    assert y.dtype == y_t.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_t, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# --- linear_act: the one-layer op -------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_linear_act_matches_torch(kind, shape):
    activation, slope = kind
    for bias in (True, False):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
        y = linear_act(x, w, b, activation, slope)
        want = activation_ref(F.linear(x, w, b), activation, slope)
        torch.testing.assert_close(y, want)
        gy = torch.randn_like(y)
        inputs = [t for t in (x, w, b) if t is not None]
        got = torch.autograd.grad(y, inputs, gy)
        for g, r in zip(got, torch.autograd.grad(want, inputs, gy), strict=True):
            torch.testing.assert_close(g, r)
        # ReLU is the per-layer op, the others the one-layer whole-MLP op.
        op = "LinearReLUFunction" if activation == "relu" else "MlpFunction"
        assert op in y.grad_fn.name()


def test_linear_act_is_exported_from_the_package():
    assert fastmlp.linear_act is linear_act


# --- bad names and slopes: clear errors -------------------------------------------------

W = [torch.randn(4, 3), torch.randn(2, 4)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: mlp(torch.randn(2, 3), W, None, "gelu_erf"),
        lambda: mlp(torch.randn(2, 3), W, None, "relu", "Sigmoid"),
        lambda: mlp(torch.randn(2, 3), W, None, "relu", None),
        lambda: linear_act(torch.randn(2, 3), W[0], None, "softplus"),
        lambda: MLP((3, 4, 2), activation="swish"),
        lambda: MLP((3, 4, 2), output_activation="softmax"),
    ],
)
def test_unknown_activation_raises_value_error_listing_the_names(call):
    with pytest.raises(ValueError, match=r"activation must be one of 'relu', 'leaky_relu'"):
        call()


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_negative_slope_raises(slope):
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        mlp(torch.randn(2, 3), W, None, "leaky_relu", "none", slope)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        linear_act(torch.randn(2, 3), W[0], None, "leaky_relu", slope)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        MLP((3, 4, 2), activation="leaky_relu", negative_slope=slope)


def test_cpp_activation_names_are_what_its_parser_accepts():
    """fastmlp._C._activation_names() (C++'s one list, in enum order) names exactly what
    the ops' parser takes: each name runs as activation and output_activation, and the
    error for an unknown name lists these names, in this order."""
    from fastmlp import _C

    names = _C._activation_names()
    assert isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    assert len(set(names)) == len(names)
    x = torch.randn(2, 3)
    for name in names:
        y, _ = torch.ops.fastmlp.mlp(x, W, [], name, name, 0.01)
        assert y.shape == (2, W[-1].shape[0])
    with pytest.raises(RuntimeError) as error:
        torch.ops.fastmlp.mlp(x, W, [], "bogus", "none", 0.01)
    assert f"must be one of {', '.join(names)}, got 'bogus'" in str(error.value)


def test_python_and_cpp_list_the_same_activations_in_the_same_order():
    # fastmlp.activations.TABLE (Python's one table) against FASTMLP_ACTIVATIONS (C++'s):
    # an activation added on one side only fails here.
    from fastmlp import _C

    assert tuple(_C._activation_names()) == activations.NAMES == ACTIVATIONS


def test_raw_ops_reject_bad_names_naming_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"activation.*gelu_erf|gelu_erf.*activation"):
        torch.ops.fastmlp.mlp(x, W, [], "gelu_erf", "none", 0.01)
    with pytest.raises(RuntimeError, match=r"output_activation"):
        torch.ops.fastmlp.mlp(x, W, [], "relu", "bogus", 0.01)
    with pytest.raises(RuntimeError, match=r"negative_slope"):
        torch.ops.fastmlp.mlp(x, W, [], "leaky_relu", "none", float("nan"))
    y, hidden = torch.ops.fastmlp.mlp(x, W, [], "relu", "tanh", 0.01)
    assert len(hidden) == 2
    # The hidden count follows the output activation.
    with pytest.raises(RuntimeError, match="hidden"):
        torch.ops.fastmlp.mlp_backward(
            torch.randn_like(y), x, W, hidden[:1], [True] * 3, "relu", "tanh", 0.01
        )


# --- modules ----------------------------------------------------------------------------

MODULE = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": nn.GELU,
    "silu": nn.SiLU,
}


def _plain(sizes, activation, output_activation, slope, bias=True):
    """The plain nn.Sequential an MLP with these settings stands for."""

    def act(name):
        if name in (None, "none"):
            return []
        if name == "leaky_relu":
            return [nn.LeakyReLU(slope)]
        if name == "gelu_tanh":
            return [nn.GELU(approximate="tanh")]
        return [MODULE[name]()]

    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b, bias=bias))
        layers += act(output_activation if i == len(sizes) - 2 else activation)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("output_activation", [None, "sigmoid", "same"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_mlp_module_is_the_plain_stack_computed_by_one_op(kind, output_activation):
    activation, slope = kind
    out = activation if output_activation == "same" else output_activation
    sizes = (6, 9, 7, 3)
    torch.manual_seed(0)
    model = MLP(sizes, activation=activation, output_activation=out, negative_slope=slope)
    model = model.double()
    plain = _plain(sizes, activation, out, slope).double()
    # Same children (classes and settings), so the same state_dict keys.
    assert [repr(m) for m in model.linear_relu_stack] == [repr(m) for m in plain]
    plain.load_state_dict(model.linear_relu_stack.state_dict(), strict=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y = model(x)
    assert y.grad_fn.name().endswith("MlpFunction>")  # the whole stack: one op
    want = plain(x.flatten(1))
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    want.square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    tutorial = unfuse(copy.deepcopy(model))
    assert type(tutorial.linear_relu_stack) is nn.Sequential
    torch.testing.assert_close(tutorial(x), y)


def test_mlp_defaults_are_the_tutorials():
    model = MLP()
    assert [type(m) for m in model.linear_relu_stack] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    assert model.activation == "relu" and model.output_activation is None


def test_mlp_with_no_activation_has_only_linears():
    model = MLP((4, 5, 3), activation="none")
    assert [type(m) for m in model.linear_relu_stack] == [nn.Linear, nn.Linear]
    assert list(model.state_dict()) == [
        "linear_relu_stack.0.weight",
        "linear_relu_stack.0.bias",
        "linear_relu_stack.1.weight",
        "linear_relu_stack.1.bias",
    ]
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), model.linear_relu_stack[1](model.linear_relu_stack[0](x)))


def _act_module(activation, slope):
    return _plain((2, 2), "none", activation, slope)[1]


@pytest.mark.parametrize("kind", KINDS + [("none", 0.01)], ids=KIND_IDS + ["identity"])
def test_fuse_every_activation_module_and_unfuse_exactly(kind):
    activation, slope = kind
    act = (
        (lambda: nn.Identity())
        if activation == "none"
        else (lambda: _act_module(activation, slope))
    )
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3), act())
    children, keys, text = list(plain), list(plain.state_dict()), repr(plain)
    x = torch.randn(4, 5)
    expected = plain(x)
    fuse(plain)
    assert type(plain) is FusedSequential
    (run,) = plain.runs()
    assert len(run.linears) == 3 and run.activation == activation
    assert run.output_activation == activation
    y = plain(x)
    assert y.grad_fn.name().endswith("MlpFunction>")
    torch.testing.assert_close(y, expected)
    assert list(plain.state_dict()) == keys
    unfuse(plain)
    assert type(plain) is nn.Sequential and list(plain) == children and repr(plain) == text


def test_a_change_of_activation_starts_a_new_run():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.Tanh(),  # after the first run's last Linear: its output activation
        nn.Linear(6, 6),
        nn.LeakyReLU(0.2),
        nn.Linear(6, 4),
        nn.GELU(approximate="tanh"),
    )
    x = torch.randn(3, 5)
    expected = model(x)
    fuse(model)
    runs = model.runs()
    assert [(len(r.linears), r.activation, r.output_activation) for r in runs] == [
        (3, "gelu", "tanh"),
        (2, "leaky_relu", "gelu_tanh"),
    ]
    assert runs[1].negative_slope == 0.2
    torch.testing.assert_close(model(x), expected)
    assert describe_fusion(model) == [
        "fused 0..5 (3 Linear layers, GELU(approximate='none') between, Tanh() after the "
        "last) into one fastmlp.mlp op",
        "fused 6..9 (2 Linear layers, LeakyReLU(negative_slope=0.2) between, "
        "GELU(approximate='tanh') after the last) into one fastmlp.mlp op",
    ]


def test_leaky_relus_with_different_slopes_are_not_one_run():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.LeakyReLU(0.3), nn.Linear(4, 2)
    )
    x = torch.randn(5, 4)
    expected = model(x)
    fuse(model)
    # One negative_slope per op: the second LeakyReLU cannot be the run's output
    # activation, and the last Linear alone (no activation after it) is no run.
    assert [
        (len(r.linears), r.activation, r.output_activation, r.negative_slope) for r in model.runs()
    ] == [(2, "leaky_relu", "none", 0.1)]
    torch.testing.assert_close(model(x), expected)


def test_activation_subclasses_and_unknown_modules_are_not_fused():
    class MyGELU(nn.GELU):
        def forward(self, input):
            return super().forward(input) * 2

    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(4, 4), MyGELU(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)
    )
    x = torch.randn(5, 4)
    expected = model(x)
    fuse(model)
    assert type(model) is nn.Sequential
    torch.testing.assert_close(model(x), expected)
    assert (
        describe_fusion(model)[0] == "left 0 (followed by MyGELU, not an activation fuse() knows)"
    )


def test_single_linear_with_an_activation_is_one_op():
    torch.manual_seed(5)
    model = fuse(nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Dropout(0.5)))
    (run,) = model.runs()
    assert run.output_activation == "silu"
    x = torch.randn(3, 4)
    y = model.eval()(x)
    assert y.grad_fn.name().endswith("MlpFunction>")
    torch.testing.assert_close(y, F.silu(model[0](x)))
    assert describe_fusion(model) == [
        "fused 0..1 (1 Linear layers, SiLU() after the last) into one fastmlp.mlp op"
    ]


# --- torch.func -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [("gelu", 0.01), ("leaky_relu", -0.3), ("sigmoid", 0.01)])
def test_per_sample_gradients_match_plain_pytorch(kind):
    activation, slope = kind
    torch.manual_seed(6)
    model = MLP(
        (5, 7, 3), activation=activation, output_activation=activation, negative_slope=slope
    )
    model = model.double()
    plain = unfuse(copy.deepcopy(model))
    x = torch.randn(4, 5, dtype=torch.float64)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi):
            return torch.func.functional_call(m, p, (xi.unsqueeze(0),)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    got, want = per_sample(model), per_sample(plain)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    # vmap over the input alone runs the fused op with the activation.
    y = torch.func.vmap(model)(x.unsqueeze(1))
    torch.testing.assert_close(y.squeeze(1), plain(x))


def test_fused_sequential_follows_changed_activation_settings():
    torch.manual_seed(7)
    model = fuse(nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2)))
    x = torch.randn(5, 4)
    model(x)
    model[1].negative_slope = 0.5  # the plan must not keep the old slope
    torch.testing.assert_close(model(x), model[2](F.leaky_relu(model[0](x), 0.5)))


@pytest.mark.parametrize("kind,slope", KINDS, ids=KIND_IDS)
def test_each_row_of_the_table_agrees_with_itself(kind, slope):
    # fastmlp.activations is the one Python table: its module, forward and backward must be
    # one activation (the backward from what the row says is saved), as torch computes it.
    module = activations.module_for(kind, slope)
    z = torch.randn(33, dtype=torch.float64, requires_grad=True)
    z.data[:3] = torch.tensor([0.0, float("inf"), -float("inf")], dtype=torch.float64)
    if kind == "none":
        assert module is None and activations.from_module(nn.Identity()) is None
        y = z * 1
    else:
        assert activations.from_module(module) == (kind, slope if kind == "leaky_relu" else None)
        y = module(z)
    torch.testing.assert_close(activations.apply(z, kind, slope), y, equal_nan=True)
    g = torch.randn_like(z)
    (expected,) = torch.autograd.grad(y, z, g)
    pre = activations.saves_preactivation(kind, slope)
    saved = (z if pre else y).detach()
    got = activations.backward(g, saved, kind, slope, saved_is_output=not pre)
    finite = torch.isfinite(z.detach())  # at +-inf PyTorch's own formulas give NaN or 0
    torch.testing.assert_close(got[finite], expected[finite])

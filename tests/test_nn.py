"""fastmlp.nn: FusedLinearReLU, MLP, fuse/unfuse, and interoperability with the
tutorial's plain-PyTorch NeuralNetwork."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.nn import MLP, FusedLinearReLU, FusedSequential, describe_fusion, fuse, unfuse
from fastmlp.testing import NeuralNetwork


def _images(n=5):
    return torch.rand(n, 1, 28, 28)


def test_fused_linear_relu_is_an_nn_linear_with_the_same_init():
    torch.manual_seed(3)
    plain = nn.Linear(13, 7)
    torch.manual_seed(3)
    fused = FusedLinearReLU(13, 7)
    assert isinstance(fused, nn.Linear)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(fused.weight, plain.weight)
    torch.testing.assert_close(fused.bias, plain.bias)
    x = torch.randn(4, 13)
    torch.testing.assert_close(fused(x), torch.relu(plain(x)))
    assert "fused" in repr(fused) and "in_features=13" in repr(fused)


def test_fused_linear_relu_options():
    layer = FusedLinearReLU(5, 3, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.relu(x @ layer.weight.t()))


def test_mlp_state_dict_loads_strictly_into_tutorial_model_and_back():
    torch.manual_seed(0)
    ours, tutorial = MLP(), NeuralNetwork()
    tutorial.load_state_dict(ours.state_dict(), strict=True)
    x = _images()
    torch.testing.assert_close(tutorial(x), ours(x))

    tutorial = NeuralNetwork()
    ours.load_state_dict(tutorial.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), tutorial(x))


def test_mlp_checkpoint_round_trips_through_files():
    ours = MLP()
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    tutorial = NeuralNetwork()
    tutorial.load_state_dict(torch.load(buffer, weights_only=True))
    x = _images()
    torch.testing.assert_close(tutorial(x), ours(x))


def test_whole_model_save_and_load_like_the_tutorial():
    model = MLP()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = _images()
    torch.testing.assert_close(loaded(x), model(x))


def test_mlp_shapes_and_validation():
    model = MLP((6, 4, 3))
    assert model(torch.randn(2, 6)).shape == (2, 3)
    assert model(torch.randn(2, 2, 3)).shape == (2, 3)  # flattened
    assert [type(m) for m in model.linear_relu_stack] == [nn.Linear, nn.ReLU, nn.Linear]
    assert model.linears() == [model.linear_relu_stack[0], model.linear_relu_stack[2]]
    with pytest.raises(ValueError, match="at least 2 positive"):
        MLP((10,))
    with pytest.raises(ValueError, match="at least 2 positive"):
        MLP((10, 0, 3))


@pytest.mark.parametrize("sizes", [(784, 7.9, 10), (784, 512.0, 10), (784, True, 10), ("8", 3)])
def test_mlp_sizes_must_be_integers(sizes):
    # 7.9 used to become 7 without a word.
    with pytest.raises(TypeError, match="fastmlp.MLP: sizes must be integers"):
        MLP(sizes)


def test_mlp_forward_and_backward_are_one_op_each():
    model = MLP((6, 5, 5, 3))
    y = model(torch.randn(2, 6))
    assert y.grad_fn.name().endswith("MlpFunction>")
    assert {f.name() for f, _ in y.grad_fn.next_functions if f is not None} == {
        "torch::autograd::AccumulateGrad"
    }
    tutorial = unfuse(copy.deepcopy(model))
    x = torch.randn(7, 6)
    model(x).square().sum().backward()
    tutorial(x).square().sum().backward()
    for p, q in zip(model.parameters(), tutorial.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_fuse_makes_the_tutorial_stack_one_op_and_keeps_outputs():
    torch.manual_seed(1)
    model = NeuralNetwork()
    x = _images()
    expected = model(x)
    keys = list(model.state_dict())
    stack = model.linear_relu_stack
    children = list(stack)
    fused = fuse(model)
    assert fused is model and model.linear_relu_stack is stack
    assert type(stack) is FusedSequential and isinstance(stack, nn.Sequential)
    assert list(stack) == children  # the same modules, so the same parameters and keys
    assert list(model.state_dict()) == keys
    assert [len(run.linears) for run in stack.runs()] == [3]
    y = model(x)
    torch.testing.assert_close(y, expected)
    assert y.grad_fn.name().endswith("MlpFunction>")


def test_fuse_reports_what_it_fused_and_what_it_left(caplog):
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Linear(4, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )
    with caplog.at_level(logging.INFO, logger="fastmlp.nn"):
        fuse(model)
    lines = describe_fusion(model)
    assert lines == [
        "fused 3..5 (2 Linear layers) into one fastmlp.mlp op",
        "left 0 (followed by BatchNorm1d, not an activation fuse() knows)",
    ]
    assert all(line in caplog.text for line in lines)


def test_describe_fusion_of_a_model_never_fused_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2))
    assert describe_fusion(model) == [
        "left 0 (fusable, but fuse() has not been applied to it)",
        "left 2 (fusable, but fuse() has not been applied to it)",
        "left 4 (last in its Sequential, no activation after it)",
    ]


def test_fuse_leaves_other_patterns_alone():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    )
    x = torch.randn(2, 4)
    expected = model(x)
    fuse(model)
    assert type(model) is nn.Sequential  # Linear, Softplus, Linear: nothing to fuse
    assert type(model[3]) is FusedSequential  # nested Sequentials are fused too
    assert model[3].runs()[0].relu_last
    torch.testing.assert_close(model(x), expected)


class _LeakyReLU(nn.ReLU):
    """A ReLU subclass with its own forward: fuse must not treat it as ReLU."""

    def forward(self, input):
        return torch.nn.functional.leaky_relu(input, 0.1)


def test_fuse_replaces_only_exact_relu():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), _LeakyReLU(), nn.Linear(6, 3))
    x = torch.randn(8, 5)
    expected = model(x)
    fuse(model)
    assert type(model) is nn.Sequential
    torch.testing.assert_close(model(x), expected)


def test_fuse_unfuse_top_level_sequential_restores_it_exactly():
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    children, keys, text = list(plain), list(plain.state_dict()), repr(plain)
    x = torch.randn(4, 5)
    expected = plain(x)
    fuse(plain)
    assert type(plain) is FusedSequential
    torch.testing.assert_close(plain(x), expected)
    unfuse(plain)
    assert type(plain) is nn.Sequential and list(plain) == children
    assert list(plain.state_dict()) == keys == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert repr(plain) == text and vars(plain).keys() == vars(nn.Sequential()).keys()


def test_fuse_torchvision_mlp_keeps_its_class_and_pickles():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(6)
    model = torchvision.ops.MLP(6, [8, 8, 3])  # Linear, ReLU, Dropout(0.0), ... Linear, Dropout
    x = torch.randn(4, 6)
    expected, keys = model(x), list(model.state_dict())
    fuse(model)
    assert isinstance(model, torchvision.ops.MLP) and isinstance(model, FusedSequential)
    assert [len(run.linears) for run in model.runs()] == [3]
    torch.testing.assert_close(model(x), expected)
    assert list(model.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected)
    unfuse(model)
    assert type(model) is torchvision.ops.MLP


def test_fused_sequential_follows_replaced_children():
    model = fuse(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    model(x)
    model[1] = nn.Tanh()  # no longer a run: the plan must follow
    torch.testing.assert_close(model(x), model[2](torch.tanh(model[0](x))))


def test_unfuse_gives_plain_pytorch_with_tutorial_layout():
    torch.manual_seed(2)
    model = MLP()
    x = _images()
    expected = model(x)
    plain = unfuse(model)
    assert not any(isinstance(m, FusedLinearReLU) for m in plain.modules())
    stack = plain.linear_relu_stack
    assert type(stack) is nn.Sequential
    assert [type(m) for m in stack] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(plain(x), expected)
    tutorial = NeuralNetwork()
    tutorial.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(tutorial(x), expected)


def test_fuse_then_unfuse_round_trip():
    model = NeuralNetwork()
    x = _images()
    expected = model(x)
    unfuse(fuse(model))
    assert [type(m) for m in model.linear_relu_stack] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    torch.testing.assert_close(model(x), expected)


def test_unfuse_sequential_of_fused_linear_relu_layers_in_place():
    layers = [FusedLinearReLU(5, 4), FusedLinearReLU(4, 4), nn.Linear(4, 2)]
    model = nn.Sequential(*layers)
    x = torch.randn(3, 5)
    expected = model(x)
    unfuse(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [name for name, _ in model.named_children()] == ["0", "0_relu", "1", "1_relu", "2"]
    torch.testing.assert_close(model(x), expected)


def test_unfuse_single_layer():
    layer = FusedLinearReLU(3, 2)
    x = torch.randn(4, 3)
    plain = unfuse(layer)
    torch.testing.assert_close(plain(x), layer(x))


def test_package_exports():
    assert fastmlp.MLP is MLP and fastmlp.FusedLinearReLU is FusedLinearReLU
    assert callable(fastmlp.linear_relu)


def test_fused_run_reads_parametrized_and_replaced_weights():
    # The fused run reads each Linear's weight from its _parameters when it is there
    # (fast), else through the attribute: a parametrized weight (computed on access) and
    # a weight replaced by a new Parameter must both be what the op uses.
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.LeakyReLU(0.2)
    )
    fused = fastmlp.fuse(copy.deepcopy(plain))
    x = torch.randn(4, 5)
    torch.testing.assert_close(fused(x), plain(x))
    for model in (plain, fused):
        parametrize.register_parametrization(model[0], "weight", Doubled())
    torch.testing.assert_close(fused(x), plain(x))
    new = torch.nn.Parameter(torch.randn(3, 7))
    plain[2].weight, fused[2].weight = new, torch.nn.Parameter(new.detach().clone())
    torch.testing.assert_close(fused(x), plain(x))
    # A changed LeakyReLU slope is seen (the plan is made again).
    plain[3].negative_slope = fused[3].negative_slope = 0.7
    torch.testing.assert_close(fused(x), plain(x))

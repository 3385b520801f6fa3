"""fastmlp.nn: FusedLinearReLU, MLP, fuse/unfuse, and interoperability with the
tutorial's plain-PyTorch NeuralNetwork."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.nn import MLP, FusedLinearReLU, fuse, unfuse
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
    assert [type(m) for m in model.linear_relu_stack] == [FusedLinearReLU, nn.Linear]
    with pytest.raises(ValueError, match="at least 2 positive"):
        MLP((10,))
    with pytest.raises(ValueError, match="at least 2 positive"):
        MLP((10, 0, 3))


def test_fuse_replaces_linear_relu_pairs_and_keeps_outputs():
    torch.manual_seed(1)
    model = NeuralNetwork()
    x = _images()
    expected = model(x)
    keys = set(model.state_dict())
    weight = model.linear_relu_stack[0].weight
    fused = fuse(model)
    assert fused is model
    stack = model.linear_relu_stack
    assert [type(m) for m in stack] == [
        FusedLinearReLU,
        nn.Identity,
        FusedLinearReLU,
        nn.Identity,
        nn.Linear,
    ]
    assert stack[0].weight is weight  # parameters are shared, not copied
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)


def test_fuse_leaves_other_patterns_alone():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    )
    x = torch.randn(2, 4)
    expected = model(x)
    fuse(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert type(model[3][0]) is FusedLinearReLU  # nested Sequentials are fused too
    torch.testing.assert_close(model(x), expected)


def test_unfuse_gives_plain_pytorch_with_tutorial_layout():
    torch.manual_seed(2)
    model = MLP()
    x = _images()
    expected = model(x)
    plain = unfuse(model)
    assert not any(isinstance(m, FusedLinearReLU) for m in plain.modules())
    stack = plain.linear_relu_stack
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


def test_unfuse_single_layer():
    layer = FusedLinearReLU(3, 2)
    x = torch.randn(4, 3)
    plain = unfuse(layer)
    torch.testing.assert_close(plain(x), layer(x))


def test_package_exports():
    assert fastmlp.MLP is MLP and fastmlp.FusedLinearReLU is FusedLinearReLU
    assert callable(fastmlp.linear_relu)

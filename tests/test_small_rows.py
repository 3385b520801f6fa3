"""The small-rows kernel (csrc/cpu/kernels/small_rows.h): a float layer over 1 to 8 rows,
each weight row read once. It runs inside the row-blocked path; checked here against a
float64 reference on fresh random inputs over the shapes that exercise its parts: rows 1-9
(pairs and a single row, and 9 going to the GEMM library), in_features from 256 (below, the
GEMM library) with and without a scalar tail, n around the 4-row weight tile (the leftover
rows), bias or not, both
threads' column split (weights over 256 KiB) and one thread, forward for inference and
for training."""

from __future__ import annotations

import pytest
import torch

from fastmlp import engines
from fastmlp.testing import mlp_layers, mlp_ref

SHAPES = [
    (257, 5, 3),  # k one past a vector (in_features >= 256 take the kernel), n below a tile
    (263, 13, 1),  # k 7 past a vector, n one past three tiles of 4
    (264, 4, 300, 2),  # no tail; a second layer of the kernel, then one below its k
    (33, 17, 17, 2),  # all below the kernel's k: the GEMM library's path, same checks
    (784, 512, 512, 10),  # the tutorial MLP: 2.7 MB of weights, the column split
]


@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_small_rows_match_float64(sizes, rows, bias):
    gen = torch.Generator().manual_seed(rows * 100 + len(sizes))
    weights, biases = mlp_layers(sizes, torch.float32, bias, gen)
    x = torch.randn(rows, sizes[0], generator=gen)
    ref_biases = None if biases is None else [b.double() for b in biases]
    ref = mlp_ref(x.double(), [w.double() for w in weights], ref_biases)
    with engines.force_cpu_path("row_blocked"):
        with torch.inference_mode():
            y_inf = torch.ops.fastmlp.mlp_inference(x, weights, biases or [], "relu", "none", 0.01)
        y_train, _ = torch.ops.fastmlp.mlp(x, weights, biases or [], "relu", "none", 0.01)
    scale = ref.abs().max().clamp_min(1.0)
    for y in (y_inf, y_train):
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert ((y.double() - ref).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
def test_small_rows_are_the_same_for_every_thread_count(threads):
    gen = torch.Generator().manual_seed(5)
    weights, biases = mlp_layers((784, 512, 512, 10), torch.float32, True, gen)
    x = torch.randn(5, 784, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with engines.force_cpu_path("row_blocked"), torch.inference_mode():
            one = torch.ops.fastmlp.mlp_inference(x, weights, biases, "relu", "none", 0.01)
        torch.set_num_threads(threads)
        with engines.force_cpu_path("row_blocked"), torch.inference_mode():
            many = torch.ops.fastmlp.mlp_inference(x, weights, biases, "relu", "none", 0.01)
    finally:
        torch.set_num_threads(before)
    # Each output is one thread's dot product in both cases: bit for bit.
    assert torch.equal(one, many)


def test_nan_and_inf_propagate_as_in_pytorch():
    w = torch.randn(6, 265)
    b = torch.randn(6)
    x = torch.randn(3, 265)
    x[0, 4] = float("nan")
    x[1, 264] = float("inf")  # in the scalar tail
    with engines.force_cpu_path("row_blocked"), torch.inference_mode():
        y = torch.ops.fastmlp.mlp_inference(x, [w], [b], "relu", "none", 0.01)
    expected = torch.nn.functional.linear(x, w, b)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())

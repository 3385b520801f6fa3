"""CPU benchmarks of one fused Linear+ReLU layer, forward and backward
(pytest-benchmark).

For each shape and dtype, three things are timed in the same process:
  * fused: ``fastmlp.ops.linear_relu(x, w, b)`` then ``y.backward(gy)``
    (x, weight and bias all need gradients, as in a hidden layer);
  * eager: ``torch.relu(F.linear(x, w, b))`` under autograd, the same way;
  * gemms: the three bare matrix products any implementation must do
    (``x @ W.T``, ``gy @ W``, ``gy.T @ x``) with plain ``torch.mm``: the floor
    that fusion can approach but not beat.
Eager float32 is also timed for the bfloat16 shapes, since that is what a
user runs without fastmlp. Inputs are random (never zeros); each round runs
``INNER`` steps; the report uses the fastest round (the least disturbed by
other load on the machine). Ratios are computed from one run by
``python benchmarks/report.py BENCH.json`` (see docs/benchmarks.md).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-json=bench.json

Knobs: FASTMLP_BENCH_ROUNDS (default 20), FASTMLP_BENCH_INNER (steps per round, default
20); FASTMLP_BENCH_SHORT=1 makes both default to 1 and skips the warm-up, which checks
that every case runs (CI) and times nothing worth reading.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastmlp.ops import linear_relu

SHAPES = [(784, 512), (512, 512)]
BATCHES = [64, 256, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
INNER = int(os.environ.get("FASTMLP_BENCH_INNER", "1" if SHORT else "20"))
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "20"))


def _problem(batch, fan_in, fan_out, dtype):
    gen = torch.Generator().manual_seed(batch * 7 + fan_in + fan_out)
    x = torch.randn(batch, fan_in, generator=gen).to(dtype).requires_grad_()
    w = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1).mul_(fan_in**-0.5)
    b = (torch.rand(fan_out, generator=gen) * 2 - 1).mul_(fan_in**-0.5)
    w, b = w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    gy = torch.randn(batch, fan_out, generator=gen).to(dtype)
    return x, w, b, gy


def _step_fn(kind, x, w, b, gy):
    # Gradients are reset before every step, as optimizer.zero_grad() does in
    # training, so that no step pays for accumulating into the last one's.
    def clear():
        x.grad = w.grad = b.grad = None

    if kind == "fused":

        def step():
            clear()
            linear_relu(x, w, b).backward(gy)

    elif kind == "eager":

        def step():
            clear()
            torch.relu(F.linear(x, w, b)).backward(gy)

    else:  # the bare GEMMs
        xd, wd = x.detach(), w.detach()

        def step():
            torch.mm(xd, wd.t())
            torch.mm(gy, wd)
            torch.mm(gy.t(), xd)

    def run():
        for _ in range(INNER):
            step()

    return run


CASES = [
    (kind, prec, fan_in, fan_out, batch)
    for prec in DTYPES
    for fan_in, fan_out in SHAPES
    for batch in BATCHES
    for kind in ("fused", "eager", "gemms")
] + [
    ("eager", "fp32-baseline", fan_in, fan_out, batch)
    for fan_in, fan_out in SHAPES
    for batch in BATCHES
]


@pytest.mark.parametrize(
    "kind,prec,fan_in,fan_out,batch",
    CASES,
    ids=[f"{k}-{p}-{i}x{o}-b{b}" for k, p, i, o, b in CASES],
)
def test_linear_relu_layer(benchmark, kind, prec, fan_in, fan_out, batch):
    dtype = DTYPES.get(prec, torch.float32)
    run = _step_fn(kind, *_problem(batch, fan_in, fan_out, dtype))
    benchmark.group = f"{fan_in}->{fan_out} batch {batch} {prec.split('-')[0]}"
    benchmark.extra_info.update(
        kind=kind,
        precision=prec,
        fan_in=fan_in,
        fan_out=fan_out,
        batch=batch,
        inner_steps=INNER,
        # Forward + backward = 3 GEMMs of 2*b*i*o FLOPs each.
        flops_per_step=6 * batch * fan_in * fan_out,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0 if SHORT else 2)

"""FusedAdamW's one-kernel training step against a user's eager loop with AdamW
(pytest-benchmark), CPU, float32, the tutorial's 784-512-512-10 MLP.

Variants, each one training step on a fixed random batch (no data loading):

* ``eager-adamw-fused``: the tutorial's ``NeuralNetwork`` with
  ``torch.optim.AdamW(fused=True)``, the loop body
  ``loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()``;
* ``eager-adamw``: the same with torch's default AdamW (for-loop/foreach form);
* ``fused-adamw``: ``fastmlp.MLP`` with ``fastmlp.FusedAdamW``, ``opt.train_step(x, y)``:
  forward, loss, backward and the AdamW update as one ``fastmlp::mlp_adamw_step`` call;
* ``fused-sgd``: ``fastmlp.FusedSGD.train_step`` for scale (the same GEMMs, SGD's update).

All with lr 1e-3 and AdamW's defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-2).
The issue's target: ``fused-adamw`` at least 1.5x faster than ``eager-adamw-fused`` at
batch 64.

    python -m pytest benchmarks/test_bench_fused_adamw.py --benchmark-json=adamw.json

As a script it interleaves the variants round by round in one process (the machine may be
shared and its speed drifts; interleaving spreads that over all variants alike) and prints
medians and fastest rounds with the ratio to ``eager-adamw-fused``:

    python benchmarks/test_bench_fused_adamw.py [--rounds 15] [--steps 20] [--batches 64 256]

FASTMLP_BENCH_SHORT=1 runs every variant for one step without warm-up (CI's check that
everything runs; times nothing worth reading).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp.testing import NeuralNetwork  # the tutorial's model, verbatim

SIZES = (784, 512, 512, 10)
VARIANTS = ["eager-adamw-fused", "eager-adamw", "fused-adamw", "fused-sgd"]
BASELINE = "eager-adamw-fused"
BATCHES = [64, 256]
LR = 1e-3
SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "10"))
ITERATIONS = 1 if SHORT else 10  # steps per round under pytest
WARMUP_STEPS = 0 if SHORT else 5


def make_step(variant: str, batch: int) -> Callable[[], None]:
    """One training step of the variant, on a fixed random batch."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    if variant.startswith("eager"):
        model = NeuralNetwork()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=variant == "eager-adamw-fused")

        def eager_step() -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return eager_step
    mlp = fastmlp.MLP(SIZES)
    if variant == "fused-adamw":
        fused: fastmlp.FusedAdamW | fastmlp.FusedSGD = fastmlp.FusedAdamW(mlp, lr=LR)
    elif variant == "fused-sgd":
        fused = fastmlp.FusedSGD(mlp, lr=LR)
    else:
        raise ValueError(variant)
    assert fused.fused_step_applies(x)
    return lambda: fused.train_step(x, y)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_adamw_step(benchmark, variant, batch):
    step = make_step(variant, batch)
    for _ in range(WARMUP_STEPS):
        step()
    benchmark.extra_info.update(
        suite="fused_adamw",
        variant=variant,
        batch=batch,
        dtype="fp32",
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=0 if SHORT else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1 if SHORT else 15)
    parser.add_argument(
        "--steps", type=int, default=1 if SHORT else 20, help="steps per round and variant"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    args = parser.parse_args()
    from fastmlp import hardware

    print(f"machine: {hardware.describe_cpu(hardware.describe('cpu'))}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| batch | "
        + " | ".join(f"{v} ms" for v in VARIANTS)
        + " | "
        + " | ".join(f"{BASELINE} / {v}" for v in VARIANTS if v != BASELINE)
        + " |"
    )
    print("|---:|" + "---:|" * (2 * len(VARIANTS) - 1))
    for batch in args.batches:
        steps = {v: make_step(v, batch) for v in VARIANTS}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v, step in steps.items():  # interleaved: one round of each in turn
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[v].append((time.perf_counter() - start) / args.steps * 1e3)
        med = {v: statistics.median(t) for v, t in times.items()}
        best = {v: min(t) for v, t in times.items()}
        print(
            f"| {batch} "
            + "".join(f"| {med[v]:.2f} ({best[v]:.2f}) " for v in VARIANTS)
            + "".join(
                f"| {med[BASELINE] / med[v]:.2f}x ({best[BASELINE] / best[v]:.2f}x) "
                for v in VARIANTS
                if v != BASELINE
            )
            + "|",
            flush=True,
        )


if __name__ == "__main__":
    main()

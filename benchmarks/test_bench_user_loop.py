"""A user's own training step, fastmlp's whole-MLP op against eager PyTorch
(pytest-benchmark), CPU, float32.

The step is the tutorial's loop body with any optimizer::

    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

Models (784-512-512-10, ReLU):

* ``eager``: the tutorial's ``NeuralNetwork`` (nn.Sequential of Linear/ReLU);
* ``mlp``: ``fastmlp.MLP`` (forward and backward one op each);
* ``fused``: the tutorial's ``NeuralNetwork`` after ``fastmlp.fuse(model)``;
* ``floor``: no model: the step's eight bare GEMMs (``torch.mm`` into preallocated
  outputs: three forward, three weight gradients, two input gradients) and then the same
  optimizer's ``step()`` on gradients already in ``.grad``: what no implementation of
  this step can go below on this machine.

Optimizers: ``sgd`` (``torch.optim.SGD``, lr 1e-3), ``adamw-fused``
(``torch.optim.AdamW(fused=True)``), ``adamw`` (its default foreach form). Batches 64, 256,
1024 of random data (no data loading). Timing starts after warm-up steps.

    python -m pytest benchmarks/test_bench_user_loop.py --benchmark-json=loop.json

docs/benchmarks.md's table comes from running this file as a script, which interleaves the
variants round by round in one process (this machine is shared, and its speed drifts
over tens of seconds; interleaving spreads that drift over all variants alike) and prints
medians and fastest rounds with their ratios:

    python benchmarks/test_bench_user_loop.py [--rounds 15] [--steps 20]

FASTMLP_BENCH_SHORT=1 (CI's short mode, for both ways of running) makes every variant run
one step without warm-up: 1 round of 1 iteration under pytest (FASTMLP_BENCH_ROUNDS still
sets the rounds), ``--rounds 1 --steps 1`` as a script. It checks that everything runs and
times nothing worth reading.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp.testing import NeuralNetwork  # the tutorial's model, verbatim

SIZES = (784, 512, 512, 10)
MODELS = ["eager", "mlp", "fused", "floor"]
OPTIMIZERS = ["sgd", "adamw-fused", "adamw"]
BATCHES = [64, 256, 1024]
SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "10"))
ITERATIONS = 1 if SHORT else 10  # steps per round under pytest
WARMUP_STEPS = 0 if SHORT else 5


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    raise ValueError(kind)


def make_step(model_kind: str, opt_kind: str, batch: int) -> Callable[[], None]:
    """One training step of the given variant, on a fixed random batch."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    if model_kind == "floor":
        return _floor_step(opt_kind, x.view(batch, -1), y)
    if model_kind == "eager":
        model = NeuralNetwork()
    elif model_kind == "mlp":
        model = fastmlp.MLP(SIZES)
    elif model_kind == "fused":
        model = fastmlp.fuse(NeuralNetwork())
    else:
        raise ValueError(model_kind)
    opt = make_optimizer(opt_kind, model.parameters())

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _floor_step(opt_kind: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = NeuralNetwork()
    linears = [m for m in model.linear_relu_stack if isinstance(m, torch.nn.Linear)]
    ws = [lin.weight.detach() for lin in linears]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(opt_kind, model.parameters())
    batch = x.shape[0]
    acts = [x] + [torch.empty(batch, w.shape[0]) for w in ws]
    grads_in = [None] + [torch.randn(batch, w.shape[1]) for w in ws[1:]]
    g_out = torch.randn(batch, ws[-1].shape[0])

    def step():
        with torch.no_grad():
            for i, w in enumerate(ws):  # forward
                torch.mm(acts[i], w.t(), out=acts[i + 1])
            g = g_out
            for i in reversed(range(len(ws))):  # weight gradients, input gradients
                torch.mm(g.t(), acts[i], out=linears[i].weight.grad)
                if i > 0:
                    torch.mm(g, ws[i], out=grads_in[i])
                    g = grads_in[i]
        opt.step()

    return step


def step_flops(batch: int, sizes=SIZES) -> int:
    pairs = list(zip(sizes[:-1], sizes[1:], strict=False))
    return 2 * batch * (2 * sum(i * o for i, o in pairs) + sum(i * o for i, o in pairs[1:]))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@pytest.mark.parametrize("model_kind", MODELS)
def test_user_loop(benchmark, model_kind, opt_kind, batch):
    step = make_step(model_kind, opt_kind, batch)
    for _ in range(WARMUP_STEPS):
        step()
    benchmark.extra_info.update(
        suite="user_loop",
        variant=model_kind,
        optimizer=opt_kind,
        batch=batch,
        dtype="fp32",
        flops=step_flops(batch),
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=0 if SHORT else 1)


def _cpu_description() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(isa) or 'none of interest'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1 if SHORT else 15)
    parser.add_argument(
        "--steps", type=int, default=1 if SHORT else 20, help="steps per round and variant"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    args = parser.parse_args()
    print(
        f"cpu: {_cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "| batch | optimizer | eager ms | MLP ms | fused tutorial ms | GEMMs+opt ms "
        "| eager / MLP | eager / fused | MLP / floor |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for opt_kind in args.optimizers:
            steps = {m: make_step(m, opt_kind, batch) for m in MODELS}
            for step in steps.values():
                for _ in range(WARMUP_STEPS):
                    step()
            times: dict[str, list[float]] = {m: [] for m in MODELS}
            for _ in range(args.rounds):
                for m, step in steps.items():  # interleaved: one round of each in turn
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[m].append((time.perf_counter() - start) / args.steps * 1e3)
            med = {m: statistics.median(t) for m, t in times.items()}
            best = {m: min(t) for m, t in times.items()}
            print(
                f"| {batch} | {opt_kind} "
                + "".join(f"| {med[m]:.2f} ({best[m]:.2f}) " for m in MODELS)
                + f"| {med['eager'] / med['mlp']:.2f}x ({best['eager'] / best['mlp']:.2f}x) "
                + f"| {med['eager'] / med['fused']:.2f}x ({best['eager'] / best['fused']:.2f}x) "
                + f"| {med['mlp'] / med['floor']:.2f}x ({best['mlp'] / best['floor']:.2f}x) |",
                flush=True,
            )


if __name__ == "__main__":
    main()

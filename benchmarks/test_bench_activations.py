"""CPU benchmarks of MLPs with each activation (issue 23): fastmlp against eager PyTorch
and torch.compile, training step and inference (pytest-benchmark).

Two workloads:
  * ``block``: a transformer-style MLP block, Linear 512->2048, GELU, Linear 2048->512,
    batch 4096 (also with gelu_tanh and silu, the other activations those blocks use);
  * ``tutorial``: the tutorial's 784-512-512-10 MLP, batch 256, with each activation.

For each workload and activation, three implementations run the same maths in the same
process: ``fastmlp`` (:class:`fastmlp.MLP`, one op forward and one backward), ``eager``
(the same layers as a plain ``nn.Sequential``, :func:`fastmlp.unfuse` of it) and
``compile`` (that plain stack under ``torch.compile``; compile time is paid in the warm-up
and not timed). ``train`` times forward + backward of the mean output with the gradients
cleared before each step (as ``zero_grad`` does); ``infer`` times forward under
``torch.inference_mode()``. float32, inputs random (never zeros); each round runs
``INNER`` steps; compare rounds' minima across implementations of one group.

    python -m pytest benchmarks/test_bench_activations.py --benchmark-json=act.json
    python benchmarks/test_bench_activations.py   # the same cases interleaved: one table

Run as a script, the three implementations of each case alternate round by round in one
process (FASTMLP_BENCH_ROUNDS rounds of FASTMLP_BENCH_INNER steps after one warm-up
round), and the table gives the median ms per step and the ratios of medians.

Knobs as in the other suites: FASTMLP_BENCH_ROUNDS (default 10), FASTMLP_BENCH_INNER
(default 5); FASTMLP_BENCH_SHORT=1 makes both 1, shrinks the batches to 64 and skips the
warm-up and torch.compile's cases: it checks that every case runs and times nothing
worth reading.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fastmlp

SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
INNER = int(os.environ.get("FASTMLP_BENCH_INNER", "1" if SHORT else "5"))
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "10"))

WORKLOADS = {
    # name: (sizes, batch, activations)
    "block": ((512, 2048, 512), 4096, ("gelu", "gelu_tanh", "silu", "relu")),
    "tutorial": ((784, 512, 512, 10), 256, tuple(fastmlp.ops.ACTIVATIONS)),
}
IMPLS = ("fastmlp", "eager") if SHORT else ("fastmlp", "eager", "compile")


def _model(impl: str, sizes: tuple[int, ...], activation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fastmlp.MLP(sizes, activation=activation)
    if impl == "fastmlp":
        return model
    plain = fastmlp.unfuse(copy.deepcopy(model))
    return torch.compile(plain) if impl == "compile" else plain


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str):
    params = list(model.parameters())

    def train():
        for p in params:
            p.grad = None
        model(x).mean().backward()

    def infer():
        with torch.inference_mode():
            model(x)

    step = train if mode == "train" else infer

    def run():
        for _ in range(INNER):
            step()

    return run


CASES = [
    (workload, activation, impl, mode)
    for workload, (_, _, activations) in WORKLOADS.items()
    for activation in activations
    for mode in ("train", "infer")
    for impl in IMPLS
]


@pytest.mark.parametrize("workload,activation,impl,mode", CASES, ids=["-".join(c) for c in CASES])
def test_mlp_with_activation(benchmark, workload, activation, impl, mode):
    sizes, batch, _ = WORKLOADS[workload]
    batch = 64 if SHORT else batch
    model = _model(impl, sizes, activation)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    run = _step(model, x, mode)
    benchmark.group = f"{workload} {activation} {mode} batch {batch}"
    flops = 2 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    benchmark.extra_info.update(
        workload=workload,
        activation=activation,
        impl=impl,
        mode=mode,
        batch=batch,
        inner_steps=INNER,
        # Forward: one GEMM per layer; training adds two more (the first layer's grad_x
        # is not needed, which this count ignores).
        flops_per_step=flops * (3 if mode == "train" else 1),
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0 if SHORT else 2)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def interleaved_table(rounds: int = ROUNDS) -> str:
    """Every workload and activation, the implementations alternating round by round."""
    import time

    from fastmlp import hardware

    rows = [
        f"Machine: {hardware.describe_cpu(hardware.describe())}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median ms per step of {rounds} rounds x {INNER} steps",
        "",
        "| workload | activation | mode | "
        + " | ".join(f"{i} ms" for i in IMPLS)
        + " | "
        + " | ".join(f"{i} / fastmlp" for i in IMPLS[1:])
        + " |",
        "|---|---|---|" + "---:|" * (2 * len(IMPLS) - 1),
    ]
    for workload, (sizes, batch, activations) in WORKLOADS.items():
        batch = 64 if SHORT else batch
        x = torch.randn(batch, sizes[0], generator=torch.Generator().manual_seed(1))
        for activation in activations:
            for mode in ("train", "infer"):
                torch._dynamo.reset()  # each case compiles afresh (no recompile limit)
                runs = {i: _step(_model(i, sizes, activation), x, mode) for i in IMPLS}
                for run in runs.values():  # warm-up (and torch.compile's compilation)
                    run()
                times: dict[str, list[float]] = {i: [] for i in IMPLS}
                for _ in range(rounds):
                    for impl, run in runs.items():
                        t0 = time.perf_counter()
                        run()
                        times[impl].append((time.perf_counter() - t0) / INNER * 1e3)
                med = {i: _median(t) for i, t in times.items()}
                rows.append(
                    f"| {workload} b{batch} | {activation} | {mode} | "
                    + " | ".join(f"{med[i]:.2f}" for i in IMPLS)
                    + " | "
                    + " | ".join(f"{med[i] / med['fastmlp']:.2f}x" for i in IMPLS[1:])
                    + " |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(interleaved_table())

"""GPU benchmarks of the fused Linear+ReLU ops (pytest-benchmark; skipped without a GPU).

What is timed:
  * fwd_bwd: one layer's forward and backward (x, weight and bias all need
    gradients, as in a hidden layer), ``y = f(x); y.backward(gy)``, for
      - fused-<engine>: ``fastmlp.ops.linear_relu`` with that engine forced
        (fastmlp.engines.cuda_engine); fused-auto is the default rule, i.e. the
        ``aten`` engine wherever no engine is validated yet,
      - eager: ``torch.relu(F.linear(x, w, b))`` under autograd,
      - compile: the eager code under
        ``torch.compile(mode="max-autotune-no-cudagraphs")`` (compile time excluded).
    Mode "wall" runs ``inner`` steps back to back and synchronizes inside the
    timed function (host overhead included, as in an eager training loop);
    mode "graph" replays a CUDA graph of ``inner`` steps (device time only).
  * fwd_large: the forward alone at 16384 x 4096 -> 4096 against a plain
    ``torch.mm`` of the same shape and dtype (FLOP rate ratio).

Each measurement's numbers are in its ``extra_info`` in the --benchmark-json
file, which benchmarks/report.py renders; ratios come from one run.
Inputs are random (never zeros). Set FASTMLP_BENCH_COMPILE=none|subset|all
to choose which shapes get the (slow to compile) max-autotune baseline, and
FASTMLP_BENCH_ROUNDS (default 10) the rounds. FASTMLP_BENCH_SHORT=1 (CI's short mode)
makes the defaults 1 round of 2 steps and no max-autotune baseline: it checks that every
case runs and times nothing worth reading.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from fastmlp.testing import allow_tf32, capture_cuda_graph, layer_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import fastmlp.ops
    from fastmlp import engines

SHAPES = [(784, 512), (512, 512)]
BATCHES = [64, 256, 4096]
PRECS = {"bf16": (torch.bfloat16, False), "tf32": (torch.float32, True)}
ENGINES = ["custom", "cublaslt", "auto"]
SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "10"))
COMPILE_SET = os.environ.get("FASTMLP_BENCH_COMPILE", "none" if SHORT else "subset")
COMPILE_SUBSET = {
    ((784, 512), 64, "bf16"),
    ((784, 512), 4096, "bf16"),
    ((784, 512), 4096, "tf32"),
    ((512, 512), 256, "bf16"),
}


def _inner(batch: int) -> int:
    if SHORT:
        return 2
    return 50 if batch <= 256 else 20


def _engine(impl: str):
    """Forces the engine of a "fused-<engine>" implementation for the duration."""
    if impl.startswith("fused-"):
        return engines.cuda_engine(impl.split("-", 1)[1])
    return contextlib.nullcontext()


def _problem(batch, fin, fout, dtype):
    x, w, b, gy = layer_inputs(batch, fin, fout, dtype, "cuda")
    return x.requires_grad_(), w.requires_grad_(), b.mul_(0.2).requires_grad_(), gy


def _eager(x, w, b):
    return torch.relu(F.linear(x, w, b))


def _fused(x, w, b):
    return fastmlp.ops.linear_relu(x, w, b)


def _make_step(fn, x, w, b, gy):
    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(gy)

    return step


def _time(benchmark, run_once, inner):
    """Median seconds per step; run_once runs `inner` steps and synchronizes."""
    run_once()  # warm-up (allocator, cuBLASLt heuristics, autotuning)
    torch.cuda.synchronize()
    benchmark.pedantic(run_once, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        return benchmark.stats.stats.median / inner
    # --benchmark-disable: time it here (events around the same runs).
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2] / inner


def _wall_runner(step, inner):
    def run():
        for _ in range(inner):
            step()
        torch.cuda.synchronize()

    return run


def _graph_runner(step, inner):
    def steps():
        for _ in range(inner):
            step()

    graph, _ = capture_cuda_graph(steps, warmup=1)

    def run():
        graph.replay()
        torch.cuda.synchronize()

    return run


def _flops_fwd_bwd(batch, fin, fout):
    return 3 * 2 * batch * fin * fout


def _ids(val):
    if isinstance(val, tuple):
        return f"{val[0]}x{val[1]}"
    return str(val)


@pytest.mark.parametrize("mode", ["wall", "graph"])
@pytest.mark.parametrize("impl", [f"fused-{e}" for e in ENGINES] + ["eager"])
@pytest.mark.parametrize("prec", list(PRECS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_fwd_bwd(benchmark, shape, batch, prec, impl, mode):
    fin, fout = shape
    dtype, tf32 = PRECS[prec]
    fn = _fused if impl.startswith("fused-") else _eager
    inner = _inner(batch)
    with allow_tf32(tf32), _engine(impl):
        x, w, b, gy = _problem(batch, fin, fout, dtype)
        step = _make_step(fn, x, w, b, gy)
        run = _wall_runner(step, inner) if mode == "wall" else _graph_runner(step, inner)
        t = _time(benchmark, run, inner)
    flops = _flops_fwd_bwd(batch, fin, fout)
    rec = dict(
        kind="fwd_bwd",
        shape=f"{fin}->{fout}",
        batch=batch,
        prec=prec,
        impl=impl,
        mode=mode,
        us=t * 1e6,
        tflops=flops / t / 1e12,
    )
    benchmark.extra_info.update(rec, rounds=ROUNDS)


@pytest.mark.parametrize("impl", ["torch.mm", "fused-custom", "fused-cublaslt", "fused-auto"])
@pytest.mark.parametrize("prec", list(PRECS))
def test_fwd_large(benchmark, prec, impl):
    M, K, N = 16384, 4096, 4096
    dtype, tf32 = PRECS[prec]
    inner = 2 if SHORT else 5
    with allow_tf32(tf32), torch.no_grad(), _engine(impl):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
        b = torch.randn(N, device="cuda", dtype=dtype, generator=g)
        if impl == "torch.mm":
            wt = w.t()

            def once():
                torch.mm(x, wt)
        else:

            def once():
                torch.ops.fastmlp.linear_relu(x, w, b)

        def run():
            for _ in range(inner):
                once()
            torch.cuda.synchronize()

        t = _time(benchmark, run, inner)
    rec = dict(
        kind="fwd_large",
        shape=f"{M}x{K}->{N}",
        prec=prec,
        impl=impl,
        us=t * 1e6,
        tflops=2 * M * N * K / t / 1e12,
    )
    benchmark.extra_info.update(rec, rounds=ROUNDS)


# Last in the file: max-autotune compiles are the slowest part of the suite.
@pytest.mark.parametrize("prec", list(PRECS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_fwd_bwd_compiled(benchmark, shape, batch, prec):
    if COMPILE_SET == "none" or (
        COMPILE_SET == "subset" and (shape, batch, prec) not in COMPILE_SUBSET
    ):
        pytest.skip(f"max-autotune baseline not selected (FASTMLP_BENCH_COMPILE={COMPILE_SET})")
    fin, fout = shape
    dtype, tf32 = PRECS[prec]
    inner = _inner(batch)
    torch._dynamo.reset()
    compiled = torch.compile(_eager, mode="max-autotune-no-cudagraphs")
    with allow_tf32(tf32):
        x, w, b, gy = _problem(batch, fin, fout, dtype)
        step = _make_step(compiled, x, w, b, gy)
        for _ in range(2):  # compile (and autotune) outside the timing
            step()
        torch.cuda.synchronize()
        t = _time(benchmark, _wall_runner(step, inner), inner)
    rec = dict(
        kind="fwd_bwd",
        shape=f"{fin}->{fout}",
        batch=batch,
        prec=prec,
        impl="compile",
        mode="wall",
        us=t * 1e6,
        tflops=_flops_fwd_bwd(batch, fin, fout) / t / 1e12,
    )
    benchmark.extra_info.update(rec, rounds=ROUNDS)

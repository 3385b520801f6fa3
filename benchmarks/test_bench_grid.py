"""Issue 24's shape grid on a representative subset (pytest-benchmark): fastmlp's CPU MLP
against eager PyTorch and torch.compile at tiny-cuda-nn's network shape, 32 -> width x
depth -> 16 with ReLU.

The models, steps and weights are fastmlp.bench.grid's (what ``fastmlp bench --grid`` times):
``train`` is a user's step (``zero_grad(set_to_none=True)``, the squared output's mean,
``backward``, ``torch.optim.SGD(lr=1e-3).step()``), ``no_grad`` and ``inference_mode`` the
forward under that context; bf16 runs under CPU autocast with fp32 weights and is skipped
where the CPU has no native bf16. ``eager`` is a plain ``nn.Sequential`` of Linear and
ReLU, ``compile`` that stack under ``torch.compile`` (compiled in the warm-up, not timed),
``fastmlp`` is :class:`fastmlp.MLP` with the same weights. Inputs random (never zeros).

    python -m pytest benchmarks/test_bench_grid.py --benchmark-json=grid.json
    python benchmarks/test_bench_grid.py   # the same subset interleaved: one table

Run as a script, the variants of each point alternate round by round in one process
(``fastmlp.bench.grid.run``: FASTMLP_BENCH_ROUNDS rounds, each long enough for the fastest
variant to take 20 ms) and the table gives median ms per step and speed-ups. The whole
grid is ``fastmlp bench --grid`` (docs/benchmarks.md).

Knobs as in the other suites: FASTMLP_BENCH_ROUNDS (default 10), FASTMLP_BENCH_INNER
(steps per round under pytest, default 5); FASTMLP_BENCH_SHORT=1 makes both 1, caps the
batches at 64 and skips the warm-up and torch.compile: it checks that every case runs and
times nothing worth reading.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmlp import hardware
from fastmlp.bench import grid

SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
INNER = int(os.environ.get("FASTMLP_BENCH_INNER", "1" if SHORT else "5"))
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "10"))

# (width, depth, batch): narrow networks at large batches (where a fused engine should win
# most), mid widths, and the small-batch inference corner.
SHAPES = [
    (64, 4, 4096),
    (64, 4, 65536),
    (128, 4, 65536),
    (256, 4, 4096),
    (256, 2, 256),
    (1024, 2, 16),
    (32, 2, 1),
]
IMPLS = ("eager", "fastmlp") if SHORT else grid.VARIANTS


def _points() -> list[grid.Point]:
    return [
        grid.Point(width, depth, min(batch, 64) if SHORT else batch, dtype, mode)
        for dtype in grid.DTYPES
        for mode in grid.MODES
        for width, depth, batch in SHAPES
    ]


CASES = [(point, impl) for point in _points() for impl in IMPLS]


def _id(case: tuple[grid.Point, str]) -> str:
    p, impl = case
    return f"{p.dtype}-{p.mode}-{p.width}x{p.depth}x{p.batch}-{impl}"


@pytest.mark.parametrize("point, impl", CASES, ids=[_id(c) for c in CASES])
def test_grid_point(benchmark, point, impl):
    if point.dtype == "bf16" and not hardware.cpu_has_native_bf16():
        pytest.skip(grid.skip_reason(point))
    torch._dynamo.reset()  # each case compiles afresh (no recompile limit)
    model = grid.build_model(impl, point.sizes, grid.initial_state(point.sizes))
    step = grid.make_step(model, grid.example_input(point), point)

    def run():
        for _ in range(INNER):
            step()

    benchmark.group = f"{point.dtype} {point.mode} {point.shape}"
    benchmark.extra_info.update(
        impl=impl,
        width=point.width,
        depth=point.depth,
        batch=point.batch,
        dtype=point.dtype,
        mode=point.mode,
        inner_steps=INNER,
        flops_per_step=round(point.gflop() * 1e9),
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0 if SHORT else 2)


def interleaved_table(rounds: int = ROUNDS) -> str:
    """The subset through fastmlp.bench.grid.run: variants alternating round by round."""
    result = grid.run(
        _points(),
        IMPLS,
        rounds=rounds,
        min_round_s=0.0 if SHORT else grid.MIN_ROUND_S,
        log=lambda line: print(line, flush=True),
    )
    return grid.format_markdown(result)


if __name__ == "__main__":
    print(interleaved_table())

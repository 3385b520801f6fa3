"""The CI speed gate: fastmlp against eager PyTorch on this machine, whatever its CPU.

    python benchmarks/speed_gate.py            # this CPU, then (on AVX-512) emulated AVX2
    python benchmarks/speed_gate.py --native   # this CPU only

A small grid (32 -> width x 4 -> 16 with ReLU, widths 64/512/1024, batch 256/4096, a
training step (forward + backward) and an inference_mode forward; plus the transformer MLP
block 512 -> 2048 (GELU) -> 512 at 4096 rows). Each point times a fastmlp.MLP against the
same weights in plain nn.Linear/activation layers, interleaved in one process, after both
have run twice (fastmlp's first call measures its CPU paths: docs/cpu.md); the ratio is
eager's median over fastmlp's, over ROUNDS rounds, each round long enough (>= 20 ms) to
time. A point below THRESHOLD is measured once more (its CPU path chosen afresh), and the
gate fails if it stays below. KNOWN_GAPS lists the points known to sit below THRESHOLD, each
with a lower floor that still gates regressions, and why.
On a CPU with AVX-512 the grid runs again in a child process under the AVX2 emulation
(ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2; the child
checks that ATen took it). Prints a markdown table; exits 1 if any point fails. Timings,
not tests: this is a benchmark script (tests/ hold no timing assertions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import fastmlp
from fastmlp import engines, hardware

THRESHOLD = 0.9
# Points with a known gap to eager: their own, lower floor, and why. Each is a regression
# gate still (below the floor fails); remove the entry when the gap is closed.
KNOWN_GAPS = {
    ("GELU block 512-2048-512 b4096", "train"): (
        0.8,
        "0.87-0.95x measured on a Zen 4: the fastest path here is aten, whose backward "
        "recomputes GELU(z) for the second layer's weight gradient where eager's autograd "
        "keeps GELU(z) (issue 31)",
    ),
}
ROUNDS = 7
ROUND_SECONDS = 0.02
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# (name, widths, activation, rows)
POINTS = [
    *(
        (f"32-{w}x4-16 b{b}", (32, w, w, w, w, 16), "relu", b)
        for w in (64, 512, 1024)
        for b in (256, 4096)
    ),
    ("GELU block 512-2048-512 b4096", (512, 2048, 512), "gelu", 4096),
]


def _twins(widths: tuple[int, ...], activation: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fused = fastmlp.MLP(widths, activation=activation)
    eager = fastmlp.nn.unfuse(fastmlp.MLP(widths, activation=activation))
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def _step(model: nn.Module, x: torch.Tensor, phase: str) -> Callable[[], None]:
    if phase == "inference":

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer

    def train() -> None:
        for p in model.parameters():
            p.grad = None
        model(x).sum().backward()

    return train


def _ratio(fused: Callable[[], None], eager: Callable[[], None]) -> tuple[float, float, float]:
    """(eager median ms, fastmlp median ms, ratio) over ROUNDS interleaved rounds."""
    start = time.perf_counter()
    eager()
    calls = max(1, round(ROUND_SECONDS / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {"eager": [], "fused": []}
    for _ in range(ROUNDS):
        for name, f in (("eager", eager), ("fused", fused)):
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append((time.perf_counter() - start) / calls)
    e, f = (statistics.median(times[k]) * 1e3 for k in ("eager", "fused"))
    return e, f, e / f


def run_grid() -> list[tuple[str, str, float, float, float, bool]]:
    rows = []
    for name, widths, activation, batch in POINTS:
        fused_model, eager_model = _twins(widths, activation)
        x = torch.randn(batch, widths[0])
        for phase in ("train", "inference"):
            fused, eager = _step(fused_model, x, phase), _step(eager_model, x, phase)
            for f in (fused, fused, eager, eager):  # fastmlp's first call measures its paths
                f()
            floor = KNOWN_GAPS.get((name, phase), (THRESHOLD, ""))[0]
            e, f, ratio = _ratio(fused, eager)
            if ratio < floor:
                # Once more before failing, from a fresh choice of CPU path: a machine busy
                # at the first call may have had fastmlp pick a path that is not the
                # fastest (as a new process would measure again).
                engines.clear_measured_cpu_paths()
                fused()
                e, f, ratio = _ratio(fused, eager)
            rows.append((name, phase, e, f, ratio, ratio >= floor))
            print(f"  {name} {phase}: {ratio:.2f}x", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[tuple[str, str, float, float, float, bool]], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| point | phase | eager ms | fastmlp ms | speed-up | gate |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, phase, e, f, ratio, ok in rows:
        floor = KNOWN_GAPS.get((name, phase), (THRESHOLD, ""))[0]
        gate = "ok" if ok else f"FAIL (< {floor}x)"
        if ok and floor < THRESHOLD:
            gate = f"known gap (floor {floor}x)"
        lines.append(f"| {name} | {phase} | {e:.3f} | {f:.3f} | {ratio:.2f}x | {gate} |")
    return "\n".join(lines)


def _title() -> str:
    cpu = hardware.describe_cpu(hardware.describe())
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu}, ATen {capability}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", action="store_true", help="skip the AVX2 emulation")
    parser.add_argument(
        "--emulated-child", action="store_true", help=argparse.SUPPRESS
    )  # set by the parent for the AVX2 run
    args = parser.parse_args(argv)
    if args.emulated_child and torch.backends.cpu.get_cpu_capability() != "AVX2":
        print("speed gate: ATEN_CPU_CAPABILITY=avx2 did not take effect", file=sys.stderr)
        return 1
    title = ("emulated AVX2: " if args.emulated_child else "") + _title()
    rows = run_grid()
    print(format_table(rows, title), flush=True)
    ok = all(row[-1] for row in rows)
    if args.emulated_child:
        return 0 if ok else 1
    if not args.native:
        if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            child = subprocess.run(
                [sys.executable, __file__, "--emulated-child"], env={**os.environ, **AVX2_ENV}
            )
            ok = ok and child.returncode == 0
        else:
            print("\n(no AVX-512 here: the native run is the AVX2 run)")
    verdict = "passed" if ok else "FAILED"
    print(f"\nspeed gate: {verdict} (every point >= {THRESHOLD}x eager, known gaps >= their floor)")
    for (name, phase), (floor, why) in KNOWN_GAPS.items():
        print(f"known gap: {name} {phase}: floor {floor}x; {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

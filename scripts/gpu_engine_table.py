#!/usr/bin/env python3
"""Print the validated-engine entries a GPU run has earned, ready for csrc/cuda/engine_rule.cpp.

    python scripts/gpu_engine_table.py --tests OUT/test_results.jsonl \\
        [--bench OUT/bench_main.json ...] [--tests-rc RC] [--capability 9.0]

An engine (custom, cublaslt) earns an entry for a precision (fp32, tf32, bf16,
fp16) when the run's CUDA tests finished and every test of that engine in that
precision, and every engine test without a precision parameter, passed; at
least one must have run in that precision. Where the op benchmarks measured
that precision, the entries follow the measured winner from the smallest
product up (the default rule's timing, i.e. ``aten`` before any entry exists,
competing), and each entry's ``max_flops`` is the largest product it won;
without measurements the entries are printed commented out, since "validated"
means correct and measured. Flops here are those of one GEMM, 2*M*N*K, as the
rule sees them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ENGINES = ("custom", "cublaslt")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
CPP_PRECISION = {"fp32": "kFloat32", "tf32": "kTF32", "bf16": "kBFloat16", "fp16": "kFloat16"}
CPP_ENGINE = {"custom": "kCustom", "cublaslt": "kCublasLt"}
# test_opcheck and friends take a dtype; TF32 is off by default in torch.
DTYPE_PRECISION = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _lines(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _bench_records(paths: list[Path]) -> list[dict]:
    """The measurements (extra_info) of benchmarks/test_bench_gpu.py's JSON files."""
    records = []
    for path in paths:
        try:
            records += [b["extra_info"] for b in json.loads(path.read_text())["benchmarks"]]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return records


def earned(tests: list[dict]) -> dict[str, list[str]]:
    """precision -> engines whose tests in that precision all passed."""
    passed: dict[tuple[str, str | None], int] = defaultdict(int)
    failed: set[tuple[str, str | None]] = set()
    for t in tests:
        engine = t.get("engine")
        if engine not in ENGINES:
            continue
        prec = t.get("prec") or DTYPE_PRECISION.get(t.get("dtype", ""))
        if t.get("dtype") == "torch.float64":
            prec = "fp64"  # not an engine precision (float64 always runs aten)
        key = (engine, prec)
        if t["outcome"] == "passed":
            passed[key] += 1
        elif t["outcome"] == "failed":
            failed.add(key)
    result: dict[str, list[str]] = {}
    for prec in PRECISIONS:
        result[prec] = [
            e
            for e in ENGINES
            if passed[(e, prec)] > 0 and (e, prec) not in failed and (e, None) not in failed
        ]
    return result


def entries_for(prec: str, engines: list[str], bench: list[dict], cc: int) -> list[str]:
    runs = [
        b
        for b in bench
        if b.get("kind") == "fwd_bwd" and b.get("mode") == "wall" and b.get("prec") == prec
    ]
    points: dict[float, dict[str, float]] = defaultdict(dict)
    for b in runs:
        fin, fout = (int(v) for v in b["shape"].split("->"))
        flops = 2.0 * b["batch"] * fin * fout
        points[flops][b["impl"]] = b["us"]
    candidates = [f"fused-{e}" for e in engines] + ["fused-auto"]
    measured = {
        f: t for f, t in points.items() if all(c in t for c in candidates) and len(candidates) > 1
    }
    lines = []
    if not measured:
        for e in engines:
            lines.append(
                f"// {{{cc}, Precision::{CPP_PRECISION[prec]}, Engine::{CPP_ENGINE[e]}, "
                f"INFINITY}},  // tests passed; not benchmarked in {prec}: measure before enabling"
            )
        return lines
    winners = []  # (flops, winner impl, times)
    for flops in sorted(measured):
        times = measured[flops]
        winners.append((flops, min(candidates, key=lambda c: times[c]), times))
    for i, (flops, win, times) in enumerate(winners):
        last_of_run = i + 1 == len(winners) or winners[i + 1][1] != win
        if win == "fused-auto" or not last_of_run:
            continue
        bound = "INFINITY" if i + 1 == len(winners) else f"{flops:.3g}"
        cells = ", ".join(f"{c.removeprefix('fused-')} {times[c]:.1f} us" for c in candidates)
        engine = win.removeprefix("fused-")
        lines.append(
            f"{{{cc}, Precision::{CPP_PRECISION[prec]}, Engine::{CPP_ENGINE[engine]}, {bound}}},"
            f"  // fastest up to {flops:.3g} flops ({cells})"
        )
    if winners and winners[0][1] == "fused-auto":
        lines.append(
            f"// {prec}: the default (aten) was fastest at the smallest product "
            f"({winners[0][0]:.3g} flops); entries have no lower bound, review before adding"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", type=Path, required=True, help="FASTMLP_TEST_RESULTS JSONL")
    p.add_argument(
        "--bench", type=Path, nargs="*", default=[], help="--benchmark-json files of the op suite"
    )
    p.add_argument("--tests-rc", type=int, default=0, help="exit status of the test run")
    p.add_argument("--capability", help="e.g. 9.0 (default: this machine's GPU)")
    args = p.parse_args()

    if args.capability:
        major, minor = (int(v) for v in args.capability.split("."))
    else:
        import torch

        major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    tests = _lines(args.tests)
    print(f"// Validated-engine entries earned by this run (compute capability {major}.{minor}):")
    if args.tests_rc not in (0, 1) or not tests:
        print(f"// none: the CUDA tests did not finish (exit status {args.tests_rc})")
        return 0
    bench = _bench_records(args.bench)
    by_prec = earned(tests)
    any_line = False
    for prec in PRECISIONS:
        if not by_prec[prec]:
            print(f"// {prec}: no engine passed all of its tests")
            continue
        for line in entries_for(prec, by_prec[prec], bench, cc):
            print(line)
            any_line = True
    if not any_line:
        print("// none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

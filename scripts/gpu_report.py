#!/usr/bin/env python3
"""Render the GPU benchmark JSON lines (benchmarks/test_bench_gpu.py) as markdown.

    python scripts/gpu_report.py OUTDIR/bench.jsonl [--tests-log OUTDIR/tests.log]

Tables: fused forward+backward against eager and torch.compile per shape,
batch and precision (times in microseconds per step, speedups as ratios from
the same run), and the large forward against torch.mm.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FUSED = ["fused-custom", "fused-cublaslt", "fused-auto"]


def load(path: Path) -> list[dict]:
    recs = []
    if not path.exists():
        return recs
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return recs


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def fwd_bwd_table(recs: list[dict], mode: str) -> list[str]:
    rows = {}
    for r in recs:
        if r.get("kind") != "fwd_bwd" or r.get("mode") != mode:
            continue
        key = (r["shape"], r["prec"], r["batch"])
        rows.setdefault(key, {})[r["impl"]] = r["us"]
    if not rows:
        return []
    has_compile = mode == "wall" and any("compile" in v for v in rows.values())
    head = ["shape", "prec", "batch", "eager µs"]
    if has_compile:
        head.append("compile µs")
    head += [f"{i} µs" for i in FUSED]
    head += ["best fused", "eager / best"]
    if has_compile:
        head.append("compile / best")
    head.append("eager / auto")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2])):
        v = rows[key]
        fused = {i: v.get(i) for i in FUSED}
        # Best of the two engines; auto is whichever of them its rule picks.
        present = {i: t for i, t in fused.items() if t is not None and i != "fused-auto"}
        best = min(present, key=present.get) if present else None
        tbest = present.get(best) if best else None
        cells = [key[0], key[1], str(key[2]), fmt(v.get("eager"))]
        if has_compile:
            cells.append(fmt(v.get("compile")))
        cells += [fmt(fused[i]) for i in FUSED]
        cells += [best.replace("fused-", "") if best else "–", ratio(v.get("eager"), tbest)]
        if has_compile:
            cells.append(ratio(v.get("compile"), tbest))
        cells.append(ratio(v.get("eager"), fused.get("fused-auto")))
        out.append("| " + " | ".join(cells) + " |")
    return out


def fwd_large_table(recs: list[dict]) -> list[str]:
    rows = {}
    for r in recs:
        if r.get("kind") == "fwd_large":
            rows.setdefault((r["shape"], r["prec"]), {})[r["impl"]] = r
    if not rows:
        return []
    out = [
        "| shape | prec | impl | µs | TFLOP/s | % of torch.mm |",
        "|---|---|---|---|---|---|",
    ]
    for (shape, prec), v in sorted(rows.items()):
        mm = v.get("torch.mm")
        for impl in ["torch.mm", *FUSED]:
            r = v.get(impl)
            if r is None:
                continue
            pct = "–" if mm is None else f"{100 * r['tflops'] / mm['tflops']:.0f}%"
            out.append(
                f"| {shape} | {prec} | {impl} | {fmt(r['us'])} | {fmt(r['tflops'])} | {pct} |"
            )
    return out


def tests_summary(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line (timed out or crashed?)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", type=Path)
    ap.add_argument("--tests-log", type=Path, default=None)
    ap.add_argument("--failed", default="")
    args = ap.parse_args()
    recs = load(args.jsonl)
    env = next((r for r in recs if r.get("kind") == "env"), {})
    md = ["# fastmlp GPU results", ""]
    if env:
        md.append(
            f"GPU: **{env.get('gpu')}**, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"median of {env.get('rounds')} rounds."
        )
    summary = tests_summary(args.tests_log)
    if summary:
        md.append(f"Tests: {summary}")
    if args.failed.strip():
        md.append(f"Failed stages: {args.failed.strip()}")
    md.append("")
    for mode, title in [
        ("wall", "Forward+backward, eager loop (host overhead included)"),
        ("graph", "Forward+backward, CUDA-graph replay (device time)"),
    ]:
        t = fwd_bwd_table(recs, mode)
        if t:
            md += [f"## {title}", "", *t, ""]
    t = fwd_large_table(recs)
    if t:
        md += ["## Forward 16384 x 4096 -> 4096 vs torch.mm", "", *t, ""]
    if len(md) <= 5:
        md.append("(no benchmark results)")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Renders pytest-benchmark JSON as markdown tables (all numbers from the one run):
per-step times and ratios for benchmarks/test_bench_ops.py; ms per training step and
ratios to eager and the floor for benchmarks/test_bench_user_loop.py; seconds per epoch,
ratios to each baseline and the fraction of the GEMM floor for
benchmarks/test_bench_epoch.py; fused against eager, torch.compile and torch.mm for
benchmarks/test_bench_gpu.py.

    python benchmarks/report.py bench.json [more.json ...] [--tests-log LOG] [--failed STAGES]

Several files (e.g. the GPU suite and its max-autotune baseline, run separately) are
rendered as one run; a run of several suites (``pytest benchmarks/ --benchmark-json=...``)
gets one table per suite.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from fastmlp import hardware


def _cpu_name(data: dict) -> str:
    """The measuring machine's CPU and the ISA flags that decide fp32/bf16 speed, as
    benchmarks/conftest.py recorded them (bf16 numbers mean nothing without them)."""
    # JSON written before the machine was recorded: this machine's.
    return hardware.describe_cpu(data.get("machine") or hardware.describe())


def _suite(info: dict) -> str:
    """Which suite recorded a benchmark, from its ``extra_info``."""
    if "suite" in info:  # test_bench_epoch.py, test_bench_user_loop.py
        return info["suite"]
    if info.get("kind") in ("fwd_bwd", "fwd_large"):
        return "gpu"
    if "inner_steps" in info:
        return "ops"
    raise ValueError(f"a benchmark of no suite report.py knows: extra_info {info}")


def render(data: dict) -> str:
    """The tables of the suites that wrote ``data``, one per suite, in this file's order."""
    by_suite: dict[str, list] = defaultdict(list)
    for bench in data["benchmarks"]:
        by_suite[_suite(bench["extra_info"])].append(bench)
    renderers = {
        "ops": render_ops,
        "user_loop": render_user_loop,
        "epoch": render_epoch,
        "gpu": render_gpu,
    }
    unknown = by_suite.keys() - renderers.keys()
    if unknown:
        raise ValueError(f"no table for suite(s) {sorted(unknown)}")
    return "\n\n".join(
        render_suite(dict(data, benchmarks=by_suite[name]))
        for name, render_suite in renderers.items()
        if name in by_suite
    )


LOOP_MODELS = ["eager", "mlp", "fused", "floor"]
LOOP_OPTIMIZERS = ["sgd", "adamw-fused", "adamw"]  # the script's order; others after


def render_user_loop(data: dict) -> str:
    """ms per step of each model (median of the rounds, the fastest in parentheses) and the
    ratios of medians, as benchmarks/test_bench_user_loop.py prints when run as a script."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (batch, optimizer) -> model
    threads = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        threads = info.get("threads", threads)
        rows[(info["batch"], info["optimizer"])][info["variant"]] = bench["stats"]
    lines = [
        f"Machine: {_cpu_name(data)}, {threads} threads, torch {data.get('torch_version', '?')}",
        "",
        "| batch | optimizer | eager ms | MLP ms | fused tutorial ms | GEMMs+opt ms "
        "| eager / MLP | eager / fused | MLP / floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def order(key: tuple) -> tuple:
        batch, opt = key
        return batch, LOOP_OPTIMIZERS.index(opt) if opt in LOOP_OPTIMIZERS else 99, opt

    for (batch, opt), models in sorted(rows.items(), key=lambda item: order(item[0])):
        med = {m: models[m]["median"] * 1e3 for m in LOOP_MODELS if m in models}
        best = {m: models[m]["min"] * 1e3 for m in LOOP_MODELS if m in models}
        cells = [f"{med[m]:.2f} ({best[m]:.2f})" if m in med else "–" for m in LOOP_MODELS]
        cells += [
            _ratio(med.get(a), med.get(b))
            for a, b in (("eager", "mlp"), ("eager", "fused"), ("mlp", "floor"))
        ]
        lines.append(f"| {batch} | {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EPOCH_VARIANTS = ["tutorial", "eager", "compile", "fastmlp", "fastmlp-bf16"]
BASELINES = ["tutorial", "eager", "compile"]


def render_epoch(data: dict) -> str:
    """Seconds per epoch (fastest round), samples/s, speed-up over each baseline, and
    achieved / floor, the floor being the epoch's FLOPs at the measured GEMM rate."""
    epochs: dict[str, dict[str, dict]] = defaultdict(dict)  # device -> variant -> info
    gemm_rate: dict[tuple[str, str], float] = {}  # (device, dtype) -> FLOP/s
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"], seconds=bench["stats"]["min"])
        if info["variant"] == "gemm":
            gemm_rate[(info["device"], info["dtype"])] = info["flops"] / info["seconds"]
        else:
            epochs[info["device"]][info["variant"]] = info
    lines = []
    for device, runs in epochs.items():
        any_run = next(iter(runs.values()))
        name = any_run.get("device_name") if device == "cuda" else _cpu_name(data)
        rates = ", ".join(
            f"{dt} {gemm_rate[(device, dt)] / 1e9:.0f} GFLOP/s"
            for dt in ("fp32", "bf16")
            if (device, dt) in gemm_rate
        )
        lines += [
            f"{device}: {name}, {any_run['threads']} threads, torch "
            f"{data.get('torch_version', '?')}; batch {any_run['batch']}, "
            f"{any_run['samples']} samples, {any_run['flops'] / 1e9:.0f} GFLOP per epoch; "
            f"GEMM rate {rates or 'not measured'}",
            "",
            "| run | s/epoch | samples/s | vs tutorial | vs eager | vs compile | floor s "
            "| floor / time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in [v for v in EPOCH_VARIANTS if v in runs]:
            info = runs[variant]
            t = info["seconds"]
            ratios = [f"{runs[b]['seconds'] / t:.2f}x" if b in runs else "–" for b in BASELINES]
            rate = gemm_rate.get((device, info["dtype"]))
            floor = info["flops"] / rate if rate else float("nan")
            lines.append(
                f"| {variant} ({info['dtype']}) | {t:.2f} | {info['samples'] / t:,.0f} "
                f"| {' | '.join(ratios)} | {floor:.2f} | {floor / t:.2f} |"
            )
        compile_s = runs.get("compile", {}).get("compile_seconds")
        if compile_s:
            lines += ["", f"torch.compile's compilation ({compile_s:.0f} s) is not included."]
        lines.append("")
    return "\n".join(lines).rstrip()


def render_ops(data: dict) -> str:
    # (precision, fan_in, fan_out, batch) -> kind -> median seconds per step
    table: dict[tuple, dict[str, float]] = defaultdict(dict)
    flops: dict[tuple, int] = {}
    baseline: dict[tuple, float] = {}
    threads = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        per_step = bench["stats"]["min"] / info["inner_steps"]  # min: least disturbed by other load
        key = (info["fan_in"], info["fan_out"], info["batch"])
        threads = info.get("threads", threads)
        if info["precision"] == "fp32-baseline":
            baseline[key] = per_step
            continue
        table[(info["precision"], *key)][info["kind"]] = per_step
        flops[(info["precision"], *key)] = info["flops_per_step"]

    lines = [
        f"Machine: {_cpu_name(data)}, {threads} threads, torch {data.get('torch_version', '?')}",
        "",
        "| dtype | layer | batch | fused µs | eager µs | bare GEMMs µs | eager / fused "
        "| fused / GEMMs | eager fp32 / fused | fused GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(table, key=lambda k: (k[0] != "fp32", k[1], -k[2], k[3])):
        prec, fan_in, fan_out, batch = key
        row = table[key]
        if not {"fused", "eager", "gemms"} <= row.keys():
            continue
        fused, eager, gemms = row["fused"], row["eager"], row["gemms"]
        base = baseline.get((fan_in, fan_out, batch))
        lines.append(
            f"| {prec} | {fan_in}→{fan_out} | {batch} | {fused * 1e6:.0f} | {eager * 1e6:.0f} "
            f"| {gemms * 1e6:.0f} | {eager / fused:.2f}x | {fused / gemms:.2f}x "
            f"| {(base / fused if base else float('nan')):.2f}x "
            f"| {flops[key] / fused / 1e9:.0f} |"
        )
    return "\n".join(lines)


# --- the GPU suite (benchmarks/test_bench_gpu.py) ------------------------------------

FUSED = ["fused-custom", "fused-cublaslt", "fused-auto"]


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _fwd_bwd_table(recs: list[dict], mode: str) -> list[str]:
    rows: dict[tuple, dict[str, float]] = {}
    for r in recs:
        if r.get("kind") == "fwd_bwd" and r.get("mode") == mode:
            rows.setdefault((r["shape"], r["prec"], r["batch"]), {})[r["impl"]] = r["us"]
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
    for key in sorted(rows):
        v = rows[key]
        fused = {i: v.get(i) for i in FUSED}
        # Best of the two forced engines; auto is whatever the validated-engine rule picks.
        present = {i: t for i, t in fused.items() if t is not None and i != "fused-auto"}
        best = min(present, key=present.get) if present else None
        tbest = present.get(best) if best else None
        cells = [key[0], key[1], str(key[2]), _fmt(v.get("eager"))]
        if has_compile:
            cells.append(_fmt(v.get("compile")))
        cells += [_fmt(fused[i]) for i in FUSED]
        cells += [best.replace("fused-", "") if best else "–", _ratio(v.get("eager"), tbest)]
        if has_compile:
            cells.append(_ratio(v.get("compile"), tbest))
        cells.append(_ratio(v.get("eager"), fused.get("fused-auto")))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _fwd_large_table(recs: list[dict]) -> list[str]:
    rows: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        if r.get("kind") == "fwd_large":
            rows.setdefault((r["shape"], r["prec"]), {})[r["impl"]] = r
    if not rows:
        return []
    out = ["| shape | prec | impl | µs | TFLOP/s | % of torch.mm |", "|---|---|---|---|---|---|"]
    for (shape, prec), v in sorted(rows.items()):
        mm = v.get("torch.mm")
        for impl in ["torch.mm", *FUSED]:
            r = v.get(impl)
            if r is None:
                continue
            pct = "–" if mm is None else f"{100 * r['tflops'] / mm['tflops']:.0f}%"
            out.append(
                f"| {shape} | {prec} | {impl} | {_fmt(r['us'])} | {_fmt(r['tflops'])} | {pct} |"
            )
    return out


def render_gpu(data: dict) -> str:
    recs = [b["extra_info"] for b in data["benchmarks"]]
    machine = data.get("machine", {})
    rounds = next((r["rounds"] for r in recs if "rounds" in r), "?")
    md = [
        f"GPU: **{machine.get('gpu', '?')}** (compute capability "
        f"{machine.get('gpu_capability', '?')}), torch {data.get('torch_version', '?')}, "
        f"host {_cpu_name(data)}; median of {rounds} rounds.",
        "",
    ]
    for mode, title in [
        ("wall", "Forward+backward, eager loop (host overhead included)"),
        ("graph", "Forward+backward, CUDA-graph replay (device time)"),
    ]:
        if table := _fwd_bwd_table(recs, mode):
            md += [f"## {title}", "", *table, ""]
    if table := _fwd_large_table(recs):
        md += ["## Forward 16384 x 4096 -> 4096 vs torch.mm", "", *table, ""]
    return "\n".join(md).rstrip()


def _tests_summary(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line (timed out or crashed?)"


def load(paths: list[Path]) -> dict:
    """One run from several --benchmark-json files: the first file's metadata, every
    file's benchmarks. Missing or unreadable files are skipped (a stage that timed out)."""
    data: dict | None = None
    for path in paths:
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data is None:
            data = part
        else:
            data["benchmarks"] += part["benchmarks"]
    return data or {"benchmarks": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="files written by --benchmark-json")
    parser.add_argument("--tests-log", type=Path, help="pytest log whose summary to quote")
    parser.add_argument("--failed", default="", help="failed stages to name")
    args = parser.parse_args()
    data = load(args.json)
    if args.tests_log:
        print(f"Tests: {_tests_summary(args.tests_log)}")
    if args.failed.strip():
        print(f"Failed stages: {args.failed.strip()}")
    print(render(data) if data["benchmarks"] else "(no benchmark results)")


if __name__ == "__main__":
    main()

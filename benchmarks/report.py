"""Renders a pytest-benchmark JSON as a markdown table (all numbers from the one run):
per-step times and ratios for benchmarks/test_bench_ops.py, seconds per epoch, ratios to
each baseline and the fraction of the GEMM floor for benchmarks/test_bench_epoch.py.

    python benchmarks/report.py bench.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from fastmlp import hardware


def _cpu_name(data: dict) -> str:
    """The measuring machine's CPU and the ISA flags that decide fp32/bf16 speed, as
    benchmarks/conftest.py recorded them (bf16 numbers mean nothing without them)."""
    machine = data.get("machine") or hardware.describe()  # JSON from before the record
    isa = ", ".join(machine["cpu_isa"]) or "no AVX2"
    native = "native bf16" if machine["cpu_native_bf16"] else "bf16 not native"
    return f"{machine['cpu']} ({isa}; {native})"


def render(data: dict) -> str:
    """The table for whichever suite wrote ``data``."""
    if any(b["extra_info"].get("suite") == "epoch" for b in data["benchmarks"]):
        return render_epoch(data)
    return render_ops(data)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    args = parser.parse_args()
    with open(args.json) as f:
        print(render(json.load(f)))


if __name__ == "__main__":
    main()

"""Renders a pytest-benchmark JSON of benchmarks/test_bench_ops.py as a
markdown table of per-step times and ratios (all from the one run).

    python benchmarks/report.py bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(data: dict) -> str:
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
        f"Machine: {_cpu_name()}, {threads} threads, torch {data.get('torch_version', '?')}",
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

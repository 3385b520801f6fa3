"""benchmarks/report.py on recorded --benchmark-json documents of the CPU suites (the GPU
suite's table is tested in test_gpu_scripts.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
MACHINE = {"cpu": "X", "cpu_isa": ["avx2"], "cpu_native_bf16": False}


@pytest.fixture(scope="module")
def report():
    return runpy.run_path(str(REPORT))


def _loop(ms: dict[tuple[int, str, str], tuple[float, float]]) -> list[dict]:
    """benchmarks/test_bench_user_loop.py's records: (batch, optimizer, model) -> (median,
    min) ms per step."""
    return [
        {
            "extra_info": {
                "suite": "user_loop",
                "variant": model,
                "optimizer": opt,
                "batch": batch,
                "threads": 2,
            },
            "stats": {"median": median / 1e3, "min": fastest / 1e3},
        }
        for (batch, opt, model), (median, fastest) in ms.items()
    ]


def _ops(batch: int, kinds: dict[str, float]) -> list[dict]:
    """benchmarks/test_bench_ops.py's records: kind -> seconds per round of 2 steps."""
    return [
        {
            "extra_info": {
                "kind": kind,
                "precision": "fp32",
                "fan_in": 512,
                "fan_out": 512,
                "batch": batch,
                "inner_steps": 2,
                "flops_per_step": 6 * batch * 512 * 512,
                "threads": 2,
            },
            "stats": {"min": seconds},
        }
        for kind, seconds in kinds.items()
    ]


def _cells(text: str, start: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in row.strip("|").split("|")]


def test_user_loop_table_has_medians_fastest_rounds_and_ratios(report):
    ms = {
        (64, "sgd", "eager"): (4.0, 3.0),
        (64, "sgd", "mlp"): (2.0, 1.5),
        (64, "sgd", "fused"): (2.5, 2.0),
        (64, "sgd", "floor"): (1.0, 1.0),
        (64, "adamw", "eager"): (6.0, 5.0),  # no other model of this row was recorded
    }
    text = report["render"]({"machine": MACHINE, "benchmarks": _loop(ms)})
    # eager, MLP, fused, floor; eager / MLP, eager / fused, MLP / floor
    assert _cells(text, "| 64 | sgd |")[2:] == [
        "4.00 (3.00)",
        "2.00 (1.50)",
        "2.50 (2.00)",
        "1.00 (1.00)",
        "2.00x",
        "1.60x",
        "2.00x",
    ]
    assert _cells(text, "| 64 | adamw |")[2:] == ["6.00 (5.00)", "–", "–", "–", "–", "–", "–"]
    rows = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| 64")]
    assert rows == ["sgd", "adamw"]  # the script's order, not the alphabet's


def test_a_run_of_several_suites_gets_one_table_each(report):
    loop = _loop({(64, "sgd", m): (1.0, 1.0) for m in ("eager", "mlp", "fused", "floor")})
    ops = _ops(256, {"fused": 2e-3, "eager": 4e-3, "gemms": 1e-3})
    text = report["render"]({"machine": MACHINE, "benchmarks": loop + ops})
    # fused, eager, bare GEMMs µs per step; eager / fused, fused / GEMMs
    assert _cells(text, "| fp32 | 512→512 | 256 |")[3:8] == [
        "1000",
        "2000",
        "500",
        "2.00x",
        "2.00x",
    ]
    assert _cells(text, "| 64 | sgd |")[-1] == "1.00x"


def test_a_benchmark_of_an_unknown_suite_is_named(report):
    with pytest.raises(ValueError, match="no suite report.py knows.*'something'"):
        report["render"]({"benchmarks": [{"extra_info": {"something": 1}, "stats": {}}]})

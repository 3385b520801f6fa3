"""benchmarks/speed_gate.py, the CI speed gate: its verdict and table (not its timings)."""

from __future__ import annotations

import runpy
from pathlib import Path

GATE = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed_gate.py"))


def test_table_marks_points_below_the_threshold():
    rows = [
        ("a", "train", 2.0, 1.0, 2.0, True),
        ("b", "inference", 1.0, 2.0, 0.5, False),
    ]
    table = GATE["format_table"](rows, "some CPU")
    lines = table.splitlines()
    assert lines[0] == "### some CPU"
    assert lines[4] == "| a | train | 2.000 | 1.000 | 2.00x | ok |"
    assert lines[5] == f"| b | inference | 1.000 | 2.000 | 0.50x | FAIL (< {GATE['THRESHOLD']}x) |"
    assert all(line.count("|") == 7 for line in lines[2:])


def test_ratio_is_eager_time_over_fastmlp_time():
    import time

    def slow() -> None:
        time.sleep(0.004)

    def fast() -> None:
        time.sleep(0.001)

    eager_ms, fused_ms, ratio = GATE["_ratio"](fast, slow)
    assert fused_ms < eager_ms and ratio > 1.5
    assert abs(ratio - eager_ms / fused_ms) < 1e-9


def test_grid_covers_the_issue_points():
    names = [p[0] for p in GATE["POINTS"]]
    for width in (64, 512, 1024):
        for batch in (256, 4096):
            assert f"32-{width}x4-16 b{batch}" in names
    assert any("GELU" in n for n in names)


def test_known_gaps_have_a_lower_floor_and_a_reason():
    (key, (floor, why)), *_ = GATE["KNOWN_GAPS"].items()
    assert key in {(p[0], phase) for p in GATE["POINTS"] for phase in ("train", "inference")}
    assert 0 < floor < GATE["THRESHOLD"] and why
    ok = GATE["format_table"]([(*key, 2.0, 2.1, 0.95 * 2.0 / 2.1, True)], "cpu")
    assert ok.splitlines()[-1].endswith(f"| known gap (floor {floor}x) |")
    below = GATE["format_table"]([(*key, 1.0, 2.0, 0.5, False)], "cpu")
    assert below.splitlines()[-1].endswith(f"| FAIL (< {floor}x) |")

"""The GPU check's helper scripts, on recorded outputs (no GPU needed)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def table():
    return runpy.run_path(str(SCRIPTS / "gpu_engine_table.py"))


@pytest.fixture(scope="module")
def resources():
    return runpy.run_path(str(SCRIPTS / "cuda_resources.py"))


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def _tests(engine_fails: set[tuple[str, str]] = frozenset()) -> list[dict]:
    out = []
    for engine in ("custom", "cublaslt", "aten"):
        for prec in ("fp32", "tf32", "bf16", "fp16"):
            outcome = "failed" if (engine, prec) in engine_fails else "passed"
            out.append(
                {"test": f"t[{engine}-{prec}]", "engine": engine, "prec": prec, "outcome": outcome}
            )
        out.append({"test": f"generic[{engine}]", "engine": engine, "outcome": "passed"})
    return out


def _bench(times: dict[tuple[int, str], float], prec: str = "bf16") -> dict:
    """A --benchmark-json document of benchmarks/test_bench_gpu.py's fwd_bwd cases."""
    cases = [
        {"kind": "fwd_bwd", "mode": "wall", "prec": prec, "shape": "512->512", "batch": batch}
        | {"impl": impl, "us": us}
        for (batch, impl), us in times.items()
    ]
    return {"benchmarks": [{"extra_info": case} for case in cases]}


def _run(table, monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["gpu_engine_table.py", *argv])
    assert table["main"]() == 0
    return capsys.readouterr().out


def test_earned_requires_every_test_of_engine_and_precision(table):
    by_prec = table["earned"](_tests({("custom", "bf16")}))
    assert by_prec["bf16"] == ["cublaslt"]
    assert by_prec["tf32"] == ["custom", "cublaslt"]
    generic_fail = _tests() + [{"test": "g", "engine": "custom", "outcome": "failed"}]
    assert table["earned"](generic_fail)["tf32"] == ["cublaslt"]


def test_entries_follow_the_measured_winner(table, tmp_path, monkeypatch, capsys):
    times = {}
    for batch, custom, cublaslt, auto in [(64, 10, 20, 30), (256, 20, 25, 40), (4096, 90, 60, 95)]:
        times |= {
            (batch, "fused-custom"): custom,
            (batch, "fused-cublaslt"): cublaslt,
            (batch, "fused-auto"): auto,
        }
    out = _run(
        table,
        monkeypatch,
        capsys,
        "--tests",
        str(_write(tmp_path / "t", _tests())),
        "--bench",
        str(_write_json(tmp_path / "b.json", _bench(times))),
        "--capability",
        "9.0",
    )
    lines = [line for line in out.splitlines() if line.startswith("{90, Precision::kBFloat16")]
    flops_256 = 2.0 * 256 * 512 * 512
    assert lines[0].startswith(f"{{90, Precision::kBFloat16, Engine::kCustom, {flops_256:.3g}}},")
    assert lines[1].startswith("{90, Precision::kBFloat16, Engine::kCublasLt, INFINITY},")
    # Precisions without benchmark numbers are only candidates, commented out.
    assert "// {90, Precision::kFloat16, Engine::kCustom, INFINITY}" in out


def test_unfinished_test_run_earns_nothing(table, tmp_path, monkeypatch, capsys):
    out = _run(
        table,
        monkeypatch,
        capsys,
        "--tests",
        str(_write(tmp_path / "t", _tests())),
        "--tests-rc",
        "124",
        "--capability",
        "9.0",
    )
    assert "did not finish" in out and "Engine::" not in out


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN7fastmlp4cuda3fwdEv' for 'sm_90'
ptxas info    : Function properties for _ZN7fastmlp4cuda3fwdEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 33280 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN7fastmlp4cuda3bwdEv' for 'sm_90'
ptxas info    : Function properties for _ZN7fastmlp4cuda3bwdEv
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, 400 bytes cmem[0]
"""


def test_ptxas_output_is_parsed(resources):
    functions = resources["parse"](PTXAS)
    fwd, bwd = functions["_ZN7fastmlp4cuda3fwdEv"], functions["_ZN7fastmlp4cuda3bwdEv"]
    assert (fwd.entry, fwd.registers, fwd.smem, fwd.stack, fwd.spill_stores) == (
        True,
        255,
        33280,
        0,
        0,
    )
    assert (bwd.registers, bwd.smem, bwd.stack, bwd.spill_stores, bwd.spill_loads) == (
        40,
        0,
        16,
        8,
        8,
    )


def test_report_renders_the_gpu_suite_from_several_files(tmp_path):
    report = runpy.run_path(str(SCRIPTS.parent / "benchmarks" / "report.py"))
    main = _bench({(64, "fused-custom"): 10.0, (64, "fused-auto"): 30.0, (64, "eager"): 40.0})
    main["machine"] = {"cpu": "X", "cpu_isa": ["avx2"], "cpu_native_bf16": False, "gpu": "H200"}
    compiled = _bench({(64, "compile"): 20.0})
    data = report["load"](
        [
            _write_json(tmp_path / "main.json", main),
            _write_json(tmp_path / "compile.json", compiled),
            tmp_path / "missing.json",  # a stage that timed out
        ]
    )
    text = report["render"](data)
    assert "**H200**" in text
    row = next(line for line in text.splitlines() if line.startswith("| 512->512 | bf16 | 64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # eager, compile, custom, cublaslt, auto, best, eager/best, compile/best, eager/auto
    assert cells[3:] == ["40.0", "20.0", "10.0", "–", "30.0", "custom", "4.00x", "2.00x", "1.33x"]

"""fastmlp.bench.epochs (what `fastmlp bench` runs), in a short mode: structure, not speed."""

from __future__ import annotations

import json

import pytest

from fastmlp import hardware
from fastmlp.bench import epochs as bench


@pytest.fixture(scope="module")
def result():
    return bench.run(samples=512, steps=2, precisions=("fp32", "bf16"))


@pytest.mark.slow
def test_every_variant_and_precision_is_timed(result):
    assert [(r.variant, r.precision) for r in result.runs] == [
        ("eager", "fp32"),
        ("fastmlp", "fp32"),
        ("eager", "bf16"),
        ("fastmlp", "bf16"),
    ]
    for r in result.runs:
        assert r.step_ms > 0 and r.epoch_s > 0 and r.floor_s > 0
    assert set(result.gemm_gflops) == {"fp32", "bf16"}
    assert all(rate > 0 for rate in result.gemm_gflops.values())
    # Emulated bf16 is timed on part of the epoch and scaled; native bf16 and fp32 are not.
    scaled = {r.precision for r in result.runs if r.scaled}
    assert scaled == (set() if hardware.cpu_has_native_bf16() else {"bf16"})


@pytest.mark.slow
def test_result_records_the_machine_and_auto_precision(result):
    assert result.machine == hardware.describe("cpu")
    assert result.auto_precision == hardware.resolve_precision("auto", "cpu")
    data = json.loads(result.to_json())
    assert data["machine"]["cpu"] == hardware.cpu_info().model
    assert len(data["runs"]) == 4


@pytest.mark.slow
def test_table_names_machine_and_ratios(result):
    table = bench.format_table(result)
    assert hardware.cpu_info().model in table
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| eager") or line.startswith("| fastmlp")
    ]
    assert len(rows) == 4
    assert all(row.split("|")[5].strip().endswith("x") for row in rows)  # vs eager
    assert "(auto)" in table


def test_epoch_flops_of_the_tutorial_mlp():
    # forward 784*512 + 512*512 + 512*10 multiply-adds, the same for weight gradients,
    # input gradients of the two upper layers; x2 for FLOPs.
    per_sample = 2 * (2 * (784 * 512 + 512 * 512 + 512 * 10) + 512 * 512 + 512 * 10)
    assert bench.epoch_flops(60_000) == 60_000 * per_sample


@pytest.mark.slow
def test_cli_bench_short_json(capsys):
    from fastmlp.workflow.cli import main

    assert main(["bench", "--short", "--precision", "fp32", "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["variant"], r["precision"]) for r in data["runs"]] == [
        ("eager", "fp32"),
        ("fastmlp", "fp32"),
    ]
    assert data["machine"]["cpu"] == hardware.cpu_info().model


def test_cli_bench_auto_times_the_precision_auto_picks(capsys):
    from fastmlp.workflow.cli import main

    assert main(["bench", "--short", "--precision", "auto", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    picked = hardware.resolve_precision("auto", "cpu")
    assert f"precision auto picks {picked}" in out
    assert f"| fastmlp | {picked} (auto) |" in out

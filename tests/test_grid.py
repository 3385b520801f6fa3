"""fastmlp.bench.grid and ``fastmlp bench --grid`` (issue 24's shape grid): which points it
times and skips, that every variant computes the same function, its JSON and table.
Structure, never speed: rounds are 1 and no time is asserted."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from fastmlp import hardware
from fastmlp.bench import grid
from fastmlp.workflow.cli import main

# A small point off the grid's powers of two (odd batch, 3 hidden layers).
SMALL = dict(width=40, depth=3, batch=33)


def _quick_run(points, variants=("eager", "fastmlp"), **kw):
    return grid.run(points, variants, rounds=1, min_round_s=0.0, **kw)


def test_default_grid_is_the_issues_points():
    points = grid.grid()
    expected = itertools.product(
        (32, 64, 128, 256, 512, 1024),
        (2, 4, 8),
        (1, 16, 256, 4096, 65536),
        ("fp32", "bf16"),
        ("train", "no_grad", "inference_mode"),
    )
    assert sorted((p.width, p.depth, p.batch, p.dtype, p.mode) for p in points) == sorted(expected)
    assert len(points) == len(set(points)) == 6 * 3 * 5 * 2 * 3
    assert grid.Point(64, 4, 16, "fp32", "train").sizes == (32, 64, 64, 64, 64, 16)


def test_gflop_counts_forward_and_the_training_gemms():
    macs = 32 * 64 + 64 * 64 + 64 * 16  # per sample, 2 hidden layers of 64
    assert grid.Point(64, 2, 10, "fp32", "no_grad").gflop() == pytest.approx(2 * 10 * macs / 1e9)
    # Training: forward + weight gradients + input gradients of all but the first layer.
    train = 2 * macs + 64 * 64 + 64 * 16
    assert grid.Point(64, 2, 10, "fp32", "train").gflop() == pytest.approx(2 * 10 * train / 1e9)


def test_bad_selection_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        grid.grid(dtypes=["fp16"])
    with pytest.raises(ValueError, match="width must be a positive integer"):
        grid.grid(widths=[0])
    with pytest.raises(ValueError, match="not WIDTHxDEPTHxBATCH"):
        grid.parse_anchors("64x4")
    with pytest.raises(ValueError, match="anchor 64x2x8 is not a shape of the selected grid"):
        _quick_run(grid.grid([32], [2], [8], ["fp32"], ["no_grad"]), anchors=["64x2x8"])


def test_points_over_the_cap_are_reported_skipped_with_the_reason():
    big = grid.Point(1024, 8, 65536, "fp32", "train")
    assert big.gflop() > grid.MAX_GFLOP  # the default cap leaves out the largest point
    small = grid.Point(**SMALL, dtype="fp32", mode="train")
    result = _quick_run([small, big], max_gflop=1.0)
    timed, skipped = result.points
    assert timed.skipped is None and set(timed.ms) == {"eager", "fastmlp"}
    assert skipped.ms == {} and (skipped.width, skipped.batch) == (1024, 65536)
    assert "over the cap of 1" in skipped.skipped and "--max-gflop" in skipped.skipped
    assert "1024" in grid.format_markdown(result).split("Skipped (1 points):")[1]


def _cells_per_table_line(table: str) -> set[int]:
    """How many cells each Markdown table line of ``table`` has (one number when the
    header, separator and rows agree)."""
    return {len(line.strip().strip("|").split("|")) for line in table.splitlines() if "|" in line}


def test_a_grid_with_every_point_skipped_says_so_instead_of_a_broken_table():
    # Issue 29: 9 header cells over 8 separators when no point ran.
    points = [grid.Point(1024, 8, 65536, "fp32", m) for m in ("train", "no_grad")]
    table = grid.format_markdown(_quick_run(points, max_gflop=1.0))
    assert _cells_per_table_line(table) == set(), table
    assert "No point was timed: all 2 selected points were skipped (below)." in table
    assert "Skipped (2 points):" in table


def test_table_without_variants_is_well_formed():
    # A point timed with no variant has no "<variant> ms" column: the header had an empty one.
    table = grid.format_markdown(
        _quick_run([grid.Point(**SMALL, dtype="fp32", mode="no_grad")], ())
    )
    assert _cells_per_table_line(table) == {8}, table


@pytest.mark.parametrize("native", [False, True])
def test_bf16_is_timed_only_where_native(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    points = grid.grid([32], [2], [4], ["fp32", "bf16"], ["no_grad"])
    fp32, bf16 = _quick_run(points).points
    assert fp32.skipped is None and fp32.ms
    if native:
        assert bf16.skipped is None and set(bf16.ms) == {"eager", "fastmlp"}
    else:
        assert bf16.ms == {} and "bf16 is not native" in bf16.skipped
        assert hardware.cpu_info().model in bf16.skipped


def _after_one_step(variant, point, double=False):
    """The step's result (loss or output) and, for training, each parameter's change."""
    state = grid.initial_state(point.sizes)
    model = grid.build_model("eager" if double else variant, point.sizes, state)
    x = grid.example_input(point)
    if double:
        model, x = model.double(), x.double()
        point = grid.Point(point.width, point.depth, point.batch, "fp32", point.mode)
    before = [p.detach().clone() for p in model.parameters()]
    out = grid.make_step(model, x, point)().detach().double()
    deltas = [(p.detach() - b).double() for p, b in zip(model.parameters(), before, strict=True)]
    return [out, *deltas] if point.mode == "train" else [out]


def _check_same_function(variant, point):
    # Each tensor's error against a float64 reference is bounded by eager's own in the
    # same dtype (bf16's rounding is far larger than fp32's).
    ref = _after_one_step("eager", point, double=True)
    eager = _after_one_step("eager", point)
    got = _after_one_step(variant, point)
    assert len(got) == len(ref) == (2 * (point.depth + 1) + 1 if point.mode == "train" else 1)
    for i, (g, e, r) in enumerate(zip(got, eager, ref, strict=True)):
        assert g.shape == r.shape
        bound = 4 * (e - r).abs().max() + 1e-6 * r.abs().max()
        err = (g - r).abs().max()
        assert err <= bound, f"{variant} {point}: tensor {i} off by {err:.3g} (bound {bound:.3g})"


MODES_DTYPES = [(m, d) for d in grid.DTYPES for m in grid.MODES]


@pytest.mark.parametrize("mode, dtype", MODES_DTYPES, ids=[f"{m}-{d}" for m, d in MODES_DTYPES])
@pytest.mark.parametrize("variant", ["fastmlp", "compile"])
def test_every_variant_computes_what_eager_does(variant, mode, dtype):
    if dtype == "bf16" and not hardware.cpu_has_native_bf16():
        pytest.skip("bf16 is not native on this CPU (the grid skips it too)")
    torch._dynamo.reset()
    _check_same_function(variant, grid.Point(**SMALL, dtype=dtype, mode=mode))


@pytest.mark.slow
def test_max_autotune_computes_what_eager_does():
    torch._dynamo.reset()
    _check_same_function("max-autotune", grid.Point(**SMALL, dtype="fp32", mode="train"))


def test_a_failing_compile_is_recorded_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    points = grid.grid([32], [2], [8], ["fp32"], ["train"])
    (r,) = _quick_run(points, ["eager", "compile", "fastmlp"]).points
    assert set(r.ms) == {"eager", "fastmlp"}
    assert r.errors == {"compile": "RuntimeError: no C++ compiler"}
    table = grid.format_markdown(_quick_run(points, ["eager", "compile", "fastmlp"]))
    assert "| failed |" in table and "compile: RuntimeError: no C++ compiler" in table


def test_anchors_add_max_autotune_at_their_shapes_only(monkeypatch):
    modes = []

    def fake_compile(model, mode=None, **kwargs):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    points = grid.grid([32], [2], [4, 8], ["fp32"], ["no_grad"])
    at4, at8 = _quick_run(points, ["eager", "fastmlp"], anchors=["32x2x8"]).points
    assert set(at4.ms) == {"eager", "fastmlp"}
    assert set(at8.ms) == {"eager", "fastmlp", "max-autotune"}
    assert modes == ["max-autotune"]


@pytest.fixture(scope="module")
def small_result():
    points = [grid.Point(**SMALL, dtype="fp32", mode=m) for m in grid.MODES]
    points.append(grid.Point(1024, 8, 65536, "fp32", "train"))  # over the cap
    return _quick_run(points)


def test_json_round_trips(small_result):
    text = small_result.to_json()
    back = grid.GridResult.from_json(text)
    assert back == small_result
    assert back.to_json() == text
    data = json.loads(text)
    assert data["machine"]["cpu"] == hardware.cpu_info().model
    assert data["torch_version"] == torch.__version__


def test_table_is_headed_by_the_cpu_and_torch(small_result):
    table = grid.format_markdown(small_result)
    assert _cells_per_table_line(table) == {10}, table
    first = table.splitlines()[0]
    assert hardware.cpu_info().model in first and torch.__version__ in first
    assert ("native bf16" if hardware.cpu_has_native_bf16() else "bf16 not native") in first
    rows = [line for line in table.splitlines() if line.startswith("| fp32")]
    assert [row.split("|")[2].strip() for row in rows] == list(grid.MODES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # eager ms, fastmlp ms, fastmlp samples/s, vs eager, vs compile (not run: –)
        assert float(cells[5]) > 0 and float(cells[6]) > 0
        assert cells[8].endswith("x") and cells[9] == "–"


def test_cli_bench_grid_short_prints_a_table(capsys):
    assert main(["bench", "--grid", "--short", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert hardware.cpu_info().model in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.startswith("| fp32 |")]
    assert [r.split("|")[2].strip() for r in rows] == list(grid.MODES)
    assert all("| 32 | 2 | 16 |" in r for r in rows)


def test_cli_bench_grid_json_and_selection(capsys):
    argv = ["bench", "--grid", "--short", "--json", "--widths", "16,24", "--modes", "no_grad"]
    # One step at width 16 is 3.3e-5 GFLOP, at width 24 5.5e-5.
    assert main([*argv, "--dtypes", "fp32", "--max-gflop", "4e-5"]) == 0
    result = grid.GridResult.from_json(capsys.readouterr().out)
    assert [(p.width, p.mode) for p in result.points] == [(16, "no_grad"), (24, "no_grad")]
    assert result.rounds == 1 and result.max_gflop == 4e-5
    assert result.points[0].skipped is None and "over the cap" in result.points[1].skipped


def test_cli_grid_options_need_grid(capsys):
    assert main(["bench", "--widths", "32"]) == 2
    assert "--widths needs --grid" in capsys.readouterr().err
    assert main(["bench", "--grid", "--compile"]) == 2
    assert "--compile is not a --grid option" in capsys.readouterr().err
    assert main(["bench", "--grid", "--variants", "eager,jit"]) == 2
    assert "expected a comma-separated list of eager" in capsys.readouterr().err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_cli_bench_grid_with_every_point_skipped_is_one_line(capsys, json_flag):
    argv = ["bench", "--grid", "--short", "--dtypes", "fp32", "--max-gflop", "1e-9", *json_flag]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith(
        "fastmlp bench: error: no grid point to time: all 3 selected points are skipped, "
        "e.g. fp32 train width 32 depth 2 batch 16: "
    )
    assert "over the cap of 1e-09 (--max-gflop)" in lines[0]


@pytest.mark.parametrize("widths", ["32,,64", "32,", ",32", "32, ,64"])
def test_cli_grid_widths_with_an_empty_item_are_refused(capsys, widths):
    # Before: the empty item was dropped and the grid ran 32,64 without a word.
    assert main(["bench", "--grid", "--short", "--widths", widths]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comma-separated positive integers" in err[0], err

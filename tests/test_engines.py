"""The validated-engine rule of the CUDA ops (csrc/cuda/engine_rule.cpp), tested without a GPU.

The rule is host code compiled into every build: these tests ask it about GPU
generations by compute capability, with the recorded table and with filled ones.
Then the CPU path rule (csrc/cpu/paths/rule.cpp): the path and reason per shape, dtype
and phase, forcing (function, context manager, FASTMLP_CPU_PATH) and the report command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastmlp
from fastmlp import engines, hardware
from fastmlp.engines import ENGINE_PRECISIONS, engine_choice

WARNING = "no recorded GPU run has validated"
H100 = 90
# A filled table: custom for small bf16 products, cuBLASLt above, and tf32 on cuBLASLt.
TABLE = ["90 bf16 custom 8e9", "90 bf16 cublaslt inf", "90 tf32 cublaslt inf"]


@pytest.fixture(autouse=True)
def _requested_from_env(monkeypatch):
    """Each test starts from FASTMLP_CUDA_ENGINE unset (auto) and leaves it so."""
    monkeypatch.delenv("FASTMLP_CUDA_ENGINE", raising=False)
    engines.set_cuda_engine(None)
    yield
    monkeypatch.delenv("FASTMLP_CUDA_ENGINE", raising=False)
    engines.set_cuda_engine(None)


def _recorded(capability: int, precision: str) -> list[str]:
    return [e for e in engines.validated_engines() if e.split()[:2] == [str(capability), precision]]


@pytest.mark.parametrize("capability", [70, 80, 89, 90, 100])
@pytest.mark.parametrize("precision", ENGINE_PRECISIONS)
def test_auto_without_validated_entry_is_aten(capability, precision):
    if _recorded(capability, precision):
        pytest.skip("the recorded table validates an engine here")
    choice = engine_choice(capability, precision)
    assert (choice.engine, choice.reason) == ("aten", "fallback")
    assert choice.precision == precision


@pytest.mark.parametrize("precision", ENGINE_PRECISIONS)
def test_auto_with_an_empty_table_is_aten(precision):
    choice = engine_choice(H100, precision, table=[])
    assert (choice.engine, choice.reason) == ("aten", "fallback")


def test_recorded_entries_parse_and_are_used():
    for entry in engines.validated_engines():
        capability, precision, engine, max_flops = entry.split()
        choice = engine_choice(int(capability), precision, flops=1.0)
        assert choice.reason == "validated", entry
        assert choice.engine in ("custom", "cublaslt"), entry
        assert float(max_flops) > 0


def test_filled_table_picks_the_first_entry_that_fits():
    small = engine_choice(H100, "bf16", flops=1e6, table=TABLE)
    assert (small.engine, small.reason) == ("custom", "validated")
    large = engine_choice(H100, "bf16", flops=1e12, table=TABLE)
    assert (large.engine, large.reason) == ("cublaslt", "validated")
    # At exactly the crossover the first entry still applies.
    assert engine_choice(H100, "bf16", flops=8e9, table=TABLE).engine == "custom"
    # A shape fastmlp's kernels cannot take skips the custom entry.
    assert engine_choice(H100, "bf16", flops=1e6, fits_custom=False, table=TABLE).engine == (
        "cublaslt"
    )
    assert engine_choice(H100, "tf32", flops=1e6, table=TABLE).engine == "cublaslt"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_filled_table_leaves_other_precisions_on_aten(precision):
    choice = engine_choice(H100, precision, table=TABLE)
    assert (choice.engine, choice.reason) == ("aten", "fallback")


@pytest.mark.parametrize("capability", [80, 89, 100])
def test_filled_table_is_per_capability(capability):
    choice = engine_choice(capability, "bf16", flops=1e6, table=TABLE)
    assert (choice.engine, choice.reason) == ("aten", "fallback")


def test_float64_and_empty_products_are_aten_even_when_forced():
    engines.set_cuda_engine("custom")
    assert engine_choice(H100, "fp64", table=TABLE).engine == "aten"
    assert engine_choice(H100, "bf16", flops=0, table=TABLE).engine == "aten"


@pytest.mark.parametrize("forced", ["custom", "cublaslt", "aten"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_forced_engine(forced, precision):
    engines.set_cuda_engine(forced)
    choice = engine_choice(H100, precision, table=TABLE)
    assert (choice.engine, choice.reason) == (forced, "forced")


def test_forced_custom_too_large_for_our_kernels_uses_cublaslt():
    engines.set_cuda_engine("custom")
    choice = engine_choice(H100, "bf16", fits_custom=False, table=[])
    assert (choice.engine, choice.reason) == ("cublaslt", "forced")


def test_forced_unvalidated_engine_warns_once(capfd):
    engines.set_cuda_engine("custom")
    for _ in range(3):
        engine_choice(H100, "bf16", table=[])
    err = capfd.readouterr().err
    assert err.count(WARNING) == 1, err
    assert "'custom'" in err and "bf16" in err and "9.0" in err
    # Another precision or GPU generation is another warning, again once.
    for _ in range(2):
        engine_choice(H100, "fp16", table=[])
        engine_choice(80, "bf16", table=[])
    assert capfd.readouterr().err.count(WARNING) == 2
    # set_cuda_engine re-arms the warnings.
    engines.set_cuda_engine("custom")
    engine_choice(H100, "bf16", table=[])
    assert capfd.readouterr().err.count(WARNING) == 1


def test_forced_validated_or_aten_engine_does_not_warn(capfd):
    engines.set_cuda_engine("custom")
    engine_choice(H100, "bf16", flops=1e6, table=TABLE)
    engines.set_cuda_engine("aten")
    engine_choice(H100, "bf16", table=[])
    engines.set_cuda_engine(None)
    engine_choice(H100, "bf16", table=[])
    assert WARNING not in capfd.readouterr().err


def test_environment_variable_is_read_once(monkeypatch):
    monkeypatch.setenv("FASTMLP_CUDA_ENGINE", "cublaslt")
    engines.set_cuda_engine(None)
    assert engines.requested_cuda_engine() == "cublaslt"
    monkeypatch.setenv("FASTMLP_CUDA_ENGINE", "aten")
    assert engines.requested_cuda_engine() == "cublaslt"  # cached
    engines.set_cuda_engine(None)  # the documented way to re-read it
    assert engines.requested_cuda_engine() == "aten"


def test_context_manager_switches_and_restores(monkeypatch):
    monkeypatch.setenv("FASTMLP_CUDA_ENGINE", "aten")
    engines.set_cuda_engine(None)
    with engines.cuda_engine("custom"):
        assert engines.requested_cuda_engine() == "custom"
    assert engines.requested_cuda_engine() == "aten"


def test_bad_environment_value_raises_on_use(monkeypatch):
    monkeypatch.setenv("FASTMLP_CUDA_ENGINE", "fastest")
    engines.set_cuda_engine(None)
    for _ in range(2):  # not cached: every use says what is wrong
        with pytest.raises(RuntimeError, match="FASTMLP_CUDA_ENGINE must be one of.*'fastest'"):
            engine_choice(H100, "bf16")


def test_bad_names_raise():
    with pytest.raises(ValueError, match="CUDA engine must be one of"):
        engines.set_cuda_engine("fastest")
    with pytest.raises(ValueError, match="precision must be one of"):
        engine_choice(H100, "int8")
    for entry in ("90 bf16 custom", "90 bf16 custom 1e6 extra", "x bf16 custom 1"):
        with pytest.raises(RuntimeError, match="validated-engine entry reads"):
            engine_choice(H100, "bf16", table=[entry])
    with pytest.raises(RuntimeError, match="unknown engine"):
        engine_choice(H100, "bf16", table=["90 bf16 auto 1"])


def test_report_covers_every_precision():
    report = engines.cuda_engine_report(capability=(9, 0))
    assert [c.precision for c in report] == list(ENGINE_PRECISIONS)
    fp64 = report[-1]
    assert (fp64.engine, fp64.reason) == ("aten", "fallback")
    table = engines.format_report(report)
    assert table.splitlines()[0].split()[:3] == ["precision", "engine", "reason"]
    assert len(table.splitlines()) == 1 + len(ENGINE_PRECISIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_report_without_a_gpu_says_how_to_ask():
    with pytest.raises(RuntimeError, match="capability="):
        engines.cuda_engine_report()


# --- the CPU path rule (csrc/cpu/paths/rule.cpp) and its report ------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_auto():
    """The CPU path left to the rule for the test (whatever FASTMLP_CPU_PATH says)."""
    with engines.force_cpu_path("auto"):
        yield


# (widths, batch, dtype, phase, path, words of the reason)
RULE = [
    ([32, 64, 16], 4096, torch.float32, "train", "row_blocked", "narrow"),
    ([32, 64, 16], 4096, torch.float64, "backward", "row_blocked", "narrow"),
    ([32, 256, 256, 16], 1 << 20, torch.float32, "inference", "row_blocked", "narrow"),
    # float64 runs MKL's dgemm everywhere: the rule's MKL thresholds.
    ([32, 257, 16], 4095, torch.float64, "train", "layered", "wide layers (257 > 256)"),
    ([32, 257, 16], 4096, torch.float64, "train", "row_blocked", "big batch"),
    ([32, 512, 16], 1 << 16, torch.float64, "backward", "row_blocked", "big batch"),
    ([32, 513, 16], 1 << 16, torch.float64, "train", "layered", "wide layers (513 > 256)"),
    # float32 shapes whose path does not depend on brgemm being there.
    ([784, 512, 512, 10], 64, torch.float32, "backward", "layered", "wide layers"),
    ([784, 512, 512, 10], 1, torch.float32, "inference", "row_blocked", "small batch"),
    ([784, 512, 512, 10], 1, torch.float32, "train", "layered", "wide layers"),
    ([784, 512, 512, 10], 512, torch.float32, "inference", "layered", "wide layers"),
    ([784, 1025, 10], 65536, torch.float32, "inference", "layered", "wide layers"),
    ([32, 64, 16], 4096, torch.bfloat16, "train", "layered", "bfloat16"),
    ([32, 64, 16], 1, torch.float16, "inference", "layered", "float32, float64 and bfloat16"),
]


def test_cpu_rule_for_float32_follows_the_gemm_library(cpu_auto):
    # With oneDNN's brgemm the row-blocked path takes layers up to 1024 wide from 256
    # rows in training and 1024 in inference; with MKL only the narrow and big-batch
    # cases (checked in float64 above).
    fast = engines.cpu_float_gemm() == "onednn_brgemm"
    assert engines.cpu_float_gemm() in ("onednn_brgemm", "mkl_sgemm", "none")
    blocked = "row_blocked" if fast else "layered"
    tutorial = [784, 512, 512, 10]
    assert engines.cpu_path(tutorial, 256, torch.float32, "train").path == blocked
    assert engines.cpu_path(tutorial, 256, torch.float32, "backward").path == blocked
    assert engines.cpu_path(tutorial, 255, torch.float32, "train").path == "layered"
    assert engines.cpu_path(tutorial, 1024, torch.float32, "inference").path == blocked
    assert engines.cpu_path(tutorial, 1023, torch.float32, "inference").path == "layered"
    choice = engines.cpu_path([32, 1024, 1024, 16], 4096, torch.float32, "train")
    assert choice.path == blocked, choice
    if fast:
        assert "brgemm" in choice.reason, choice
    assert engines.cpu_path([32, 1025, 16], 4096, torch.float32).path == "layered"


@pytest.mark.parametrize("widths,batch,dtype,phase,path,reason", RULE)
def test_cpu_rule_picks_the_documented_path(cpu_auto, widths, batch, dtype, phase, path, reason):
    choice = engines.cpu_path(widths, batch, dtype, phase)
    assert (choice.phase, choice.path) == (phase, path), choice
    assert reason in choice.reason and choice.reason != "forced", choice


def test_cpu_report_has_every_phase(cpu_auto):
    report = engines.cpu_path_report([32, 64, 16], 4096)
    assert [c.phase for c in report] == list(engines.CPU_PHASES)
    assert all(c.path in ("layered", "row_blocked", "aten") and c.reason for c in report)


@pytest.mark.parametrize("forced", ["layered", "row_blocked", "aten"])
def test_forced_cpu_path_is_reported_as_forced(cpu_auto, forced):
    with engines.force_cpu_path(forced):
        assert engines.requested_cpu_path() == forced
        for widths, batch in (([32, 64, 16], 4096), ([784, 512, 10], 1), ([3, 1000, 3], 9999)):
            for c in engines.cpu_path_report(widths, batch, torch.float64):
                assert (c.path, c.reason) == (forced, "forced")
    assert engines.requested_cpu_path() == "auto"


def test_cpu_rule_for_bf16_follows_native_support(cpu_auto):
    # The rule keeps bf16 layered (MKL's bf16 GEMM measured slower than oneDNN's); a
    # forced row_blocked runs it where bf16 is native and raises with the reason
    # elsewhere.
    choice = engines.cpu_path([32, 64, 16], 4096, torch.bfloat16)
    assert choice.path == "layered" and "bfloat16" in choice.reason, choice
    with engines.force_cpu_path("row_blocked"):
        if hardware.cpu_has_native_bf16():
            assert engines.cpu_path([32, 64, 16], 4096, torch.bfloat16).path == "row_blocked"
        else:
            with pytest.raises(RuntimeError, match="not native"):
                engines.cpu_path([32, 64, 16], 4096, torch.bfloat16)


def test_forced_row_blocked_for_float16_raises_the_reason(cpu_auto):
    with engines.force_cpu_path("row_blocked"):
        with pytest.raises(
            RuntimeError, match="forced to row_blocked.*float32, float64 and bfloat16"
        ):
            engines.cpu_path([32, 64, 16], 4096, torch.float16)
    with engines.force_cpu_path("layered"):
        assert engines.cpu_path([32, 64, 16], 4096, torch.bfloat16).path == "layered"


def test_cpu_path_bad_arguments_raise_value_errors(cpu_auto):
    with pytest.raises(ValueError, match="CPU path must be one of auto, layered, row_blocked"):
        engines.set_cpu_path("fastest")
    with pytest.raises(ValueError, match="CPU path must be one of"), engines.force_cpu_path("rb"):
        pass
    assert engines.requested_cpu_path() == "auto"
    with pytest.raises(ValueError, match="phase must be one of train, inference, backward"):
        engines.cpu_path([3, 4], 1, phase="eval")
    for widths in ([3], [], [3, 0], [0, 3], [3, -1, 2]):
        with pytest.raises(ValueError, match="widths must list in_features"):
            engines.cpu_path(widths, 1)
    with pytest.raises(ValueError, match="batch must be >= 0"):
        engines.cpu_path([3, 4], -1)


def test_cpu_path_refuses_values_beyond_int64(cpu_auto):
    # Issue 29: pybind11's "Unable to cast Python instance of type <class 'list'>".
    big = 10**20
    with pytest.raises(ValueError, match=rf"widths must be at most 2\*\*63 - 1 .*; got {big}"):
        engines.cpu_path([3, big], 1)
    with pytest.raises(ValueError, match=rf"batch must be at most 2\*\*63 - 1 .*; got {big}"):
        engines.cpu_path([3, 4], big)
    assert engines.cpu_path([3, 2**63 - 1], 2**63 - 1).path == "layered"


def test_force_cpu_path_restores_the_previous_setting(cpu_auto):
    with engines.force_cpu_path("layered"):
        with pytest.raises(KeyError), engines.force_cpu_path("row_blocked"):
            assert engines.requested_cpu_path() == "row_blocked"
            raise KeyError("boom")
        assert engines.requested_cpu_path() == "layered"
        try:
            engines.set_cpu_path("row_blocked")  # the process's: this thread keeps its own
            assert engines.requested_cpu_path() == "layered"
        finally:
            engines.set_cpu_path(None)
    assert engines.requested_cpu_path() == "auto"  # cpu_auto's


def test_force_cpu_path_is_thread_local_and_leaves_nothing_behind():
    # The sequence: A forces row_blocked, B forces layered, A leaves, B leaves.
    # With one process-wide setting B restored A's path and left it forced for good.
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}
    errors: list[BaseException] = []

    def thread_a() -> None:
        try:
            with engines.force_cpu_path("row_blocked"):
                a_in.set()
                assert b_in.wait(10)
                seen["a"] = engines.requested_cpu_path()
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            a_out.set()

    def thread_b() -> None:
        try:
            assert a_in.wait(10)
            with engines.force_cpu_path("layered"):
                b_in.set()
                assert a_out.wait(10)
                seen["b"] = engines.requested_cpu_path()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == {"a": "row_blocked", "b": "layered"}
    process = _in_a_new_thread(engines.requested_cpu_path)
    assert engines.requested_cpu_path() == process == _env_path()
    # Nothing left forced: float16, which only the layered path runs, works everywhere.
    if process != "row_blocked":
        fastmlp.mlp(torch.randn(2, 3).half(), [torch.randn(4, 3).half()])


def test_force_cpu_path_applies_to_the_calling_thread_only(cpu_auto):
    with engines.force_cpu_path("row_blocked"):
        assert _in_a_new_thread(engines.requested_cpu_path) == _env_path()
        assert engines.requested_cpu_path() == "row_blocked"


def _in_a_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    return out[0]


def _env_path() -> str:
    """The process-wide path this test process was started with."""
    return os.environ.get("FASTMLP_CPU_PATH") or "auto"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FASTMLP_CPU_PATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # starts a Python process
def test_environment_variable_forces_the_cpu_path():
    code = (
        "import torch, fastmlp\n"
        "from fastmlp import engines\n"
        "print(engines.requested_cpu_path())\n"
        "c = engines.cpu_path([32, 2048, 16], 4096)\n"
        "print(c.path, c.reason)\n"
        "try:\n"
        "    fastmlp.mlp(torch.randn(2, 3).half(), [torch.randn(4, 3).half()])\n"
        "except RuntimeError as e:\n"
        "    print('fp16:', e)\n"
        "engines.set_cpu_path(None)\n"
        "print(engines.cpu_path([32, 2048, 16], 4096).path)\n"
    )
    run = _python(code, FASTMLP_CPU_PATH="row_blocked")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == ["row_blocked", "row_blocked forced"], run.stdout
    assert lines[2].startswith("fp16: fastmlp: the CPU path is forced to row_blocked"), run.stdout
    assert lines[3] == "layered", run.stdout  # set_cpu_path(None): the rule again


@pytest.mark.slow  # starts a Python process
def test_bad_environment_value_raises_a_clear_error_at_first_use():
    code = (
        "import torch, fastmlp\n"
        "print('imported')\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        fastmlp.mlp(torch.randn(2, 3), [torch.randn(4, 3)])\n"
        "    except RuntimeError as e:\n"
        "        print(str(e).splitlines()[0])\n"
    )
    run = _python(code, FASTMLP_CPU_PATH="fastest")
    assert run.returncode == 0, run.stderr
    want = (
        "FASTMLP_CPU_PATH: unknown CPU path 'fastest': expected auto, layered, row_blocked or aten"
    )
    lines = run.stdout.splitlines()
    assert lines[0] == "imported" and len(lines) == 3, run.stdout
    assert all(want in line for line in lines[1:]), run.stdout


@pytest.mark.slow  # starts a Python process
def test_report_command_prints_the_cpu_path():
    args = ["-m", "fastmlp.engines", "--widths", "32,64,16", "--batch", "4096"]
    environ = {k: v for k, v in os.environ.items() if k != "FASTMLP_CPU_PATH"}
    run = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "RuntimeWarning" not in run.stderr, run.stderr
    out = run.stdout
    assert "FASTMLP_CPU_PATH: auto" in out
    assert "CPU path for widths [32, 64, 16], batch 4096, float32:" in out
    rows = [line.split(maxsplit=2) for line in out.splitlines() if line.startswith("  ")]
    phases = {r[0]: r[1:] for r in rows if r and r[0] in engines.CPU_PHASES}
    assert set(phases) == set(engines.CPU_PHASES), out
    assert all(path == "row_blocked" and "narrow" in why for path, why in phases.values()), out


# Issue 29: each printed a 23-line traceback (or pybind11's cast error) after the first lines
# of the report, and "32,,64" or "6.5" were not named.
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--widths", "784"], "--widths: widths must list in_features and each layer's out"),
        (["--widths=-5,10"], "--widths: widths must list in_features and each layer's out"),
        (["--widths", "-5,10"], "--widths: widths must list in_features and each layer's out"),
        (["--widths", "784,0,10"], "got [784, 0, 10]"),
        (["--widths", "32,,64"], "--widths: expected comma-separated integers, got '32,,64'"),
        (["--widths", "32,6.5"], "--widths: expected comma-separated integers, got '32,6.5'"),
        (["--widths", "784," + "9" * 20], "--widths: widths must be at most 2**63 - 1"),
        (["--batch", "-1"], "--batch: batch must be >= 0; got -1"),
        (["--batch", "9" * 20], "--batch: batch must be at most 2**63 - 1"),
        (["--batch", "many"], "--batch: expected a number of rows (an integer >= 0), got 'many'"),
    ],
)
def test_report_command_bad_widths_and_batch_are_usage_errors(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_:
        engines._main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "", out
    assert err.startswith("usage: python -m fastmlp.engines"), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m fastmlp.engines: error: argument --") and expected in last


@pytest.mark.slow  # starts a Python process
def test_report_command_error_has_no_runpy_warning_and_no_traceback():
    # fastmlp/__init__.py imported fastmlp.engines before runpy ran it as __main__, so runpy
    # warned "found in sys.modules ... unpredictable behaviour" first.
    environ = {k: v for k, v in os.environ.items() if k != "FASTMLP_CPU_PATH"}
    run = subprocess.run(
        [sys.executable, "-m", "fastmlp.engines", "--widths", "784"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert "RuntimeWarning" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("usage: python -m fastmlp.engines"), run.stderr
    assert "error: argument --widths: widths must list in_features" in run.stderr


@pytest.mark.slow  # starts a Python process
@pytest.mark.parametrize(
    ("env", "args", "want"),
    [
        ("ROW_BLOCKED", [], "FASTMLP_CPU_PATH='ROW_BLOCKED' is not a CPU path"),
        ("row_blocked ", [], "FASTMLP_CPU_PATH='row_blocked ' is not a CPU path"),
        ("row_blocked", ["--dtype", "float16"], "the CPU path is forced to row_blocked"),
    ],
)
def test_report_command_bad_forced_path_is_one_line(env: str, args: list[str], want: str):
    run = subprocess.run(
        [sys.executable, "-m", "fastmlp.engines", *args],
        cwd=REPO,
        env={**os.environ, "FASTMLP_CPU_PATH": env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and want in lines[0], run.stderr
    assert run.stdout == ""

"""The CPU path cache on disk (fastmlp.path_cache, ``fastmlp tune``): measured choices
written once and used by later processes on the same machine; every bad case of the file
(corrupt, another format, unreadable, unwritable, concurrent writers, another torch)
ignored with one warning or refused with a clear error. Issue 31, item 2."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from fastmlp import engines, path_cache
from fastmlp.workflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
SIZES = (12, 9, 5)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache folder of the test's own; nothing measured before or after."""
    monkeypatch.setenv("FASTMLP_CACHE_DIR", str(tmp_path / "cache"))
    engines.clear_measured_cpu_paths()
    yield tmp_path / "cache"
    engines.clear_measured_cpu_paths()


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_the_cache_file_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMLP_CACHE_DIR", str(tmp_path / "a"))
    assert path_cache.cache_file() == tmp_path / "a" / "cpu_paths.json"
    monkeypatch.delenv("FASTMLP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert path_cache.cache_file() == tmp_path / "x" / "fastmlp" / "cpu_paths.json"


def test_tune_measures_each_phase_and_save_writes_them(cache_dir):
    choices = path_cache.tune(SIZES, (3, 64))
    assert [(c.phase, c.source) for c in choices] == [
        (phase, "measured") for _ in (3, 64) for phase in engines.CPU_PHASES
    ]
    assert not engines.cpu_tuning()  # the suite's setting is back
    n = path_cache.save()
    data = json.loads(path_cache.cache_file().read_text())
    assert data["format"] == path_cache.FORMAT
    mine = data["machines"][path_cache.fingerprint()]
    assert n == len(mine) == 6
    assert {e["path"] for e in mine.values()} <= {"layered", "row_blocked", "aten"}
    assert path_cache.entries_for_this_machine() == mine


def test_a_later_process_starts_from_the_cache(cache_dir):
    path_cache.tune(SIZES, (64,))
    path_cache.save()
    code = f"""
    import torch
    from fastmlp import engines
    for phase in engines.CPU_PHASES:
        c = engines.cpu_path({SIZES!r}, 64, torch.float32, phase)
        print(c.source, c.path, "|", c.reason)
    """
    env = {"FASTMLP_CACHE_DIR": str(cache_dir), "FASTMLP_CPU_TUNE": "on"}
    proc = _python(code, env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("cached ") for line in lines), lines
    assert all("fastmlp tune" in line for line in lines), lines
    # With tuning off the file is not read: the built-in rule.
    proc = _python(code, {**env, "FASTMLP_CPU_TUNE": "off"})
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("rule ") for line in proc.stdout.strip().splitlines())


@pytest.mark.parametrize(
    "content,why",
    [
        ("{not json", "it is not JSON"),
        ('{"format": 99, "machines": {}}', "not a format-1 cache (format 99)"),
        ('{"format": 1, "machines": {"m": {"k": {"path": 3}}}}', "entries are not"),
        ("[1, 2]", "not a format-1 cache (format None)"),
    ],
)
def test_an_unusable_file_is_ignored_with_one_warning_and_rewritten(cache_dir, content, why):
    cache_dir.mkdir()
    path_cache.cache_file().write_text(content)
    with pytest.warns(RuntimeWarning, match=re.escape(why)) as caught:
        assert path_cache.load() == 0
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    path_cache.tune(SIZES, (5,))
    with pytest.warns(RuntimeWarning, match="writing a new one"):
        assert path_cache.save() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert path_cache.load() == 3


def test_an_unreadable_file_is_ignored_with_a_warning(cache_dir):
    path_cache.cache_file().mkdir(parents=True)  # a folder where the file should be
    with pytest.warns(RuntimeWarning, match="cannot read it"):
        assert path_cache.load() == 0


def test_an_unknown_path_in_the_file_is_skipped_with_a_warning(cache_dir):
    cache_dir.mkdir()
    entries = {"k1": {"path": "warp_drive", "times": "x"}, "k2": {"path": "aten", "times": "y"}}
    data = {"format": 1, "machines": {path_cache.fingerprint(): entries}}
    path_cache.cache_file().write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="warp_drive"):
        assert path_cache.load() == 1


def test_an_unwritable_cache_raises_and_tune_says_so(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTMLP_CACHE_DIR", str(blocker / "cache"))  # under a file
    with pytest.raises(OSError):
        path_cache.save()
    assert main(["tune", "--sizes", "12,9,5", "--batches", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastmlp tune: error:") and "\n" == err[-1] and err.count("\n") == 1


def test_another_torch_or_isa_limit_does_not_use_the_entries(cache_dir, monkeypatch):
    path_cache.tune(SIZES, (5,))
    path_cache.save()
    mine = path_cache.fingerprint()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert path_cache.fingerprint() != mine
    assert path_cache.entries_for_this_machine() == {}
    monkeypatch.undo()
    monkeypatch.setenv("FASTMLP_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert path_cache.fingerprint() != mine and "ONEDNN_MAX_CPU_ISA=AVX2" in (
        path_cache.fingerprint()
    )


def test_other_machines_are_kept_up_to_a_bound(cache_dir, monkeypatch):
    cache_dir.mkdir()
    others = {f"machine {i}": {"k": {"path": "aten", "times": "t"}} for i in range(40)}
    data = {"format": 1, "machines": others}
    path_cache.cache_file().write_text(json.dumps(data))
    path_cache.tune(SIZES, (5,))
    path_cache.save()
    machines = json.loads(path_cache.cache_file().read_text())["machines"]
    assert len(machines) == path_cache.MAX_MACHINES
    assert next(iter(machines)) == path_cache.fingerprint()  # the latest first
    assert "machine 0" in machines


def _writer(folder: str, index: int, rounds: int) -> None:
    os.environ["FASTMLP_CACHE_DIR"] = folder
    from fastmlp import path_cache as cache

    for r in range(rounds):
        data = {"format": 1, "machines": {}}
        with cache._locked(cache.cache_file()):
            if cache.cache_file().exists():
                data = cache._read(cache.cache_file())
            data["machines"].setdefault("shared", {})[f"w{index} r{r}"] = {
                "path": "aten",
                "times": "t",
            }
            cache._write_atomically(cache.cache_file(), json.dumps(data))


def test_concurrent_writers_leave_a_whole_file_with_every_entry(cache_dir):
    cache_dir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(cache_dir), i, 25)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    data = json.loads(path_cache.cache_file().read_text())
    assert len(data["machines"]["shared"]) == 75  # the lock: no update lost
    assert not list(cache_dir.glob("*.tmp"))  # no temporary file left behind


def test_tune_command_prints_each_choice_and_show_reads_them_back(cache_dir, capsys):
    assert main(["tune", "--sizes", "12,9,5", "--batches", "3,17"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 7 and out[-1].startswith(f"wrote {path_cache.cache_file()}: 6 entries")
    assert out[0].startswith("fp32 batch  3 train")
    assert main(["tune", "--show"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"{path_cache.cache_file()}: 6 entries") and len(shown) == 7


def test_tune_refuses_bad_arguments(capsys):
    assert main(["tune", "--sizes", "12"]) == 2
    assert "at least 2 widths" in capsys.readouterr().err
    assert main(["tune", "--batches", "0"]) == 2
    assert main(["tune", "--activation", "swish"]) == 2

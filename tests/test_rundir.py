"""Output folders: one run per folder, never a silent overwrite, checked before training."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastmlp.workflow import rundir
from fastmlp.workflow.rundir import LOCK_NAME, RunDir, RunDirError, new_run_dir

# A child that claims a folder, says so, and holds it until its stdin closes.
_HOLDER = textwrap.dedent(
    """
    import sys
    from fastmlp.workflow.rundir import RunDir
    with RunDir(sys.argv[1]):
        print("HOLDING", flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.slow
def test_second_run_on_a_folder_fails_at_once_naming_the_other(tmp_path: Path) -> None:
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "HOLDING"
        with pytest.raises(RunDirError) as info:
            RunDir(out).acquire()
        message = str(info.value)
        assert "\n" not in message
        assert str(out) in message and f"pid {child.pid}" in message and "in use" in message
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=60)
    with RunDir(out):  # free again once the other run has ended
        pass


@pytest.mark.slow
def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "HOLDING"
    child.kill()
    child.wait(timeout=60)
    with RunDir(out):
        pass


def test_default_folders_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # one second
    made = [new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["20260101-000000", "20260101-000000-2", "20260101-000000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)


def test_out_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        RunDir(f).acquire()
    assert f.read_text() == "keep me"


def test_unwritable_folder_is_found_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: make the lock file's creation fail as it would
        real_open = os.open

        def refuse(path: object, *args: object, **kw: object) -> int:
            if str(path).endswith(LOCK_NAME):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(rundir.os, "open", refuse)
    try:
        with pytest.raises(RunDirError, match="is not writable"):
            RunDir(out).acquire()
    finally:
        out.chmod(0o755)


def test_earlier_results_are_refused_resumed_or_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "last.pt").write_bytes(b"old")
    with pytest.raises(RunDirError, match="already holds an earlier run.*--overwrite"):
        RunDir(out).acquire()
    assert (out / "last.pt").read_bytes() == b"old"
    with RunDir(out, resume=out / "last.pt"):  # continuing the run in it is fine
        assert (out / "last.pt").read_bytes() == b"old"
    with pytest.raises(RunDirError):  # resuming another run into it is not
        RunDir(out, resume=tmp_path / "other" / "last.pt").acquire()
    with RunDir(out, overwrite=True):
        assert not (out / "last.pt").exists() and not (out / "metrics.json").exists()


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (out / ".metrics.json.x9.tmp").write_text("{")
    (out / "notes.txt").write_text("mine")
    with RunDir(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt"]


def test_a_folder_made_for_a_run_that_wrote_nothing_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    with RunDir(out):
        assert out.is_dir()
    assert not out.exists()
    out.mkdir(parents=True)  # a folder the user made is left alone
    with RunDir(out):
        pass
    assert out.is_dir()

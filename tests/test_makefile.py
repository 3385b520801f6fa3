"""The two-command setup (Makefile): what `make train` / `make test` would run, from a fresh
clone and again afterwards (`make -n` prints the commands without running them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target: str, venv: Path, cuda: str = "0") -> list[str]:
    proc = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            "-C",
            str(ROOT),
            target,
            f"VENV={venv}",
            f"FASTMLP_CUDA={cuda}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def builds(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "--no-build-isolation -e" in ln]


@pytest.mark.parametrize("target", ["train", "test"])
def test_fresh_clone_sets_up_everything_and_builds_once(tmp_path: Path, target: str) -> None:
    lines = dry_run(target, tmp_path / "venv")
    text = "\n".join(lines)
    assert "-m venv" in text and "torch==2.14.1 torchvision==0.29.1" in text
    assert len(builds(lines)) == 1 and '".[test]"' in builds(lines)[0]
    command = "fastmlp train" if target == "train" else "-m pytest"
    assert command in lines[-1]  # setup first, then the command itself


def _set_up_venv(venv: Path, cuda: str) -> None:
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    stamp = venv / f".fastmlp-built-cuda{cuda}"
    stamp.touch()
    newest = max(p.stat().st_mtime for p in ROOT.glob("csrc/**/*") if p.is_file())
    later = max(
        newest, (ROOT / "setup.py").stat().st_mtime, (ROOT / "pyproject.toml").stat().st_mtime
    )
    os.utime(stamp, (later + 10, later + 10))


@pytest.mark.parametrize("target", ["train", "test"])
def test_second_run_reuses_the_setup(tmp_path: Path, target: str) -> None:
    venv = tmp_path / "venv"
    _set_up_venv(venv, "0")
    lines = dry_run(target, venv)
    assert not [ln for ln in lines if "pip install" in ln or "-m venv" in ln], lines


def test_switching_the_cuda_build_rebuilds(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _set_up_venv(venv, "0")
    assert len(builds(dry_run("test", venv, cuda="1"))) == 1

"""The build's own decisions (setup.py): where the CUDA toolkit is, and whether
the CUDA part is built. These run without compiling anything."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fastmlp_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines functions, builds nothing
    return module


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_cuda_home_from_environment(setup_py, tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_py.find_cuda_home() == str(home)


def test_bad_cuda_home_is_a_clear_error(setup_py, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        setup_py.find_cuda_home()
    assert "has no bin/nvcc" in capsys.readouterr().err


def test_cuda_home_through_symlinked_nvcc(setup_py, tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(home / "bin" / "nvcc", bindir / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(bindir))
    assert setup_py.find_cuda_home() == str(home)


def test_cuda_home_through_wrapper_script(setup_py, tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(bindir))
    assert setup_py.find_cuda_home() == str(home)


def test_no_toolkit(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup_py.find_cuda_home() is None


@pytest.mark.parametrize(
    "forced,torch_cuda,home,expected",
    [
        ("", "13.0", "/cuda", True),
        ("", None, "/cuda", False),
        ("", "13.0", None, False),
        ("0", "13.0", "/cuda", False),
        ("1", "13.0", "/cuda", True),
    ],
)
def test_want_cuda(setup_py, monkeypatch, forced, torch_cuda, home, expected):
    monkeypatch.setenv("FASTMLP_CUDA", forced)
    assert setup_py.want_cuda(torch_cuda, home) is expected


@pytest.mark.parametrize(
    "forced,torch_cuda,home,message",
    [
        ("1", None, "/cuda", "CPU-only build"),
        ("1", "13.0", None, "no CUDA toolkit found"),
        ("yes", "13.0", "/cuda", "must be 0 or 1"),
    ],
)
def test_impossible_cuda_request_fails_clearly(
    setup_py, monkeypatch, capsys, forced, torch_cuda, home, message
):
    monkeypatch.setenv("FASTMLP_CUDA", forced)
    with pytest.raises(SystemExit):
        setup_py.want_cuda(torch_cuda, home)
    assert message in capsys.readouterr().err


def test_cuda_sources_are_built_only_with_cuda(setup_py):
    cpu = setup_py.kernel_sources(with_cuda=False)
    cuda = setup_py.kernel_sources(with_cuda=True)
    assert "csrc/cpu/mlp_cpu.cpp" in cpu and "csrc/schemas.cpp" in cpu
    assert "csrc/cpu/paths/rule.cpp" in cpu and "csrc/aten/aten_engine.cpp" in cpu  # subfolders
    # of csrc/cuda, only the engine rule (host code, tested without a GPU)
    assert [p for p in cpu if p.startswith("csrc/cuda/")] == ["csrc/cuda/engine_rule.cpp"]
    assert {
        "csrc/cuda/gemm_kernels.cu",
        "csrc/cuda/linear_relu_cuda.cpp",
        "csrc/cuda/mlp_cuda.cpp",
    } <= set(cuda)
    assert set(cpu) < set(cuda)


def test_cmake_builds_the_same_kernel_sources_as_setup_py(setup_py):
    """Two builds, two source lists: CMakeLists.txt (the C++ tests under sanitizers)
    must compile every CPU source setup.py compiles, but the Python module glue."""
    text = (ROOT / "CMakeLists.txt").read_text()
    block = re.search(r"set\(FASTMLP_KERNEL_SOURCES\s+(.*?)\)", text, re.S)
    assert block, "CMakeLists.txt has no set(FASTMLP_KERNEL_SOURCES ...)"
    cmake = set(block.group(1).split())
    setup = set(setup_py.kernel_sources(with_cuda=False)) - {"csrc/python_module.cpp"}
    assert cmake == setup, (
        f"only in CMakeLists.txt: {sorted(cmake - setup)}; "
        f"only in setup.py: {sorted(setup - cmake)}"
    )

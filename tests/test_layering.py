"""Layering: the workflow works where the compiled extension cannot load, and a plain
``import fastmlp`` still registers the ops.

Each check runs in a fresh interpreter: this process has long loaded ``fastmlp._C``, and a
module once imported stays imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workflow_fixtures import write_fake_dataset

ROOT = Path(__file__).resolve().parents[1]

# Makes `import fastmlp._C` fail the way a missing or broken build does.
BLOCK_EXTENSION = """
import importlib.abc
import sys


class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastmlp._C":
            raise ImportError("blocked by tests/test_layering.py")
        return None


sys.meta_path.insert(0, _NoExtension())
"""

# The two layers of the flat fastmlp/ folder: every module is in exactly one
# (test_every_module_is_in_exactly_one_layer), so a new one cannot stay unclassified.
# The library: modules that need the extension. The workflow must not import them at
# module level.
LIBRARY = ("fastmlp._C", "fastmlp.ops", "fastmlp.nn", "fastmlp.optim", "fastmlp.export")
LIBRARY += ("fastmlp.engines", "fastmlp.transforms", "fastmlp.fusion", "fastmlp.apex")

# The workflow: modules that import and work where the extension cannot load ("fastmlp"
# is fastmlp/__init__.py; fastmlp.__main__ runs the command when imported).
WORKFLOW = (
    "fastmlp",
    "fastmlp.__main__",
    "fastmlp.data",
    "fastmlp.loader",
    "fastmlp.checkpoint",
    "fastmlp.rundir",
    "fastmlp.hardware",
    "fastmlp.plots",
    "fastmlp.distributed",
    "fastmlp.loops",
    "fastmlp.protocols",
    "fastmlp.config",
    "fastmlp.train",
    "fastmlp.bench",
    "fastmlp.grid",
    "fastmlp.testing",
    "fastmlp.cli",
    "fastmlp.whitening",
)

BUILD_HINT = "pip install --no-build-isolation -e ."


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -P is not on 3.10; putting the repository first on sys.path imports this checkout's
    # fastmlp whatever the working folder.
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_workflow_without_the_extension(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path / "data")
    code = (
        BLOCK_EXTENSION
        + f"""
import importlib

import fastmlp

for name in {WORKFLOW!r}:
    if name != "fastmlp.__main__":
        importlib.import_module(name)

import contextlib
import io
import runpy

sys.argv = ["fastmlp", "--help"]
try:
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_module("fastmlp.__main__", run_name="__main__")
except SystemExit as e:
    assert e.code == 0, f"python -m fastmlp --help exited with {{e.code}}"
else:
    raise AssertionError("python -m fastmlp --help did not exit")

import fastmlp.checkpoint as ckpt
import fastmlp.cli
import fastmlp.train
from fastmlp.testing import NeuralNetwork

assert fastmlp.cli.main(["--help"]) == 0
assert fastmlp.cli.main(["samples", "--data", "data", "--out", "grid.png", "--seed", "0"]) == 0
ckpt.save_checkpoint({{"model": NeuralNetwork().state_dict()}}, "model.pt")
state = ckpt.extract_state_dict(ckpt.load_checkpoint("model.pt"))
assert ckpt.sizes_from_state_dict(state) == (784, 512, 512, 10), ckpt.sizes_from_state_dict(state)
assert fastmlp.__version__

loaded = sorted(m for m in {LIBRARY!r} if m in sys.modules)
assert not loaded, f"the workflow imported the library: {{loaded}}"


def import_error(fn):
    try:
        fn()
    except ImportError as e:
        return str(e)
    raise AssertionError(f"{{fn}} did not raise ImportError")


for fn in (
    lambda: fastmlp.MLP,
    lambda: importlib.import_module("fastmlp.nn"),
    lambda: fastmlp.train.build_model(),
):
    message = import_error(fn)
    assert {BUILD_HINT!r} in message and "fastmlp._C" in message, message
print("ok")
"""
    )
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok"), proc.stdout
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_import_fastmlp_registers_the_ops(tmp_path: Path) -> None:
    # What the README's users do: `import fastmlp`, then the ops and export by their
    # torch names, with no fastmlp submodule named.
    code = """
    import torch
    import fastmlp
    from torch._decomp import decomposition_table

    x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    y = torch.ops.fastmlp.linear_relu(x, w, b)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.linear(x, w, b)))
    assert torch.ops.fastmlp.linear_relu.default in decomposition_table
    assert isinstance(fastmlp.MLP(), torch.nn.Module)
    # fastmlp.engines loads on first use (`python -m fastmlp.engines` would warn otherwise).
    import sys
    assert "fastmlp.engines" not in sys.modules
    assert fastmlp.cuda_engine_report is fastmlp.engines.cuda_engine_report
    print("ok")
    """
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout


def _module_name(path: Path) -> str:
    return "fastmlp" if path.stem == "__init__" else f"fastmlp.{path.stem}"


def test_every_module_is_in_exactly_one_layer() -> None:
    modules = {_module_name(path) for path in (ROOT / "fastmlp").glob("*.py")}
    listed = [*LIBRARY, *WORKFLOW]
    twice = sorted({name for name in listed if listed.count(name) > 1})
    assert not twice, f"in both layers, or listed twice: {twice}"
    unclassified = sorted(modules - set(listed))
    assert not unclassified, (
        f"modules in no layer: {unclassified}; add each to LIBRARY (needs the compiled "
        "extension) or WORKFLOW (works without it) in tests/test_layering.py"
    )
    gone = sorted(set(listed) - modules - {"fastmlp._C"})
    assert not gone, f"listed, but no such module in fastmlp/: {gone}"

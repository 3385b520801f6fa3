"""Layering: the workflow works where the compiled extension cannot load, and a plain
``import fastmlp`` still registers the ops.

Each check runs in a fresh interpreter: this process has long loaded ``fastmlp._C``, and a
module once imported stays imported.
"""

from __future__ import annotations

import ast
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

PACKAGE = ROOT / "fastmlp"

# The layers are the package's folders; this file is the one statement of the rule.
#
# * fastmlp/*.py, the library: the ops and what is built on them. Never imports the workflow
#   or the benchmarks.
# * fastmlp/workflow/, the Fashion-MNIST workflow, and fastmlp/bench/, the benchmarks'
#   workloads: import (and `fastmlp --help`, `fastmlp samples`, reading checkpoints work)
#   where the compiled extension cannot load. At module level they import only the library
#   modules that need no extension; the rest inside the functions that build or run a model.
# * Of the workflow, only the `fastmlp` command (workflow/cli.py, which has a `bench`
#   subcommand) imports the benchmarks. fastmlp/__main__.py (`python -m fastmlp`) runs the
#   command: it sits in the package's root folder, as Python asks, but belongs to the workflow.
LAYER_FOLDERS = ("workflow", "bench")
COMMAND = "fastmlp.workflow.cli"
MAIN = "fastmlp.__main__"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    if name == MAIN:
        return "workflow"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYER_FOLDERS else "library"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LIBRARY = sorted(n for n in MODULES if layer_of(n) == "library")
WORKFLOW = sorted(n for n in MODULES if layer_of(n) != "library")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    # `from fastmlp import nn` imports the module fastmlp.nn; `from fastmlp.nn import MLP`
    # imports fastmlp.nn (MLP is not a module).
    subs = [f"{base}.{a.name}" for a in node.names]
    return [m if m in MODULES or m == "fastmlp._C" else base for m in subs]


def imports(name: str, module_level: bool) -> set[str]:
    """The fastmlp modules that module ``name`` imports: all of them, or only those its
    import runs (not inside functions, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(m for m in _imported(node) if m.split(".")[0] == "fastmlp")
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    if module_level:
        visit(tree.body)
    else:
        found = {
            m
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for m in _imported(node)
            if m.split(".")[0] == "fastmlp"
        }
    return found - {name}


def needs_extension() -> set[str]:
    """Library modules whose import loads fastmlp._C, directly or through another module
    (``fastmlp`` itself loads it inside a try: it imports without it)."""
    needs = {"fastmlp._C"}
    grew = True
    while grew:
        grew = False
        for name in LIBRARY:
            if name != "fastmlp" and name not in needs and imports(name, True) & needs:
                needs.add(name)
                grew = True
    return needs


def test_the_library_never_imports_the_workflow_or_the_benchmarks() -> None:
    bad = {n: sorted(m for m in imports(n, False) if layer_of(m) != "library") for n in LIBRARY}
    bad = {n: ms for n, ms in bad.items() if ms}
    assert not bad, f"library modules importing fastmlp/workflow or fastmlp/bench: {bad}"


def test_workflow_and_bench_import_no_compiled_library_at_module_level() -> None:
    needs = needs_extension()
    assert {"fastmlp.ops", "fastmlp.nn", "fastmlp.optim"} <= needs  # the check sees them
    bad = {n: sorted(imports(n, True) & needs) for n in WORKFLOW}
    bad = {n: ms for n, ms in bad.items() if ms}
    assert not bad, (
        f"{bad}: these need the compiled extension; import them inside the functions that "
        "build or run a model, so the workflow works where the extension cannot load"
    )


def test_only_the_command_imports_the_benchmarks_from_the_workflow() -> None:
    bad = {
        n: sorted(m for m in imports(n, False) if layer_of(m) == "bench")
        for n in WORKFLOW
        if layer_of(n) == "workflow" and n not in (COMMAND, MAIN)
    }
    bad = {n: ms for n, ms in bad.items() if ms}
    assert not bad, f"workflow modules importing fastmlp/bench: {bad}"


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
    if name != {MAIN!r}:  # importing it runs the command (below)
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

import fastmlp.workflow.checkpoint as ckpt
import fastmlp.workflow.cli
import fastmlp.workflow.train
from fastmlp.testing import NeuralNetwork

assert fastmlp.workflow.cli.main(["--help"]) == 0
samples = ["samples", "--data", "data", "--out", "grid.png", "--seed", "0"]
assert fastmlp.workflow.cli.main(samples) == 0
ckpt.save_checkpoint({{"model": NeuralNetwork().state_dict()}}, "model.pt")
state = ckpt.extract_state_dict(ckpt.load_checkpoint("model.pt"))
assert ckpt.sizes_from_state_dict(state) == (784, 512, 512, 10), ckpt.sizes_from_state_dict(state)
assert fastmlp.__version__

loaded = sorted(m for m in {sorted(needs_extension())!r} if m in sys.modules)
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
    lambda: fastmlp.workflow.train.build_model(),
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


def test_a_pickled_fused_model_names_only_library_modules(tmp_path: Path) -> None:
    # A whole model saved with torch.save names its classes by module path. Those must be
    # library modules, which stay where they are when the workflow or the benchmarks move;
    # and the model must load and compute the same in a fresh interpreter.
    import pickletools
    import zipfile

    import torch

    import fastmlp

    torch.manual_seed(0)
    model = fastmlp.fuse(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7), torch.nn.GELU())
    )
    model.append(fastmlp.MLP(sizes=(7, 5, 3)))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # GLOBAL carries "module name"; STACK_GLOBAL takes the module from a string pushed before.
    strings = [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    named = {s.split(" ")[0] for s in strings if s.startswith("fastmlp")}
    assert "fastmlp.nn" in named, f"the check found no fastmlp class in the pickle: {named}"
    assert all(layer_of(n) == "library" and n in MODULES for n in named), named

    x = torch.randn(4, 3, 4)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    proc = run_python(
        """
        import torch, fastmlp
        model = torch.load("model.pt", weights_only=False)
        x, y = torch.load("x.pt"), torch.load("y.pt")
        assert torch.equal(model(x).detach(), y)
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout

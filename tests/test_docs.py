"""The documentation still works: every fenced code block and every relative link of
README.md and docs/*.md.

- ```python blocks run, each on its own, in a fresh folder (they are written to be quick);
- ```bash blocks: each `fastmlp ...` command (also `torchrun ... -m fastmlp ...` and
  `python -m fastmlp ...`) goes through the real argument parser, so a wrong flag or value
  fails here; `python FILE`, `python -m MODULE`, `pytest PATH` and `./script` name what
  exists; `make X` names a Makefile target, and its ARGS are checked as the command they go
  to (`make train` -> `fastmlp train`, `make test` -> pytest paths);
- a relative link points to an existing file, and an anchor to a heading of that file;
- every page of docs/ is linked from the README.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmlp.workflow import data
from fastmlp.workflow.cli import UsageError, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL = {"bash", "sh", "shell"}
UNCHECKED = {""}  # plain text: the layout listing, sample output
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"&&", "||", ";", "|"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(path: Path) -> Iterator[tuple[str, str, int]]:
    """(language, code, line of the opening fence) for each fenced block of ``path``."""
    text = path.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        yield m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1


def _blocks(languages: set[str]) -> list[pytest.param]:
    # The code is padded with the lines above it, so tracebacks give the page's line numbers.
    return [
        pytest.param(path, "\n" * line + code, id=f"{_rel(path)}:{line}")
        for path in PAGES
        for lang, code, line in code_blocks(path)
        if lang in languages
    ]


# --- shell commands ---------------------------------------------------------------


def commands(code: str) -> Iterator[list[str]]:
    """Each simple command of a shell block as its words: continuation lines joined,
    comments dropped, split at ``&&``, ``||``, ``;`` and ``|``, leading VAR=value removed."""
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in OPERATORS:
                while command and ENV_ASSIGNMENT.match(command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


def check_fastmlp(args: list[str]) -> None:
    try:
        build_parser().parse_args(args)
    except UsageError as e:
        raise AssertionError(f"`fastmlp {shlex.join(args)}`: {e}") from None


# pytest options whose value is the next word (a marker or keyword expression, a plugin).
PYTEST_OPTIONS_WITH_VALUE = {"-m", "-k", "-p", "--durations", "--benchmark-json"}


def check_pytest(args: list[str]) -> None:
    words = iter(args)
    for arg in words:
        if arg in PYTEST_OPTIONS_WITH_VALUE:
            next(words, None)
        elif not arg.startswith("-"):
            target = arg.split("::")[0]
            assert (ROOT / target).exists(), f"pytest {arg}: no such file or folder {target}"


def check_python(args: list[str]) -> None:
    if not args or args[0] == "-c":
        return  # the interpreter itself, or inline code
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module == "pytest":
            check_pytest(rest)
        elif module == "fastmlp":
            check_fastmlp(rest)
        else:
            assert importlib.util.find_spec(module) is not None, f"python -m {module}: no module"
        return
    script = args[0]
    assert (ROOT / script).is_file(), f"python {script}: no such file"


def check_make(args: list[str]) -> None:
    targets = makefile_targets()
    variables = dict(a.split("=", 1) for a in args if "=" in a)
    for target in (a for a in args if "=" not in a and not a.startswith("-")):
        assert target in targets, f"make {target}: no such target in the Makefile"
        extra = shlex.split(variables.get("ARGS", ""))
        if target == "train":
            check_fastmlp(["train", *extra])
        elif target == "test":
            check_pytest(extra)


def check_command(words: list[str]) -> None:
    program, args = words[0], words[1:]
    if program == "fastmlp" or program.endswith("/bin/fastmlp"):
        check_fastmlp(args)
    elif program == "torchrun":
        assert "-m" in args, f"{shlex.join(words)}: torchrun runs `-m fastmlp` here"
        i = args.index("-m")
        assert args[i + 1] == "fastmlp", f"{shlex.join(words)}: expected -m fastmlp"
        check_fastmlp(args[i + 2 :])
    elif re.fullmatch(r"(.*/)?python3?", program):
        check_python(args)
    elif program == "pytest":
        check_pytest(args)
    elif program == "make":
        check_make(args)
    elif "/" in program:  # a script of the repository: ./x, scripts/x.sh, .ci/run
        path = ROOT / program
        assert path.is_file(), f"{program}: no such file"
        assert os.access(path, os.X_OK), f"{program} is not executable"
    # Anything else (git, pip, cmake, apt-get, source, ...) is not ours to check.


@pytest.mark.parametrize("path, code", _blocks(SHELL))
def test_shell_block(path: Path, code: str) -> None:
    for words in commands(code):
        check_command(words)


# --- python blocks ----------------------------------------------------------------

# Blocks that need something beyond the install, and the reason.
NEEDS_ONNX = "torch.onnx.export"  # onnx and onnxscript: the [test] extra, else skipped
NEEDS_DATA = ("fit(", "load_split(")  # real Fashion-MNIST


@pytest.mark.slow
@pytest.mark.parametrize("path, code", _blocks({"python"}))
def test_python_block(path: Path, code: str, tmp_path: Path, monkeypatch) -> None:
    if NEEDS_ONNX in code:
        pytest.importorskip("onnx", reason="the ONNX export needs onnx (the [test] extra)")
        pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript")
    if any(s in code for s in NEEDS_DATA):
        try:
            data.find_data_dir(download=False)
        except data.DataNotFoundError:
            pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)  # files a block writes (mlp.onnx, runs/...) land here
    exec(compile(code, f"{path}", "exec"), {"__name__": "__docs__"})


# --- links and the set of pages ---------------------------------------------------


def _without_code(text: str) -> str:
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2``, ... for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _without_code(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


@pytest.mark.parametrize("path", PAGES, ids=_rel)
def test_links(path: Path) -> None:
    broken = []
    for target in LINK.findall(_without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(path)}: " + "; ".join(broken)


def test_every_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text()) if t}
    missing = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md links to none of {missing}"


def test_every_block_has_a_known_language() -> None:
    unknown = [
        f"{_rel(path)}:{line} ```{lang}"
        for path in PAGES
        for lang, _, line in code_blocks(path)
        if lang not in SHELL | {"python"} | UNCHECKED
    ]
    assert not unknown, f"code blocks this test does not check: {unknown}"

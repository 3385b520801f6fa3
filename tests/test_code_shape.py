"""The package's code stays readable in parts: no function in fastmlp/ runs over
MAX_LINES lines (decorators, signature and docstring included) unless it says why, with
a ``# long: <reason>`` comment inside it. Split long functions into named parts that read
top to bottom instead (as cli.build_parser does, one function per subcommand)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastmlp"
MAX_LINES = 80
MARKER = "# long:"


def long_functions(folder: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` for each function of ``folder/*.py`` over
    ``max_lines`` lines without a MARKER comment that gives the reason."""
    found = []
    for path in sorted(folder.glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            body = lines[first - 1 : node.end_lineno]
            if length > max_lines and not any(
                line.strip().startswith(MARKER) and line.strip() != MARKER for line in body
            ):
                found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_long_without_a_reason():
    long = long_functions(PACKAGE)
    assert not long, (
        f"functions over {MAX_LINES} lines: {', '.join(long)}; split them into named parts, "
        f"or say why one must stay long with a '{MARKER} <reason>' comment inside it"
    )


def test_the_check_sees_long_functions_and_their_reasons(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (tmp_path / "a.py").write_text(f"def too_long():\n{body}")
    (tmp_path / "b.py").write_text(f"def explained():\n    # long: one table\n{body}")
    (tmp_path / "c.py").write_text(f"def short():\n{body[: body.index('x1 =')]}")
    assert long_functions(tmp_path) == [f"a.py:1 too_long ({MAX_LINES + 1} lines)"]

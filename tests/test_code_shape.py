"""The package's code stays readable in parts: no function in fastmlp/ (at any depth) or
in csrc/ (C++ and CUDA) runs over MAX_LINES lines (decorators or template line, signature
and docstring included) unless it says why, with a ``# long: <reason>`` comment (Python)
or a ``// long: <reason>`` comment (C++) inside it. Split long functions into named parts
that read top to bottom instead (as cli.build_parser does, one function per subcommand)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastmlp"
CSRC = ROOT / "csrc"
MAX_LINES = 80
MARKER = "# long:"
CPP_MARKER = "// long:"
CPP_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def _explained(lines: list[str], marker: str) -> bool:
    return any(line.strip().startswith(marker) and line.strip() != marker for line in lines)


def long_functions(folder: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` for each function of ``folder/**/*.py`` over
    ``max_lines`` lines without a MARKER comment that gives the reason; ``path`` is
    relative to ``folder``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            body = lines[first - 1 : node.end_lineno]
            if length > max_lines and not _explained(body, MARKER):
                found.append(
                    f"{path.relative_to(folder).as_posix()}:{node.lineno} {node.name} "
                    f"({length} lines)"
                )
    return found


# --- C++ and CUDA: a small brace matcher, not a parser --------------------------------

# Comments, string and character literals, and preprocessor lines (with their
# continuations): blanked out, newlines kept, so that braces and parentheses in them
# do not count and line numbers stay those of the file.
_CPP_NOISE = re.compile(
    r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'|^[ \t]*#(?:[^\n]*\\\n)*[^\n]*",
    re.S | re.M,
)
# What may follow a function's parameter list before its body: qualifiers, a trailing
# return type, a constructor's initializer list.
_FUNCTION_HEAD = re.compile(
    r"\)\s*(?:const|noexcept|override|final|mutable|&&?|\s)*"
    r"(?:->\s*[^;{}]+|:\s*[^;{}]+\))?\s*$"
)
_SCOPE_HEAD = re.compile(r"^(?:template\s*<.*>\s*)?(?:namespace|extern|class|struct|union)\b", re.S)
_CONTROL = re.compile(r"^(?:if|for|while|switch|catch|do|else|return)\b")
# Before a function's name: a template line, CUDA's __launch_bounds__(...).
_NOT_NAMES = re.compile(r"^template\s*<.*?>\s*|__launch_bounds__\s*\([^)]*\)", re.S)
_NAME = re.compile(r"(~?\w+(?:\s*operator\s*[^\s(]+)?)\s*\(")


def _blank(match: re.Match[str]) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def cpp_functions(text: str) -> list[tuple[str, int, int]]:
    """``(name, first line, last line)`` of each function body found at namespace or
    class scope of C++ source ``text`` (lambdas and local classes count as part of the
    function they are in). A function starts at the first line of its head (template
    line and signature) and ends at its closing brace."""
    code = _CPP_NOISE.sub(_blank, text)
    found = []
    scopes: list[bool] = []  # per open brace: True for a namespace or class scope
    head_start = 0  # where the current declaration began (after ; { or })
    i = 0
    while i < len(code):
        c = code[i]
        if c in ";}":
            if c == "}" and scopes:
                scopes.pop()
            head_start = i + 1
        elif c == "{":
            head = code[head_start:i].strip()
            at_scope_level = all(scopes)
            if at_scope_level and _SCOPE_HEAD.match(head):
                scopes.append(True)
                head_start = i + 1
            elif at_scope_level and _FUNCTION_HEAD.search(head) and not _CONTROL.match(head):
                end = _matching_brace(code, i)
                name = _NAME.search(_NOT_NAMES.sub("", head))
                first = code.count("\n", 0, head_start + code[head_start:i].index(head[0])) + 1
                found.append((name.group(1) if name else "?", first, code.count("\n", 0, end) + 1))
                i, head_start = end, end + 1
            else:
                scopes.append(False)  # an initializer, an enum, a block: not a function
                head_start = i + 1
        i += 1
    return found


def _matching_brace(code: str, open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(code)):
        depth += {"{": 1, "}": -1}.get(code[j], 0)
        if depth == 0:
            return j
    return len(code) - 1


def long_cpp_functions(folder: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` for each C++/CUDA function of ``folder`` (at any
    depth) over ``max_lines`` lines without a CPP_MARKER comment that gives the reason."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in CPP_SUFFIXES):
        text = path.read_text()
        lines = text.splitlines()
        for name, first, last in cpp_functions(text):
            length = last - first + 1
            if length > max_lines and not _explained(lines[first - 1 : last], CPP_MARKER):
                found.append(
                    f"{path.relative_to(folder).as_posix()}:{first} {name} ({length} lines)"
                )
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
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.py").write_text(f"def nested_too_long():\n{body}")
    assert long_functions(tmp_path) == [
        f"a.py:1 too_long ({MAX_LINES + 1} lines)",
        f"sub/d.py:1 nested_too_long ({MAX_LINES + 1} lines)",
    ]


def test_no_cpp_function_is_long_without_a_reason():
    long = long_cpp_functions(CSRC)
    assert not long, (
        f"C++/CUDA functions over {MAX_LINES} lines: {', '.join(long)}; split them into "
        f"named parts, or say why one must stay long with a '{CPP_MARKER} <reason>' comment "
        "inside it"
    )


def test_the_cpp_check_sees_long_functions_and_their_reasons(tmp_path):
    body = "".join(f"  int x{i} = {i};\n" for i in range(MAX_LINES - 2))
    (tmp_path / "a.cpp").write_text(
        f"namespace n {{\ntemplate <typename T>\nint too_long(T t) {{\n{body}}}\n}}\n"
    )
    (tmp_path / "b.h").write_text(f"int explained() {{\n  // long: one table\n{body}}}\n")
    (tmp_path / "c.cu").write_text(f"int short_one() {{\n{body[: body.index('int x9 ')]}}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.cuh").write_text(
        f"struct S {{\n  void method() const {{\n{body}    int extra;\n  }}\n}};\n"
    )
    assert long_cpp_functions(tmp_path) == [
        f"a.cpp:2 too_long ({MAX_LINES + 1} lines)",
        f"sub/d.cuh:2 method ({MAX_LINES + 1} lines)",
    ]


def test_the_cpp_check_skips_braces_in_comments_strings_and_blocks():
    text = (
        "// void commented() {\n"
        "#define BLOCK(X) { X }\n"
        'const char* s = "{ not a body";\n'
        "constexpr int kTable[] = {1, 2};\n"
        "enum class E { kA, kB };\n"
        "namespace fastmlp {\n"
        "int f(int a) {\n"
        "  if (a) { return '}'; }\n"
        "  auto g = [&](int b) { return b; };\n"
        "  return g(a);\n"
        "}\n"
        "TORCH_LIBRARY(fastmlp, m) {\n"
        '  m.def("x");\n'
        "}\n"
        "}  // namespace fastmlp\n"
    )
    assert cpp_functions(text) == [("f", 7, 11), ("TORCH_LIBRARY", 12, 14)]

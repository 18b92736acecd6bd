"""The code stays easy to see: no module over 400 lines, no function over 60 lines of code.

Lines of code: non-blank lines that are not comments and not part of a docstring (a function's
signature counts). A module that must grow splits by concept; a function that needs more is
doing more than one thing. The deprecated re-export shims are ordinary modules and count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = (ROOT / "src" / "dlmoe", ROOT / "bench")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LOC = 60


def _python_files() -> list[Path]:
    return sorted(p for tree in TREES for p in tree.rglob("*.py"))


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def function_sizes(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines of code) of every function and method in `path`."""
    text = path.read_text(encoding="utf-8")
    source, tree = text.splitlines(), ast.parse(text)
    docs = _docstring_lines(tree)
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                code = [
                    i
                    for i in range(child.lineno, child.end_lineno + 1)
                    if i not in docs and source[i - 1].strip() and not source[i - 1].strip().startswith("#")
                ]
                out.append((f"{prefix}{child.name}", child.lineno, len(code)))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def test_the_checker_counts_code_not_docstrings_or_comments(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('def f(x):\n    """Doc\n    more doc."""\n    # a comment\n\n    y = x + 1\n    return y\n')
    assert function_sizes(sample) == [("f", 1, 3)]


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_size(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_MODULE_LINES}): split it"
    sizes = function_sizes(path)
    long = [f"{name} (line {line}: {loc} lines of code)" for name, line, loc in sizes if loc > MAX_FUNCTION_LOC]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LOC} lines of code: {long}"

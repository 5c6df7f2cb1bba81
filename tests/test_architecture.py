"""The layout of DESIGN.md, checked: import-linter's contracts (layers, no cycles inside a package), no
function over 80 lines outside the tests, and a docstring at the top of every module."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("platform", "deploy", "trainers", "search_spaces", "datasets")
MAX_LINES = 80


def modules() -> list[Path]:
    return sorted(
        p for package in PACKAGES for p in (REPO / package).rglob("*.py") if "sample" not in p.parts
    )


def test_import_contracts_hold():
    result = subprocess.run(
        [sys.executable, "-m", "tests.lint_imports", "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_no_function_over_80_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "build_parser":
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_every_module_says_what_it_is_for():
    missing = [
        str(path.relative_to(REPO))
        for path in modules()
        if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert not missing, "modules without a docstring: " + ", ".join(missing)

"""Runs import-linter on the contracts in pyproject.toml: `python -m tests.lint_imports` (make lint).

Not `lint-imports`: its script finds the standard library's `platform` module where our package should be.
Started from the repository root with `python -m`, the root is first on sys.path, so `platform` resolves to
this project's package (which re-exports the standard library's, DESIGN.md)."""

import sys

from importlinter.cli import lint_imports_command

if __name__ == "__main__":
    sys.exit(lint_imports_command())

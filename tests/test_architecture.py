"""The package's design, kept by contracts (pyproject's [tool.importlinter]): imports run one way down the
layers (cli -> bench -> tracking -> reports -> search -> study -> training -> moe -> data | allocation), no two
siblings import each other, and nothing below the search imports Ray or MLflow."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package at ``root`` (its own copy first on the path)."""
    import os

    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' installs import-linter")
    proc = _lint(REPO)
    assert "Contracts: 3 kept, 0 broken." in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0


def test_a_broken_layer_is_caught(tmp_path):
    """The checker is not a formality: a study module importing the search (a layer above) fails it."""
    pytest.importorskip("importlinter")
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "allocsearch", copy / "allocsearch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "allocsearch" / "study" / "ledger.py"
    bad.write_text(bad.read_text() + "\nfrom allocsearch.search import controller  # noqa: E402,F401\n")
    proc = _lint(copy)
    assert proc.returncode != 0
    assert "allocsearch.study.ledger -> allocsearch.search.controller" in proc.stdout

"""The house's dependencies flow one way: configs/refer -> data/models -> utils -> engine -> args -> tools/main."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the first-party packages it may import (besides itself)
ALLOWED = {
    "configs": set(),
    "refer": set(),
    "utils": set(),
    "models": set(),
    "data": {"refer", "models"},
    "engine": {"configs", "data", "models", "refer", "utils"},
    # args: main.py's command line, which the SLURM launcher checks before submitting (as DETR's run_with_submitit
    # uses main's parser); args itself imports configs, models and utils only
    "tools": {"args", "configs", "data", "engine", "models", "refer", "utils"},
}
FIRST_PARTY = set(ALLOWED) | {"main", "args"}


def imported_packages(path: Path) -> set[str]:
    """First-party top-level packages a file imports, wherever the import statement stands (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & FIRST_PARTY


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).glob("*.py"))
    }
    assert {k: v for k, v in bad.items() if v} == {}

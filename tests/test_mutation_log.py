"""tests/mutation_log.py, the plugin that records tests failing in mutmut's runs of the unmutated code, in a real
pytest process on a file of one passing and one failing test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(tmp_path: Path, mutant: str) -> Path:
    """Two tests run under the plugin with ``MUTANT_UNDER_TEST=mutant``; returns the failure log's path."""
    (tmp_path / "test_two.py").write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 == 2\n")
    log = tmp_path / "failures.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUTANT_UNDER_TEST": mutant, "MUTATION_FAILURE_LOG": str(log)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "tests.mutation_log", "-p", "no:cacheprovider", "test_two.py"]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "1 failed, 1 passed" in out.stdout, out.stdout + out.stderr
    return log


@pytest.mark.parametrize("run", ["stats", ""], ids=["coverage-run", "clean-run"])
def test_a_failure_on_the_unmutated_code_is_written_with_its_reason(tmp_path, run):
    lines = run_pytest(tmp_path, run).read_text().splitlines()
    assert lines[0] == f"=== test_two.py::test_fails (call, mutmut run {run!r})"
    assert "assert 1 == 2" in "\n".join(lines[1:])
    assert not any("test_passes" in line for line in lines)


def test_a_failure_under_a_mutant_is_a_kill_and_not_written(tmp_path):
    assert not run_pytest(tmp_path, "utils.losses.x_dice_loss__mutmut_9").exists()

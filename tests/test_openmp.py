"""utils.openmp: OpenMP's spin count set before torch loads libgomp, by main.py and the benchmark; the user's value
kept; recorded with the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from utils.machine import machine_info
from utils.openmp import SPIN_COUNT, set_spin_count

ROOT = Path(__file__).resolve().parents[1]

# Imports an entry point with set_spin_count spied on: was torch already loaded when it ran, and what did it leave?
_SPY = """
import os, sys
sys.path.insert(0, {root!r})
import utils.openmp
calls = []
real = utils.openmp.set_spin_count
def spy(*args, **kwargs):
    calls.append("torch" in sys.modules)
    return real(*args, **kwargs)
utils.openmp.set_spin_count = spy
import {module}
print(calls, os.environ.get("GOMP_SPINCOUNT"))
"""


def _import_entry_point(module: str, spin: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    code = textwrap.dedent(_SPY).format(root=str(ROOT), module=module)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_set_spin_count_fills_in_only_a_missing_value() -> None:
    environ: dict[str, str] = {}
    assert set_spin_count(environ) == "3000" and environ == {"GOMP_SPINCOUNT": "3000"}
    mine = {"GOMP_SPINCOUNT": "77"}
    assert set_spin_count(mine) == "77" and mine == {"GOMP_SPINCOUNT": "77"}


@pytest.mark.parametrize("module", ["main", "tools.benchmark"])
def test_entry_points_set_it_before_torch_loads(module: str) -> None:
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: set later, the value would be ignored
    assert _import_entry_point(module, None) == f"[False] {SPIN_COUNT}"
    assert _import_entry_point(module, "77") == "[False] 77"


def test_machine_info_records_the_spin_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    info = machine_info(torch.device("cpu"))
    assert info["openmp_spin_count"] == "123"
    # the fields the timing records and benchmark JSONs name the machine's native bf16 by
    assert info["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    assert info["amx"] == torch.cpu._is_amx_tile_supported()
    assert info["python"] == platform.python_version() and info["torch"] == torch.__version__
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert machine_info(torch.device("cpu"))["openmp_spin_count"] is None

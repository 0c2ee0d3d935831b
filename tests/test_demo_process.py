"""``python -m tools.demo`` as a user runs it, in a process of its own: what it writes, its log on stderr (level and
message, nothing else), a mistake as one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_demo import SIZE, make_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("demo_process"))


def demo(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.demo", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_the_command_writes_the_overlay_and_logs_level_and_message(run, tmp_path):
    long = "the " + " ".join(["big"] * 20) + " circle"  # more tokens than the model reads: a WARNING
    out = demo("--checkpoint", str(run["checkpoint"]), "--example", "0", "--text", "the red circle", "--text", long,
               "--mask_out", "m.png", "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    checkpoint, images = re.escape(str(run["checkpoint"])), re.escape(f"{run['cfg'].DATA.ROOT}{os.sep}images{os.sep}")
    expected = [
        r"INFO text encoder from .+ \(2 layers, width 16\)",
        rf"INFO loaded \d+ tensors from {checkpoint}",
        rf"INFO model of {checkpoint} on cpu, input {SIZE}x{SIZE}, float32",
        r"INFO loading dataset synthetic \(unc\) into memory\.\.\.",  # (the REFER API's own lines)
        r"INFO DONE \(t=\d+\.\d\ds\)",
        rf"INFO example 0: ({images}.+\.jpg)",
        r"WARNING expression 2: the expression has 24 tokens, more than the 12 the model reads: it reads only "
        r"'the big big big big big big big big big big'",
        r"INFO 'the red circle': \d+\.\d% of the image",
        rf"INFO {re.escape(repr(long))}: \d+\.\d% of the image",
        r"INFO overlay: overlay\.png; masks: m_0\.png, m_1\.png",
    ]
    assert len(lines) == len(expected), out.stderr
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert out.stdout == ""
    photo = np.asarray(Image.open(re.fullmatch(expected[5], lines[5])[1]).convert("RGB"))
    assert Image.open(tmp_path / "overlay.png").format == "PNG"  # (its content: tests/test_demo.py)
    for name in ("m_0.png", "m_1.png"):
        mask = np.asarray(Image.open(tmp_path / name))
        assert mask.shape == photo.shape[:2] and set(np.unique(mask)) <= {0, 255}


def test_a_mistake_is_one_line_and_writes_nothing(run, tmp_path):
    out = demo("--checkpoint", str(tmp_path / "none.pth"), "--image", "x.jpg", "--text", "a", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("python -m tools.demo: error: CheckpointError: checkpoint not found")
    assert out.stderr.count("\n") == 1 and os.listdir(tmp_path) == []

"""data/opencv.py: the data path runs OpenCV single-threaded, so that no forked DataLoader worker inherits its
thread pool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["data.synthetic", "data.transforms"])
def test_the_data_package_runs_opencv_single_threaded(module):
    """Importing the data path (the generator, or the transforms the DataLoader workers run) turns OpenCV's thread
    pool off for the process, so that no forked worker inherits it (data/opencv.py); 4 threads set before, 1 after."""
    code = (f"import cv2; cv2.setNumThreads(4); assert cv2.getNumThreads() == 4; import {module}; "
            "print(cv2.getNumThreads())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1"]


def test_only_data_opencv_imports_opencv():
    """Every module of the project takes cv2 from data.opencv (which makes it single-threaded), none imports it
    alone (tools/bench_input.py, which sets its own thread count, is the one exception)."""
    direct = sorted(
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
        if "tests" not in p.parts and any(line.strip() == "import cv2" for line in p.read_text().splitlines())
    )  # fmt: skip
    assert direct == ["data/opencv.py", "tools/bench_input.py"]

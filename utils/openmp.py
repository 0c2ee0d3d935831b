"""How long OpenMP's idle threads spin before they sleep (libgomp's ``GOMP_SPINCOUNT``), set before torch loads it.

Between two parallel operations a CPU step runs Python and small serial work for some microseconds. Threads that
sleep in that gap have to be woken for the next operation, and on the small models and images of the demo, with
thousands of operations a step, those wake-ups cost ~20-40% of the step. Threads that spin too long do the opposite
harm once another process shares the cores: they burn the time slices the other threads are waiting for (libgomp's
default, 300k spins, made a 0.3 s step take 13 s). ``SPIN_COUNT`` is measured between the two (docs/performance.md).
Nothing here imports torch: entry points call ``set_spin_count`` before they do.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["SPIN_COUNT", "set_spin_count"]

#: spins before an idle OpenMP thread sleeps (libgomp's default: 300000)
SPIN_COUNT = 3000


def set_spin_count(environ: MutableMapping[str, str] = os.environ, count: int = SPIN_COUNT) -> str:
    """``GOMP_SPINCOUNT`` = ``count`` unless the environment sets it (the user's value is kept); call before torch
    is imported: libgomp reads it when it loads. Returns the value in effect."""
    return environ.setdefault("GOMP_SPINCOUNT", str(count))

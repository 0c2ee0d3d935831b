"""Commands run as a user runs them in a terminal, for tests that stop them with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def terminal_job(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """``argv`` started as a terminal's foreground job: its own process group (``os.killpg(proc.pid, SIGINT)`` is
    Ctrl-C, reaching its helper processes too) and SIGINT at its default. A test process started with SIGINT ignored
    (a background job of a shell without job control, mutmut's test processes) would pass that on through ``exec``,
    and Python would then never turn SIGINT into KeyboardInterrupt; a handled signal is reset to its default in the
    child. Whatever is still running at the end of the block is killed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(argv, start_new_session=True, **popen)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

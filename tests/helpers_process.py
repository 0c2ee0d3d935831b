"""Processes for tests: commands run as a user runs them in a terminal (stopped with Ctrl-C), a process holding a
lock, a process that has ended, and the files of a folder to compare before and after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def start_in(stat: str) -> int:
    """The start time in clock ticks since boot that a /proc/<pid>/stat line gives: field 22, counted after the
    process's name in parentheses (written here apart from ``utils.lock``)."""
    return int(stat[stat.rindex(")") + 2 :].split(" ")[19])


def own_start() -> int:
    """This process's start time (``start_in``)."""
    return start_in(Path("/proc/self/stat").read_text())


def ended_process() -> tuple[int, int]:
    """(pid, start time) of a process that has ended. A lock naming both stays the lock of an ended process even
    where the pid is given to a new process meanwhile."""
    code = "import sys; sys.stdout.write(open('/proc/self/stat').read())"
    stat = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(stat.split(" ", 1)[0]), start_in(stat)


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


REPO = Path(__file__).resolve().parents[1]
# a process that holds the lock given as its argument until it is stopped
_HOLDER = """import sys, time
from utils.lock import RunLock
with RunLock(sys.argv[1]):
    print('locked', flush=True)
    time.sleep(600)
"""


def lock_holder(lock: Path) -> subprocess.Popen:
    """A process holding ``lock`` (``utils.lock.RunLock``) until killed; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

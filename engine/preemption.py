"""Stopping a run cleanly on request: SIGTERM / SIGUSR1 (what SLURM and torchrun send before they kill a job),
Ctrl-C (SIGINT) or ``request_checkpoint()`` set one flag; the training loop checks it at every iteration boundary,
writes ``last.pth`` and raises ``Preempted``, which ``main.py`` turns into its exit status (75, "try again later"; 130
after Ctrl-C, as a shell reports an interrupted command). A second Ctrl-C stops at once, without that checkpoint.

The handler only sets the flag (nothing else is safe inside a signal handler; the second Ctrl-C raises
KeyboardInterrupt, as Python's own handler does); all ranks agree through an all-reduce of it, so a signal that
reached one process stops them all at the same iteration.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from utils.distributed import all_reduce_sum, is_dist_avail_and_initialized

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: how the log and the stop line name each signal
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)"}
#: main.py's exit status after a stop by SIGTERM / SIGUSR1 with last.pth written: EX_TEMPFAIL ("try again later"), so
#: that a job script can requeue the same command with --resume auto
EXIT_PREEMPTED = 75
#: the exit status of a command stopped by Ctrl-C, as a shell reports one killed by SIGINT (a job script must not
#: requeue what its user stopped)
EXIT_INTERRUPTED = 128 + signal.SIGINT
_requested = threading.Event()
_reason: list[str] = []  # what set the flag, for the log


class Preempted(Exception):
    """Training stopped on request after writing ``last.pth``; the same command with ``--resume auto`` continues
    it exactly. ``path``: the checkpoint; ``epoch`` and ``iteration``: where it stopped (iterations done in epoch)."""

    def __init__(self, path: str, epoch: int, iteration: int, reason: str, interrupted: bool = False) -> None:
        super().__init__(
            f"{reason}: checkpoint {path} written at epoch {epoch}, iteration {iteration}; "
            "run the same command with --resume auto to continue exactly"
        )
        self.path, self.epoch, self.iteration = path, epoch, iteration
        self.interrupted = interrupted  # stopped by Ctrl-C in this process, not by a scheduler


def request_checkpoint() -> None:
    """Ask the training loop of this process to write ``last.pth`` at the next iteration boundary and stop
    (``Preempted``), as SIGTERM / SIGUSR1 do. For launchers that learn of a preemption otherwise (e.g. submitit)."""
    _reason[:] = ["engine.request_checkpoint()"]
    _requested.set()


def _handle(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT and _requested.is_set():
        raise KeyboardInterrupt  # Ctrl-C again while a stop is pending: the user will not wait for the checkpoint
    if not _requested.is_set():  # the first request names the stop (torchrun adds SIGTERM to a terminal's Ctrl-C)
        _reason[:] = [SIGNAL_NAMES.get(signum, signal.Signals(signum).name)]
    _requested.set()


def ignore_ctrl_c(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: Ctrl-C reaches every process of the terminal's group, and a worker that took
    it would end (PyTorch's workers end quietly on KeyboardInterrupt) while the training process still waits for its
    batches; the training process alone handles it and shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Within the block, SIGTERM, SIGUSR1 and Ctrl-C request a checkpoint and a stop instead of ending the process; the
    previous handlers come back after it. A request left from before the block is dropped."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    # a process started with Ctrl-C ignored (a job put in the background by a shell) keeps it ignored
    handled = [s for s in STOP_SIGNALS if s != signal.SIGINT or signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _handle) for s in handled}
    _requested.clear()
    _reason.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_agreed(device: torch.device) -> bool:
    """Whether any rank was asked to stop (a collective: every rank must call it at the same point)."""
    local = _requested.is_set()
    if not is_dist_avail_and_initialized():
        return local
    return bool(all_reduce_sum(torch.tensor([float(local)], device=device)).item() > 0)


def stopped_by_ctrl_c() -> bool:
    """Whether this process was asked to stop by Ctrl-C (SIGINT)."""
    return _requested.is_set() and _reason == [SIGNAL_NAMES[signal.SIGINT]]


def stop_reason() -> str:
    """What asked this process to stop (a signal's name, ``engine.request_checkpoint()``), or that another rank was."""
    return f"{_reason[0]} received" if _requested.is_set() and _reason else "another process was asked to stop"

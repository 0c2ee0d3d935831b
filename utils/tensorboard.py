"""``TensorBoardWriter``: the run's scalars as TensorBoard event files in ``<run_dir>/tensorboard`` (rank 0).

The step of every scalar is the number of optimisation steps done (epoch ``e`` ends at step ``(e + 1) x``
iterations per epoch), so that training and validation curves share one axis. Tags: ``train/<meter>`` every
``print_freq`` iterations (the mean over the iterations since the previous point: loss, lr, grad_norm,
time_per_iter), and at each epoch's end its ``metrics.jsonl`` record: ``val/mIoU``, ``val/oIoU``, ``epoch/train_loss``,
``epoch/best_oIoU``, ``epoch/epoch_time_s``... A resumed run passes the first step it logs as ``purge_step``:
TensorBoard then drops what the interrupted run had logged from that step on, which the resumed run logs again.
Disabled (``LOG.TENSORBOARD False``, ``--no_tensorboard``, ranks other than 0), every call does nothing. Where the
disk has no room for the events, one WARNING turns it off and training goes on (``metrics.jsonl`` and the
checkpoints are what a resume needs).
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import storage_error

TENSORBOARD_DIR = "tensorboard"  # beside metrics.jsonl in the run folder

logger = logging.getLogger(__name__)
_next_hook: list[Any] = []  # the threading.excepthook that _quiet_full_disk hands other errors to


def _quiet_full_disk(args: Any) -> None:
    """``threading.excepthook``: TensorBoard's writing thread ends with the error of a full disk, which its writer's
    next call raises again in the training's thread (``TensorBoardWriter`` warns there): no traceback of the thread.
    Any other error goes to the hook that was in place."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and storage_error(args.exc_value, "") is not None:
        return
    _next_hook[-1](args)


def _install_quiet_hook() -> None:
    if threading.excepthook is not _quiet_full_disk:
        _next_hook[:] = [threading.excepthook]
        threading.excepthook = _quiet_full_disk


class TensorBoardWriter:
    """A ``SummaryWriter`` on ``<run_dir>/tensorboard`` when ``enabled``, else a no-op with the same methods; a
    context manager that closes (flushes) it."""

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, purge_step: int | None = None) -> None:
        self._writer: Any = None
        if not enabled or run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # requirements.txt pins it; a partial install still trains
            logger.warning("TensorBoard logging off: %s (pip install -r requirements.txt, or --no_tensorboard)", e)
            return
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        _install_quiet_hook()  # before its thread starts: the first event may find no room
        try:
            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30, purge_step=purge_step)
        except Exception as e:
            self._turn_off(e)
            return
        atexit.register(self.close)  # a crash keeps what was logged up to it

    def _call(self, method: str, *args: Any) -> None:
        """``self._writer.<method>(*args)``; a full disk turns the writer off (``_turn_off``)."""
        try:
            getattr(self._writer, method)(*args)
        except Exception as e:
            self._turn_off(e)

    def _turn_off(self, error: Exception) -> None:
        """After ``error``: one WARNING and no more writing where the disk has no room; any other error is raised."""
        full = storage_error(error, f"TensorBoard's events in {self.log_dir}", "TensorBoard logging is off from here")
        if full is None:
            raise error
        logger.warning("%s; training goes on (its checkpoints need room too)", full)
        self._writer = None  # dropped unclosed: its thread ended with the error, which closing would raise again
        atexit.unregister(self.close)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        """``prefix + name`` = value at ``step`` for every finite number in ``values``."""
        if self._writer is None:
            return
        for name, value in values.items():
            if self._writer is not None and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._call("add_scalar", prefix + name, float(value), step)

    def epoch_record(self, step: int, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` record at ``step``: ``val_x`` as ``val/x``, anything else but ``epoch`` as
        ``epoch/<key>``; flushed, so that TensorBoard shows each epoch as soon as it ends."""
        if self._writer is None:
            return
        values = {k: v for k, v in record.items() if k != "epoch"}
        self.scalars(step, {k[4:]: v for k, v in values.items() if k.startswith("val_")}, "val/")
        self.scalars(step, {k: v for k, v in values.items() if not k.startswith("val_")}, "epoch/")
        if self._writer is not None:
            self._call("flush")

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._call("close")
            self._writer = None
            atexit.unregister(self.close)

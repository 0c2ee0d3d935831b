"""``TensorBoardWriter``: the run's scalars as TensorBoard event files in ``<run_dir>/tensorboard`` (rank 0).

The step of every scalar is the number of optimisation steps done (epoch ``e`` ends at step ``(e + 1) x``
iterations per epoch), so that training and validation curves share one axis. Tags: ``train/<meter>`` every
``print_freq`` iterations (the mean over the iterations since the previous point: loss, lr, grad_norm,
time_per_iter), and at each epoch's end its ``metrics.jsonl`` record: ``val/mIoU``, ``val/oIoU``, ``epoch/train_loss``,
``epoch/best_oIoU``, ``epoch/epoch_time_s``... A resumed run passes the first step it logs as ``purge_step``:
TensorBoard then drops what the interrupted run had logged from that step on, which the resumed run logs again.
Disabled (``LOG.TENSORBOARD False``, ``--no_tensorboard``, ranks other than 0), every call does nothing.
"""

from __future__ import annotations

import atexit
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"  # beside metrics.jsonl in the run folder

logger = logging.getLogger(__name__)


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
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30, purge_step=purge_step)
        atexit.register(self.close)  # a crash keeps what was logged up to it

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        """``prefix + name`` = value at ``step`` for every finite number in ``values``."""
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(prefix + name, float(value), step)

    def epoch_record(self, step: int, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` record at ``step``: ``val_x`` as ``val/x``, anything else but ``epoch`` as
        ``epoch/<key>``; flushed, so that TensorBoard shows each epoch as soon as it ends."""
        if self._writer is None:
            return
        values = {k: v for k, v in record.items() if k != "epoch"}
        self.scalars(step, {k[4:]: v for k, v in values.items() if k.startswith("val_")}, "val/")
        self.scalars(step, {k: v for k, v in values.items() if not k.startswith("val_")}, "epoch/")
        self._writer.flush()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            atexit.unregister(self.close)

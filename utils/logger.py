"""Logging and progress: ``setup_logging`` (console + per-run log file), ``SmoothedValue`` and ``MetricLogger``;
``RunProgress`` and ``run_eta_seconds`` for the whole run's ETA.

Only rank 0 writes to the console, the log file and the progress bar; other ranks log warnings and errors.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .atomic import storage_error
from .distributed import all_reduce_sum, is_main_process
from .tensorboard import TensorBoardWriter

LOGGER_NAME = "lavt"
# the library modules log through logging.getLogger(__name__): their records reach the same console and file
PACKAGE_LOGGERS = ("data", "models", "refer", "utils", "engine", "tools")
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write``, so log lines do not break a live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the training loop
            self.handleError(record)


class _LogFileHandler(logging.FileHandler):
    """The run's log file; where the disk has no room for a line, one line on stderr says so and the file is left
    (the console keeps every line) instead of logging's traceback for each record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        full = storage_error(sys.exc_info()[1], f"to the log file {self.baseFilename}",
                             "its lines from here on reach the console only")  # fmt: skip
        if full is None:
            return super().handleError(record)
        print(f"logging: {full}", file=sys.stderr)
        self.setLevel(logging.CRITICAL + 1)  # no more attempts


def setup_logging(log_file: str | Path | None = None, rank: int = 0) -> logging.Logger:
    """Configure the ``lavt`` logger and those of the library's packages (``data.*``, ``models.*``, ``refer.*``,
    ``utils.*``): console on every rank (INFO on rank 0, WARNING elsewhere), file on rank 0.

    Calling it again replaces the handlers (a second run in the same process logs to its own file). These loggers
    stop propagating to the root logger, so their records are written once.
    """
    fmt = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    console = _TqdmHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    handlers: list[logging.Handler] = [console]
    if log_file is not None and rank == 0:
        fh = _LogFileHandler(log_file, mode="a", encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(fh)
    closed: set[int] = set()
    for name in (LOGGER_NAME, *PACKAGE_LOGGERS):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if id(h) not in closed:  # the same handlers serve every logger: close each once
                closed.add(id(h))
                h.close()
        for h in handlers:
            logger.addHandler(h)
    return logging.getLogger(LOGGER_NAME)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class SmoothedValue:
    """A series of values: median/average over a window, global average over everything seen."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over ranks (the window stays local)."""
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


@dataclass
class RunProgress:
    """Where one epoch's iterations sit in the whole run: for its ETA and TensorBoard's step."""

    first_step: int = 0  # global iterations done before this loop's first
    iters_per_epoch: int = 0
    epochs_after: int = 0  # epochs the run still trains after this one
    epoch_extra_s: float = 0.0  # per epoch, seconds outside its iterations (validation, checkpoints), last measured
    tensorboard: TensorBoardWriter | None = None  # where ``log_every`` writes the meters (rank 0)


def run_eta_seconds(sec_per_iter: float, iters_left: int, run: RunProgress) -> float:
    """Seconds until the run's last epoch ends: ``iters_left`` in this epoch and ``run.iters_per_epoch`` in each of
    ``run.epochs_after`` epochs, at ``sec_per_iter``, plus ``run.epoch_extra_s`` for this epoch and each later one."""
    iters = iters_left + run.epochs_after * run.iters_per_epoch
    return sec_per_iter * iters + (run.epochs_after + 1) * run.epoch_extra_s


def peak_memory_note() -> str:
    """``"max mem: N MB"``, the peak CUDA memory allocated by tensors, when this process uses CUDA; else ""."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return ""
    return f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"


def _means_since(meters: dict[str, SmoothedValue], marks: dict[str, tuple[int, float]]) -> dict[str, float]:
    """Each meter's mean over the values added since its ``marks`` entry (count, total), which it then updates."""
    means = {}
    for name, m in meters.items():
        count, total = marks.get(name, (0, 0.0))
        if m.count > count:
            means[name] = (m.total - total) / (m.count - count)
        marks[name] = (m.count, m.total)
    return means


class MetricLogger:
    """Named ``SmoothedValue`` meters plus ``log_every``, a progress bar over an iterable (rank 0)."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **kwargs: float | torch.Tensor) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if not isinstance(v, float | int):
                raise TypeError(f"MetricLogger.update: {k} must be a number, got {type(v).__name__}")
            self.meters.setdefault(k, SmoothedValue()).update(float(v))

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or meter {name!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(
        self,
        iterable: Iterable[Any],
        print_freq: int,
        header: str = "",
        total: int | None = None,
        run_progress: RunProgress | None = None,
    ) -> Iterator[Any]:
        """Yield from ``iterable``; rank 0 shows a tqdm bar (meters, it/s, ETA) and logs a line every ``print_freq``.

        The log line carries the meters, the ETA of this loop (and with ``run_progress`` of the whole run), the time
        per iteration split into data and compute, and on CUDA the peak memory. With ``run_progress.tensorboard``,
        each line's meters (their means since the previous line) and time per iteration go to TensorBoard too.
        """
        logger = get_logger()
        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else None
        show = is_main_process()
        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI), the log lines remain
        bar = tqdm(total=total, desc=header, disable=None if show else True, dynamic_ncols=True, leave=False)
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        marks: dict[str, tuple[int, float]] = {n: (m.count, m.total) for n, m in self.meters.items()}
        start = end = time.time()
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            i += 1
            if show:
                bar.set_postfix_str(self._postfix(), refresh=False)
                bar.update(1)
                if print_freq > 0 and (i % print_freq == 0 or i == total):
                    left = None if total is None else iter_time.global_avg * (total - i)
                    eta = "?" if left is None else str(datetime.timedelta(seconds=int(left)))
                    if run_progress is not None and total is not None:
                        run_left = run_eta_seconds(iter_time.global_avg, total - i, run_progress)
                        eta += f" (run: {datetime.timedelta(seconds=int(run_left))})"
                    logger.info(
                        f"{header} [{i}/{total if total is not None else '?'}] eta: {eta}  {self}  "
                        f"time: {iter_time}  data: {data_time}  {peak_memory_note()}".rstrip()
                    )
                    if run_progress is not None and run_progress.tensorboard is not None:
                        means = _means_since({**self.meters, "time_per_iter": iter_time}, marks)
                        run_progress.tensorboard.scalars(run_progress.first_step + i, means, "train/")
            end = time.time()
        bar.close()
        elapsed = time.time() - start
        if show and i:
            logger.info(f"{header} total time: {datetime.timedelta(seconds=int(elapsed))} ({elapsed / i:.4f} s / it)")

    def _postfix(self) -> str:
        parts = []
        for name, meter in self.meters.items():
            v = meter.value
            parts.append(f"{name}={v:.2e}" if name == "lr" else f"{name}={v:.4f}")
        return " ".join(parts)

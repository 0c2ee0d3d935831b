"""Logging and progress: ``setup_logging`` (console + per-run log file), ``SmoothedValue`` and ``MetricLogger``.

Only rank 0 writes to the console, the log file and the progress bar; other ranks log warnings and errors.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .distributed import all_reduce_sum, is_main_process

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
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
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
        self, iterable: Iterable[Any], print_freq: int, header: str = "", total: int | None = None
    ) -> Iterator[Any]:
        """Yield from ``iterable``; rank 0 shows a tqdm bar (meters, it/s, ETA) and logs a line every ``print_freq``.

        The log line carries the meters, the ETA and the time per iteration split into data and compute.
        """
        logger = get_logger()
        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else None
        show = is_main_process()
        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI), the log lines remain
        bar = tqdm(total=total, desc=header, disable=None if show else True, dynamic_ncols=True, leave=False)
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
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
                    left = None if total is None else int(iter_time.global_avg * (total - i))
                    eta = "?" if left is None else str(datetime.timedelta(seconds=left))
                    logger.info(
                        f"{header} [{i}/{total if total is not None else '?'}] eta: {eta}  {self}  "
                        f"time: {iter_time}  data: {data_time}"
                    )
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

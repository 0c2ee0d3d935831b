"""Where a run's wall time went: contiguous laps from the process's start, so that they add up to the whole."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

__all__ = ["Lap", "Stopwatch", "format_seconds"]


@dataclass(frozen=True)
class Lap:
    """``seconds`` spent on ``name``; laps of one ``group`` ("training") are reported together."""

    name: str
    seconds: float
    group: str = ""


def format_seconds(seconds: float) -> str:
    """49 s, 16 min 40 s, 2 h 05 min: the precision a wall time is read with."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Stopwatch:
    """``lap(name)`` ends the current lap: it holds the time since the previous lap ended (or since ``start``).

    Args:
        start: when the run began, on ``clock`` (default: now); e.g. noted before the slow imports.
        clock: seconds, monotonic.
    """

    def __init__(self, start: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock() if start is None else start
        self._last = self.start
        self.laps: list[Lap] = []

    def lap(self, name: str, group: str = "") -> float:
        """End the current lap as ``name`` (in ``group``); returns its seconds."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        self.laps.append(Lap(name, seconds, group))
        return seconds

    @property
    def total(self) -> float:
        """Seconds from the start to the end of the last lap."""
        return self._last - self.start

    def summary(self) -> str:
        """"16 min 40 s: generation 49 s (5%), training 854 s (85%: epoch 0 232 s, epoch 1 622 s), ...": laps in
        order, a group's consecutive laps as one entry with its parts."""
        total = self.total or 1.0
        items = []
        for group, laps in groupby(self.laps, key=lambda lap: lap.group or id(lap)):
            laps = list(laps)
            seconds = sum(lap.seconds for lap in laps)
            share = f"{100 * seconds / total:.0f}%"
            if isinstance(group, str):
                share += ": " + ", ".join(f"{lap.name} {format_seconds(lap.seconds)}" for lap in laps)
            items.append(f"{laps[0].group or laps[0].name} {format_seconds(seconds)} ({share})")
        return f"{format_seconds(self.total)}: {', '.join(items)}"

    def as_dict(self) -> dict[str, Any]:
        """The laps as JSON: ``{"wall_s", "laps": [{"name", "seconds", "group"}]}``."""
        laps = [{**asdict(lap), "seconds": round(lap.seconds, 3)} for lap in self.laps]
        return {"wall_s": round(self.total, 3), "laps": laps}

"""Where a run's wall time went: contiguous laps from the process's start, so that they add up to the whole.

Laps are measured on the monotonic clock, which no setting of the system clock moves. A virtual machine paused by
its host (a Firecracker VM, for one) stops that clock too, and its wall clock jumps ahead when it
resumes: the seconds by which the wall clock outran the monotonic one within a lap are kept as that lap's
``paused``, so that the total is the time a person waited, as the log's timestamps and ``/usr/bin/time`` count it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

__all__ = ["Lap", "Stopwatch", "format_seconds"]


# the wall clock may run up to 500 ppm fast or slow under NTP's slewing: only a larger gap is a pause (or a jump)
PAUSE_MIN_S, SLEW = 1.0, 1e-3


@dataclass(frozen=True)
class Lap:
    """``seconds`` spent on ``name``, ``paused`` of them while the process's clock stood still; laps of one
    ``group`` ("training") are reported together."""

    name: str
    seconds: float
    group: str = ""
    paused: float = 0.0


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
        wall_clock: seconds since the epoch (the system clock), to see pauses and to date the start.
    """

    def __init__(
        self,
        start: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock, self.wall_clock = clock, wall_clock
        now, wall = clock(), wall_clock()
        self.start = now if start is None else start
        self.started_wall = wall - (now - self.start)  # the start on the system clock
        self._last, self._last_wall = self.start, self.started_wall
        self.laps: list[Lap] = []

    def lap(self, name: str, group: str = "") -> float:
        """End the current lap as ``name`` (in ``group``); returns its seconds, a pause included."""
        now, wall = self.clock(), self.wall_clock()
        counted = now - self._last
        ahead = (wall - self._last_wall) - counted  # < 0 when the system clock was set back: nothing paused
        paused = ahead if ahead > max(PAUSE_MIN_S, SLEW * counted) else 0.0
        self._last, self._last_wall = now, wall
        self.laps.append(Lap(name, counted + paused, group, paused))
        return counted + paused

    @property
    def total(self) -> float:
        """Seconds from the start to the end of the last lap, pauses included."""
        return sum(lap.seconds for lap in self.laps)

    @property
    def ended_wall(self) -> float:
        """The end of the last lap on the system clock (the start's, before any lap)."""
        return self._last_wall

    @property
    def paused(self) -> float:
        """Seconds of ``total`` during which the process's clock stood still (a paused virtual machine)."""
        return sum(lap.paused for lap in self.laps)

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
                share += ": " + ", ".join(f"{lap.name} {format_seconds(lap.seconds)}{_paused(lap, ' with')}"
                                          for lap in laps)  # fmt: skip
            else:
                share += _paused(laps[0], ",")
            items.append(f"{laps[0].group or laps[0].name} {format_seconds(seconds)} ({share})")
        return f"{format_seconds(self.total)}: {', '.join(items)}"

    def as_dict(self) -> dict[str, Any]:
        """The laps as JSON: ``{"wall_s", "paused_s", "laps": [{"name", "seconds", "group", "paused"}]}``."""
        laps = [{**asdict(lap), "seconds": round(lap.seconds, 3), "paused": round(lap.paused, 3)} for lap in self.laps]
        return {"wall_s": round(self.total, 3), "paused_s": round(self.paused, 3), "laps": laps}


def _paused(lap: Lap, joint: str) -> str:
    return f"{joint} {format_seconds(lap.paused)} paused" if lap.paused else ""

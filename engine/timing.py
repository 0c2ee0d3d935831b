"""Where a run's wall time went: the log's last line and ``<run folder>/timing.jsonl``, with the machine and the
code's version, so that a figure measured anywhere can be compared (README: the demo's table)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from utils.atomic import storage_error
from utils.distributed import DistInfo
from utils.logger import get_logger
from utils.machine import code_version, describe_machine, machine_info
from utils.stopwatch import Stopwatch

__all__ = ["TIMING_FILE", "report_timing"]

TIMING_FILE = "timing.jsonl"


def report_timing(stopwatch: Stopwatch, cfg: CfgNode, info: DistInfo, run_dir: Path, run: str) -> dict[str, Any]:
    """Log where the wall time went, with the machine, and append it to ``<run folder>/timing.jsonl`` (rank 0; one
    record per process run: a resumed training adds its own)."""
    precision = cfg.TRAIN.AMP or "float32"
    get_logger().info("wall time %s; %s, %s", stopwatch.summary(), describe_machine(info.device), precision)
    record = {
        "run": run,
        "started": _iso(stopwatch.started_wall),
        "finished": _iso(stopwatch.ended_wall),
        "code": code_version(Path(__file__).resolve().parents[1]),
        "machine": machine_info(info.device),
        "processes": info.world_size,
        "precision": precision,
        **stopwatch.as_dict(),
    }
    if info.rank == 0:
        path = run_dir / TIMING_FILE
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # the run is done: a full disk costs its timing record only
            full = storage_error(e, f"this run's line of {path}", "the run itself is complete")
            if full is None:
                raise
            os.truncate(path, size)  # no part of a line left for the readers of the file
            get_logger().warning("%s", full)
    return record


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")

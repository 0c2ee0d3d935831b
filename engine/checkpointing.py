"""What a training run writes to continue exactly, and when it is committed.

``last.pth`` holds everything a run needs to go on as if never stopped, at an epoch end or at any iteration
boundary (``TRAIN.CHECKPOINT_EVERY``, a stop request): ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``,
``config`` (``cfg.dump()``, YAML text), ``epoch`` (the last finished, 0-based, -1 for none), ``iteration``
(iterations of the next epoch done: the sampler's position), ``iters_per_epoch``, ``world_size``, ``best``, and
per process (lists indexed by rank) ``rng`` (python, numpy, torch, CUDA and the data loader generator: for a
mid-epoch checkpoint the generator as the epoch started, since the loader drew its workers' seeds from it then) and
``meters`` (the epoch's running sums of loss and gradient norm). ``history`` holds the metrics records of every
finished epoch: ``metrics.jsonl`` is rewritten from it whenever ``last.pth`` is, so the two never disagree after a
crash (a resume rewrites it again from the checkpoint it continues). ``best.pth`` holds the weights only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode

from utils.amp import NativeScaler
from utils.checkpoint import get_rng_state, remove_stale_temporaries, save_checkpoint, write_text_atomic
from utils.distributed import DistInfo, all_gather_object, barrier

LAST, BEST, METRICS = "last.pth", "best.pth", "metrics.jsonl"
# what a checkpoint must hold to be resumed from (best.pth holds weights only)
RESUME_ENTRIES = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "best", "rng", "config")


@dataclass
class Progress:
    """Where a run stands: ``epoch`` (0-based) is the one in progress or next, ``iteration`` of its iterations
    are done; ``totals`` are this process's running sums of the epoch so far (``engine.loops.train_one_epoch``)."""

    epoch: int = 0
    iteration: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"oIoU": -1.0, "mIoU": -1.0, "epoch": -1})
    history: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, tuple[int, float]] = field(default_factory=dict)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON line per finished epoch, replaced atomically."""
    write_text_atomic(run_dir / METRICS, "".join(json.dumps(record) + "\n" for record in history))


def clear_interrupted_writes(run_dir: Path) -> list[Path]:
    """Remove what writes killed before their ``os.replace`` left in ``run_dir`` (rank 0, before training)."""
    return remove_stale_temporaries(run_dir, (LAST, BEST, METRICS))


class Checkpointer:
    """Writes ``last.pth`` (and ``best.pth``, ``metrics.jsonl``) of one run; ``save`` is a collective."""

    def __init__(
        self,
        run_dir: Path,
        cfg: CfgNode,
        info: DistInfo,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: NativeScaler,
        generator: torch.Generator,
        iters_per_epoch: int,
    ) -> None:
        self.run_dir, self.cfg, self.info, self.model = run_dir, cfg, info, model
        self.optimizer, self.lr_scheduler, self.scaler, self.generator = optimizer, lr_scheduler, scaler, generator
        self.iters_per_epoch = iters_per_epoch

    def save(self, progress: Progress, epoch_generator: torch.Tensor | None = None, best: bool = False) -> Path:
        """Write ``last.pth`` at ``progress`` (every rank calls this: each one's random states are gathered), then
        ``metrics.jsonl`` from ``progress.history``; with ``best``, ``best.pth`` first.

        Args:
            epoch_generator: mid-epoch, the loader generator's state as the epoch started (its value is stored).
        """
        rng = get_rng_state(self.generator)
        if epoch_generator is not None:
            rng["generator"] = epoch_generator
        gathered = all_gather_object({"rng": rng, "meters": dict(progress.totals)})
        path = self.run_dir / LAST
        if self.info.rank == 0:
            state: dict[str, Any] = {
                "model": self.model.state_dict(),
                "epoch": progress.epoch - 1,
                "best": dict(progress.best),
                "config": self.cfg.dump(),
            }
            if best:
                save_checkpoint(state, self.run_dir / BEST)
            state.update(
                iteration=progress.iteration,
                iters_per_epoch=self.iters_per_epoch,
                world_size=self.info.world_size,
                optimizer=self.optimizer.state_dict(),
                lr_scheduler=self.lr_scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=[g["rng"] for g in gathered],
                meters=[g["meters"] for g in gathered],
                history=list(progress.history),
            )
            save_checkpoint(state, path)
            write_metrics(self.run_dir, progress.history)  # after last.pth: a crash in between is mended on resume
        barrier()  # nobody goes on (or exits) before the file is complete
        return path

"""Continuing a run: which checkpoint (``--resume``, ``--resume auto``, ``--resume PATH``), whether this run may
continue it (``plan_resume``: reads, checks, writes nothing), and putting its state back (``restore``).

A resume continues the stored configuration. A setting that differs is refused with the keys named, unless it is
applied on purpose (``--allow_change KEY ...``); then the learning-rate schedule is recomputed for the new settings
from the point reached, and the log says how this differs from an uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from yacs.config import CfgNode

from configs import architecture_keys, leaf_keys
from models import CheckpointError, load_weights, read_checkpoint
from utils.amp import NativeScaler
from utils.checkpoint import set_rng_state
from utils.distributed import DistInfo

from .checkpoint_config import (
    WORLD_SIZE,
    checkpoint_config,
    describe_differences,
    free_differences,
    resume_differences,
)
from .checkpointing import LAST, METRICS, RESUME_ENTRIES, Progress
from .optim import load_optimizer_state

logger = logging.getLogger("lavt")

AUTO, LAST_OF_RUN = "auto", "last"  # --resume auto; --resume alone


@dataclass
class ResumePlan:
    """A checkpoint this run continues: its content and the differences applied on purpose."""

    path: Path
    ckpt: dict[str, Any]
    saved: CfgNode
    changes: dict[str, tuple]  # applied on purpose (--allow_change)
    free: dict[str, tuple]  # keys a resume may change freely (configs.RESUME_FREE_KEYS)
    unused: list[str]  # --allow_change keys that do not differ (e.g. the change was applied by an earlier resume)


def resume_path(resume: str | None, pretrain: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: None (no resume, or ``auto`` without ``<run_dir>/last.pth``: a fresh start).

    ``--resume`` alone: ``--pretrain`` if given (the older form), else ``<run_dir>/last.pth``, which must exist.
    """
    if resume is None:
        return None
    if resume == AUTO:
        last = run_dir / LAST
        return last if last.is_file() else None
    if resume == LAST_OF_RUN:
        path = Path(pretrain) if pretrain else run_dir / LAST
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint to continue, {path} does not exist (to start fresh when there is none, "
                "use --resume auto)"
            )
        return path
    if pretrain:
        raise ValueError(f"--resume {resume} and --pretrain {pretrain}: name the checkpoint to continue once")
    return Path(resume)


def plan_resume(
    resume: str | None,
    pretrain: str | None,
    cfg: CfgNode,
    world_size: int,
    run_dir: Path,
    allow_change: list[str] | None = None,
) -> ResumePlan | None:
    """Read and check the checkpoint to continue; None for a fresh start. Writes nothing.

    Raises (one line each): FileNotFoundError / CheckpointError for a missing, unreadable or weights-only file;
    ValueError for a setting that differs from the stored one and is not in ``allow_change`` (all such keys named),
    for an architecture change (never possible: the weights would not fit) and for an unknown key in
    ``allow_change``.
    """
    allow = list(allow_change or [])
    unknown = [k for k in allow if k != WORLD_SIZE and k not in leaf_keys(cfg)]
    if unknown:
        raise ValueError(f"--allow_change: {', '.join(unknown)} is not a config key (nor {WORLD_SIZE})")
    path = resume_path(resume, pretrain, run_dir)
    if path is None:
        return None
    ckpt = read_checkpoint(path)
    missing = [k for k in RESUME_ENTRIES if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path}: it holds no {', '.join(missing)} (a best.pth or a released model holds "
            "weights only: start from it with --pretrain instead)"
        )
    saved = checkpoint_config(ckpt, path)
    diffs = resume_differences(saved, cfg, saved_world_size(ckpt), world_size)
    fixed = {k: v for k, v in diffs.items() if k in architecture_keys(cfg)}
    if fixed:
        raise ValueError(
            f"checkpoint {path} is of another configuration than this run: {describe_differences(fixed)}. "
            "The weights depend on these keys: a run cannot continue with other values of them."
        )
    refused = {k: v for k, v in diffs.items() if k not in allow}
    if refused:
        raise ValueError(
            f"checkpoint {path} is of another configuration than this run: {describe_differences(refused)}. "
            "A resume continues the stored configuration: drop these settings, or apply them on purpose with "
            f"--allow_change {' '.join(refused)}"
        )
    unused = [k for k in allow if k not in diffs]
    return ResumePlan(path, ckpt, saved, diffs, free_differences(saved, cfg), unused)


def saved_world_size(ckpt: dict[str, Any]) -> int:
    """The number of processes that wrote ``ckpt`` (older checkpoints: one random state per process)."""
    return int(ckpt.get("world_size", len(ckpt["rng"])))


def restore(
    plan: ResumePlan,
    cfg: CfgNode,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: NativeScaler,
    generator: torch.Generator,
    info: DistInfo,
    iters_per_epoch: int,
    run_dir: Path,
) -> Progress:
    """Put ``plan``'s states into the run's objects (``model`` without DDP); returns where to continue.

    ``iters_per_epoch`` (this run's) with TRAIN.BATCH_SIZE x processes converts the stored position when the batch
    or the number of processes changed on purpose.
    """
    ckpt, path, changes = plan.ckpt, plan.path, plan.changes
    if plan.free:
        logger.info("resume: %s (settings that leave the results alone)", describe_differences(plan.free))
    if plan.unused:
        logger.info("--allow_change %s: no difference from %s, nothing to apply", " ".join(plan.unused), path)
    load_weights(model, path, ckpt)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # this run's settings
    load_optimizer_state(optimizer, ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if "TRAIN.AMP" in changes:
        logger.info("TRAIN.AMP changed on purpose: the loss scaler starts afresh")
    else:
        scaler.load_state_dict(ckpt["scaler"])
    history = ckpt["history"] if "history" in ckpt else _history_from_file(run_dir / METRICS, ckpt["epoch"])
    progress = Progress(ckpt["epoch"] + 1, int(ckpt.get("iteration", 0)), dict(ckpt["best"]), list(history))
    same_position = True
    if changes:
        same_position = _apply_changes(plan, cfg, progress, optimizer, lr_scheduler, fresh, iters_per_epoch, info)
    if WORLD_SIZE not in changes:
        set_rng_state(ckpt["rng"][info.rank], generator)
        if same_position and progress.iteration and "meters" in ckpt:
            progress.totals = {k: (int(c), float(t)) for k, (c, t) in ckpt["meters"][info.rank].items()}
    else:
        logger.warning("the random states of the %d processes that wrote %s are not restored", len(ckpt["rng"]), path)
    if progress.iteration and not progress.totals:
        logger.info("epoch %d's training averages cover the iterations after the resume only", progress.epoch)
    where = f"epoch {progress.epoch}, iteration {progress.iteration} of {iters_per_epoch}"
    best = progress.best
    best_text = f"best oIoU {best['oIoU']:.2f}, epoch {best['epoch']}" if best["epoch"] >= 0 else "no epoch validated"
    logger.info("resumed from %s at %s (%s)", path, where, best_text)
    return progress


def _apply_changes(
    plan: ResumePlan,
    cfg: CfgNode,
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
    fresh: list[dict[str, Any]],
    iters_per_epoch: int,
    info: DistInfo,
) -> bool:
    """Apply the settings changed on purpose: this run's optimizer settings, the stored position in this run's
    iterations, the LR schedule recomputed from there. Returns whether the position stayed as stored."""
    ckpt = plan.ckpt
    old_lr = [g["lr"] for g in optimizer.param_groups]
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in settings.items() if k != "lr"})
    samples_per_step = cfg.TRAIN.BATCH_SIZE * info.world_size
    saved_ipe = int(ckpt.get("iters_per_epoch", iters_per_epoch))
    saved_sps = plan.saved.TRAIN.BATCH_SIZE * saved_world_size(ckpt)
    same_position = (saved_ipe, saved_sps) == (iters_per_epoch, samples_per_step)
    if not same_position:
        samples = progress.iteration * saved_sps  # of this epoch, over all processes
        progress.iteration = min(samples // samples_per_step, iters_per_epoch)
        if progress.iteration * samples_per_step != samples:
            logger.info(
                "the %d samples of epoch %d done are %d iterations of %d now: %d samples are seen again",
                samples, progress.epoch, progress.iteration, samples_per_step,
                samples - progress.iteration * samples_per_step,
            )  # fmt: skip
    reached = progress.epoch * iters_per_epoch + progress.iteration
    lr_scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lr_scheduler.last_epoch = reached
    for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * factor(reached)
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    total = cfg.TRAIN.EPOCHS * iters_per_epoch
    logger.warning(
        "resume applies on purpose %s; the LR schedule is recomputed for them from iteration %d (of %d): lr %.4g "
        "now where the stored run had %.4g. The iterations before followed the stored settings, so this run is "
        "not the one an uninterrupted run with the new settings would give.",
        describe_differences(plan.changes), reached, total, optimizer.param_groups[0]["lr"], old_lr[0],
    )  # fmt: skip
    return same_position


def _history_from_file(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    """Older checkpoints keep no history: the lines of ``metrics.jsonl`` up to their epoch."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_epoch = {r["epoch"]: r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] <= last_epoch}
    return [by_epoch[e] for e in sorted(by_epoch)]  # an epoch appended twice by an older resume: its last line


class EpochSampler(Sampler[int]):
    """A ``DistributedSampler`` that can start an epoch past its first ``skip`` indices (a resumed epoch), without
    loading them. The order of an epoch depends only on the seed and the epoch, so the rest is what an uninterrupted
    run would have drawn."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

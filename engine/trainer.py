"""Training orchestration: ``train`` (every epoch: train, validate, checkpoint; step checkpoints and stop
requests at iteration boundaries) and loading weights.

The step itself is ``engine.loops.train_step``; what a checkpoint holds is ``engine.checkpointing``'s, how a run
continues one ``engine.resume``'s; this file decides what runs when.
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from data import ReferDataset, build_dataset, load_refer
from models import load_weights, read_checkpoint
from refer import REFER
from utils.amp import NativeScaler, autocast
from utils.distributed import DistInfo
from utils.logger import RunProgress, get_logger
from utils.losses import build_criterion
from utils.stopwatch import Stopwatch
from utils.tensorboard import TensorBoardWriter

from .checkpoint_config import check_config
from .checkpointing import LAST, Checkpointer, Progress, clear_interrupted_writes, write_metrics
from .evaluation import eval_loader
from .loops import evaluate, low_res_iterations, train_one_epoch
from .optim import build_lr_scheduler, build_optimizer
from .preemption import Preempted, ignore_ctrl_c, stop_agreed, stop_reason, stop_signals_handled, stopped_by_ctrl_c
from .resume import EpochSampler, ResumePlan, restore
from .text_cache import TextFeatureCache


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_pretrained(model: torch.nn.Module, path: str, cfg: CfgNode) -> dict[str, Any]:
    """Load ``path`` into ``model``; a file of another architecture is reported by its config keys."""
    ckpt = read_checkpoint(path)
    check_config(ckpt, cfg, path)  # names the differing config keys, when the file has them
    load_weights(model, path, ckpt)
    return ckpt


def train(
    cfg: CfgNode,
    args: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    info: DistInfo,
    run_dir: Path,
    refer: REFER | None = None,
    resume: ResumePlan | None = None,
    stopwatch: Stopwatch | None = None,
) -> dict[str, Any]:
    """The training loop: every epoch, train, validate on val (one random expression per object), checkpoint;
    ``last.pth`` also every TRAIN.CHECKPOINT_EVERY iterations and, followed by ``Preempted``, on a stop request.

    ``refer``: the dataset's annotations if already read (``data.load_refer``), shared by both splits.
    ``resume``: the checkpoint to continue (``engine.resume.plan_resume``), or None to start fresh.
    ``stopwatch``: the run's, given a lap (group "training") for what comes before the first epoch and one per epoch.
    """
    logger = get_logger()
    datasets = _datasets(cfg, tokenizer, load_refer(cfg) if refer is None else refer)
    train_loader, sampler, generator = _train_loader(cfg, datasets["train"], info)
    iters_per_epoch = len(train_loader)
    val_loader = eval_loader(cfg, datasets["val"], info, cfg.TRAIN.BATCH_SIZE)

    # the optimizer first: its parameter groups freeze the text layers the recipe keeps, which DDP must know
    optimizer = build_optimizer(model, cfg)
    model_without_ddp = model
    lr_scheduler = build_lr_scheduler(
        optimizer, iters_per_epoch * cfg.TRAIN.EPOCHS, cfg.TRAIN.POLY_POWER, cfg.TRAIN.WARMUP_ITERS
    )
    scaler = NativeScaler(cfg.TRAIN.AMP, info.device)
    criterion = build_criterion(cfg.TRAIN.LOSS, cfg.TRAIN.CE_WEIGHTS)

    progress = Progress()
    if resume is not None:  # before DDP wraps the model: DDP broadcasts rank 0's weights, the restored ones
        progress = restore(
            resume, cfg, model_without_ddp, optimizer, lr_scheduler, scaler, generator, info, iters_per_epoch, run_dir
        )
    elif args.pretrain:
        load_pretrained(model_without_ddp, args.pretrain, cfg)
        logger.info("initialised from %s", args.pretrain)
    if info.distributed:
        if info.device.type == "cuda":  # SyncBatchNorm runs on GPUs only; on CPU DDP broadcasts rank 0's BN buffers
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    if info.rank == 0:
        for tmp in clear_interrupted_writes(run_dir):
            logger.info("removed %s, left by a write that was interrupted", tmp)
        if resume is not None:  # the records of the checkpoint continued, none more, none less
            write_metrics(run_dir, progress.history)

    cache = _cached_text_features(cfg, model_without_ddp.text_encoder, datasets, info.device)
    checkpointer = Checkpointer(
        run_dir, cfg, info, model_without_ddp, optimizer, lr_scheduler, scaler, generator, iters_per_epoch
    )
    stop = cfg.TRAIN.EPOCHS if args.stop_after is None else min(cfg.TRAIN.EPOCHS, args.stop_after)
    # rank 0's scalars; a resumed run has TensorBoard drop what the interrupted one logged past the checkpoint
    step = progress.epoch * iters_per_epoch + progress.iteration
    tensorboard = TensorBoardWriter(run_dir, cfg.LOG.TENSORBOARD and info.rank == 0, purge_step=step + 1)
    stopwatch = Stopwatch() if stopwatch is None else stopwatch
    stopwatch.lap("datasets and text features" if cache is not None else "datasets", group="training")
    extra_s = 0.0  # per epoch, the seconds outside its iterations (validation, checkpoints), as last measured
    with stop_signals_handled(), tensorboard:
        for epoch in range(progress.epoch, stop):
            tic = time.time()
            skip = progress.iteration * cfg.TRAIN.BATCH_SIZE if epoch == progress.epoch else 0
            sampler.set_epoch(epoch, skip)
            for ds in datasets.values():
                ds.set_epoch(epoch)
            epoch_generator = generator.get_state()  # the loader draws its workers' seeds from it as it starts
            low_res, size = low_res_iterations(cfg.TRAIN.LOW_RES_EPOCHS, epoch, iters_per_epoch), cfg.TRAIN.LOW_RES_SIZE
            if low_res:
                logger.info(
                    "epoch %d trains %d of its %d iterations at %dx%d (TRAIN.LOW_RES_SIZE)",
                    epoch, low_res, iters_per_epoch, size, size,
                )  # fmt: skip

            stats = train_one_epoch(
                model, criterion, optimizer, lr_scheduler, scaler, train_loader, info.device, epoch,
                amp=cfg.TRAIN.AMP, clip_grad=cfg.TRAIN.CLIP_GRAD, print_freq=args.print_freq, text_cache=cache,
                start=progress.iteration if epoch == progress.epoch else 0,
                totals=progress.totals if epoch == progress.epoch else None,
                on_boundary=partial(_at_boundary, checkpointer, progress, epoch, epoch_generator),
                run_progress=RunProgress(step, iters_per_epoch, stop - epoch - 1, extra_s, tensorboard), size=size,
                size_iters=low_res,
            )  # fmt: skip
            train_s, step = time.time() - tic, (epoch + 1) * iters_per_epoch  # the steps done: the next epoch's start
            val, _ = evaluate(
                model_without_ddp, val_loader, info.device, amp=cfg.TRAIN.AMP, header=f"Val [{epoch}]",
                text_cache=cache,
            )  # fmt: skip
            is_best = val["oIoU"] > progress.best["oIoU"]
            best = {"oIoU": val["oIoU"], "mIoU": val["mIoU"], "epoch": epoch} if is_best else progress.best
            record = {
                "epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}, "val_mIoU": val["mIoU"],
                "val_oIoU": val["oIoU"], "best_oIoU": best["oIoU"], "epoch_time_s": round(time.time() - tic, 2),
            }  # fmt: skip
            progress = Progress(epoch + 1, 0, best, [*progress.history, record])
            checkpointer.save(progress, best=is_best)
            tensorboard.epoch_record(step, record)
            extra_s = time.time() - tic - train_s
            logger.info(
                "epoch %d: loss %.4f, val (one random expression per object) mIoU %.2f oIoU %.2f%s, %.0fs",
                epoch, stats["loss"], val["mIoU"], val["oIoU"], " (best)" if is_best else "", time.time() - tic,
            )  # fmt: skip
            stopwatch.lap(_epoch_name(epoch, low_res, iters_per_epoch, size), group="training")
            if stop_agreed(info.device):
                _stop(run_dir / LAST, progress)
    finished = progress.epoch >= cfg.TRAIN.EPOCHS
    if resume is not None and progress.epoch == resume.ckpt["epoch"] + 1 and finished:
        logger.info("%s holds a finished run (%d epochs): nothing left to train", resume.path, cfg.TRAIN.EPOCHS)
    return {"best": progress.best, "model_without_ddp": model_without_ddp, "finished": finished}


def _datasets(cfg: CfgNode, tokenizer: Any, refer: REFER) -> dict[str, ReferDataset]:
    """The train split (augmented) and the per-epoch val, which takes the training form (one random expression per
    object), never augmented."""
    datasets = {
        "train": build_dataset(cfg, "train", eval_mode=False, tokenizer=tokenizer, refer=refer),
        "val": build_dataset(cfg, "val", eval_mode=False, tokenizer=tokenizer, augment=False, refer=refer),
    }
    if cfg.DATA.CACHE and cfg.DATA.WORKERS > 0:
        get_logger().warning(
            "DATA.CACHE keeps images in the process that reads them: with DATA.WORKERS %d the workers, and their "
            "caches, end with every epoch (not persistent: the datasets learn each epoch as it starts); set "
            "DATA.WORKERS 0 to use the cache",
            cfg.DATA.WORKERS,
        )
    return datasets


def _train_loader(
    cfg: CfgNode, dataset: ReferDataset, info: DistInfo
) -> tuple[DataLoader, EpochSampler, torch.Generator]:
    """This process's share of the train split in full batches, its sampler (which can skip a resumed epoch's done
    samples) and the generator the loader draws its workers' seeds from (saved in checkpoints)."""
    generator = torch.Generator().manual_seed(cfg.TRAIN.SEED + info.rank)
    sampler = EpochSampler(DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.TRAIN.SEED
    ))  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_size=cfg.TRAIN.BATCH_SIZE,
        sampler=sampler,
        num_workers=cfg.DATA.WORKERS,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        generator=generator,
        worker_init_fn=ignore_ctrl_c,
    )
    if len(loader) == 0:
        raise ValueError(
            f"train split of {cfg.DATA.DATASET} has {len(dataset)} objects: fewer than one batch of "
            f"{cfg.TRAIN.BATCH_SIZE} per process x {info.world_size} processes"
        )
    return loader, sampler, generator


def _cached_text_features(
    cfg: CfgNode, text_encoder: torch.nn.Module, datasets: dict[str, ReferDataset], device: torch.device
) -> TextFeatureCache | None:
    """With MODEL.TEXT.CACHE, every train and val expression encoded up front, in a fixed order (exact resume).
    Called after every weight load: the cache holds the features of the encoder's final weights."""
    if not cfg.MODEL.TEXT.CACHE:
        return None
    cache, tic = TextFeatureCache(), time.time()
    with autocast(cfg.TRAIN.AMP, device):
        for ds in datasets.values():
            cache.prime(text_encoder, ds.input_ids, ds.attention_masks)
    get_logger().info("text features of %d distinct expressions cached in %.1fs", len(cache), time.time() - tic)
    return cache


def _epoch_name(epoch: int, low_res: int, iters_per_epoch: int, size: int) -> str:
    """"epoch 0 at 48 px", "epoch 1 (120 iterations at 48 px)" or "epoch 2": its lap's name."""
    if not low_res:
        return f"epoch {epoch}"
    if low_res == iters_per_epoch:
        return f"epoch {epoch} at {size} px"
    return f"epoch {epoch} ({low_res} iterations at {size} px)"


def _at_boundary(
    checkpointer: Checkpointer,
    progress: Progress,
    epoch: int,
    epoch_generator: torch.Tensor,
    done: int,
    totals: dict[str, tuple[int, float]],
) -> None:
    """After iteration ``done`` of ``epoch``: checkpoint and stop if any rank was asked to; else checkpoint every
    TRAIN.CHECKPOINT_EVERY iterations (not at the epoch's end, which writes its own after validation)."""
    at = Progress(epoch, done, progress.best, progress.history, totals)
    if stop_agreed(checkpointer.info.device):
        _stop(checkpointer.save(at, epoch_generator), at)
    every, per_epoch = checkpointer.cfg.TRAIN.CHECKPOINT_EVERY, checkpointer.iters_per_epoch
    if every and (epoch * per_epoch + done) % every == 0 and done < per_epoch:
        checkpointer.save(at, epoch_generator)


def _stop(path: Path, at: Progress) -> None:
    """After the checkpoint of a stop request: say so and raise ``Preempted`` (every rank)."""
    error = Preempted(str(path), at.epoch, at.iteration, stop_reason(), interrupted=stopped_by_ctrl_c())
    get_logger().warning("stopped: %s", error)
    raise error

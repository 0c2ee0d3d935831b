"""Training orchestration: ``train`` (every epoch: train, validate, checkpoint), resuming, and loading weights.

The step itself is ``engine.loops.train_step``; this file decides what runs when and what is written.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from data import build_dataset, load_refer
from models import CheckpointError, load_weights, read_checkpoint
from refer import REFER
from utils.amp import NativeScaler, autocast
from utils.checkpoint import check_config, get_rng_state, save_checkpoint, set_rng_state
from utils.distributed import DistInfo, all_gather_object, barrier
from utils.logger import get_logger
from utils.losses import build_criterion

from .evaluation import eval_loader
from .loops import evaluate, train_one_epoch
from .optim import build_lr_scheduler, build_optimizer
from .text_cache import TextFeatureCache


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_pretrained(model: torch.nn.Module, path: str, cfg: CfgNode, resume: bool = False) -> dict[str, Any]:
    """Load ``path`` into ``model``; a file of another configuration is reported by its config keys."""
    ckpt = read_checkpoint(path)
    try:
        load_weights(model, path, ckpt)
    except CheckpointError:
        check_config(ckpt, cfg, path)  # names the differing config keys, when the file has them
        raise
    check_config(ckpt, cfg, path, resume=resume)
    return ckpt


def train(
    cfg: CfgNode,
    args: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    info: DistInfo,
    run_dir: Path,
    refer: REFER | None = None,
) -> dict[str, Any]:
    """The training loop: every epoch, train, validate on val (one random expression per object), checkpoint.
    ``refer``: the dataset's annotations if already read (``data.load_refer``), shared by both splits."""
    logger = get_logger()
    refer = load_refer(cfg) if refer is None else refer
    # the per-epoch val takes the training form (one random expression per object), never augmented
    datasets = {
        "train": build_dataset(cfg, "train", eval_mode=False, tokenizer=tokenizer, refer=refer),
        "val": build_dataset(cfg, "val", eval_mode=False, tokenizer=tokenizer, augment=False, refer=refer),
    }
    if cfg.DATA.CACHE and cfg.DATA.WORKERS > 0:
        logger.warning(
            "DATA.CACHE keeps images in the process that reads them: with DATA.WORKERS %d the workers, and their "
            "caches, end with every epoch (not persistent, so that a resumed run draws the same expressions); "
            "set DATA.WORKERS 0 to use the cache", cfg.DATA.WORKERS,
        )
    generator = torch.Generator().manual_seed(cfg.TRAIN.SEED + info.rank)
    sampler = DistributedSampler(
        datasets["train"], num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.TRAIN.SEED
    )
    train_loader = DataLoader(
        datasets["train"],
        batch_size=cfg.TRAIN.BATCH_SIZE,
        sampler=sampler,
        num_workers=cfg.DATA.WORKERS,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        generator=generator,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"train split of {cfg.DATA.DATASET} has {len(datasets['train'])} objects: fewer than one batch of "
            f"{cfg.TRAIN.BATCH_SIZE} per process x {info.world_size} processes"
        )
    val_loader = eval_loader(cfg, datasets["val"], info, cfg.TRAIN.BATCH_SIZE)

    # the optimizer first: its parameter groups freeze the text layers the recipe keeps, which DDP must know
    optimizer = build_optimizer(model, cfg)
    model_without_ddp = model
    if info.distributed:
        if info.device.type == "cuda":  # SyncBatchNorm runs on GPUs only; on CPU DDP broadcasts rank 0's BN buffers
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
        model_without_ddp = model.module
    lr_scheduler = build_lr_scheduler(
        optimizer, len(train_loader) * cfg.TRAIN.EPOCHS, cfg.TRAIN.POLY_POWER, cfg.TRAIN.WARMUP_ITERS
    )
    scaler = NativeScaler(cfg.TRAIN.AMP, info.device)
    criterion = build_criterion(cfg.TRAIN.LOSS, cfg.TRAIN.CE_WEIGHTS)

    start_epoch, best = 0, {"oIoU": -1.0, "mIoU": -1.0, "epoch": -1}
    if args.resume:
        path = args.pretrain or str(run_dir / "last.pth")
        ckpt = load_pretrained(model_without_ddp, path, cfg, resume=True)
        for key in ("optimizer", "lr_scheduler", "scaler", "epoch", "best", "rng"):
            if key not in ckpt:
                raise KeyError(f"cannot resume from {path}: it has no {key!r} entry (a best.pth holds weights only)")
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = ckpt["epoch"] + 1, dict(ckpt["best"])
        if len(ckpt["rng"]) == info.world_size:
            set_rng_state(ckpt["rng"][info.rank], generator)
        else:
            logger.warning(
                "checkpoint %s was written by %d processes, this run has %d: random states not restored, the "
                "continuation is not bit-identical",
                path,
                len(ckpt["rng"]),
                info.world_size,
            )
        logger.info("resumed from %s: epoch %d done, best oIoU %.2f", path, ckpt["epoch"], best["oIoU"])
    elif args.pretrain:
        load_pretrained(model_without_ddp, args.pretrain, cfg)
        logger.info("initialised from %s", args.pretrain)

    # built after every weight load: the cache holds the features of the encoder's final weights
    cache = TextFeatureCache() if cfg.MODEL.TEXT.CACHE else None
    if cache is not None:  # every train and val expression encoded up front, in a fixed order (exact resume)
        tic = time.time()
        with autocast(cfg.TRAIN.AMP, info.device):
            for ds in datasets.values():
                cache.prime(model_without_ddp.text_encoder, ds.input_ids, ds.attention_masks)
        logger.info("text features of %d distinct expressions cached in %.1fs", len(cache), time.time() - tic)

    stop = cfg.TRAIN.EPOCHS if args.stop_after is None else min(cfg.TRAIN.EPOCHS, args.stop_after)
    for epoch in range(start_epoch, stop):
        tic = time.time()
        sampler.set_epoch(epoch)
        stats = train_one_epoch(
            model, criterion, optimizer, lr_scheduler, scaler, train_loader, info.device, epoch,
            amp=cfg.TRAIN.AMP, clip_grad=cfg.TRAIN.CLIP_GRAD, print_freq=args.print_freq, text_cache=cache,
        )  # fmt: skip
        val, _ = evaluate(
            model_without_ddp, val_loader, info.device, amp=cfg.TRAIN.AMP, header=f"Val [{epoch}]", text_cache=cache
        )
        is_best = val["oIoU"] > best["oIoU"]
        if is_best:
            best = {"oIoU": val["oIoU"], "mIoU": val["mIoU"], "epoch": epoch}
        rng = all_gather_object(get_rng_state(generator))
        if info.rank == 0:
            state = {
                "model": model_without_ddp.state_dict(),
                "epoch": epoch,
                "best": best,
                "config": cfg.dump(),
            }
            if is_best:
                save_checkpoint(state, run_dir / "best.pth")
            state.update(
                optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(),
                scaler=scaler.state_dict(),
                rng=rng,
            )
            save_checkpoint(state, run_dir / "last.pth")
            record = {
                "epoch": epoch,
                **{f"train_{k}": v for k, v in stats.items()},
                "val_mIoU": val["mIoU"],
                "val_oIoU": val["oIoU"],
                "best_oIoU": best["oIoU"],
                "epoch_time_s": round(time.time() - tic, 2),
            }
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            logger.info(
                "epoch %d: loss %.4f, val (one random expression per object) mIoU %.2f oIoU %.2f%s, %.0fs",
                epoch, stats["loss"], val["mIoU"], val["oIoU"], " (best)" if is_best else "", time.time() - tic,
            )  # fmt: skip
        barrier()
    return {"best": best, "model_without_ddp": model_without_ddp, "finished": stop == cfg.TRAIN.EPOCHS}

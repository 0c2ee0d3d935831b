"""Train and evaluate LAVT. ``python main.py`` alone runs the built-in demo (configs/demo.yaml).

    torchrun --nproc_per_node 4 main.py --cfg_file configs/swin_base_refcoco.yaml
    torchrun --nproc_per_node 4 main.py --cfg_file ... --resume
    torchrun --nproc_per_node 4 main.py --cfg_file ... --eval --type val testA testB --pretrain <file>

Wiring only: the loops live in utils/engine.py, the network in models/, the data in data/.
Everything a run writes goes to <OUTPUT>/<MODEL_ID>/: log.txt, metrics.jsonl, last.pth, best.pth,
results_<protocol>.json and per-expression results (JSON lines).
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP (libgomp): by default its threads busy-wait ~300k spins at every barrier, and a
# CPU step gets 10-40x slower as soon as another process shares the cores (measured on 2 cores: 0.3 s -> 13 s).
# 1000 spins keeps the idle speed (within ~5%) and degrades gracefully under load; set it yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from args import config_from_args, parse_args
from data import build_dataset, collate_eval, load_refer
from data.synthetic import ensure_synthetic, synthetic_sizes
from models import CheckpointError, build_model, build_param_groups, load_weights, read_checkpoint
from models.text import load_tokenizer
from utils.amp import NativeScaler, autocast, resolve_amp
from utils.checkpoint import check_config, get_rng_state, save_checkpoint, set_rng_state
from utils.controls import ShuffledExpressions
from utils.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed_mode
from utils.engine import ShardSampler, build_lr_scheduler, evaluate, train_one_epoch
from utils.logger import get_logger, setup_logging
from utils.losses import build_criterion
from utils.metrics import format_table, results_summary


def prepare_run_dir(cfg: CfgNode, info: DistInfo) -> Path:
    """Create ``<OUTPUT>/<MODEL_ID>`` (rank 0) and make sure it is a writable folder, or say why not."""
    run_dir = Path(cfg.OUTPUT) / cfg.MODEL_ID
    if info.rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise PermissionError(
                f"output folder {run_dir} cannot be created or written ({type(e).__name__}: {e}); "
                "choose another with --output / --model_id"
            ) from e
    barrier()
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_loader(cfg: CfgNode, dataset: Any, info: DistInfo, batch_size: int, collate: Any = None) -> DataLoader:
    """Each item exactly once over all ranks (no padding), in dataset order within a rank."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        num_workers=cfg.DATA.WORKERS,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
    )


def run_evaluation(
    cfg: CfgNode, model: torch.nn.Module, tokenizer: Any, info: DistInfo, run_dir: Path, checkpoint: str
) -> list[dict[str, Any]]:
    """Evaluate ``EVAL.SPLITS`` in ``EVAL.MODE`` at ``EVAL.RESOLUTION``; rank 0 writes results and the table."""
    logger = get_logger()
    resolution = f"network {cfg.DATA.SIZE}x{cfg.DATA.SIZE}" if cfg.EVAL.RESOLUTION == "network" else "original"
    variants = [cfg.EVAL.SHUFFLE_EXPRESSIONS] + ([True] if cfg.EVAL.SHUFFLED_CONTROL else [])
    summaries = []
    refer = load_refer(cfg)
    for split in cfg.EVAL.SPLITS:
        dataset = build_dataset(cfg, split, eval_mode=True, tokenizer=tokenizer, refer=refer)
        for shuffled in dict.fromkeys(variants):
            ds = ShuffledExpressions(dataset, seed=cfg.TRAIN.SEED) if shuffled else dataset
            tag = f"{split}_{cfg.EVAL.MODE}_{cfg.EVAL.RESOLUTION}" + ("_shuffled" if shuffled else "")
            metrics, records = evaluate(
                model,
                eval_loader(cfg, ds, info, cfg.EVAL.BATCH_SIZE, collate_eval),
                info.device,
                mode=cfg.EVAL.MODE,
                resolution=cfg.EVAL.RESOLUTION,
                amp=cfg.TRAIN.AMP,
                header=f"Eval {tag}",
            )
            summary = results_summary(
                metrics,
                dataset=f"{cfg.DATA.DATASET} ({cfg.DATA.SPLIT_BY})",
                split=split + (" (expressions shuffled)" if shuffled else ""),
                protocol=cfg.EVAL.MODE,
                resolution=resolution,
                checkpoint=checkpoint,
                expressions=(
                    f"shuffled among each image's objects ({ds.left_out} objects alone in their image left out)"
                    if shuffled
                    else "as annotated"
                ),
            )
            summaries.append(summary)
            if info.rank == 0:
                with open(run_dir / f"per_expression_{tag}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
    if info.rank == 0:
        name = f"results_{cfg.EVAL.MODE}_{cfg.EVAL.RESOLUTION}.json"
        (run_dir / name).write_text(json.dumps(summaries, indent=2), encoding="utf-8")
        logger.info("results (%s):\n%s", run_dir / name, format_table(summaries))
    return summaries


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
    cfg: CfgNode, args: Any, model: torch.nn.Module, tokenizer: Any, info: DistInfo, run_dir: Path
) -> dict[str, Any]:
    """The training loop: every epoch, train, validate on val (one random expression per object), checkpoint."""
    logger = get_logger()
    refer = load_refer(cfg)  # the annotations read once for both splits
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

    # parameter groups first: they freeze the text layers the recipe keeps, which DDP must know at construction
    param_groups = build_param_groups(model, cfg.TRAIN.WEIGHT_DECAY, cfg.MODEL.TEXT.TRAIN_LAYERS)
    model_without_ddp = model
    if info.distributed:
        if info.device.type == "cuda":  # SyncBatchNorm runs on GPUs only; on CPU DDP broadcasts rank 0's BN buffers
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
        model_without_ddp = model.module
    optimizer = torch.optim.AdamW(
        param_groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY, fused=cfg.TRAIN.FUSED_ADAMW or None
    )
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

    cache = model_without_ddp.text_cache
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
            amp=cfg.TRAIN.AMP, clip_grad=cfg.TRAIN.CLIP_GRAD, print_freq=args.print_freq,
        )  # fmt: skip
        val, _ = evaluate(model_without_ddp, val_loader, info.device, amp=cfg.TRAIN.AMP, header=f"Val [{epoch}]")
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run what ``argv`` asks; returns ``{"summaries": [...], "best": ...}`` (also written to the run folder)."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    info = init_distributed_mode(args.device)
    try:
        return _run(args, cfg, info)
    finally:
        cleanup()


def _run(args: Any, cfg: CfgNode, info: DistInfo) -> dict[str, Any]:
    if args.eval and not args.pretrain:
        raise ValueError("--eval needs the weights to evaluate: --pretrain <checkpoint>")
    if not cfg.MODEL.TEXT.ENCODER:
        raise ValueError("MODEL.TEXT.ENCODER (--ck_bert) is empty: training and evaluation need the text encoder")
    run_dir = prepare_run_dir(cfg, info)
    logger = setup_logging(run_dir / "log.txt", info.rank)
    if cfg.TRAIN.AMP == "auto":
        cfg.defrost()
        cfg.TRAIN.AMP = resolve_amp(cfg.TRAIN.AMP, info.device)
        cfg.freeze()
        logger.info("TRAIN.AMP auto -> %s on %s", cfg.TRAIN.AMP or "float32", info.device)
    logger.info("run folder %s, %d process(es) on %s", run_dir, info.world_size, info.device)
    config_file = run_dir / ("config_eval.yaml" if args.eval else "config.yaml")
    if info.rank == 0:
        config_file.write_text(cfg.dump(), encoding="utf-8")
    logger.info("config: %s", config_file)
    seed_everything(cfg.TRAIN.SEED + info.rank)
    if cfg.DATA.DATASET == "synthetic":
        if info.rank == 0:
            sizes = synthetic_sizes(cfg.DATA.SYNTHETIC_IMAGES, cfg.DATA.SYNTHETIC_EVAL_IMAGES)
            ensure_synthetic(cfg.DATA.ROOT, **sizes)
        barrier()
    tokenizer = load_tokenizer(cfg.MODEL.TEXT.ENCODER)

    # a full LAVT checkpoint replaces every weight: skip loading the pretrained parts first
    model = build_model(cfg, pretrained=not (args.eval or args.resume or args.pretrain)).to(info.device)
    out: dict[str, Any] = {"run_dir": str(run_dir)}
    if args.eval:
        load_pretrained(model, args.pretrain, cfg)
        out["summaries"] = run_evaluation(cfg, model, tokenizer, info, run_dir, args.pretrain)
        return out
    result = train(cfg, args, model, tokenizer, info, run_dir)
    out["best"] = result["best"]
    if result["finished"] and cfg.EVAL.AFTER_TRAIN:
        best_path = run_dir / "best.pth"
        load_pretrained(result["model_without_ddp"], str(best_path), cfg)
        out["summaries"] = run_evaluation(cfg, result["model_without_ddp"], tokenizer, info, run_dir, str(best_path))
    return out


if __name__ == "__main__":
    main()

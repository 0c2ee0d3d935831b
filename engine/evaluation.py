"""Evaluate splits of a REFER dataset and write the results: ``run_evaluation`` (the ``--eval`` path and the
evaluation after training), and ``results_paths``, the one place that names the files it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from data import build_dataset, collate_eval, load_refer
from data.controls import ShuffledExpressions
from refer import REFER
from utils.distributed import DistInfo, ShardSampler
from utils.logger import get_logger
from utils.metrics import format_table, results_summary

from .loops import evaluate


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


def results_tag(cfg: CfgNode, split: str, shuffled: bool = False) -> str:
    """``<split>_<mode>_<resolution>[_shuffled]``: the name of one evaluation's per-expression file."""
    return f"{split}_{cfg.EVAL.MODE}_{cfg.EVAL.RESOLUTION}" + ("_shuffled" if shuffled else "")


def per_expression_path(run_dir: str | Path, tag: str) -> Path:
    """The per-expression records (JSON lines) of the evaluation ``tag`` (``results_tag``)."""
    return Path(run_dir) / f"per_expression_{tag}.jsonl"


def results_path(run_dir: str | Path, cfg: CfgNode) -> Path:
    """The summary (JSON) of every split evaluated by one run of ``run_evaluation``."""
    return Path(run_dir) / f"results_{cfg.EVAL.MODE}_{cfg.EVAL.RESOLUTION}.json"


def run_evaluation(
    cfg: CfgNode,
    model: torch.nn.Module,
    tokenizer: Any,
    info: DistInfo,
    run_dir: Path,
    checkpoint: str,
    refer: REFER | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``EVAL.SPLITS`` in ``EVAL.MODE`` at ``EVAL.RESOLUTION``; rank 0 writes results and the table.
    ``refer``: the dataset's annotations if already read (``data.load_refer``)."""
    logger = get_logger()
    resolution = f"network {cfg.DATA.SIZE}x{cfg.DATA.SIZE}" if cfg.EVAL.RESOLUTION == "network" else "original"
    variants = [cfg.EVAL.SHUFFLE_EXPRESSIONS] + ([True] if cfg.EVAL.SHUFFLED_CONTROL else [])
    summaries = []
    refer = load_refer(cfg) if refer is None else refer
    for split in cfg.EVAL.SPLITS:
        dataset = build_dataset(cfg, split, eval_mode=True, tokenizer=tokenizer, refer=refer)
        for shuffled in dict.fromkeys(variants):
            ds = ShuffledExpressions(dataset, seed=cfg.TRAIN.SEED) if shuffled else dataset
            tag = results_tag(cfg, split, shuffled)
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
                with open(per_expression_path(run_dir, tag), "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
    if info.rank == 0:
        path = results_path(run_dir, cfg)
        path.write_text(json.dumps(summaries, indent=2), encoding="utf-8")
        logger.info("results (%s):\n%s", path, format_table(summaries))
    return summaries

"""Evaluate splits of a REFER dataset and write the results: ``run_evaluation`` (the ``--eval`` path and the
evaluation after training), and ``EvalFiles``, the one place that names the files it writes.

One evaluation (``EVAL.SPLITS`` in one protocol) writes into the run folder:
- ``results_<dataset>_<splitBy>_<split+split...>_<mode>_<resolution>[_shuffled|_control].json``: the summaries;
- ``per_expression_<dataset>_<splitBy>_<split>_<mode>_<resolution>[_shuffled].jsonl`` per split (and control);
- with ``EVAL.SAVE_MASKS``: ``masks_<same tag>/<ref_id>_<sent_id>.png`` per split, the masks it scored.
``<resolution>`` is ``network<SIZE>`` or ``original``; ``_shuffled``: the expressions shuffled among each image's
objects (``EVAL.SHUFFLE_EXPRESSIONS``), ``_control``: both as annotated and shuffled (``EVAL.SHUFFLED_CONTROL``).
A file is never replaced: when any name of an evaluation is taken, all of its names get the first free number
(``-2``, ``-3``, ...), also when another evaluation takes it while this one writes (``utils.atomic.staged`` with
``replace=False``: this one then takes the next). The files appear complete or not at all (temporary files renamed
into place), the results file last: once it exists, its per-expression files and mask folders are complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from data import build_dataset, collate_eval, load_refer
from data.controls import ShuffledExpressions
from refer import REFER
from utils.amp import autocast
from utils.atomic import new_folders, staged
from utils.distributed import DistInfo, ShardSampler, all_gather_object
from utils.logger import get_logger
from utils.metrics import format_table, results_summary

from .eval_masks import MaskWriter, remove_abandoned, staging_folder
from .loops import evaluate, unwrap
from .text_cache import TextFeatureCache


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


def resolution_name(cfg: CfgNode) -> str:
    """``network<SIZE>`` (the network's input, where the official protocol scores) or ``original``."""
    return f"network{cfg.DATA.SIZE}" if cfg.EVAL.RESOLUTION == "network" else "original"


def results_tag(cfg: CfgNode, split: str, shuffled: bool) -> str:
    """``<dataset>_<splitBy>_<split>_<mode>_<resolution>[_shuffled]``: one split's evaluation (no number)."""
    base = f"{cfg.DATA.DATASET}_{cfg.DATA.SPLIT_BY}_{split}_{cfg.EVAL.MODE}_{resolution_name(cfg)}"
    return base + ("_shuffled" if shuffled else "")


def variants(cfg: CfgNode) -> list[bool]:
    """Whether each scoring of a split has its expressions shuffled: as annotated, shuffled, or both (control)."""
    return list(dict.fromkeys([cfg.EVAL.SHUFFLE_EXPRESSIONS] + ([True] if cfg.EVAL.SHUFFLED_CONTROL else [])))


@dataclass
class EvalFiles:
    """The names of one evaluation's files in ``run_dir``; ``number`` > 1 is appended to each (``-<number>``)."""

    run_dir: Path
    cfg: CfgNode
    number: int = 1

    def _suffix(self) -> str:
        return f"-{self.number}" if self.number > 1 else ""

    def results(self) -> Path:
        c = self.cfg
        shuffled = "_shuffled" if variants(c) == [True] else "_control" if len(variants(c)) > 1 else ""
        splits = "+".join(c.EVAL.SPLITS)
        name = f"results_{c.DATA.DATASET}_{c.DATA.SPLIT_BY}_{splits}_{c.EVAL.MODE}_{resolution_name(c)}{shuffled}"
        return self.run_dir / f"{name}{self._suffix()}.json"

    def per_expression(self, split: str, shuffled: bool = False) -> Path:
        return self.run_dir / f"per_expression_{results_tag(self.cfg, split, shuffled)}{self._suffix()}.jsonl"

    def masks(self, split: str, shuffled: bool = False) -> Path:
        return self.run_dir / f"masks_{results_tag(self.cfg, split, shuffled)}{self._suffix()}"

    def all(self) -> list[Path]:
        """Every path the evaluation writes (mask folders only with ``EVAL.SAVE_MASKS``), the results last."""
        paths = []
        for split in self.cfg.EVAL.SPLITS:
            for shuffled in variants(self.cfg):
                paths.append(self.per_expression(split, shuffled))
                if self.cfg.EVAL.SAVE_MASKS:
                    paths.append(self.masks(split, shuffled))
        return paths + [self.results()]

    def first_free(self) -> EvalFiles:
        """These names, numbered with the first number none of whose paths exists."""
        number = self.number
        while any(os.path.lexists(p) for p in EvalFiles(self.run_dir, self.cfg, number).all()):  # (a link too)
            number += 1
        return EvalFiles(self.run_dir, self.cfg, number)


def find_per_expression(folder: str | Path, cfg: CfgNode, split: str, shuffled: bool = False) -> Path | None:
    """The newest per-expression results of ``split`` in the protocol of ``cfg`` under ``folder`` (searched
    recursively, whatever the number), or None."""
    tag = re.escape(f"per_expression_{results_tag(cfg, split, shuffled)}")
    pattern = re.compile(rf"{tag}(-\d+)?\.jsonl")
    found = [p for p in Path(folder).rglob("per_expression_*.jsonl") if pattern.fullmatch(p.name)]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def run_evaluation(
    cfg: CfgNode,
    model: torch.nn.Module,
    tokenizer: Any,
    info: DistInfo,
    run_dir: Path,
    checkpoint: str,
    refer: REFER | None = None,
    config: str = "",
) -> list[dict[str, Any]]:
    """Evaluate ``EVAL.SPLITS`` in ``EVAL.MODE`` at ``EVAL.RESOLUTION``; rank 0 writes the files (``EvalFiles``,
    never replacing one) and the table. ``refer``: the dataset's annotations if already read (``data.load_refer``);
    ``config``: the file in ``run_dir`` that holds the run's config, recorded in each summary when given.
    """
    logger = get_logger()
    refer = load_refer(cfg) if refer is None else refer
    if cfg.EVAL.SAVE_MASKS and info.rank == 0:
        for folder in remove_abandoned(run_dir):
            logger.info("removed %s: the masks of an evaluation that ended before writing its results", folder)
    # with EVAL.SAVE_MASKS, each scoring's unfinished mask folder, entered before it is created: removed on any error
    staging: dict[tuple[str, bool], Path] = {}
    resolution = f"network {cfg.DATA.SIZE}x{cfg.DATA.SIZE}" if cfg.EVAL.RESOLUTION == "network" else "original"
    summaries, records_of = [], {}
    try:
        for split in cfg.EVAL.SPLITS:
            dataset = build_dataset(cfg, split, eval_mode=True, tokenizer=tokenizer, refer=refer)
            cache = _split_text_cache(cfg, model, dataset, info.device)
            for shuffled in variants(cfg):
                ds = ShuffledExpressions(dataset, seed=cfg.TRAIN.SEED) if shuffled else dataset
                tag = results_tag(cfg, split, shuffled)
                loader = eval_loader(cfg, ds, info, cfg.EVAL.BATCH_SIZE, collate_eval)
                scored = model
                if cfg.EVAL.SAVE_MASKS:  # every rank writes its shard's masks into rank 0's unfinished folder
                    staging[(split, shuffled)] = folder = all_gather_object(staging_folder(run_dir, tag))[0]
                    scored, loader = MaskWriter(folder, cfg.EVAL.RESOLUTION).tap(model, loader)
                metrics, records = evaluate(
                    scored, loader, info.device, mode=cfg.EVAL.MODE, resolution=cfg.EVAL.RESOLUTION, amp=cfg.TRAIN.AMP,
                    header=f"Eval {tag}", text_cache=cache,
                )  # fmt: skip
                records_of[(split, shuffled)] = records
                summaries.append(
                    results_summary(
                        metrics,
                        dataset=f"{cfg.DATA.DATASET} ({cfg.DATA.SPLIT_BY})",
                        split=split + (" (expressions shuffled)" if shuffled else ""),
                        protocol=cfg.EVAL.MODE,
                        resolution=resolution,
                        checkpoint=checkpoint,
                        **({"config": config} if config else {}),
                        expressions=(
                            f"shuffled among each image's objects ({ds.left_out} objects alone in their image left out)"
                            if shuffled
                            else "as annotated"
                        ),
                    )
                )
        if info.rank == 0:
            path = _write(EvalFiles(Path(run_dir), cfg), records_of, staging, summaries)
            logger.info("results (%s):\n%s", path, format_table(summaries))
    except BaseException:
        for folder in staging.values():  # (renamed back by _write where it had moved them)
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return summaries


def _split_text_cache(
    cfg: CfgNode, model: torch.nn.Module, dataset: Any, device: torch.device
) -> TextFeatureCache | None:
    """With ``MODEL.TEXT.CACHE`` (a frozen encoder), one split's expressions encoded once, in batches of similar
    lengths, for its scoring as annotated and its shuffled control (the same sentences, moved between objects);
    dropped with the split, so memory stays one split's. None without the cache: each batch encodes its own."""
    encoder = unwrap(model).text_encoder
    if not cfg.MODEL.TEXT.CACHE or encoder is None:
        return None
    cache = TextFeatureCache()
    if cfg.EVAL.MODE != "cat":  # cat scores joined expressions: encoded batch by batch as they come
        with torch.no_grad(), autocast(cfg.TRAIN.AMP, device):
            cache.prime(encoder, dataset.input_ids, dataset.attention_masks)
    return cache


def _write(
    files: EvalFiles,
    records_of: dict[tuple[str, bool], list[dict[str, Any]]],
    staging: dict[tuple[str, bool], Path],
    summaries: list[dict[str, Any]],
) -> Path:
    """Move the mask folders into place, then write the per-expression files and the results (last), atomically,
    under the first free number; where another evaluation takes one of its names meanwhile, under the next."""
    keys = list(records_of)
    while True:
        files = files.first_free()
        targets = [files.per_expression(split, shuffled) for split, shuffled in keys] + [files.results()]
        try:
            with new_folders([(folder, files.masks(*key)) for key, folder in staging.items()]):
                with staged(targets, replace=False) as temps:
                    for tmp, key in zip(temps, keys):
                        with open(tmp, "w", encoding="utf-8") as f:
                            f.writelines(json.dumps(r) + "\n" for r in records_of[key])
                    temps[-1].write_text(json.dumps(summaries, indent=2), encoding="utf-8")
            return files.results()
        except FileExistsError:  # taken meanwhile by another evaluation: first_free now passes it
            continue

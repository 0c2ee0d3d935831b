"""The training and evaluation loops: ``train_one_epoch`` and ``evaluate`` (DETR's engine.py is the shape).

Evaluation batches come in two forms:
- ``data.collate_eval`` batches (every expression of every object): scored per expression (``each``), with an
  object's expressions joined into one input (``cat``), or with their logits averaged (``avg``);
- training-form batches (``image``, ``target``, ``input_ids`` [B, N], ``attention_mask``, ``ref_id``): one
  expression per object, as the official per-epoch validation.
The text encoder runs once per batch on all its expressions; the image branch runs once per (image, expression).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from .amp import NativeScaler, autocast
from .distributed import all_reduce_mean
from .logger import MetricLogger, SmoothedValue
from .metrics import IoUAccumulator, intersection_union

EVAL_MODES = ("each", "cat", "avg")
RESOLUTIONS = ("network", "original")
MAX_EXPRESSIONS = 1024  # per object; sort keys are ref_id * MAX_EXPRESSIONS + expression index


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before anything else is written."""


def poly_lr_lambda(total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> Callable[[int], float]:
    """``it -> (1 - it / total_iters) ** power``: the LR factor after ``it`` steps, 0 at ``total_iters``.

    ``warmup_iters`` > 0 (not in the official recipe) scales the first steps linearly up from ``1 / warmup_iters``.
    """
    if total_iters <= 0:
        raise ValueError(f"poly LR needs a positive number of iterations, got {total_iters}")

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else 1.0
        return warm * max(0.0, 1.0 - it / total_iters) ** power

    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9, warmup_iters: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay stepped every iteration, reaching zero after ``total_iters`` steps (official LAVT)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(total_iters, power, warmup_iters))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: every item exactly once over all ranks.

    Unlike ``DistributedSampler`` it never pads with repeated items, so a sharded evaluation counts each
    expression once (shards may differ in length by one).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} outside world size {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: NativeScaler,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    epoch: int,
    *,
    amp: str = "",
    clip_grad: float = 0.0,
    print_freq: int = 10,
) -> dict[str, float]:
    """One pass over ``loader``, the LR scheduler stepped after every iteration.

    Batches: image [B, 3, S, S], target [B, S, S], input_ids / attention_mask [B, N].

    Raises:
        NonFiniteLossError: the loss (averaged over ranks, so every rank stops together) is NaN or Inf.
    Returns:
        averages over the epoch (all ranks): ``loss``, ``grad_norm``; and ``lr``, the last learning rate.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
    header = f"Epoch [{epoch}]"
    for it, batch in enumerate(logger.log_every(loader, print_freq, header)):
        images = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(images, input_ids, attention_mask)
            loss = criterion(logits, target)
        loss_value = all_reduce_mean(loss.detach()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch}, iteration {it}: training stopped; the checkpoints already "
                "written are kept (resume from last.pth, e.g. with a lower --lr, --clip_grad or without --amp)"
            )
        optimizer.zero_grad(set_to_none=True)
        norm = scaler(loss, optimizer, params, clip_grad)
        lr_scheduler.step()
        logger.update(loss=loss_value, lr=optimizer.param_groups[0]["lr"], grad_norm=norm)
    logger.synchronize_between_processes()
    return {
        "loss": logger.loss.global_avg,
        "grad_norm": logger.grad_norm.global_avg,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward may broadcast buffers (a collective): with uneven shards one rank would wait forever
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    *,
    mode: str = "each",
    resolution: str = "network",
    amp: str = "",
    header: str = "Eval",
    print_freq: int = 50,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``loader`` (sharded over ranks or not) and aggregate every rank's expressions exactly.

    Args:
        mode: ``each`` | ``cat`` | ``avg`` (ignored for training-form batches, which hold one expression each).
        resolution: ``network`` (argmax at the network's input size vs the resized mask: official) or
            ``original`` (logits resized bilinearly to the image's size vs the original mask).
    Returns:
        (metrics, records): see ``IoUAccumulator.compute``; one record per scored expression (``each``) or
        object (``cat``, ``avg``), sorted by (ref_id, expression).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"EVAL.MODE must be one of {EVAL_MODES}, got {mode!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"EVAL.RESOLUTION must be one of {RESOLUTIONS}, got {resolution!r}")
    model = _unwrap(model)
    model.eval()
    acc = IoUAccumulator()
    # one autocast region for the whole loop: its cache casts the weights once, not once per batch
    with autocast(amp, device):
        for batch in MetricLogger().log_every(loader, print_freq, header):
            keys, inter, union, records = _score_batch(model, batch, device, mode, resolution, amp)
            acc.update(keys, inter, union, records)
    return acc.compute()


def _score_batch(
    model: nn.Module, batch: dict[str, Any], device: torch.device, mode: str, resolution: str, amp: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Per scored unit (expression or object): sort key, I, U and a record."""
    images = batch["image"].to(device, non_blocking=True)
    B = images.shape[0]
    ref_ids = torch.as_tensor(batch["ref_id"]).tolist()
    if "expr_index" not in batch:  # training form: one expression per object
        mode = "each"
        owner = torch.arange(B)
        counts = [1] * B
        records = [{"ref_id": r} for r in ref_ids]
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
        owner = batch["expr_index"]
        counts = [len(s) for s in batch["sent_ids"]]
        if owner.tolist() != [b for b, n in enumerate(counts) for _ in range(n)]:
            raise ValueError("evaluate: expressions must come object by object, as data.collate_eval orders them")
        if max(counts) > MAX_EXPRESSIONS:
            raise ValueError(f"evaluate: an object has {max(counts)} expressions, more than {MAX_EXPRESSIONS}")
        if mode == "cat":
            ids, mask = batch["cat_input_ids"], batch["cat_attention_mask"]
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
        records = _records(batch, ref_ids, mode)
    with autocast(amp, device):
        lang_feats, lang_mask = model.encode_text(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        src = torch.arange(B, device=device) if mode == "cat" else owner.to(device)
        logits = model.segment(images[src], lang_feats, lang_mask).float()  # [E, 2, S, S] (E = B for cat)
    if mode == "avg":  # mean logits of each object's expressions
        summed = logits.new_zeros((B, *logits.shape[1:])).index_add_(0, src, logits)
        logits = summed / torch.tensor(counts, device=device, dtype=logits.dtype).view(B, 1, 1, 1)
    per_object = mode in ("cat", "avg")
    unit_owner = torch.arange(B) if per_object else owner  # object of each scored unit
    if resolution == "network":
        target = batch["target"].to(device, non_blocking=True)[unit_owner.to(device)]
        inter, union = intersection_union(logits.argmax(1) == 1, target == 1)
    else:
        inter_l, union_l = [], []
        for b in range(B):
            sel = (unit_owner == b).nonzero().flatten().to(device)
            tgt = batch["target_orig"][b].to(device)  # [H0, W0]
            up = F.interpolate(logits[sel], size=tgt.shape, mode="bilinear", align_corners=False)
            i, u = intersection_union(up.argmax(1) == 1, (tgt != 0).expand(len(sel), -1, -1))
            inter_l.append(i)
            union_l.append(u)
        inter, union = torch.cat(inter_l), torch.cat(union_l)
    expr_pos = [0] * B if per_object else [j for n in counts for j in range(n)]
    keys = torch.tensor([ref_ids[b] * MAX_EXPRESSIONS + j for b, j in zip(unit_owner.tolist(), expr_pos)])
    return keys, inter, union, records


def _records(batch: dict[str, Any], ref_ids: list[int], mode: str) -> list[dict[str, Any]]:
    out = []
    for b, ref_id in enumerate(ref_ids):
        base = {"ref_id": ref_id, "image_id": int(batch["image_id"][b]), "file_name": batch["file_name"][b]}
        sent_ids, sentences = batch["sent_ids"][b], batch["sentences"][b]
        if mode == "each":
            out += [{**base, "sent_id": int(s), "sentence": t} for s, t in zip(sent_ids, sentences)]
        else:
            out.append({**base, "sent_ids": [int(s) for s in sent_ids], "sentences": list(sentences)})
    return out

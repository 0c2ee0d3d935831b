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
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.transforms import resize_batch
from utils.amp import NativeScaler, autocast
from utils.distributed import all_reduce_mean
from utils.logger import MetricLogger, RunProgress, SmoothedValue
from utils.metrics import IoUAccumulator, intersection_union

from .text_cache import TextFeatureCache

EVAL_MODES = ("each", "cat", "avg")
RESOLUTIONS = ("network", "original")
TOTALS = ("loss", "grad_norm")  # the meters whose epoch averages train_one_epoch returns
MAX_EXPRESSIONS = 1024  # per object; sort keys are ref_id * MAX_EXPRESSIONS + expression index


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before anything else is written."""


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(
    model: nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scaler: NativeScaler,
    batch: dict[str, Any],
    device: torch.device,
    params: list[torch.nn.Parameter],
    *,
    amp: str = "",
    clip_grad: float = 0.0,
    where: str = "",
    mark: Callable[[str], None] | None = None,
    text_cache: TextFeatureCache | None = None,
    size: int = 0,
    grad_norm: bool = True,
) -> tuple[float, torch.Tensor | None]:
    """One optimisation step on ``batch``: forward and loss under ``amp``, backward, clip, AdamW step.

    The training loop and the benchmark both call this, so what is timed is what trains.

    Args:
        batch: image [B, 3, S, S], target [B, S, S], and input_ids / attention_mask [B, N] or, for a model without
            a text encoder, lang_feats [B, C, N] / lang_mask [B, N, 1].
        params: the trainable parameters (clipping and the gradient norm run over them).
        where: where this step is, for the error message (e.g. "epoch 3, iteration 20").
        mark: called with "forward", "backward" and "optimizer" as each part ends (the benchmark's timer).
        text_cache: a frozen text encoder's features per expression (``MODEL.TEXT.CACHE``), instead of encoding.
        size: > 0: train on the batch resized to size x size (``data.resize_batch``; ``TRAIN.LOW_RES_SIZE``).
        grad_norm: compute the gradient norm; False skips it unless clipping needs it (a pass over every gradient:
            ~2% of the Swin-T step, docs/performance.md).
    Raises:
        NonFiniteLossError: the loss (averaged over ranks, so every rank stops together) is NaN or Inf.
    Returns:
        (the loss averaged over ranks, the gradient norm before clipping, or None where it was skipped).
    """
    images = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    if size:
        images, target = resize_batch(images, target, size)
    with autocast(amp, device):
        if "lang_feats" in batch:
            logits = model(images, text=(batch["lang_feats"].to(device), batch["lang_mask"].to(device)))
        else:
            ids, mask = batch["input_ids"].to(device, non_blocking=True), batch["attention_mask"].to(device)
            if text_cache is None:
                logits = model(images, ids, mask)
            else:  # through the (DDP) model's own forward, so that gradients are still synchronised
                logits = model(images, text=text_cache.features(unwrap(model).text_encoder, ids, mask))
        loss = criterion(logits, target)
    if mark is not None:
        mark("forward")
    loss_value = all_reduce_mean(loss.detach()).item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"loss is {loss_value} at {where or 'a training step'}: training stopped; the checkpoints already "
            "written are kept (resume from last.pth, e.g. with a lower --lr, --clip_grad or without --amp)"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.backward(loss)
    if mark is not None:
        mark("backward")
    norm = scaler.step(optimizer, params, clip_grad, norm=grad_norm)
    if mark is not None:
        mark("optimizer")
    return loss_value, norm


def low_res_iterations(low_res_epochs: float, epoch: int, iters_per_epoch: int) -> int:
    """How many of ``epoch``'s first iterations train at ``TRAIN.LOW_RES_SIZE``: those of the run's first
    ``round(low_res_epochs * iters_per_epoch)`` iterations that fall in this epoch (0 to ``iters_per_epoch``)."""
    low_res = round(low_res_epochs * iters_per_epoch)
    return min(max(low_res - epoch * iters_per_epoch, 0), iters_per_epoch)


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
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
    text_cache: TextFeatureCache | None = None,
    start: int = 0,
    totals: dict[str, tuple[int, float]] | None = None,
    on_boundary: Callable[[int, dict[str, tuple[int, float]]], None] | None = None,
    run_progress: RunProgress | None = None,
    size: int = 0,
    size_iters: int | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (``train_step`` per batch), the LR scheduler stepped after every iteration.

    The gradient norm (a pass over every gradient) is computed at every ``print_freq``-th iteration of the epoch and
    at its last, unless clipping needs it at every one: its meter (log lines, TensorBoard, the epoch's average) holds
    the norms of those iterations. They are counted from the epoch's first iteration, also in a resumed epoch, so
    that a resumed run averages the same norms as one that ran straight through.

    Args:
        start: iterations of this epoch done before (a resumed epoch: ``loader`` yields the rest only).
        totals: this process's running sums of the epoch so far, ``{meter: (count, total)}``, as ``on_boundary``
            saw them (a resumed epoch continues its averages from them).
        on_boundary: called after every iteration with (iterations of the epoch done, the running sums): where the
            trainer writes step checkpoints and stops on request.
        run_progress: where this epoch sits in the run, for the log's whole-run ETA and TensorBoard.
        size: > 0: the batches trained at size x size (progressive resizing), see ``train_step``.
        size_iters: how many of the epoch's iterations (counted from its first, ``start`` included) train at
            ``size``; None: all of them, 0: none.
    Returns:
        averages over the epoch (all ranks): ``loss``, ``grad_norm``; and ``lr``, the last learning rate.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
    for name in TOTALS:
        logger.add_meter(name, SmoothedValue())
    for name, (count, total) in (totals or {}).items():
        logger.meters[name].count, logger.meters[name].total = count, total
    # the epoch's iterations (a resumed epoch's loader yields those after ``start``)
    epoch_iters = start + len(loader) if hasattr(loader, "__len__") else None
    batches = logger.log_every(loader, print_freq, f"Epoch [{epoch}]", run_progress=run_progress)
    for it, batch in enumerate(batches, start=start):
        sampled = (print_freq > 0 and (it + 1) % print_freq == 0) or it + 1 == epoch_iters
        loss, norm = train_step(
            model, criterion, optimizer, scaler, batch, device, params,
            amp=amp, clip_grad=clip_grad, where=f"epoch {epoch}, iteration {it}", text_cache=text_cache,
            size=size if size_iters is None or it < size_iters else 0, grad_norm=sampled,
        )  # fmt: skip
        lr_scheduler.step()
        logger.update(loss=loss, lr=optimizer.param_groups[0]["lr"], **({} if norm is None else {"grad_norm": norm}))
        if on_boundary is not None:
            on_boundary(it + 1, {name: (logger.meters[name].count, logger.meters[name].total) for name in TOTALS})
    logger.synchronize_between_processes()
    return {
        "loss": logger.loss.global_avg,
        "grad_norm": logger.grad_norm.global_avg,
        "lr": optimizer.param_groups[0]["lr"],
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
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
    text_cache: TextFeatureCache | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``loader`` (sharded over ranks or not) and aggregate every rank's expressions exactly.

    Args:
        mode: ``each`` | ``cat`` | ``avg`` (ignored for training-form batches, which hold one expression each).
        resolution: ``network`` (argmax at the network's input size vs the resized mask: official) or
            ``original`` (logits resized bilinearly to the image's size vs the original mask).
        text_cache: the training's cache of a frozen encoder's features (the per-epoch validation uses it).
    Returns:
        (metrics, records): see ``IoUAccumulator.compute``; one record per scored expression (``each``) or
        object (``cat``, ``avg``), sorted by (ref_id, expression).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"EVAL.MODE must be one of {EVAL_MODES}, got {mode!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"EVAL.RESOLUTION must be one of {RESOLUTIONS}, got {resolution!r}")
    # DDP's forward may broadcast buffers (a collective): with uneven shards one rank would wait forever
    model = unwrap(model)
    model.eval()
    acc = IoUAccumulator()
    # one autocast region for the whole loop: its cache casts the weights once, not once per batch
    with autocast(amp, device):
        for batch in MetricLogger().log_every(loader, print_freq, header):
            keys, inter, union, records = _score_batch(model, batch, device, mode, resolution, amp, text_cache)
            acc.update(keys, inter, union, records)
    return acc.compute()


def _score_batch(
    model: nn.Module,
    batch: dict[str, Any],
    device: torch.device,
    mode: str,
    resolution: str,
    amp: str,
    text_cache: TextFeatureCache | None = None,
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
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if text_cache is None:
            lang_feats, lang_mask = model.encode_text(ids, mask)
        else:
            lang_feats, lang_mask = text_cache.features(model.text_encoder, ids, mask)
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

"""Referring-segmentation metrics, as the official LAVT evaluation computes them.

Per expression: I = |pred & gt|, U = |pred | gt| (pixels), IoU = I / U, and IoU = 0 when U = 0.
- mIoU (mean IoU): the mean over expressions of the per-expression IoU.
- oIoU (overall IoU): cumulative I over cumulative U, summed over all expressions.
- precision@t: the fraction of expressions with IoU >= t, t in 0.5 ... 0.9.

``IoUAccumulator`` keeps per-expression I and U as tensors on the device and talks to the other ranks once,
in ``compute``: every per-expression I, U and sort key is gathered, sorted by key, and reduced in float64, so a
sharded evaluation gives bit-for-bit the numbers of a single process.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .distributed import all_gather_object

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
MIOU_LABEL = "mIoU (mean of per-expression IoU)"
OIOU_LABEL = "oIoU (overall: cumulative I / cumulative U)"


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts of intersection and union per mask.

    Args:
        pred: [B, H, W] bool (or 0/1 integer) predicted masks.
        target: [B, H, W] bool (or 0/1 integer) ground-truth masks.
    Returns:
        (I [B] int64, U [B] int64), on the input's device.
    """
    if pred.shape != target.shape or pred.dim() != 3:  # (one [H, W] mask would count as H masks of one row)
        raise ValueError(
            f"intersection_union: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
            "equal shapes [B, H, W]"
        )
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)  # [B, H*W]
    inter = (pred & target).sum(1)
    union = (pred | target).sum(1)
    return inter, union


def iou_from_counts(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """IoU in float64 with 0 where the union is empty (both masks empty)."""
    inter, union = inter.double(), union.double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


class IoUAccumulator:
    """Collect per-expression (key, I, U) over batches; ``compute`` gathers all ranks once and summarises.

    ``key`` orders the expressions (e.g. dataset index * 1000 + expression index); keys must be unique
    across all ranks. Optional ``records`` (one dict per expression, e.g. ref_id, sent_id, sentence) travel
    with the counts and come back, sorted by key, from ``compute`` with IoU, I and U filled in.
    """

    def __init__(self) -> None:
        self._keys: list[torch.Tensor] = []
        self._inter: list[torch.Tensor] = []
        self._union: list[torch.Tensor] = []
        self._records: list[dict[str, Any]] = []
        self._with_records = False

    def __len__(self) -> int:
        return sum(len(k) for k in self._keys)

    def update(
        self,
        keys: torch.Tensor,
        inter: torch.Tensor,
        union: torch.Tensor,
        records: list[dict[str, Any]] | None = None,
    ) -> None:
        """Add a batch. keys, inter, union: [E] integer tensors; records: E dicts or None."""
        if not (keys.shape == inter.shape == union.shape) or keys.dim() != 1:
            raise ValueError(
                f"IoUAccumulator.update: keys {tuple(keys.shape)}, inter {tuple(inter.shape)}, union "
                f"{tuple(union.shape)} must be equal 1-D shapes"
            )
        if records is not None and len(records) != len(keys):
            raise ValueError(f"IoUAccumulator.update: {len(records)} records for {len(keys)} expressions")
        if self._keys and (records is not None) != self._with_records:
            raise ValueError("IoUAccumulator.update: records must be given with every batch or with none")
        self._with_records = records is not None
        self._keys.append(keys.detach().long())
        self._inter.append(inter.detach().long())
        self._union.append(union.detach().long())
        if records is not None:
            self._records.extend(records)

    def compute(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Gather every rank's expressions (one collective call) and summarise.

        Returns:
            (metrics, records). metrics: ``num_expressions``, ``mIoU``, ``oIoU`` (both in percent),
            ``cum_I``, ``cum_U``, ``precision@0.5`` ... ``precision@0.9`` (percent). records: sorted by key,
            each with ``IoU`` (fraction), ``I`` and ``U`` added.
        """
        empty = torch.zeros(0, dtype=torch.long)
        local = (
            torch.cat(self._keys).cpu() if self._keys else empty,
            torch.cat(self._inter).cpu() if self._inter else empty,
            torch.cat(self._union).cpu() if self._union else empty,
            self._records,
        )
        gathered = all_gather_object(local)
        keys = torch.cat([g[0] for g in gathered])
        inter = torch.cat([g[1] for g in gathered])
        union = torch.cat([g[2] for g in gathered])
        records = [r for g in gathered for r in g[3]]
        if len(torch.unique(keys)) != len(keys):
            raise RuntimeError("IoUAccumulator: an expression was counted twice (duplicate keys across ranks)")
        order = torch.argsort(keys)
        inter, union = inter[order], union[order]
        if records:
            records = [records[i] for i in order.tolist()]
        ious = iou_from_counts(inter, union)
        metrics = summarize_counts(inter, union, ious)
        for rec, iou, i, u in zip(records, ious.tolist(), inter.tolist(), union.tolist()):
            rec.update(IoU=iou, I=i, U=u)
        return metrics, records


def summarize_counts(
    inter: torch.Tensor, union: torch.Tensor, ious: torch.Tensor | None = None
) -> dict[str, Any]:
    """mIoU, oIoU and precision@t (percent) from per-expression I and U ([E] integer tensors); ``ious``: their
    ``iou_from_counts`` when the caller has it already."""
    n = int(inter.numel())
    ious = iou_from_counts(inter, union) if ious is None else ious
    cum_i, cum_u = int(inter.sum()), int(union.sum())
    out: dict[str, Any] = {
        "num_expressions": n,
        "mIoU": 100.0 * float(ious.mean()) if n else float("nan"),
        "oIoU": 100.0 * cum_i / cum_u if cum_u else 0.0,
        "cum_I": cum_i,
        "cum_U": cum_u,
    }
    for t in PRECISION_THRESHOLDS:
        out[f"precision@{t}"] = 100.0 * float((ious >= t).double().mean()) if n else float("nan")
    return out


def results_summary(
    metrics: dict[str, Any],
    *,
    dataset: str,
    split: str,
    protocol: str,
    resolution: str,
    checkpoint: str,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON summary of one evaluation: its setting, the metrics, and what mIoU and oIoU mean."""
    return {
        "dataset": dataset,
        "split": split,
        "protocol": protocol,
        "resolution": resolution,
        "checkpoint": checkpoint,
        **extra,
        **metrics,
        "definitions": {"mIoU": MIOU_LABEL, "oIoU": OIOU_LABEL, "precision@t": "% of expressions with IoU >= t"},
    }


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table of ``results_summary`` dicts, one row per evaluation, with the legend under it."""
    cols = ["dataset", "split", "protocol", "resolution", "N", "mIoU", "oIoU"] + [
        f"P@{t}" for t in PRECISION_THRESHOLDS
    ]
    rows = []
    for s in summaries:
        row = [str(s["dataset"]), str(s["split"]), str(s["protocol"]), str(s["resolution"]), str(s["num_expressions"])]
        row += [_pct(s["mIoU"]), _pct(s["oIoU"])] + [_pct(s[f"precision@{t}"]) for t in PRECISION_THRESHOLDS]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "-" * len(line)] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    checkpoints = sorted({str(s["checkpoint"]) for s in summaries})
    out += [
        "",
        f"{MIOU_LABEL}; {OIOU_LABEL}; P@t: % of expressions with IoU >= t. All in percent.",
        "protocol: each = every expression scored alone (the paper's tables); cat = an object's expressions joined "
        "into one; avg = their logits averaged. resolution: network = the NxN network input (official), "
        "original = the image's own size.",
        "checkpoint: " + ", ".join(checkpoints),
    ]
    return "\n".join(out)


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2f}"

"""Segmentation losses on two-class logits: weighted cross-entropy (the paper's), Dice, and their sum."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LOSSES = ("ce", "dice", "ce+dice")


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy with class weights, averaged as ``F.cross_entropy`` does (weighted mean).

    Args:
        logits: [B, 2, H, W]; target: [B, H, W] int64 in {0, 1}; weight: [2].
    """
    return F.cross_entropy(logits, target, weight=weight.to(device=logits.device, dtype=logits.dtype))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the foreground probability, per sample, averaged over the batch.

    Args:
        logits: [B, 2, H, W]; target: [B, H, W] int64 in {0, 1}.
        eps: smoothing added to numerator and denominator (an empty target with an empty prediction scores 0).
    """
    prob = logits.float().softmax(1)[:, 1].flatten(1)  # [B, H*W] foreground probability
    tgt = target.flatten(1).to(prob.dtype)
    inter = (prob * tgt).sum(1)
    dice = (2 * inter + eps) / (prob.sum(1) + tgt.sum(1) + eps)
    return (1 - dice).mean()


def build_criterion(name: str, ce_weights: Sequence[float] = (0.9, 1.1)) -> Callable[..., torch.Tensor]:
    """``criterion(logits [B,2,H,W], target [B,H,W]) -> scalar loss`` for ``name`` in ``LOSSES``."""
    if name not in LOSSES:
        raise ValueError(f"TRAIN.LOSS must be one of {LOSSES}, got {name!r}")
    if len(ce_weights) != 2:
        raise ValueError(f"TRAIN.CE_WEIGHTS must hold 2 class weights (background, object), got {list(ce_weights)}")
    weight = torch.tensor([float(w) for w in ce_weights])
    parts = set(name.split("+"))

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or logits.shape[1] != 2 or logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"loss: logits must be [B, 2, H, W] and target [B, H, W], got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}"
            )
        logits = logits.float()  # losses in float32 under autocast too
        loss = logits.new_zeros(())
        if "ce" in parts:
            loss = loss + weighted_cross_entropy(logits, target, weight)
        if "dice" in parts:
            loss = loss + dice_loss(logits, target)
        return loss

    return criterion

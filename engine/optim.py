"""The official optimiser and learning-rate schedule: AdamW over the recipe's parameter groups, polynomial decay
stepped every iteration and reaching zero at the end."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from yacs.config import CfgNode

from models import build_param_groups


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


def build_optimizer(model: nn.Module, cfg: CfgNode) -> torch.optim.AdamW:
    """AdamW over ``models.build_param_groups`` (which also freezes the text layers the recipe keeps: call it before
    wrapping the model in DDP). Raises ValueError when MODEL.TEXT.TRAIN_LAYERS exceeds the encoder's layers."""
    groups = build_param_groups(model, cfg.TRAIN.WEIGHT_DECAY, cfg.MODEL.TEXT.TRAIN_LAYERS)
    return torch.optim.AdamW(
        groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY, fused=cfg.TRAIN.FUSED_ADAMW or None
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` (which gives each moment its parameter's dtype and device), each moment
    then stored in its parameter's memory layout too. The fused AdamW walks a parameter, its gradient and its moments
    as flat arrays: moments saved in another layout (a checkpoint from a run whose decoder weights were laid out
    otherwise, ``models.conv.training_layout``) would be paired with the wrong elements, silently."""
    optimizer.load_state_dict(state)
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                entries[key] = torch.empty_like(param).copy_(value)

"""What ``utils.benchmark`` runs and times: inputs, a training step, an evaluation forward, FLOPs, per-part times."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .amp import NativeScaler, autocast
from .profiling import PartTimer, count_flops, median, synchronize

if TYPE_CHECKING:
    from .benchmark import BenchSpec

def make_batch(model: nn.Module, cfg: Any, batch: int, size: int, device: torch.device) -> dict[str, Any]:
    """Random images, targets and expressions (some padded) of the shapes the data pipeline gives."""
    n = cfg.MODEL.TEXT.MAX_TOKENS
    lengths = torch.randint(max(n // 2, 1), n + 1, (batch,))
    mask = (torch.arange(n)[None] < lengths[:, None]).long()  # [B, N]
    out = {"image": torch.randn(batch, 3, size, size), "target": torch.randint(0, 2, (batch, size, size))}
    if model.text_encoder is not None:
        vocab = model.text_encoder.config.vocab_size
        out["input_ids"] = torch.randint(1, vocab, (batch, n)) * mask
        out["attention_mask"] = mask
    else:
        out["lang_feats"] = torch.randn(batch, cfg.MODEL.TEXT.DIM, n)
        out["lang_mask"] = mask.unsqueeze(-1).float()
    return {k: v.to(device) for k, v in out.items()}


def forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    if "input_ids" in batch:
        return model(batch["image"], batch["input_ids"], batch["attention_mask"])
    return model.segment(batch["image"], batch["lang_feats"], batch["lang_mask"])


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts of the breakdown; ``stage i`` includes its PWAM, gate and patch merging."""
    parts = {}
    if model.text_encoder is not None:
        parts["text encoder"] = model.text_encoder
    parts["patch embed"] = model.backbone.patch_embed
    for i, stage in enumerate(model.backbone.layers):
        parts[f"stage {i + 1}"] = stage
        parts[f"  of which PWAM {i + 1}"] = stage.fusion
    parts["decoder"] = model.classifier
    return parts


def train_step(
    model: nn.Module, cfg: Any, spec: BenchSpec, device: torch.device, amp: str
) -> tuple[Callable[[], None], dict[str, list[float]]]:
    """One training step as the training loop does it (AdamW of the official parameter groups, the configured
    loss, ``NativeScaler``: GradScaler for fp16, clipping, gradient norm), timing its forward, backward and optimizer
    parts into the returned lists."""
    from models import build_param_groups

    from .losses import build_criterion

    layers = cfg.MODEL.TEXT.TRAIN_LAYERS
    if model.text_encoder is not None:  # e.g. the 6-layer MiniLM under a BERT-base config: train all it has
        layers = min(layers, len(model.text_encoder.encoder.layer))
    params = build_param_groups(model, cfg.TRAIN.WEIGHT_DECAY, layers)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY, fused=cfg.TRAIN.FUSED_ADAMW or None
    )
    criterion = build_criterion(cfg.TRAIN.LOSS, cfg.TRAIN.CE_WEIGHTS)
    scaler = NativeScaler(amp, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(model, cfg, spec.batch_size, spec.size, device)
    split: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast(amp, device):
            loss = criterion(forward(model, batch), batch["target"])
        synchronize(device)
        t1 = time.perf_counter()
        scaler.backward(loss)
        synchronize(device)
        t2 = time.perf_counter()
        scaler.step(optimizer, trainable, cfg.TRAIN.CLIP_GRAD)
        synchronize(device)
        for key, seconds in zip(split, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            split[key].append(seconds)

    return step, split


def eval_step(
    model: nn.Module, cfg: Any, batch_size: int, spec: BenchSpec, device: torch.device, amp: str
) -> Callable[[], torch.Tensor]:
    """One evaluation forward of ``batch_size`` expressions, with logits in float32 as the evaluation scores them."""
    batch = make_batch(model, cfg, batch_size, spec.size, device)

    @torch.no_grad()
    def run() -> torch.Tensor:
        model.eval()
        with autocast(amp, device):
            return forward(model, batch).float()

    return run


STATS = {"median": median, "min": min}


def train_summary(times: list[float], split: dict[str, list[float]], warmup: int, stat: str) -> dict[str, Any]:
    pick = STATS[stat]
    return {
        "step_ms": 1e3 * pick(times),
        "times_ms": [1e3 * t for t in times],
        **{f"{k}_ms": 1e3 * pick(v[warmup:]) for k, v in split.items()},
    }


def eval_summary(times: list[float], batch_size: int, stat: str) -> dict[str, Any]:
    seconds = STATS[stat](times)
    return {"ms": 1e3 * seconds, "expr_per_s": batch_size / seconds, "times_ms": [1e3 * t for t in times]}


def count_model_flops(model: nn.Module, cfg: Any, spec: BenchSpec, device: torch.device, amp: str) -> dict[str, Any]:
    """Counted on the model as built (before any torch.compile): eval forward at batch 1 and a train
    forward+backward at the training batch (with checkpointing the recomputed forward counts too)."""
    model.eval()
    batch = make_batch(model, cfg, 1, spec.size, device)
    with torch.no_grad(), autocast(amp, device):
        eval_flops, per_module = count_flops(lambda: forward(model, batch))
    model.train()
    batch = make_batch(model, cfg, spec.batch_size, spec.size, device)

    def train_step() -> None:
        with autocast(amp, device):
            loss = forward(model, batch).float().mean()
        loss.backward()

    train_flops, _ = count_flops(train_step)
    model.zero_grad(set_to_none=True)
    parts = {name: per_module.get(_module_path(model, module), 0) for name, module in model_parts(model).items()}
    return {"eval_per_image": eval_flops, "train_per_image": train_flops / spec.batch_size, "eval_parts": parts}


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{type(model).__name__}.{name}"
    return ""


def part_breakdown(model: nn.Module, cfg: Any, spec: BenchSpec, device: torch.device, amp: str) -> dict[str, Any]:
    result = {}
    for mode, bs in dict.fromkeys((("eval", 1), ("eval", spec.eval_batch_size), ("train", spec.batch_size))):
        model.train(mode == "train")
        batch = make_batch(model, cfg, bs, spec.size, device)
        timer = PartTimer(model_parts(model), device)
        totals = []
        for i in range(spec.warmup + spec.runs):
            recording = timer.recording() if i >= spec.warmup else contextlib.nullcontext()
            with torch.set_grad_enabled(mode == "train"), autocast(amp, device), recording:
                synchronize(device)
                start = time.perf_counter()
                logits = forward(model, batch)
                synchronize(device)
                if i >= spec.warmup:
                    totals.append(time.perf_counter() - start)
            if mode == "train":
                logits.float().mean().backward()
                model.zero_grad(set_to_none=True)
        timer.remove()
        parts = {k: 1e3 * s for k, s in timer.medians().items()}
        result[f"{mode}_forward_batch{bs}"] = {"total_ms": 1e3 * median(totals), "parts_ms": parts}
    return result

"""What ``tools.benchmark`` runs and times: its spec and variants, inputs, the training step (``engine.train_step``,
the one training uses), an evaluation forward, FLOPs and per-part times."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from configs import get_config
from engine import build_optimizer
from engine import train_step as engine_train_step
from models.text import resolve_text_encoder
from utils.amp import NativeScaler, autocast, resolve_amp
from utils.losses import build_criterion
from utils.profiling import PartTimer, count_flops, median, synchronize

#: switch name -> the boolean config key it turns on (every switch is off in the "base" variant)
SWITCHES: dict[str, str] = {
    "fused": "MODEL.FUSED_ATTENTION",
    "channels_last": "MODEL.CHANNELS_LAST",
    "conv_grad_mm": "MODEL.CONV_GRAD_MATMUL",
    "winograd": "MODEL.CONV_WINOGRAD",
    "checkpoint": "MODEL.GRAD_CHECKPOINT",
    "compile": "MODEL.COMPILE",
    "fused_adamw": "TRAIN.FUSED_ADAMW",
    # changes the results too, not only the speed: maps smaller than the window attended unpadded (the demo sets it)
    "fit_window": "MODEL.SWIN.FIT_WINDOW",
    # not a config key: the evaluation loop inside one autocast region, so that autocast casts the weights to
    # bf16/fp16 once (its cache) instead of once per batch (what an evaluation entering autocast per batch does)
    "cast_once": "",
}
#: precision name -> TRAIN.AMP value
PRECISIONS: dict[str, str] = {"float32": "", "bf16": "bf16", "fp16": "fp16"}
PHASES = ("train", "eval", "flops", "breakdown")
MEMORY_MODES = ("inline", "skip", "only")
MALLOC_MODES = ("keep", "default")


@dataclass
class BenchSpec:
    """What one benchmark process measures (JSON-serialisable: it is handed to worker processes)."""

    variant: str = "base"
    cfg_file: str = ""
    opts: list[str] = field(default_factory=list)
    size: int = 224
    batch_size: int = 2
    eval_batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 2
    runs: int = 5
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    threads: int = 0
    seed: int = 0
    stat: str = "median"  # or "min": on a machine shared with other work, the least disturbed run
    # peak memory: "inline" (after the timings, in the same process), "skip", or "only" (a process of its own whose
    # allocator returns freed memory from the start: on CPU the exact figure, see profiling.return_freed_memory)
    memory: str = "inline"
    # side of the square matmul that measures the machine's FLOP/s (0: 2048 on CPU, 8192 on GPU)
    matmul_size: int = 0
    # glibc's malloc while timing: "keep" freed memory for reuse, as main.py does (utils.allocator), or "default"
    malloc: str = "keep"


def parse_variant(name: str, default_dtype: str = "float32") -> tuple[set[str], str]:
    """``"fused+bf16"`` -> ({"fused"}, "bf16"); ``"base"`` -> (set(), TRAIN.AMP of ``default_dtype``)."""
    if default_dtype not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {list(PRECISIONS)}, got {default_dtype!r}")
    switches, amp = set(), PRECISIONS[default_dtype]
    for token in name.split("+"):
        if token in SWITCHES:
            switches.add(token)
        elif token in PRECISIONS:
            amp = PRECISIONS[token]
        elif token != "base":
            raise ValueError(
                f"unknown switch {token!r} in variant {name!r}: use base, "
                f"{', '.join(SWITCHES)} or {', '.join(PRECISIONS)}, joined with '+'"
            )
    return switches, amp


def variant_config(spec: BenchSpec, switches: set[str], amp: str = "") -> Any:
    """The config of a variant: ``spec``'s file and overrides, its switches, and the measured shape and precision
    (which decide the decoder's weight layouts, ``models.decoder.decoder_layouts``)."""
    opts = [*spec.opts, "DATA.SIZE", spec.size, "TRAIN.BATCH_SIZE", spec.batch_size, "TRAIN.AMP", amp]
    for switch, key in SWITCHES.items():
        if key:
            opts += [key, switch in switches]
    return get_config(spec.cfg_file or None, opts)


def variant_setup(spec: BenchSpec) -> tuple[set[str], str, Any]:
    """``spec``'s switches, precision and config (``variant_config``, without compiling); ValueError or
    FileNotFoundError (one line) for what would fail its every run: an unknown switch, fp16 on a CPU, a text encoder
    folder that is not there. ``tools.benchmark.main`` checks each variant so before measuring any."""
    switches, amp = parse_variant(spec.variant, spec.dtype)
    resolve_amp(amp, spec.device)  # (fp16 on a CPU that emulates it)
    cfg = variant_config(spec, switches - {"compile"}, amp)
    if cfg.MODEL.TEXT.ENCODER:
        resolve_text_encoder(cfg.MODEL.TEXT.ENCODER)
    return switches, amp, cfg


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
    """One ``engine.train_step`` (the training loop's: AdamW of the official parameter groups, the configured loss,
    ``NativeScaler``, clipping, gradient norm), timing its forward, backward and optimizer parts into the lists."""
    optimizer = build_optimizer(model, cfg)
    criterion = build_criterion(cfg.TRAIN.LOSS, cfg.TRAIN.CE_WEIGHTS)
    scaler = NativeScaler(amp, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(model, cfg, spec.batch_size, spec.size, device)
    split: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    last = [0.0]

    def mark(part: str) -> None:
        synchronize(device)
        now = time.perf_counter()
        split[part].append(now - last[0])
        last[0] = now

    def step() -> None:
        model.train()
        synchronize(device)
        last[0] = time.perf_counter()
        # without the gradient norm, as the training loop runs all but one step in --print_freq (engine.loops)
        engine_train_step(
            model, criterion, optimizer, scaler, batch, device, trainable, amp=amp, clip_grad=cfg.TRAIN.CLIP_GRAD,
            mark=mark, grad_norm=False,
        )

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
    parts = {name: _counted(per_module, model, module) for name, module in model_parts(model).items()}
    return {"eval_per_image": eval_flops, "train_per_image": train_flops / spec.batch_size, "eval_parts": parts}


def _counted(per_module: dict[str, int], model: nn.Module, module: nn.Module) -> int:
    """``module``'s FLOPs in ``count_flops``' table, which names a module by its path below the outermost module
    called, under that one's class name: ``LAVT.backbone.layers.0`` when the model itself is called (with a text
    encoder), ``MultiModalSwin.layers.0`` when ``segment`` calls its parts (on text features)."""
    path = next(name for name, m in model.named_modules() if m is module)
    top, _, rest = path.partition(".")
    below = type(getattr(model, top)).__name__ + (f".{rest}" if rest else "")
    return per_module.get(f"{type(model).__name__}.{path}", per_module.get(below, 0))


def part_breakdown(model: nn.Module, cfg: Any, spec: BenchSpec, device: torch.device, amp: str) -> dict[str, Any]:
    result = {}
    for mode, bs in dict.fromkeys((("eval", 1), ("eval", spec.eval_batch_size), ("train", spec.batch_size))):
        model.train(mode == "train")
        batch = make_batch(model, cfg, bs, spec.size, device)
        timer = PartTimer(model_parts(model), device)
        totals = []
        for i in range(spec.warmup + spec.runs):
            timed = i >= spec.warmup
            recording = timer.recording() if timed else contextlib.nullcontext()
            with torch.set_grad_enabled(mode == "train"), autocast(amp, device), recording:
                synchronize(device)
                start = time.perf_counter()
                logits = forward(model, batch)
                synchronize(device)
                if timed:
                    totals.append(time.perf_counter() - start)
            if mode == "train":
                logits.float().mean().backward()
                model.zero_grad(set_to_none=True)
        timer.remove()
        parts = {k: 1e3 * s for k, s in timer.medians().items()}
        result[f"{mode}_forward_batch{bs}"] = {"total_ms": 1e3 * median(totals), "parts_ms": parts}
    return result

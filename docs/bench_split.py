"""Where this code's training step goes, part by part: the forward and the backward of the text encoder, each Swin
stage's blocks, PWAM, language gate and patch merging, and the decoder, timed by module hooks.

The hooks are ``utils.profiling.PartTimer``'s (forward: pre-hook to hook; backward: the full-backward pre-hook, when
the output's gradient is ready, to the full-backward hook, when the input's is). The text encoder's backward is not
seen this way (its inputs are token ids, which have no gradient) and is left to the remainder of the step, with the
loss and the optimizer. Same builders, batch and weights as ``docs/bench_official.py`` (Swin-T, window 7, a
BERT-base shaped text encoder, random weights); the official code is not needed.

Run from the repository root (the figures: docs/performance.md)::

    python docs/bench_split.py --size 224 --batch_size 2 --amp bf16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_official beside this file, also when loaded by path
import bench_official as bo  # noqa: E402

from utils.allocator import keep_freed_memory  # noqa: E402
from utils.profiling import PartTimer  # noqa: E402


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The parts timed: name -> the modules whose times add up to it (a stage's blocks)."""
    parts: dict[str, list[nn.Module]] = {"decoder": [model.classifier]}
    if model.text_encoder is not None:
        parts["text encoder"] = [model.text_encoder]
    for i, layer in enumerate(model.backbone.layers):
        parts[f"stage {i + 1} blocks"] = list(layer.blocks)
        parts[f"stage {i + 1} PWAM"] = [layer.fusion]
        parts[f"stage {i + 1} gate"] = [layer.res_gate]
        if layer.downsample is not None:
            parts[f"stage {i + 1} merging"] = [layer.downsample]
    return parts


def split(step: Callable[[], object], parts: dict[str, list[nn.Module]], warmup: int, repeats: int) -> dict[str, Any]:
    """Median ms per part, forward and backward (None where a part never ran), and of the whole ``step``, over
    ``repeats`` calls after ``warmup`` (``utils.profiling.PartTimer``)."""
    timer = PartTimer(parts, torch.device("cpu"), backward=True)
    try:
        for _ in range(warmup):
            step()
        totals = []
        for _ in range(repeats):
            with timer.recording():
                t0 = time.perf_counter()
                step()
                totals.append(time.perf_counter() - t0)
    finally:
        timer.remove()
    medians = {phase: timer.medians(phase) for phase in ("forward", "backward")}
    out: dict[str, Any] = {"step_ms": 1e3 * statistics.median(totals), "parts": {}}
    for name in parts:  # None: never ran (the text encoder's backward; a module the model does not call)
        out["parts"][name] = {ph: 1e3 * m[name] if name in m else None for ph, m in medians.items()}
    timed = sum(t or 0.0 for p in out["parts"].values() for t in p.values())
    out["rest_ms"] = out["step_ms"] - timed  # the text encoder's backward, the loss, the optimizer
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--amp", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as main.py and docs/bench_official.py (by default) run
    setup = argparse.Namespace(size=args.size, batch_size=args.batch_size, window=7, seed=0, bert="", amp=args.amp)
    with tempfile.TemporaryDirectory(prefix="bench_split_") as tmp:
        bert_dir, _, _ = bo.bert_folder(setup, Path(tmp))
        torch.manual_seed(0)
        repo = bo.build_repo(bo.repo_config(setup, bert_dir), False)
        batch = bo.make_batch(repo.model, repo.cfg, args.batch_size, args.size, torch.device("cpu"))
        step = bo.repo_train_fn(repo, batch, repo.cfg.TRAIN.AMP)  # "bf16", or "" for float32
        result = split(step, model_parts(repo.model), args.warmup, args.repeats)
    result["machine"], result["settings"] = bo.machine_info(), vars(args) | {"json": str(args.json)}
    print(f"training step {result['step_ms']:.0f} ms ({args.amp}, {args.size} px, batch {args.batch_size})")
    for name, t in result["parts"].items():
        ms = {ph: "    never" if v is None else f"{v:6.1f} ms" for ph, v in t.items()}
        print(f"  {name:18s} forward {ms['forward']}  backward {ms['backward']}")
    print(f"  {'the rest':18s} {result['rest_ms']:.1f} ms (text encoder backward, loss, gradient norm, optimizer)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""This repository's LAVT against the official LAVT code (github.com/yz93/LAVT-RIS), timed side by side in one process.

What is measured, for both implementations on the same machine, model size, batch and input tensors:

- training step: forward + loss (cross-entropy with class weights [0.9, 1.1]) + backward + AdamW step over the
  official train.py's parameter groups, at ``--batch_size`` (default 2);
- evaluation: one expression per forward (the official evaluation's batch 1), model in eval mode, no grad; reported
  as milliseconds per expression.

Each runs in float32 and under ``torch.autocast(device_type="cpu", dtype=torch.bfloat16)`` (``--amp``). After warm-up
the implementations take turns within every repeat, the first one alternating (A B, B A, ...), so that other work on
the machine slows each alike; every repeat's time is kept, and medians, min-max, the interquartile range and the
ratios official / repo (of the medians and per repeat) are reported as a markdown table and as JSON (``--json``).

The official model is its ``lavt`` packaging (``lib.segmentation.lavt``: Swin, PWAMs, SimpleDecoding) with its own
vendored BERT (``bert.modeling_bert``) run outside it, as its train.py does. The repository's model is
``configs/swin_tiny_refcoco.yaml`` built by ``models.build_model`` with the config defaults (the paper recipe and the
default fast paths; its decoder's weights laid out as bf16 training lays them out, unless only float32 is measured),
timed through ``engine.train_step`` and ``engine.build_optimizer``: what training runs. Both get
the same weights: the repository model is built first and its state dict, packed in the official layout
(``models.official.to_official``), is loaded strictly into the official one; the evaluation outputs are compared.
A third column, ``repo_unfused``, is the repository model with MODEL.FUSED_ATTENTION off (``--unfused``; by default
in float32 only, where it is cheap to add); a fourth, ``repo_conv_grad_plain``, the repository model with
MODEL.CONV_GRAD_MATMUL off (``--conv_grad_plain``: the decoder's weight gradients from oneDNN, as the official code's;
a float32 CPU path only); a fifth, ``repo_no_winograd``, with MODEL.CONV_WINOGRAD off (``--no_winograd``: the
decoder's convolutions by oneDNN, as the official code's).

The text encoder is BERT-base shaped (12 layers, width 768) because the official backbone hard-codes a 768-wide
language input. Its weights are random unless ``--bert`` names a local bert-base-uncased folder; the time does not
depend on the values.

The official checkout is only read (put on ``sys.path`` at run time); what it imports and this machine lacks
(mmcv, mmseg: used only to load ImageNet checkpoints) is replaced by stub modules written to a temporary folder.
How the official code is imported, built and run: ``docs/official_lavt.py``.

Run from the repository root::

    python docs/bench_official.py --official /path/to/LAVT-RIS --size 224 --batch_size 2 --repeats 7 --amp both \
        --json bench_official.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
# run as a file from docs/: Python puts docs/ on the path, not the repository root
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from configs import get_config  # noqa: E402
from engine import build_optimizer, train_step  # noqa: E402
from models import build_model  # noqa: E402
from tools.bench_workload import MALLOC_MODES, forward, make_batch  # noqa: E402
from utils import machine  # noqa: E402
from utils.allocator import keep_freed_memory  # noqa: E402
from utils.amp import NativeScaler, amp_dtype, autocast  # noqa: E402
from utils.losses import build_criterion  # noqa: E402
from utils.profiling import time_interleaved  # noqa: E402

# beside this file (Python puts docs/ on the path when it is run as a file; a test loads it by its path)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_lavt import (  # noqa: E402
    OFFICIAL_LR,
    OFFICIAL_WD,
    build_official,
    import_official,
    official_eval_fn,
    official_eval_rows_fn,
    official_train_fn,
)

CONFIG = REPO / "configs" / "swin_tiny_refcoco.yaml"
#: --amp value -> the precisions measured ("" is float32, as TRAIN.AMP spells it)
AMP_CHOICES = {"fp32": [""], "bf16": ["bf16"], "both": ["", "bf16"]}
PRECISION_NAMES = {"": "fp32", "bf16": "bf16"}
#: the repository columns with one switch off (same weights): column -> (its command-line flag, the repo_config
#: keyword and config key turned off, the phases the switch can change; the flag says in which precisions)
SWITCHED = {
    "repo_unfused": ("unfused", "fused_attention", "MODEL.FUSED_ATTENTION", ("train", "eval", "eval_batched")),
    "repo_conv_grad_plain": ("conv_grad_plain", "conv_grad_matmul", "MODEL.CONV_GRAD_MATMUL", ("train",)),
    "repo_no_winograd": ("no_winograd", "winograd", "MODEL.CONV_WINOGRAD", ("train", "eval", "eval_batched")),
}
# ----------------------------------------------------------------------------- the two setups


def repo_config(
    args: argparse.Namespace, bert_dir: str, fused_attention: bool = True, conv_grad_matmul: bool = True,
    winograd: bool = True,
) -> Any:
    """The repository's Swin-T config at the benchmark's size; only what the official tiny model also fixes (window
    7 unless --window 12), no ImageNet file, and the text encoder folder are overridden. The rest keeps the defaults
    (configs/defaults.py): FUSED_ATTENTION and FUSED_ADAMW on, TEXT.TRAIN_LAYERS 10, weighted CE."""
    opts = [
        "MODEL.SWIN.WINDOW_SIZE", args.window,
        "MODEL.PRETRAINED_SWIN", "",
        "MODEL.TEXT.ENCODER", bert_dir,
        "DATA.SIZE", args.size,
        "TRAIN.BATCH_SIZE", args.batch_size,
        "TRAIN.SEED", args.seed,
        # as training in bf16 builds it (the decoder's weight layouts, models.decoder.decoder_layouts); the same
        # model is timed in float32 too
        "TRAIN.AMP", "" if args.amp == "fp32" else "bf16",
    ]  # fmt: skip
    if not fused_attention:
        opts += ["MODEL.FUSED_ATTENTION", False]
    if not conv_grad_matmul:
        opts += ["MODEL.CONV_GRAD_MATMUL", False]
    if not winograd:
        opts += ["MODEL.CONV_WINOGRAD", False]
    return get_config(CONFIG, opts)


def bert_folder(args: argparse.Namespace, tmp: Path) -> tuple[str, bool, str]:
    """(text encoder folder, whether to load its weights, a description). Without --bert: a BERT-base config alone,
    randomly initialised on both sides (bert-base-uncased is not on this machine)."""
    if args.bert:
        return args.bert, True, f"bert from {args.bert} (pretrained weights, same on both sides)"
    from transformers import BertConfig

    folder = tmp / "bert-base-config"
    BertConfig().save_pretrained(folder)  # transformers' BertConfig defaults are bert-base-uncased's shape
    return str(folder), False, "BERT-base shape (12 layers, width 768, vocab 30522), random init, same on both sides"


class Repo(SimpleNamespace):
    """The repository's model with what training builds around it."""

    model: nn.Module
    cfg: Any
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]


def build_repo(cfg: Any, pretrained_text: bool) -> Repo:
    model = build_model(cfg, pretrained=pretrained_text, dtype=amp_dtype(cfg.TRAIN.AMP))
    optimizer = build_optimizer(model, cfg)  # also freezes the text layers the recipe keeps (requires_grad False)
    criterion = build_criterion(cfg.TRAIN.LOSS, cfg.TRAIN.CE_WEIGHTS)
    params = [p for p in model.parameters() if p.requires_grad]
    return Repo(model=model, cfg=cfg, optimizer=optimizer, criterion=criterion, params=params)


def repo_train_fn(rep: Repo, batch: dict[str, torch.Tensor], amp: str) -> Callable[[], float]:
    """``engine.train_step``, the training loop's step (its NativeScaler; without the gradient norm, as the loop runs
    all but one step in --print_freq)."""
    scaler = NativeScaler(amp, "cpu")
    device = torch.device("cpu")

    def step() -> float:
        rep.model.train()
        loss, _ = train_step(rep.model, rep.criterion, rep.optimizer, scaler, batch, device, rep.params,
                             amp=amp, clip_grad=rep.cfg.TRAIN.CLIP_GRAD, grad_norm=False)  # fmt: skip
        return loss

    return step


def repo_eval_fn(rep: Repo, batch: dict[str, torch.Tensor], amp: str) -> Callable[[], torch.Tensor]:
    """The evaluation forward of ``tools.bench_workload.eval_step`` on a given batch."""

    @torch.no_grad()
    def run() -> torch.Tensor:
        rep.model.eval()
        with autocast(amp, "cpu"):
            return forward(rep.model, batch).float()

    return run


# ----------------------------------------------------------------------------- timing and statistics


def alternate(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, inner: int = 1) -> dict[str, list]:
    """Seconds per call of each function, per repeat (the mean of ``inner`` calls), the functions taking turns and
    the first of each repeat alternating; ``warmup`` untimed rounds first. A collection runs before each timed
    call, untimed, so that the garbage one side leaves is not collected on the other's clock."""
    names = list(fns)
    for _ in range(warmup):  # in a fixed order, so that timed round r starts with names[r % len]
        for name in names:
            fns[name]()
    timed = time_interleaved([fns[n] for n in names], torch.device("cpu"), 0, repeats, inner=inner, before=gc.collect)
    return dict(zip(names, timed))


def summary(seconds: list[float]) -> dict[str, Any]:
    ms = [1e3 * s for s in seconds]
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "q1_ms": quartiles[0], "q3_ms": quartiles[2], "times_ms": ms}  # fmt: skip


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """num / den repeat by repeat (both ran in the same round, under the same load): median, min, max."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """``tools.benchmark``'s description of the machine, with the CPU features that decide the fast precision."""
    return {**machine.machine_info(torch.device("cpu")), "cpu_flags": machine.cpu_flags()}


# ----------------------------------------------------------------------------- report


def _cell(s: dict[str, Any] | None) -> str:
    return f"{s['median_ms']:.0f} ({s['min_ms']:.0f}-{s['max_ms']:.0f})" if s else "-"


def format_table(results: dict[str, Any], impls: list[str]) -> str:
    repos = [name for name in impls if name != "official"]
    head = ["phase", "precision", *(f"{name} ms" for name in impls), *(f"official / {name}" for name in repos)]
    rows = [head, ["---"] * len(head)]
    for key, entry in results.items():
        phase, precision = key.split("/")
        label = {
            "train": f"train step (batch {entry['batch']})",
            "eval": "eval, per expression (batch 1)",
            "eval_batched": f"eval, per expression (official batch 1, this code batch {entry['batch']})",
        }[phase]
        cells = [label, precision, *(_cell(entry["impls"].get(name)) for name in impls)]
        for name in repos:
            r = entry["ratios"].get(name)
            if r:
                p = r["paired"]
                cells.append(f"{r['of_medians']:.2f}x (per repeat {p['median']:.2f}, {p['min']:.2f}-{p['max']:.2f})")
            else:
                cells.append("-")
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def goals(results: dict[str, Any]) -> list[str]:
    """Issue #17's targets: this code's float32 no slower than the official float32 (>= 1.0x) and >= 1.3x the
    official under the same bf16 autocast, per forward; its fastest mode >= 2.0x the official float32, for the
    training step and for evaluation as each code runs it (``eval_batched`` when measured). Each ratio is of the
    medians; a comparison within one precision, whose rounds paired the two codes, also gives the median of the
    per-round ratios, and is met only when both reach the target (on a machine whose speed drifts, the two can
    disagree)."""

    def med(entry: dict[str, Any], name: str) -> float:
        return entry["impls"][name]["median_ms"]

    lines = []

    def check(label: str, ratio: float, target: float, entry: dict[str, Any] | None = None) -> None:
        per_round = (entry or {}).get("ratios", {}).get("repo", {}).get("paired", {}).get("median")
        shown = f"{ratio:.2f}x" + ("" if per_round is None else f", per repeat {per_round:.2f}x")
        met = ratio >= target and (per_round is None or per_round >= target)
        lines.append(f"- {label}: {shown} (target >= {target:.1f}x: {'met' if met else 'not met'})")

    for phase in ("train", "eval"):
        fp32, bf16 = results.get(f"{phase}/fp32"), results.get(f"{phase}/bf16")
        if fp32:
            check(f"{phase}: repo fp32 vs official fp32", med(fp32, "official") / med(fp32, "repo"), 1.0, fp32)
        if bf16:
            check(f"{phase}: repo bf16 vs official bf16", med(bf16, "official") / med(bf16, "repo"), 1.3, bf16)
    for phase in ("train", "eval_batched" if "eval_batched/fp32" in results else "eval"):
        fp32 = results.get(f"{phase}/fp32")
        entries = [e for e in (fp32, results.get(f"{phase}/bf16")) if e]
        if fp32:
            best = min(med(e, "repo") for e in entries)
            check(f"{phase}: repo fastest vs official fp32", med(fp32, "official") / best, 2.0)
    return lines


# ----------------------------------------------------------------------------- main


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of github.com/yz93/LAVT-RIS (read only)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--batch_size", type=int, default=2, help="training batch")
    p.add_argument("--window", type=int, default=7, choices=[7, 12], help="Swin window (official: 7, or 12)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per phase and precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--eval_inner", type=int, default=3, help="evaluation forwards per timed round (averaged)")
    p.add_argument(
        "--eval_batch",
        type=int,
        default=8,
        help="also time evaluation as each code runs it: the official test.py one expression per forward, this "
        "code EVAL.BATCH_SIZE expressions per forward (this many; < 2: not measured)",
    )
    p.add_argument("--amp", choices=list(AMP_CHOICES), default="both", help="precisions measured")
    p.add_argument(
        "--unfused",
        choices=["off", "fp32", "both"],
        default="fp32",
        help="where to time the repo with MODEL.FUSED_ATTENTION off as well (bf16 on a CPU without native bf16 is "
        "slow: fp32 only by default)",
    )
    p.add_argument(
        "--conv_grad_plain",
        choices=["off", "fp32"],
        default="fp32",
        help="also time the repo with MODEL.CONV_GRAD_MATMUL off (float32 only: the switch acts in float32 alone)",
    )
    p.add_argument(
        "--no_winograd",
        choices=["off", "fp32", "both"],
        default="off",
        help="also time the repo with MODEL.CONV_WINOGRAD off (the decoder's convolutions by oneDNN)",
    )
    p.add_argument("--bert", default="", help="a local BERT-base folder for pretrained text weights (default: random)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--malloc",
        choices=list(MALLOC_MODES),
        default="keep",
        help="glibc's malloc for the whole process, both implementations: keep freed memory for reuse (as main.py "
        "does, utils/allocator.py) or its default thresholds",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_official.json"), help="where every number is written")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.malloc == "keep" else "malloc: glibc's default thresholds"
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp_name:
        tmp = Path(tmp_name)
        segmentation, modeling_bert, configuration_bert, stubbed = import_official(args.official, tmp / "stubs")
        bert_dir, pretrained_text, text_note = bert_folder(args, tmp)
        torch.manual_seed(args.seed)
        repo = build_repo(repo_config(args, bert_dir, fused_attention=True), pretrained_text)
        official, official_info = build_official(
            segmentation, modeling_bert, configuration_bert, bert_dir, repo.model, args
        )
        impls: dict[str, Any] = {"official": official, "repo": repo}
        for name, (flag, keyword, _, _) in SWITCHED.items():
            if getattr(args, flag) != "off":
                impls[name] = build_repo(repo_config(args, bert_dir, **{keyword: False}), pretrained_text)
                impls[name].model.load_state_dict(repo.model.state_dict())

    # one batch of each shape, given to every implementation: the repository's benchmark inputs (random images and
    # targets, expressions of 10-20 of the 20 tokens, padded with mask 0)
    torch.manual_seed(args.seed + 1)
    train_batch = make_batch(repo.model, repo.cfg, args.batch_size, args.size, torch.device("cpu"))
    eval_batch = make_batch(repo.model, repo.cfg, 1, args.size, torch.device("cpu"))
    batched = make_batch(repo.model, repo.cfg, max(args.eval_batch, 1), args.size, torch.device("cpu"))
    phases = ("train", "eval", "eval_batched") if args.eval_batch > 1 else ("train", "eval")

    # same weights, same computation: the float32 evaluation outputs must agree up to round-off
    check = {name: fn() for name, fn in (
        ("official", official_eval_fn(official, eval_batch, "")), ("repo", repo_eval_fn(repo, eval_batch, "")),
    )}  # fmt: skip
    max_diff = (check["official"] - check["repo"]).abs().max().item()
    if not max_diff < 1e-3:
        raise RuntimeError(f"official and repo logits differ by {max_diff}: the weights did not carry over")

    results: dict[str, Any] = {}
    for amp in AMP_CHOICES[args.amp]:
        precision = PRECISION_NAMES[amp]
        for phase in phases:
            fns: dict[str, Callable[[], object]] = {}
            for name, impl in impls.items():
                if name in SWITCHED:
                    flag, _, _, changes = SWITCHED[name]
                    if phase not in changes or (amp and getattr(args, flag) == "fp32"):
                        continue
                if phase == "train":
                    make = official_train_fn if name == "official" else repo_train_fn
                    fns[name] = make(impl, train_batch, amp)
                elif phase == "eval":
                    make = official_eval_fn if name == "official" else repo_eval_fn
                    fns[name] = make(impl, eval_batch, amp)
                else:  # the same expressions on both sides, each in its own forward on the official one
                    make = official_eval_rows_fn if name == "official" else repo_eval_fn
                    fns[name] = make(impl, batched, amp)
            inner = args.eval_inner if phase == "eval" else 1
            print(f"timing {phase} {precision}: {args.warmup} warm-up + {args.repeats} rounds of {', '.join(fns)}",
                  flush=True)  # fmt: skip
            times = alternate(fns, args.warmup, args.repeats, inner)
            if phase == "eval_batched":  # per expression
                times = {name: [t / args.eval_batch for t in ts] for name, ts in times.items()}
            entry: dict[str, Any] = {
                "batch": {"train": args.batch_size, "eval": 1, "eval_batched": args.eval_batch}[phase],
                "inner": inner,
                "impls": {name: summary(t) for name, t in times.items()},
                "ratios": {},
            }
            for name in fns:
                if name != "official":
                    off, mine = entry["impls"]["official"]["median_ms"], entry["impls"][name]["median_ms"]
                    entry["ratios"][name] = {"of_medians": off / mine, "paired": paired_ratio(times["official"],
                                                                                                times[name])}
            results[f"{phase}/{precision}"] = entry

    machine["load_average_after"] = os.getloadavg()
    names = list(impls)
    setup = {
        "official": f"{args.official} (lib.segmentation.lavt, swin_type tiny, window {args.window}, mha '', "
        f"fusion_drop 0; its vendored BERT outside the model, eval mode; AdamW lr {OFFICIAL_LR} wd {OFFICIAL_WD}, "
        f"train.py's 4 groups, BERT layers 0-{official_info['bert_layers_trained'] - 1} optimised, other BERT "
        "parameters keep requires_grad; loss CE [0.9, 1.1])",
        "repo": f"{CONFIG.relative_to(REPO)} + window {args.window}, DATA.SIZE {args.size}, no ImageNet file; "
        f"defaults: FUSED_ATTENTION {repo.cfg.MODEL.FUSED_ATTENTION}, FUSED_ADAMW {repo.cfg.TRAIN.FUSED_ADAMW}, "
        f"TEXT.TRAIN_LAYERS {repo.cfg.MODEL.TEXT.TRAIN_LAYERS}, "
        f"LOSS {repo.cfg.TRAIN.LOSS} {list(repo.cfg.TRAIN.CE_WEIGHTS)}, "
        f"CONV_GRAD_MATMUL {repo.cfg.MODEL.CONV_GRAD_MATMUL}, CONV_WINOGRAD {repo.cfg.MODEL.CONV_WINOGRAD}, "
        f"CHANNELS_LAST {repo.cfg.MODEL.CHANNELS_LAST}, GRAD_CHECKPOINT {repo.cfg.MODEL.GRAD_CHECKPOINT}, "
        f"COMPILE {repo.cfg.MODEL.COMPILE}; built as TRAIN.AMP {repo.cfg.TRAIN.AMP or 'float32'} training builds it "
        "(the decoder's weight layouts), timed in every precision",
        **{name: f"repo with {key} False" if name in impls else "not measured"
           for name, (_, _, key, _) in SWITCHED.items()},  # fmt: skip
        "text_encoder": text_note,
        "stubbed_modules": stubbed,
        "malloc": malloc,
        "official_bert_ignored_keys": official_info["bert_ignored_keys"],
        "eval_logits_max_abs_diff_fp32": max_diff,
        "expression_tokens": {
            "train": train_batch["attention_mask"].sum(1).tolist(),
            "eval": eval_batch["attention_mask"].sum(1).tolist(),
            "eval_batched": batched["attention_mask"].sum(1).tolist(),
            "of": train_batch["input_ids"].shape[1],
        },
    }  # fmt: skip
    report = {"machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "setup": setup, "results": results}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))

    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["cpu_flags"].items())
    print(f"\n{machine['cpu']}, {machine['cores']} logical CPUs, {machine['torch_threads']} torch threads; "
          f"torch {machine['torch']}; {flags}")  # fmt: skip
    before, after = machine["load_average"], machine["load_average_after"]
    print(f"load average (1/5/15 min) before {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}, "
          f"after {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}")  # fmt: skip
    print(f"Swin-T, window {args.window}, {args.size} px; text encoder: {text_note}; stubs: {stubbed or 'none'}")
    print(f"{malloc} (both implementations)")
    print(f"fp32 eval logits, official vs repo, max |diff| {max_diff:.2e} (same weights)")
    print(f"medians (min-max) of {args.repeats} alternating rounds after {args.warmup} warm-up; "
          f"eval: mean of {args.eval_inner} forwards per round\n")  # fmt: skip
    print(format_table(results, names))
    print("\n" + "\n".join(goals(results)))
    print(f"\nJSON: {args.json}")
    return report


if __name__ == "__main__":
    main()

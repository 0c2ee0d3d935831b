"""Command line of ``main.py``.

Every configuration flag maps onto one config key (``FLAG_TO_KEY``). Precedence, lowest first:
the defaults in ``configs/defaults.py`` (the paper's recipe) <- ``--cfg_file`` <- explicit flags <- ``--opts KEY VALUE
...`` (a key set twice in ``--opts``: the last value; by a flag and in ``--opts``: refused, as one would be lost).
``python main.py`` with no argument at all is the built-in demo (``configs/demo.yaml``).
Flags that select what the run does (``--eval``, ``--resume``, ``--allow_change``, ``--pretrain``, ``--overwrite``,
``--device``) are not config.

Nothing here parses ``sys.argv`` at import time: ``get_parser().parse_args(argv)`` does it on demand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from configs import DEMO_CONFIG, get_config
from models import CheckpointError, checkpoint_format
from utils.lock import STALE_AFTER_S

# argparse dest -> config key. A flag left unset (None) leaves the key to the config file.
FLAG_TO_KEY: dict[str, str] = {
    "dataset": "DATA.DATASET",
    "splitBy": "DATA.SPLIT_BY",
    "refer_data_root": "DATA.ROOT",
    "image_dir": "DATA.IMAGE_DIR",
    "size": "DATA.SIZE",
    "workers": "DATA.WORKERS",
    "batch_size": "TRAIN.BATCH_SIZE",
    "epochs": "TRAIN.EPOCHS",
    "lr": "TRAIN.LR",
    "weight_decay": "TRAIN.WEIGHT_DECAY",
    "loss": "TRAIN.LOSS",
    "amp": "TRAIN.AMP",
    "clip_grad": "TRAIN.CLIP_GRAD",
    "seed": "TRAIN.SEED",
    "checkpoint_every": "TRAIN.CHECKPOINT_EVERY",
    "pretrained_swin_weights": "MODEL.PRETRAINED_SWIN",
    "ck_bert": "MODEL.TEXT.ENCODER",
    "text_train_layers": "MODEL.TEXT.TRAIN_LAYERS",
    "grad_checkpoint": "MODEL.GRAD_CHECKPOINT",
    "type": "EVAL.SPLITS",
    "eval_mode": "EVAL.MODE",
    "eval_resolution": "EVAL.RESOLUTION",
    "eval_batch_size": "EVAL.BATCH_SIZE",
    "shuffle_expressions": "EVAL.SHUFFLE_EXPRESSIONS",
    "save_masks": "EVAL.SAVE_MASKS",
    "output": "OUTPUT",
    "model_id": "MODEL_ID",
    "tensorboard": "LOG.TENSORBOARD",
}
# The paper's batch (per GPU, GPUs), for the run log's comparison.
PAPER_BATCH = (8, 4)


def get_parser() -> argparse.ArgumentParser:
    """The parser of ``main.py``. Config flags default to None, meaning "as the config says"."""
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train and evaluate LAVT (referring image segmentation). "
        "Without arguments: the built-in demo (synthetic data, small model, CPU). "
        "Multi-GPU: torchrun --nproc_per_node N main.py ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("configuration")
    g.add_argument(
        "--cfg_file",
        type=str,
        default=None,
        help="YAML config merged over configs/defaults.py (the paper's recipe); with no argument at all, main.py runs "
        "the built-in demo (configs/demo.yaml)",
    )
    g.add_argument(
        "--opts",
        nargs="+",
        default=None,
        metavar="KEY VALUE",
        help="config overrides applied last, e.g. --opts TRAIN.LOSS dice MODEL.SWIN.WINDOW_SIZE 7",
    )

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default=None, help="refcoco | refcoco+ | refcocog | synthetic")
    g.add_argument("--splitBy", type=str, default=None, help="unc | google | umd")
    g.add_argument("--refer_data_root", type=str, default=None, help="REFER root holding <dataset>/refs(<splitBy>).p")
    g.add_argument("--image_dir", type=str, default=None, help="COCO train2014 images (default: under the root)")
    g.add_argument("--size", type=int, default=None, help="network input size (square)")
    g.add_argument("--workers", type=int, default=None, help="data loader workers per process")

    g = p.add_argument_group("training")
    g.add_argument(
        "--batch_size", type=int, default=None, help="per process; with --eval it sets the evaluation batch size"
    )
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW; polynomial decay)")
    g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--loss", type=str, default=None, choices=["ce", "dice", "ce+dice"], help="training loss")
    g.add_argument("--amp", type=str, default=None, choices=["bf16", "fp16", "auto"],
                   help="mixed precision; auto: bf16 where the device computes it natively, else float32")
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (0: off)")
    g.add_argument("--grad_checkpoint", action="store_true", default=None, help="activation checkpointing")
    g.add_argument("--seed", type=int, default=None, help="offset by rank in each process")
    g.add_argument(
        "--checkpoint_every", type=int, default=None, metavar="N",
        help="also write last.pth every N iterations (0: at epoch ends only); SIGTERM, SIGUSR1, Ctrl-C write it, stop",
    )  # fmt: skip
    g.add_argument("--pretrained_swin_weights", type=str, default=None, help="Swin ImageNet checkpoint")
    g.add_argument("--ck_bert", type=str, default=None, help='local BERT folder, or the alias "minilm-l6"')
    g.add_argument("--text_train_layers", type=int, default=None, help="optimise only the first N text layers")
    g.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="auto|PATH",
        help="continue a run exactly (model, optimizer, LR schedule, scaler, position in the epoch, random states, "
        "metrics): alone, from <output>/<model_id>/last.pth (or --pretrain), which must exist; 'auto': from it if "
        "it exists, else start fresh (from --pretrain's weights if given: one command for the first launch and every "
        "requeue); PATH: from that file",
    )
    g.add_argument(
        "--allow_change",
        nargs="+",
        default=None,
        metavar="KEY",
        help="on resume, apply these settings although they differ from the checkpoint's (config keys, or "
        "WORLD_SIZE for the number of processes), e.g. --epochs 60 --allow_change TRAIN.EPOCHS: the LR schedule "
        "is recomputed from the iteration reached; any other difference is refused",
    )
    g.add_argument(
        "--pretrain",
        type=str,
        default=None,
        help="weights to start from or to evaluate: this repository's checkpoint or an official LAVT release",
    )

    g.add_argument(
        "--stop_after",
        type=int,
        default=None,
        metavar="N",
        help="end the run after epoch N (the LR schedule still spans --epochs); continue it with --resume",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate --pretrain on --type")
    g.add_argument("--type", type=str, nargs="+", default=None, help="split(s) to evaluate, e.g. val testA testB")
    g.add_argument("--eval_mode", type=str, default=None, choices=["each", "cat", "avg"],
                   help="each expression alone (the paper), an object's joined (cat) or their logits averaged (avg)")
    g.add_argument("--eval_resolution", type=str, default=None, choices=["network", "original"],
                   help="IoU at the network's input size (official) or the image's own size")
    g.add_argument("--eval_batch_size", type=int, default=None, help="expressions per evaluation batch")
    g.add_argument(
        "--shuffle_expressions",
        action="store_true",
        default=None,
        help="control: each image's expressions shuffled among its objects",
    )
    g.add_argument("--save_masks", action="store_true", default=None,
                   help="write each expression's predicted mask as a PNG into masks_<...>/ in the run folder")

    g = p.add_argument_group("run")
    g.add_argument("--output", type=str, default=None, help="runs go to <output>/<model_id>/")
    g.add_argument(
        "--model_id",
        type=str,
        default=None,
        help="the run folder's name; --eval writes into it only when given (else into the checkpoint's run folder, "
        "or <output>/eval_<checkpoint name>)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a run folder that holds a run: its checkpoints, logs and results are deleted first",
    )
    g.add_argument(
        "--stale_lock_minutes",
        type=float,
        default=STALE_AFTER_S / 60,
        help="the run folder's lock, held by a training on another host, is taken for stale after this long "
        "without a heartbeat (on this host: when its process is gone)",
    )
    g.add_argument(
        "--no_tensorboard", dest="tensorboard", action="store_false", default=None, help="no TensorBoard event files"
    )
    g.add_argument("--device", type=str, default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--print_freq", type=int, default=10, help="log every N iterations (0: no per-iteration lines)")
    g.add_argument("--debug", action="store_true", help="show the Python traceback of every error, not one line")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None). No argument at all selects the demo config; any other
    invocation uses the file it names, or the paper's defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    if not argv:
        args.cfg_file = str(DEMO_CONFIG)
    return args


def is_demo(args: argparse.Namespace) -> bool:
    """The run uses the built-in demo's config file."""
    return bool(args.cfg_file) and Path(args.cfg_file).resolve() == DEMO_CONFIG.resolve()


def check_flags(args: argparse.Namespace, cfg: CfgNode) -> None:
    """Flags that contradict each other or the config (ValueError), a missing or unreadable checkpoint to evaluate
    (CheckpointError): refused before anything is written."""
    if args.overwrite and (args.eval or args.resume):
        other = "--eval" if args.eval else "--resume"
        raise ValueError(f"--overwrite (delete the run folder's previous run, then train) contradicts {other}")
    if args.eval and not args.pretrain:
        raise ValueError("--eval needs the weights to evaluate: --pretrain <checkpoint>")
    if args.eval and (args.resume or args.allow_change):
        raise ValueError("--eval evaluates --pretrain; --resume / --allow_change continue a training: choose one")
    if args.eval:  # a missing, empty or foreign file: before a folder for its results is made
        try:
            checkpoint_format(args.pretrain)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (--pretrain)") from e
    if not args.stale_lock_minutes > 0:
        raise ValueError(f"--stale_lock_minutes must be > 0, got {args.stale_lock_minutes}")
    if args.print_freq < 0:
        raise ValueError(f"--print_freq must be >= 0 (0: no per-iteration log lines), got {args.print_freq}")
    if not cfg.MODEL.TEXT.ENCODER:
        raise ValueError("MODEL.TEXT.ENCODER (--ck_bert) is empty: training and evaluation need the text encoder")


def names_run_folder(args: argparse.Namespace) -> bool:
    """The command line names the run folder: ``--model_id``, ``--output``, or MODEL_ID / OUTPUT in ``--opts``."""
    opts = list(args.opts or [])
    return args.model_id is not None or args.output is not None or bool({"MODEL_ID", "OUTPUT"} & set(opts[::2]))


def _demo_flag() -> str:
    """The flag that names the demo's config, as a user types it from here."""
    return f"--cfg_file {os.path.relpath(DEMO_CONFIG)}"


def rerun_hint(args: argparse.Namespace) -> str:
    """What to add to the refusal of a run folder that holds a run: the demo's flags need its config named."""
    return f" (the built-in demo: add {_demo_flag()})" if is_demo(args) else ""


def demo_hint(args: argparse.Namespace) -> str:
    """What to add to the refusal of missing REFER files when no config file is named: flags alone select the paper's
    recipe on RefCOCO, not the demo that ``python main.py`` alone runs."""
    if args.cfg_file:
        return ""
    demo = "python main.py alone runs the built-in demo on synthetic data"
    return f" ({demo}; to run it with flags, name its config: {_demo_flag()})"


def describe_batch(per_process: int, processes: int) -> str:
    """The global batch of a training, against the paper's."""
    per_gpu, gpus = PAPER_BATCH
    return (
        f"global batch {per_process * processes} = {per_process} per process x {processes} process(es) "
        f"(the paper: {per_gpu * gpus} = {per_gpu} per GPU x {gpus} GPUs)"
    )


def describe_config(args: argparse.Namespace) -> str:
    """One line: which config file (or the defaults) and which overrides this run uses."""
    if not args.cfg_file:
        source = "configs/defaults.py (the paper's recipe)"
    elif is_demo(args):
        source = f"{args.cfg_file} (the built-in demo)"
    else:
        source = f"{args.cfg_file} over configs/defaults.py"
    flags = [f"{key}={value!r}" for key, value in flag_settings(args).items()]
    overrides = flags + [" ".join(map(str, args.opts))] if args.opts else flags
    return source + (f"; overrides: {', '.join(overrides)}" if overrides else "; no overrides")


def _flags_given(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """(flag, config key, value) of each flag given. With --eval (and no --eval_batch_size), --batch_size is the
    evaluation's batch: it sets EVAL.BATCH_SIZE, not the training's."""
    given = []
    for dest, key in FLAG_TO_KEY.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "batch_size" and getattr(args, "eval", False) and getattr(args, "eval_batch_size", None) is None:
            key = "EVAL.BATCH_SIZE"
        given.append((f"--{dest}", key, value))
    return given


def refuse_set_twice(flag_of: dict[str, str], opts: Sequence[Any]) -> None:
    """ValueError where a key of ``opts`` (KEY VALUE ...) is also set by a flag given (``flag_of``: key -> flag):
    one of the two would be dropped without a word."""
    for key in list(opts)[::2]:
        if key in flag_of:
            raise ValueError(f"{flag_of[key]} and --opts {key} both set {key}: give it once")


def flag_settings(args: argparse.Namespace) -> dict[str, object]:
    """{config key: value} of the flags given (``_flags_given``)."""
    return {key: value for _, key, value in _flags_given(args)}


def config_from_args(args: argparse.Namespace) -> CfgNode:
    """Frozen config: defaults <- ``args.cfg_file`` <- explicit flags <- ``args.opts``."""
    opts = list(args.opts or [])
    if len(opts) % 2:  # named here, before the flags' pairs join them and blur which list was odd
        items = " ".join(map(str, opts))
        raise ValueError(f"--opts takes KEY VALUE pairs, got an odd number of items ({len(opts)}): {items}")
    given = _flags_given(args)
    refuse_set_twice({key: flag for flag, key, _ in given}, opts)
    overrides: list = []
    for _, key, value in given:
        # repr() keeps strings strings (yacs would literal_eval "123" into an int)
        overrides += [key, repr(list(value)) if isinstance(value, list | tuple) else repr(value)]
    return get_config(args.cfg_file, overrides + opts)

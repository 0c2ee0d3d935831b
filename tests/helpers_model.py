"""Small builders shared by the model tests."""
from __future__ import annotations

from pathlib import Path

import torch

from configs import get_config

FIXTURE = Path(__file__).parent / "fixtures" / "lavt_small_w7_224.pt"


def tiny_cfg(**over):
    """A tiny LAVT config; keyword overrides use '__' for '.' (MODEL__SWIN__EMBED_DIM=8)."""
    opts = ["MODEL.SWIN.EMBED_DIM", 8, "MODEL.SWIN.DEPTHS", [2, 2, 2, 2], "MODEL.SWIN.NUM_HEADS", [1, 2, 2, 4],
            "MODEL.SWIN.WINDOW_SIZE", 4, "MODEL.TEXT.DIM", 12, "MODEL.SWIN.DROP_PATH_RATE", 0.0,
            "MODEL.TEXT.ENCODER", "", "MODEL.PRETRAINED_SWIN", ""]
    for k, v in over.items():
        opts += [k.replace("__", "."), v]
    return get_config(None, opts)


def fixture_cfg(reference: dict, **over):
    c = reference["config"]
    return tiny_cfg(MODEL__SWIN__EMBED_DIM=c["embed_dim"], MODEL__SWIN__DEPTHS=c["depths"],
                    MODEL__SWIN__NUM_HEADS=c["num_heads"], MODEL__SWIN__WINDOW_SIZE=c["window_size"],
                    MODEL__FUSION__NUM_HEADS=c["num_heads_fusion"], MODEL__TEXT__DIM=c["lang_dim"], **over)


def save_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, vocab: int = 64) -> Path:
    """A random BERT saved as a local HF folder (config.json + weights)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(folder)
    return folder

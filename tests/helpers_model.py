"""Small builders shared by the model tests."""
from __future__ import annotations

from pathlib import Path

import torch

from configs import get_config

from .conftest import FIXTURE, tiny_opts

__all__ = ["FIXTURE", "fixture_cfg", "save_tiny_bert", "tiny_cfg"]


def tiny_cfg(**over):
    """The tiny LAVT config (tests/conftest.py: ``TINY``); keyword overrides use '__' for '.'
    (``MODEL__SWIN__EMBED_DIM=16``)."""
    return get_config(None, tiny_opts(**over))


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

"""``build_model`` from a config, and the official optimiser parameter groups."""
from __future__ import annotations

import logging

import torch
from torch import nn
from yacs.config import CfgNode

from .decoder import build_decoder
from .lavt import LAVT
from .linear import few_rows_linear_
from .refine import build_refine
from .swin import build_backbone
from .text import build_text_encoder
from .weights import load_pretrained_swin

logger = logging.getLogger(__name__)

#: MODEL.TEXT.DROPOUT -> whether the text encoder's dropout is on in training (None: by MODEL.NAME).
TEXT_DROPOUT = {"auto": None, "enabled": True, "disabled": False}


def text_dropout(name: str, setting: str) -> bool:
    """Whether ``model.train()`` turns the text encoder's dropout on: MODEL.TEXT.DROPOUT, or with "auto" the official
    packaging MODEL.NAME (``lavt_one`` yes: BERT sits inside the trained model; ``lavt`` no: BERT stays in eval mode).
    """
    forced = TEXT_DROPOUT[setting]
    return name == "lavt_one" if forced is None else forced


def build_model(
    cfg: CfgNode, pretrained: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LAVT:
    """LAVT from ``cfg.MODEL``, on ``device``.

    Args:
        cfg: the config (``configs.get_config``).
        pretrained: load the text encoder's pretrained weights and ``MODEL.PRETRAINED_SWIN``; False builds the
            architecture only (e.g. before loading a full LAVT checkpoint).
        device: where it will run.
        dtype: the precision training computes in (``TRAIN.AMP``, resolved: ``utils.amp.amp_dtype``). With ``device``,
            ``TRAIN.BATCH_SIZE`` and ``DATA.SIZE`` it decides the memory order of the decoder's weights
            (``models.decoder.decoder_layouts``): speed only, the values are the same.
    """
    m = cfg.MODEL
    if m.NAME not in ("lavt", "lavt_one"):
        raise ValueError(f"MODEL.NAME must be 'lavt' or 'lavt_one', got {m.NAME!r}")
    if len(m.SWIN.DEPTHS) != 4:
        raise ValueError(f"LAVT has 4 stages: MODEL.SWIN.DEPTHS needs 4 entries, got {list(m.SWIN.DEPTHS)}")
    if m.TEXT.DROPOUT not in TEXT_DROPOUT:
        raise ValueError(f"MODEL.TEXT.DROPOUT must be one of {list(TEXT_DROPOUT)}, got {m.TEXT.DROPOUT!r}")
    text_encoder = build_text_encoder(m.TEXT.ENCODER, pretrained) if m.TEXT.ENCODER else None
    lang_dim = text_encoder.config.hidden_size if text_encoder is not None else m.TEXT.DIM
    backbone = build_backbone(
        m.SWIN.EMBED_DIM, m.SWIN.DEPTHS, m.SWIN.NUM_HEADS, m.SWIN.WINDOW_SIZE, lang_dim, m.FUSION.NUM_HEADS,
        m.FUSION.DROPOUT, m.SWIN.PATCH_SIZE, m.SWIN.MLP_RATIO, m.SWIN.DROP_PATH_RATE, m.FUSED_ATTENTION,
        m.GRAD_CHECKPOINT, m.SWIN.STEM, m.SWIN.FIT_WINDOW,
    )
    if pretrained and m.PRETRAINED_SWIN:
        load_pretrained_swin(backbone, m.PRETRAINED_SWIN)
    device = torch.device(device)
    decoder = build_decoder(
        m.SWIN.EMBED_DIM, m.CHANNELS_LAST, m.GRAD_CHECKPOINT, m.DECODER_HIDDEN, m.CONV_GRAD_MATMUL, m.CONV_WINOGRAD,
        cfg.TRAIN.BATCH_SIZE, cfg.DATA.SIZE, dtype, device.type,
    )
    dropout = text_dropout(m.NAME, m.TEXT.DROPOUT)
    refine = build_refine(m.REFINE, m.GRAD_CHECKPOINT)
    model = LAVT(backbone, decoder, text_encoder, text_dropout=dropout, refine=refine).to(device)
    few_rows_linear_(model)  # evaluation's layers of few rows as W x^T on CPU (models/linear.py)
    return compile_model(model) if m.COMPILE else model


def compile_model(model: LAVT) -> LAVT:
    """``torch.compile`` the backbone, the decoder and the refinement (if any) in place (``nn.Module.compile``): the
    parameter names, the state dict and the checkpoints stay as they are. The text encoder (Hugging Face code) runs
    eagerly."""
    for part in (model.backbone, model.classifier, model.refine):
        if part is not None:
            part.compile()
    return model


def _no_decay(name: str) -> bool:
    return "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name


def build_param_groups(model: LAVT, weight_decay: float, text_train_layers: int = 10) -> list[dict]:
    """AdamW groups of the official recipe.

    Backbone norms and relative-position tables get no weight decay; the decoder (and the refinement, if any) gets
    it; of the text encoder only the first ``text_train_layers`` encoder layers are optimised (its embeddings and
    later layers keep their pretrained values, and are set ``requires_grad=False`` so no gradient is computed).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    decay, no_decay = [], []
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name) else decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {"params": decay, "weight_decay": weight_decay, "name": "backbone"},
        {"params": [p for part in (model.classifier, model.refine) if part is not None for p in part.parameters()
                    if p.requires_grad], "weight_decay": weight_decay, "name": "decoder"},
    ]
    if model.text_encoder is not None:
        layers = model.text_encoder.encoder.layer
        if not 0 <= text_train_layers <= len(layers):
            raise ValueError(f"MODEL.TEXT.TRAIN_LAYERS={text_train_layers}, but the encoder has {len(layers)} layers")
        trained = {id(p) for layer in layers[:text_train_layers] for p in layer.parameters()}
        for p in model.text_encoder.parameters():
            p.requires_grad_(id(p) in trained)
        groups.append({"params": [p for p in model.text_encoder.parameters() if p.requires_grad],
                       "weight_decay": weight_decay, "name": "text_encoder"})
    return [g for g in groups if g["params"]]

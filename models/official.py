"""The authors' file layout: packing a model as their ``lavt`` / ``lavt_one`` files, and their training ``args``.

The official code saves ``{'model': state_dict, 'bert_model': state_dict (lavt only), 'args': Namespace, ...}``
(``train.py``) and loads ``'model'`` with a strict ``load_state_dict``. Its Swin keeps each block's
``relative_position_index`` as a persistent buffer and its BERT has no pooler (set to None before training), so a
file it can load has the former and not the latter. The ``args`` say what the weights cannot: the PWAM heads
(``--mha``, e.g. ``4-4-4-4``; empty for one head per stage), and the input size, dataset and splits.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from .weights import TEXT_PREFIX
from .windows import relative_position_index

__all__ = ["PACKAGINGS", "SWIN_TYPES", "args_settings", "official_args", "to_official"]

PACKAGINGS = ("lavt", "lavt_one")
STAGES = 4
#: official ``--swin_type`` -> (embed dim, depths, heads), as the official ``lib/segmentation.py`` builds them
SWIN_TYPES = {
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}
#: official argument -> (config key, type) of the data settings the ``args`` record
DATA_ARGS = {"img_size": ("DATA.SIZE", int), "dataset": ("DATA.DATASET", str), "splitBy": ("DATA.SPLIT_BY", str)}


def official_args(model: nn.Module, packaging: str, **extra: Any) -> dict[str, Any]:
    """The official training arguments that describe ``model`` (a ``models.LAVT``): ``model`` (the packaging),
    ``mha`` and, where the official options can say it, ``swin_type`` and ``window12``; ``extra`` added as given
    (e.g. ``img_size=480, dataset="refcoco", splitBy="unc"``)."""
    layers = model.backbone.layers
    heads = [layer.fusion.image_lang_att.num_heads for layer in layers]
    args: dict[str, Any] = {"model": packaging, "mha": "" if heads == [1] * len(heads) else "-".join(map(str, heads))}
    shape = (model.backbone.num_features[0], [len(layer.blocks) for layer in layers],
             [layer.blocks[0].attn.num_heads for layer in layers])  # fmt: skip
    swin_type = next((name for name, known in SWIN_TYPES.items() if known == shape), None)
    if swin_type is not None:
        args["swin_type"] = swin_type
    window = layers[0].blocks[0].window
    if window in (7, 12):  # the official code knows no other window
        args["window12"] = window == 12
    return {**args, **extra}


def args_settings(args: Any) -> tuple[list[int], dict[str, Any]]:
    """An official ``args`` (Namespace or dict) -> (PWAM heads per stage, {config key: value} of its data settings).

    Raises ValueError for an ``mha`` that is not ``a-b-c-d``.
    """
    values = args if isinstance(args, dict) else vars(args)
    mha = values.get("mha") or ""
    try:
        heads = [int(h) for h in mha.split("-")] if mha else [1] * STAGES  # the official default: one head
    except (AttributeError, ValueError):
        heads = []
    if len(heads) != STAGES or min(heads) < 1:
        raise ValueError(f"official args.mha {mha!r} is not of the form a-b-c-d")
    data = {key: values[name] for name, (key, kind) in DATA_ARGS.items()
            if type(values.get(name)) is kind}  # fmt: skip
    return heads, data


def to_official(model: nn.Module, packaging: str = "lavt", **args: Any) -> dict[str, Any]:
    """The model's weights packed as the authors' files, which their code loads strictly.

    ``'lavt'``: ``{'model', 'bert_model', 'args'}`` (no ``bert_model`` without a text encoder); ``'lavt_one'``:
    ``{'model', 'args'}`` with the text encoder under ``text_encoder.``. Every Swin block gets its
    ``relative_position_index`` buffer; ``args`` (``official_args``, plus ``args`` given here) as an
    ``argparse.Namespace``, the one class ``models.read_checkpoint`` allows besides tensors.
    """
    if packaging not in PACKAGINGS:
        raise ValueError(f"packaging must be 'lavt' or 'lavt_one', got {packaging!r}")
    model = getattr(model, "module", model)  # DDP
    state = dict(model.state_dict())
    for i, layer in enumerate(model.backbone.layers):
        for j, block in enumerate(layer.blocks):
            index = relative_position_index(block.window)  # [w^2, w^2] int64, as the official buffer
            state[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = index
    packed: dict[str, Any] = {"model": state}
    if packaging == "lavt":
        bert = {k[len(TEXT_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(TEXT_PREFIX)}
        if bert:
            packed["bert_model"] = bert
    packed["args"] = argparse.Namespace(**official_args(model, packaging, **args))
    return packed

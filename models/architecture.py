"""The architecture of a LAVT checkpoint that stores no config (the official releases), read from its weights.

Every shape-bearing setting is in the tensor shapes: the embed dim (the stem's LayerNorm), the depths (block
indices per stage), the Swin heads and the window (``relative_position_bias_table`` is ``[(2w - 1)^2, heads]``),
the patch size (the stem's kernel, or its stride-2 convolutions), the MLP ratio (``fc1`` rows over the width),
the decoder width (``classifier.conv1_1`` input channels), the refinement's width (``refine.conv1``, none in the
official files), the language width (the PWAM key projection's input),
the stem (``patch_embed.stem.*`` only in the convolutional one) and the text encoder (its width, layers and
vocabulary, for checking the BERT folder given for it). The packaging is a hint: ``lavt_one`` holds the text encoder
under ``text_encoder.``, ``lavt`` beside the model under ``bert_model`` (MODEL.NAME sets only the text dropout in
training).

The PWAM heads (official ``--mha``) own no parameter of their own: they split channels, so no shape tells them.
The official files pickle their training ``args``, whose ``mha`` says them (and ``img_size``, ``dataset``,
``splitBy``: data settings, given as hints); without ``args`` the heads are reported as unknown, for the caller to
take from a config file. The keys are the config keys of ``configs/defaults.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .official import PACKAGINGS, STAGES, args_settings
from .weights import TEXT_PREFIX, CheckpointError, checkpoint_filter_fn

__all__ = ["Architecture", "infer_architecture"]

_BLOCK = re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.")
_TEXT_LAYER = re.compile(rf"^{re.escape(TEXT_PREFIX)}encoder\.layer\.(\d+)\.")
_STEM_CONV = re.compile(r"^backbone\.patch_embed\.stem\.conv(\d+)\.weight$")


@dataclass
class Architecture:
    """What a checkpoint's content says of its network.

    facts: config key -> value read from the weights (or the official ``args.mha``); a config must agree.
    hints: config key -> value the file suggests for settings outside the weights (official ``args``: input size,
        dataset); a config file may set them otherwise.
    unknown: config key -> why the file cannot tell it.
    text: the text encoder in the file (``hidden``, ``layers``, ``vocab``), or None when it holds none.
    """

    facts: dict[str, Any] = field(default_factory=dict)
    hints: dict[str, Any] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    text: dict[str, int] | None = None


def _shape(state: dict[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where}: no {key} (not a LAVT checkpoint?)")
    return tuple(state[key].shape)


def infer_architecture(checkpoint: dict[str, Any], where: str = "checkpoint") -> Architecture:
    """The architecture of ``checkpoint`` (a file's content, ``read_checkpoint``); ``where`` names it in errors.

    Raises CheckpointError (one line) if the weights are not LAVT's or contradict each other.
    """
    state = checkpoint_filter_fn(checkpoint)
    arch = Architecture()
    f = arch.facts
    f["MODEL.SWIN.EMBED_DIM"] = embed = _shape(state, "backbone.patch_embed.norm.weight", where)[0]
    stem_convs = sorted(int(m[1]) for k in state if (m := _STEM_CONV.match(k)))
    if stem_convs:  # models.patch_embed.ConvStem: log2(patch) stride-2 layers and one stride-1 layer
        f["MODEL.SWIN.STEM"], f["MODEL.SWIN.PATCH_SIZE"] = "conv", 2 ** (len(stem_convs) - 1)
    else:
        kernel = _shape(state, "backbone.patch_embed.proj.weight", where)
        f["MODEL.SWIN.STEM"], f["MODEL.SWIN.PATCH_SIZE"] = "patch", kernel[-1]
    blocks: dict[int, set[int]] = {}
    for key in state:
        if m := _BLOCK.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != list(range(STAGES)) or any(sorted(b) != list(range(len(b))) for b in blocks.values()):
        raise CheckpointError(f"{where}: Swin blocks {dict(sorted(blocks.items()))} are not 4 stages of blocks 0..n-1")
    f["MODEL.SWIN.DEPTHS"] = [len(blocks[i]) for i in range(STAGES)]
    heads, windows = [], set()
    for i in range(STAGES):
        side_sq, h = _shape(state, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table", where)
        side = round(side_sq**0.5)
        if side * side != side_sq or side % 2 == 0:
            raise CheckpointError(f"{where}: stage {i} relative-position table has {side_sq} rows, not (2w-1)^2")
        heads.append(h)
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise CheckpointError(f"{where}: the stages have different windows {sorted(windows)}")
    f["MODEL.SWIN.NUM_HEADS"], f["MODEL.SWIN.WINDOW_SIZE"] = heads, windows.pop()
    fc1 = _shape(state, "backbone.layers.0.blocks.0.mlp.fc1.weight", where)[0]
    f["MODEL.SWIN.MLP_RATIO"] = fc1 / embed
    hidden = _shape(state, "classifier.conv1_1.weight", where)[1]
    f["MODEL.DECODER_HIDDEN"] = 0 if hidden == 4 * embed else hidden  # 0: the official width
    f["MODEL.REFINE"] = state["refine.conv1.weight"].shape[0] if "refine.conv1.weight" in state else 0
    lang_dim = _shape(state, "backbone.layers.0.fusion.image_lang_att.f_key.0.weight", where)[1]
    arch.text = _text_encoder(state)
    if arch.text is None:  # no text encoder to load: the model takes language features of this width
        f["MODEL.TEXT.DIM"], arch.hints["MODEL.TEXT.ENCODER"] = lang_dim, ""
    # the official lavt_one keeps the text encoder inside 'model', lavt in 'bert_model'. A hint only: the name sets
    # nothing but the text dropout in training, and this project's files keep it inside whatever their name.
    arch.hints["MODEL.NAME"] = "lavt_one" if arch.text is not None and not checkpoint.get("bert_model") else "lavt"
    _read_args(checkpoint.get("args"), arch, where)
    return arch


def _text_encoder(state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    word = TEXT_PREFIX + "embeddings.word_embeddings.weight"
    if word not in state:
        return None
    vocab, hidden = state[word].shape
    layers = {int(m[1]) for k in state if (m := _TEXT_LAYER.match(k))}
    return {"hidden": hidden, "layers": len(layers), "vocab": vocab}


def _read_args(args: Any, arch: Architecture, where: str) -> None:
    """The official training arguments: ``mha`` (PWAM heads) as a fact, input size and dataset as hints."""
    if args is None:
        arch.unknown["MODEL.FUSION.NUM_HEADS"] = (
            "PWAM heads have no weights of their own, and the file has no official 'args' whose mha would say them"
        )
        return
    try:
        heads, data = args_settings(args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    arch.facts["MODEL.FUSION.NUM_HEADS"] = heads
    arch.hints.update(data)
    packaging = (args if isinstance(args, dict) else vars(args)).get("model")
    if packaging not in PACKAGINGS:
        return
    if arch.text is not None and packaging != arch.hints["MODEL.NAME"]:  # without BERT the layouts look alike
        raise CheckpointError(
            f"{where}: its args say model {packaging!r}, but its key layout is {arch.hints['MODEL.NAME']!r}"
        )
    arch.hints["MODEL.NAME"] = packaging

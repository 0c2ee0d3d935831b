"""Open any LAVT checkpoint for inference: ``open_checkpoint(path) -> (cfg, model)``.

- This project's checkpoints (``.pth`` from ``main.py``, ``.safetensors`` from ``tools.export``) store their config:
  defaults <- stored config <- ``cfg_file`` <- ``overrides``.
- The official ``lavt`` / ``lavt_one`` files store none: the architecture is read from the weights
  (``models.infer_architecture``) and their training ``args``: defaults <- ``cfg_file`` <- what the file says <-
  ``overrides``. A config file that contradicts the weights is refused naming the key; a setting the file cannot
  tell (the PWAM heads of a file without ``args``) must come from ``cfg_file`` or ``overrides``.

``overrides`` always win: e.g. ``MODEL.TEXT.ENCODER <folder>`` (the BERT folder: its config.json and vocabulary; the
weights come from the checkpoint) and ``DATA.ROOT <folder>`` (where the dataset is, for dataset examples).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from configs import get_config, override_pairs, read_config_file
from configs.validate import coerce_pairs, coerce_tree, lookup
from engine.checkpoint_config import checkpoint_config
from engine.config_check import validate_config
from models import LAVT, build_model, infer_architecture, load_weights, read_checkpoint
from models.text import resolve_text_encoder

__all__ = ["checkpoint_cfg", "open_checkpoint"]


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[name] = value


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def checkpoint_cfg(
    checkpoint: dict[str, Any], path: str | Path, cfg_file: str | Path | None = None, overrides: Sequence[Any] = ()
) -> CfgNode:
    """The frozen config of ``checkpoint`` (the content of ``path``), as the module docstring says.

    Raises ValueError (one line) for a config file or overrides that do not fit ``configs/defaults.py``
    (``configs.validate.ConfigError``), a config file that contradicts the weights, and a setting neither the file
    nor the user gives; FileNotFoundError for a missing ``cfg_file``; ``models.CheckpointError`` for weights that
    are not LAVT's.
    """
    given = read_config_file(Path(cfg_file)) if cfg_file else CfgNode()
    pairs = override_pairs(overrides)
    cfg = get_config(freeze=False)
    stored = checkpoint_config(checkpoint, path)

    def merge(tree: CfgNode, what: str) -> None:  # checked and coerced as get_config does a file
        cfg.merge_from_other_cfg(coerce_tree(cfg, tree, f"in {what}"))

    if stored is not None:
        merge(stored, f"the config stored in checkpoint {path}")
    if cfg_file:
        merge(given, f"config file {cfg_file}")
    if stored is None:
        _apply_weights(cfg, checkpoint, path, given, cfg_file, pairs)
    cfg.merge_from_list(coerce_pairs(cfg, pairs))
    cfg.freeze()
    return cfg


def _apply_weights(
    cfg: CfgNode, checkpoint: dict[str, Any], path: str | Path, given: CfgNode, cfg_file: Any, pairs: list[str]
) -> None:
    """What a file without a config says of itself, over ``cfg`` (already holding ``given``, the config file)."""
    arch = infer_architecture(checkpoint, f"checkpoint {path}")
    for key, value in arch.facts.items():
        known, wanted = lookup(given, key)
        if known and not _same(lookup(cfg, key)[1], value):
            raise ValueError(f"config file {cfg_file} sets {key} {wanted!r}, but the weights of {path} say {value!r}")
        _set(cfg, key, value)
    for key, value in arch.hints.items():
        if not lookup(given, key)[0]:
            _set(cfg, key, value)
    for key, why in arch.unknown.items():
        if not lookup(given, key)[0] and key not in pairs[0::2]:
            raise ValueError(
                f"checkpoint {path} stores no config and {key} is ambiguous ({why}): pass --cfg_file with the "
                f"config it was trained with, or --opts {key} <value>"
            )


def check_text_encoder(text: dict[str, int], encoder: str, path: str | Path) -> None:
    """Refuse (ValueError, one line) a text-encoder folder whose config.json does not describe the checkpoint's
    text encoder (``text``: hidden width, layers, vocabulary, ``models.Architecture.text``)."""
    folder = Path(resolve_text_encoder(encoder, weights_from=path))
    conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    got = {"hidden": conf.get("hidden_size"), "layers": conf.get("num_hidden_layers"), "vocab": conf.get("vocab_size")}
    wrong = [f"{name} {got[name]} there, {value} in the checkpoint" for name, value in text.items()
             if got[name] != value]  # fmt: skip
    if wrong:
        raise ValueError(
            f"MODEL.TEXT.ENCODER {encoder} ({folder}) is not the text encoder of {path}: {'; '.join(wrong)}. "
            "Give the folder of that BERT (config.json, vocab.txt) with --opts MODEL.TEXT.ENCODER <folder>"
        )


def open_checkpoint(
    path: str | Path, cfg_file: str | Path | None = None, overrides: Sequence[Any] = ()
) -> tuple[CfgNode, LAVT]:
    """(frozen config, LAVT in eval mode on the CPU with every weight of ``path``) for any LAVT checkpoint.

    ``path``: this project's ``.pth`` or ``.safetensors``, or an official ``lavt`` / ``lavt_one`` file.
    ``cfg_file``, ``overrides`` (``[KEY, VALUE, ...]``): see ``checkpoint_cfg``. Nothing is downloaded: the text
    encoder's folder gives its configuration and vocabulary only, the checkpoint its weights.
    """
    checkpoint = read_checkpoint(path)
    cfg = checkpoint_cfg(checkpoint, path, cfg_file, overrides)
    validate_config(cfg)
    text = infer_architecture(checkpoint, f"checkpoint {path}").text
    if text is not None and cfg.MODEL.TEXT.ENCODER:
        check_text_encoder(text, cfg.MODEL.TEXT.ENCODER, path)
    model = build_model(cfg, pretrained=False)
    load_weights(model, path, checkpoint)
    return cfg, model.eval()

"""Whether a checkpoint's stored configuration fits a run: the policy over config keys, kept out of ``utils``.

- loading weights (evaluation, ``--pretrain``): the architecture keys must agree (``configs.architecture_keys``:
  every MODEL key but the few that leave the weights alone);
- resuming: every key must agree but those a run may change freely (``configs.is_resume_free``), plus the number
  of processes (``WORLD_SIZE``); the rest is refused unless applied on purpose (``engine.resume``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from configs import architecture_keys, is_resume_free, leaf_keys, parse_config

MISSING = "<missing>"
WORLD_SIZE = "WORLD_SIZE"  # not a config key: the number of processes, compared on resume as if it were one


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> CfgNode | None:
    """The config stored in ``ckpt`` (YAML text) as a CfgNode, or None for files without one (e.g. official);
    ``configs.validate.ConfigError`` (a ValueError) for one that is not YAML text of config keys."""
    text = ckpt.get("config")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"checkpoint {path}: 'config' must be YAML text, got {type(text).__name__}")
    return parse_config(text, f"the config stored in checkpoint {path}")


def config_value(cfg: CfgNode, key: str) -> Any:
    """``cfg``'s value at the dotted ``key`` (lists for tuples), or ``MISSING``."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return MISSING
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def config_differences(saved: CfgNode, current: CfgNode, keys: list[str] | tuple[str, ...]) -> dict[str, tuple]:
    """``{key: (value in the checkpoint, value now)}`` for each of ``keys`` whose values differ."""
    pairs = {k: (config_value(saved, k), config_value(current, k)) for k in keys}
    return {k: (old, new) for k, (old, new) in pairs.items() if old != new}


def describe_differences(diffs: dict[str, tuple]) -> str:
    """``"KEY: checkpoint X, now Y; ..."``."""
    return "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in diffs.items())


def check_config(ckpt: dict[str, Any], cfg: CfgNode, path: str | Path) -> None:
    """Raise ValueError naming the keys if ``ckpt`` was trained with another architecture than ``cfg``'s (files
    without a stored config, e.g. the official releases, pass: their weights are checked by shape)."""
    saved = checkpoint_config(ckpt, path)
    if saved is None:
        return
    diffs = config_differences(saved, cfg, architecture_keys(cfg))
    if diffs:
        raise ValueError(
            f"checkpoint {path} is of another configuration than this run: {describe_differences(diffs)}. "
            "Use the config it was trained with (--cfg_file / --opts)."
        )


def resume_differences(saved: CfgNode, cfg: CfgNode, saved_world_size: int, world_size: int) -> dict[str, tuple]:
    """Every difference between the stored and the current run that a resume must not make silently: all config
    keys of either side but the free ones, and ``WORLD_SIZE``."""
    keys = list(dict.fromkeys(leaf_keys(saved) + leaf_keys(cfg)))
    diffs = config_differences(saved, cfg, [k for k in keys if not is_resume_free(k)])
    if saved_world_size != world_size:
        diffs[WORLD_SIZE] = (saved_world_size, world_size)
    return diffs


def free_differences(saved: CfgNode, cfg: CfgNode) -> dict[str, tuple]:
    """The differences a resume makes freely (``configs.RESUME_FREE_KEYS``), to log them."""
    keys = list(dict.fromkeys(leaf_keys(saved) + leaf_keys(cfg)))
    return config_differences(saved, cfg, [k for k in keys if is_resume_free(k)])

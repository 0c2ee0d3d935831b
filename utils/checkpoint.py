"""Checkpoints: atomic save, RNG states, and the config check on load (reading: ``models.read_checkpoint``).

A checkpoint is a dict of tensors and plain Python values only (it loads with ``torch.load(weights_only=True)``):
``model``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch`` (the last finished, 0-based), ``best``
(best overall IoU so far and its epoch), ``config`` (``cfg.dump()``, YAML text) and ``rng`` (``get_rng_state``).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

# Keys that fix the shapes of the network: a checkpoint with other values cannot be loaded into it.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "MODEL.NAME",
    "MODEL.SWIN.EMBED_DIM",
    "MODEL.SWIN.DEPTHS",
    "MODEL.SWIN.NUM_HEADS",
    "MODEL.SWIN.WINDOW_SIZE",
    "MODEL.SWIN.PATCH_SIZE",
    "MODEL.SWIN.MLP_RATIO",
    "MODEL.FUSION.NUM_HEADS",
    "MODEL.TEXT.DIM",
)
# Keys a resumed run must share with the run it continues (besides the architecture).
RESUME_KEYS: tuple[str, ...] = ("DATA.DATASET", "DATA.SPLIT_BY", "DATA.SIZE", "TRAIN.EPOCHS", "TRAIN.BATCH_SIZE")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the previous file or the new one, never a truncated file.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file what open() would
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> CfgNode | None:
    """The config stored in ``ckpt`` (YAML text) as a CfgNode, or None for files without one (e.g. official)."""
    text = ckpt.get("config")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"checkpoint {path}: 'config' must be YAML text, got {type(text).__name__}")
    return CfgNode.load_cfg(text)


def _get(cfg: CfgNode, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return "<missing>"
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def config_differences(saved: CfgNode, current: CfgNode, keys: tuple[str, ...]) -> list[str]:
    """``"KEY: checkpoint X, now Y"`` for each of ``keys`` whose values differ."""
    return [
        f"{k}: checkpoint {_get(saved, k)!r}, now {_get(current, k)!r}"
        for k in keys
        if _get(saved, k) != _get(current, k)
    ]


def check_config(ckpt: dict[str, Any], cfg: CfgNode, path: str | Path, resume: bool = False) -> None:
    """Raise ValueError if ``ckpt`` was trained with another architecture (or, for ``resume``, another run setup)."""
    saved = checkpoint_config(ckpt, path)
    if saved is None:
        if resume:
            raise ValueError(f"cannot resume from {path}: it holds no 'config' (not a checkpoint of this repository)")
        return
    keys = ARCHITECTURE_KEYS + (RESUME_KEYS if resume else ())
    diffs = config_differences(saved, cfg, keys)
    if diffs:
        raise ValueError(
            f"checkpoint {path} is of another configuration than this run: "
            + "; ".join(diffs)
            + ". Use the config it was trained with (--cfg_file / --opts)."
        )


def get_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and every CUDA device) and ``generator`` states, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what ``get_rng_state`` captured (CUDA states only where CUDA is available)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None:
        if "generator" not in state:
            raise KeyError("checkpoint RNG state holds no data-loader generator state")
        generator.set_state(state["generator"].cpu())

"""Checkpoint I/O: atomic writes (and the clean-up of interrupted ones) and RNG states.

Reading is ``models.read_checkpoint``; what a training checkpoint holds is ``engine.checkpointing``'s; whether a
checkpoint's configuration fits a run is ``engine.checkpoint_config``'s. Checkpoints are dicts of tensors and plain
Python values only, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .atomic import file_mode, raise_storage_error


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (``write_atomic``): a crash leaves the previous file or the new one."""
    write_atomic(path, lambda f: torch.save(state, f), what="checkpoint")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically, as ``save_checkpoint`` does."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what="file")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any], what: str) -> None:
    """Call ``write(f)`` on a temporary file ``.<name>.<random>.tmp`` beside ``path``, fsync it, then
    ``os.replace`` it onto ``path``: a crash at any point leaves either the previous file or the new one, never a
    truncated file (and at worst a temporary file, which ``remove_stale_temporaries`` clears). ``what`` names the
    kind of file in errors ("checkpoint"). A full disk (or quota, or read-only file system) is a ``StorageError``."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save {what} {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    with raise_storage_error(f"{what} {path}"):  # (after the clean-up below)
        try:
            os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file what open() would
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that interrupted ``write_atomic`` calls for ``folder/<name>`` left behind (a
    process killed between writing and replacing). Call it only while no other process writes there.
    Returns the files removed."""
    removed = []
    for name in names:
        for tmp in sorted(Path(folder).glob(f".{glob.escape(name)}.*.tmp")):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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

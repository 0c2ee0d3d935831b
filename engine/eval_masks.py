"""``EVAL.SAVE_MASKS``: each expression's predicted mask, as the evaluation scored it, written as a PNG.

``MaskWriter.tap(model, loader)`` returns the model and the loader as ``engine.loops.evaluate`` drives them: the model
hands every ``segment`` output (the logits of the batch's expressions, object by object, as ``data.collate_eval``
orders them) to the writer, and the loader, when asked for the next batch, has the writer turn the logits of the
batch just scored into masks. So the evaluation runs once and the masks are the ones it scored:
- ``network``: the argmax at the network's input size (S x S), against which the resized ground truth was scored;
- ``original``: the logits resized bilinearly to the image's size, then the argmax, as the evaluation does.
Files: ``<ref_id>_<sent_id>.png``, 0 (background) / 255 (object), in the writer's folder.

The writer's folder is an unfinished one, ``staging_folder``, of this process by name, which the evaluation renames
into place when it has scored everything; ``remove_abandoned`` removes those of evaluations that ended first.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from utils.atomic import raise_storage_error
from utils.lock import STALE_AFTER_S, LockHolder, process_start, stale_reason

from .loops import unwrap


class _SegmentTap(nn.Module):
    """``model`` for ``evaluate``: the same ``encode_text`` and ``segment``, each ``segment`` output also kept."""

    def __init__(self, model: nn.Module, kept: list[torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.kept = kept

    @property
    def text_encoder(self) -> nn.Module | None:
        return self.model.text_encoder

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_text(input_ids, attention_mask)

    def segment(self, images: torch.Tensor, lang_feats: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """As ``LAVT.segment``: images [E, 3, S, S] -> logits [E, 2, S, S]."""
        logits = self.model.segment(images, lang_feats, lang_mask)
        self.kept.append(logits.detach())
        return logits


class _Batches:
    """``loader`` (its length too, for the progress log), the writer called after each batch was scored."""

    def __init__(self, loader: Iterable[dict[str, Any]], writer: MaskWriter) -> None:
        self.loader, self.writer = loader, writer

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield batch
            self.writer.write(batch)  # evaluate asked for the next batch: this one has been scored


class MaskWriter:
    """Masks of every scored expression into ``folder`` (created); ``resolution``: ``network`` | ``original``."""

    def __init__(self, folder: str | Path, resolution: str) -> None:
        self.folder, self.resolution = Path(folder), resolution
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kept: list[torch.Tensor] = []

    def tap(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> tuple[nn.Module, Iterable[dict[str, Any]]]:
        """(model, loader) to hand to ``evaluate`` in ``each`` mode instead of the given ones."""
        return _SegmentTap(unwrap(model), self.kept), _Batches(loader, self)

    def write(self, batch: dict[str, Any]) -> None:
        """The masks of ``batch`` (an ``each``-mode batch of ``data.collate_eval``) from the logits kept for it."""
        logits = torch.cat(self.kept).float()  # [E, 2, S, S], the batch's expressions object by object
        self.kept.clear()
        owners = batch["expr_index"].tolist()
        if len(owners) != len(logits):
            raise RuntimeError(f"EVAL.SAVE_MASKS: {len(logits)} predictions for {len(owners)} expressions")
        ref_ids = torch.as_tensor(batch["ref_id"]).tolist()
        names = [f"{ref}_{int(sent)}.png" for ref, sents in zip(ref_ids, batch["sent_ids"]) for sent in sents]
        for e, (owner, name) in enumerate(zip(owners, names)):
            if self.resolution == "network":
                mask = logits[e].argmax(0) == 1  # [S, S]
            else:
                size = tuple(batch["target_orig"][owner].shape)  # [H0, W0]
                up = F.interpolate(logits[e : e + 1], size=size, mode="bilinear", align_corners=False)
                mask = up[0].argmax(0) == 1
            with raise_storage_error(f"mask {self.folder / name}", "the evaluation's unfinished masks are removed"):
                Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).save(self.folder / name, format="PNG")


# (a host name holds no "@"; a name without the start time is an older evaluation's)
_STAGING = re.compile(r"\.masks_.+\.(?P<pid>\d+)(?:-(?P<start>\d+))?@(?P<host>.+)\.partial")


def staging_folder(run_dir: str | Path, tag: str) -> Path:
    """``<run_dir>/.masks_<tag>.<pid>-<start>@<host>.partial``: this process's unfinished masks of ``tag``, apart from
    those of another evaluation writing into the same folder at the same time. ``start``, the process's start time
    (``utils.lock.process_start``), tells a pid reused after a killed evaluation from that evaluation."""
    pid = os.getpid()
    start = process_start(pid)
    owner = f"{pid}-{start}" if start is not None else str(pid)
    return Path(run_dir) / f".masks_{tag}.{owner}@{socket.gethostname()}.partial"


def remove_abandoned(run_dir: str | Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the unfinished mask folders in ``run_dir`` whose evaluation is over (killed, or stopped by an error):
    by the lock's rule (``utils.lock.stale_reason``), its process is not running on this host, or on another host
    the folder has not changed for ``stale_after_s`` (a running evaluation adds masks batch by batch); on this host
    also when its pid now belongs to a process started at another time. Returns them."""
    removed, host = [], socket.gethostname()
    for folder in sorted(Path(run_dir).glob(".masks_*.partial")):
        owner = _STAGING.fullmatch(folder.name)
        if owner is None:
            continue
        try:
            age_s = time.time() - folder.stat().st_mtime
        except FileNotFoundError:  # (its evaluation just finished)
            continue
        start = int(owner["start"]) if owner["start"] else None
        holder = LockHolder(host=owner["host"], pid=int(owner["pid"]), started="", command="", pid_start=start)
        if stale_reason(holder, age_s, stale_after_s, host) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

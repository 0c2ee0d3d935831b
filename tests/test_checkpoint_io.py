"""Checkpoint writing and the configuration check, as a user meets them: the temporary file sits next to the
checkpoint (an atomic rename, never a copy across file systems), and the refusal reads as one whole sentence."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from configs import get_config
from engine.checkpoint_config import check_config
from utils import checkpoint as ck


def test_the_temporary_file_is_written_next_to_the_checkpoint(tmp_path: Path, monkeypatch):
    seen = []
    real_save = torch.save

    def save_and_look(obj, f):
        seen.extend(p.name for p in tmp_path.iterdir())
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_and_look)
    ck.save_checkpoint({"epoch": 3}, tmp_path / "last.pth")
    assert len(seen) == 1 and seen[0].startswith(".last.pth.") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_written_files_get_the_permissions_open_gives(tmp_path: Path):
    """mkstemp makes 0600 files; checkpoints and text files get what open() would give them under the umask."""
    old = os.umask(0o022)
    try:
        with open(tmp_path / "by_open.txt", "w") as f:
            f.write("x")
        ck.save_checkpoint({"epoch": 3}, tmp_path / "last.pth")
        ck.write_text_atomic(tmp_path / "metrics.jsonl", "{}\n")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"by_open.txt": 0o644, "last.pth": 0o644, "metrics.jsonl": 0o644}


def test_another_configuration_is_refused_in_one_sentence(tmp_path: Path):
    saved = get_config(None, ["MODEL.SWIN.EMBED_DIM", 96])
    now = get_config(None, ["MODEL.SWIN.EMBED_DIM", 128])
    with pytest.raises(ValueError) as err:
        check_config({"config": saved.dump()}, now, tmp_path / "x.pth")
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'x.pth'} is of another configuration than this run: MODEL.SWIN.EMBED_DIM: checkpoint "
        "96, now 128. Use the config it was trained with (--cfg_file / --opts)."
    )

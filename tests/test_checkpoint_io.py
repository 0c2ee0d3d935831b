"""Checkpoint writing and the configuration check, as a user meets them: the temporary file sits next to the
checkpoint (an atomic rename, never a copy across file systems), and the refusal reads as one whole sentence."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from configs import get_config
from engine.checkpoint_config import check_config
from utils import checkpoint as ck
from utils.atomic import StorageError, staged


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


def _torch_save_on_a_full_disk(obj, f):
    """What torch.save does when the disk fills: its zip writer's OSError, then a RuntimeError raised while closing."""
    f.write(b"PK partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 461248 vs 461136") from None


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_is_one_line_and_the_file_there_stays(tmp_path: Path, monkeypatch, code: int):
    """No room (a full disk, a quota, a read-only file system) is a StorageError naming the file; the previous file
    and the folder are as they were, no temporary file left."""
    ck.save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    before = (tmp_path / "last.pth").read_bytes()

    def fail(obj, f):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    for save in (fail, _torch_save_on_a_full_disk):
        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(StorageError) as caught:
            ck.save_checkpoint({"epoch": 2}, tmp_path / "last.pth")
        reason = os.strerror(code if save is fail else errno.ENOSPC)
        assert str(caught.value) == (f"cannot write checkpoint {tmp_path / 'last.pth'}: {reason}; the file there, "
                                     "if any, is as it was")  # fmt: skip
        assert caught.value.errno == (code if save is fail else errno.ENOSPC)
        assert (tmp_path / "last.pth").read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]
    with pytest.raises(StorageError, match=r"^cannot write file .*metrics\.jsonl: No space left on device; "):
        ck.write_atomic(tmp_path / "metrics.jsonl", lambda f: _torch_save_on_a_full_disk(None, f), what="file")
    assert os.listdir(tmp_path) == ["last.pth"]


def test_other_write_errors_keep_their_type(tmp_path: Path):
    """Only a storage without room becomes a StorageError: an I/O error or a bug in the writer stays what it is."""
    for error in (OSError(errno.EIO, "Input/output error"), ValueError("a bug")):
        def write(f, error=error):
            raise error

        with pytest.raises(type(error)) as caught:
            ck.write_atomic(tmp_path / "x.bin", write, what="file")
        assert type(caught.value) is type(error) and caught.value is error
        with pytest.raises(type(error)) as caught, staged([tmp_path / "y.bin"]):
            raise error
        assert caught.value is error
    assert os.listdir(tmp_path) == []


def test_a_failed_write_whose_temporary_is_gone_keeps_its_own_error(tmp_path: Path):
    """The temporary file removed meanwhile (another run's clean-up of stale temporaries): the write's error is what
    is raised, not the clean-up's FileNotFoundError."""
    for error in (OSError(errno.EIO, "Input/output error"), ValueError("a bug")):
        def write(f, error=error):
            for tmp in tmp_path.glob(".x.bin.*.tmp"):
                tmp.unlink()
            raise error

        with pytest.raises(type(error)) as caught:
            ck.write_atomic(tmp_path / "x.bin", write, what="file")
        assert caught.value is error
    assert os.listdir(tmp_path) == []


def test_staged_files_on_a_full_disk(tmp_path: Path):
    """``staged``: the same StorageError naming every target; no target changes, no temporary file stays."""
    (tmp_path / "a.png").write_bytes(b"old")
    with pytest.raises(StorageError) as caught, staged([tmp_path / "a.png", tmp_path / "b.png"]) as (a, b):
        a.write_bytes(b"new")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert str(caught.value) == (f"cannot write {tmp_path / 'a.png'} and {tmp_path / 'b.png'}: "
                                 f"{os.strerror(errno.EDQUOT)}; the file there, if any, is as it was")  # fmt: skip
    assert os.listdir(tmp_path) == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"old"

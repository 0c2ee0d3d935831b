"""``utils.atomic`` placing files and folders where none is: what another process placed first is never replaced,
and a refused placement leaves nothing of its own behind (no target, no temporary file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from utils import atomic
from utils.atomic import new_folders, staged


def write(paths: list[Path], texts: list[str]) -> None:
    for path, text in zip(paths, texts):
        path.write_text(text)


def test_new_files_are_placed_whole(tmp_path: Path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with staged(targets, replace=False) as temps:
        write(temps, ["A", "B"])
    assert [t.read_text() for t in targets] == ["A", "B"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
    assert [os.stat(t).st_nlink for t in targets] == [1, 1]  # the temporary names are gone


@pytest.mark.parametrize("taken", [0, 1])
def test_a_taken_name_places_none_and_keeps_the_other_file(tmp_path: Path, taken: int):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    targets[taken].write_text("theirs")
    with pytest.raises(FileExistsError) as caught, staged(targets, replace=False) as temps:
        write(temps, ["A", "B"])
    assert f"'{targets[taken]}'" in str(caught.value)  # named
    assert os.listdir(tmp_path) == [targets[taken].name] and targets[taken].read_text() == "theirs"


def test_replace_true_still_replaces(tmp_path: Path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with staged([target]) as (tmp,):
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_without_hard_links_the_name_is_claimed_then_replaced(tmp_path: Path, monkeypatch):
    """A file system without hard links (os.link: EPERM): the same result, and a taken name is still refused."""

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(atomic.os, "link", no_links)
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with staged(targets, replace=False) as temps:
        write(temps, ["A", "B"])
    assert [t.read_text() for t in targets] == ["A", "B"] and len(os.listdir(tmp_path)) == 2
    targets[0].unlink()
    with pytest.raises(FileExistsError), staged(targets, replace=False) as temps:
        write(temps, ["C", "D"])
    assert os.listdir(tmp_path) == ["b.txt"] and targets[1].read_text() == "B"


def test_other_link_errors_are_raised(tmp_path: Path, monkeypatch):
    def broken(src, dst):
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(atomic.os, "link", broken)
    with pytest.raises(OSError, match="Input/output error"), staged([tmp_path / "a.txt"], replace=False) as (tmp,):
        tmp.write_text("A")
    assert os.listdir(tmp_path) == []


def folders(tmp_path: Path, names: list[str]) -> list[Path]:
    made = []
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.png").write_text(name)
        made.append(tmp_path / name)
    return made


def test_new_folders_move_and_stay(tmp_path: Path):
    a, b = folders(tmp_path, [".a.partial", ".b.partial"])
    with new_folders([(a, tmp_path / "A"), (b, tmp_path / "B")]):
        pass
    assert sorted(os.listdir(tmp_path)) == ["A", "B"] and (tmp_path / "B" / "m.png").read_text() == ".b.partial"


@pytest.mark.parametrize("taken", ["A", "B"])
def test_a_taken_folder_name_moves_every_folder_back(tmp_path: Path, taken: str):
    a, b = folders(tmp_path, [".a.partial", ".b.partial"])
    (tmp_path / taken).mkdir()  # another process's, empty: a rename would have replaced it
    with pytest.raises(FileExistsError), new_folders([(a, tmp_path / "A"), (b, tmp_path / "B")]):
        pass
    assert sorted(os.listdir(tmp_path)) == sorted([".a.partial", ".b.partial", taken])
    assert os.listdir(tmp_path / taken) == [] and (a / "m.png").read_text() == ".a.partial"


def test_an_error_in_the_block_moves_the_folders_back(tmp_path: Path):
    (a,) = folders(tmp_path, [".a.partial"])
    with pytest.raises(KeyError), new_folders([(a, tmp_path / "A")]):
        assert (tmp_path / "A" / "m.png").is_file() and not a.exists()
        raise KeyError("x")
    assert os.listdir(tmp_path) == [".a.partial"]


def test_a_folder_that_cannot_move_leaves_no_claimed_name(tmp_path: Path):
    (a,) = folders(tmp_path, [".a.partial"])
    with pytest.raises(FileNotFoundError), new_folders([(a, tmp_path / "A"), (tmp_path / ".gone", tmp_path / "B")]):
        pass
    assert os.listdir(tmp_path) == [".a.partial"]


def refusing_renames_onto_folders(monkeypatch, before_rename=lambda dst: None) -> None:
    """``os.replace`` / ``os.rename`` as on a file system that will not rename onto an existing folder (some FUSE
    mounts): EEXIST; ``before_rename(dst)`` runs first in ``os.rename`` (another process acting in between)."""
    real_replace, real_rename = os.replace, os.rename

    def refuse(real, src, dst, first=lambda dst: None):
        first(Path(dst))
        if Path(dst).is_dir():
            raise OSError(errno.EEXIST, "File exists", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: refuse(real_replace, src, dst))
    monkeypatch.setattr(atomic.os, "rename", lambda src, dst: refuse(real_rename, src, dst, before_rename))


def test_new_folders_where_renames_onto_a_folder_are_refused(tmp_path: Path, monkeypatch):
    a, b = folders(tmp_path, [".a.partial", ".b.partial"])
    refusing_renames_onto_folders(monkeypatch)
    with new_folders([(a, tmp_path / "A"), (b, tmp_path / "B")]):
        pass
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["A", "B"] and (tmp_path / "A" / "m.png").read_text() == ".a.partial"


def test_a_name_taken_in_the_instant_it_was_free_is_left_to_its_taker(tmp_path: Path, monkeypatch):
    (a,) = folders(tmp_path, [".a.partial"])

    def another_process_takes(dst: Path) -> None:
        dst.mkdir()
        (dst / "theirs.png").write_text("theirs")

    refusing_renames_onto_folders(monkeypatch, another_process_takes)
    with pytest.raises(FileExistsError, match="A was taken meanwhile") as caught, new_folders([(a, tmp_path / "A")]):
        pass
    assert caught.value.errno == errno.EEXIST  # an OSError as the OS's own (callers may ask its errno)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".a.partial", "A"] and os.listdir(tmp_path / "A") == ["theirs.png"]
    assert (a / "m.png").read_text() == ".a.partial"

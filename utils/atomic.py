"""Writing several files so that readers see all of them complete or none: temporary files, then ``os.replace``.

``staged(targets)`` hands out one temporary path beside each target (same folder, so the rename is atomic); the
caller writes them; on success each is renamed onto its target, in the order given, so the last target is the
"commit": once it exists, the others are complete. An error while writing removes every temporary file and changes
no target (an error in the renames themselves, e.g. the disk gone, can leave the first targets renamed only).
``staged(targets, replace=False)`` never replaces a file: where a target appeared meanwhile (another process wrote
it), the targets already placed are removed and ``FileExistsError`` names it; ``new_folders`` does the same for
folders. So processes that choose the same free name at once cannot overwrite each other: one of them is told.

A write that fails for want of room (a full disk, a quota, a read-only file system) is raised as ``StorageError``,
one line naming the file, here and in ``utils.checkpoint.write_atomic``: no traceback for the machine's state.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StorageError", "file_mode", "new_folders", "raise_storage_error", "staged", "storage_error"]

# the errors of a storage that cannot take the file, whatever is written: no room, no quota, read-only
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class StorageError(OSError):
    """A file could not be written for want of room (or the file system is read-only); the message names it."""


def storage_error(
    error: BaseException, what: str, after: str = "the file there, if any, is as it was"
) -> StorageError | None:
    """``StorageError`` for ``error`` if it, or an error it was raised from or while handling, is one of a storage
    that cannot take the file (libraries wrap it: torch's zip writer raises a RuntimeError over the OSError);
    ``what`` names the file ("checkpoint <path>"), ``after`` says what became of it. None for any other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            full = StorageError(f"cannot write {what}: {error.strerror}; {after}")
            full.errno = error.errno  # (given apart: OSError's own message would start "[Errno 28]")
            return full
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def raise_storage_error(what: str, after: str = "the file there, if any, is as it was") -> Iterator[None]:
    """The block's error re-raised as ``storage_error``'s StorageError where it is one of no room; any other as is."""
    try:
        yield
    except Exception as e:
        full = storage_error(e, what, after)
        if full is None:
            raise
        raise full from e


def file_mode() -> int:
    """The permissions ``open()`` gives a new file under this process's umask (``mkstemp`` makes them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def staged(targets: Sequence[str | Path], replace: bool = True) -> Iterator[list[Path]]:
    """Temporary paths for ``targets`` (their folders must exist); renamed onto them when the block ends normally.
    ``replace=False``: placed only where no file is, else none of them (``FileExistsError``, nothing left).

    The files get the permissions ``open()`` would give (``file_mode``), set as they are renamed: a writer that
    replaces its temporary file (safetensors' ``save_file`` makes a new 0600 one) does not leave them private.
    """
    temps: list[Path] = []
    with raise_storage_error(" and ".join(map(str, targets))):  # (after the clean-up below)
        try:
            for target in map(Path, targets):
                if target.is_dir():  # (the rename would fail only at the end, naming the temporary file)
                    raise IsADirectoryError(
                        f"{target} is a folder: a file cannot be written in its place (give a file name)"
                    )
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                except OSError as e:  # (its message would name the temporary file)
                    raise PermissionError(f"cannot write {target}: {e.strerror} in {target.parent}") from e
                os.close(fd)
                temps.append(Path(tmp))
            yield temps
            mode = file_mode()
            for tmp in temps:
                os.chmod(tmp, mode)
            if replace:
                for tmp, target in zip(temps, targets):
                    os.replace(tmp, target)
            else:
                _place_new(temps, list(map(Path, targets)))
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)  # only those not renamed: after an error, all of them


# what os.link raises where the file system has no hard links (FAT, some FUSE and SMB mounts)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _place_new(temps: list[Path], targets: list[Path]) -> None:
    """Each complete temporary file made its target, in order, replacing none; where one exists, those placed
    here are removed again and FileExistsError raised."""
    placed: list[Path] = []
    try:
        for tmp, target in zip(temps, targets):
            try:
                os.link(tmp, target)  # atomic and exclusive: the file appears complete, or EEXIST
            except FileExistsError:
                raise
            except OSError as e:  # a file system without hard links: claim the name, then rename onto it
                if e.errno not in _NO_LINKS:
                    raise
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                os.replace(tmp, target)
            placed.append(target)
    except FileExistsError:
        for target in placed:
            target.unlink(missing_ok=True)
        raise


@contextmanager
def new_folders(moves: Sequence[tuple[Path, Path]]) -> Iterator[None]:
    """Each ``(folder, target)``: ``folder`` renamed to ``target``, which must not exist (its name is claimed with
    ``mkdir``, so two processes cannot both take it); where one exists, or the block raises, the folders already
    moved go back and the error propagates (``FileExistsError`` naming the target)."""
    moved: list[tuple[Path, Path]] = []
    try:
        for folder, target in moves:
            target.mkdir()
            _move_into_claimed(folder, target)
            moved.append((folder, target))
        yield
    except BaseException:
        for folder, target in reversed(moved):
            os.replace(target, folder)
        raise


def _move_into_claimed(folder: Path, target: Path) -> None:
    """``folder`` renamed onto ``target``, the empty folder this process just made to claim the name (POSIX replaces
    it in one step). Where the file system refuses that (some FUSE mounts), ``target`` is removed first and the name
    is free for an instant: taken meanwhile, FileExistsError. On any error ``target`` is this process's no more."""
    try:
        os.replace(folder, target)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EPERM, errno.EISDIR) or not folder.is_dir():
            target.rmdir()
            raise
    target.rmdir()
    try:
        os.rename(folder, target)
    except OSError as e:
        if target.exists():  # (another process's now)
            raise FileExistsError(errno.EEXIST, f"{target} was taken meanwhile") from e
        raise

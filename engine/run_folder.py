"""Run folders: which folder a run writes into, and who owns it (``prepare_run_dir``).

- A training writes into ``<OUTPUT>/<MODEL_ID>``. A folder that already holds a run (``RUN_MARKERS``) is written into
  only to continue it (``--resume``) or, with ``--overwrite``, after the previous run's files are removed; otherwise
  the training is refused and nothing on disk changes. Rank 0 holds the folder's lock (``utils.lock.RunLock``,
  ``train.lock``) for the whole run, so a second training there is refused while the first runs.
- An evaluation (``eval_run_dir``) writes into the folder it is named (``--model_id`` / ``--output``) unless that
  folder holds another run, else into the run folder of the checkpoint it scores, else into
  ``<OUTPUT>/eval_<checkpoint stem>``: never into another run's folder. It takes no lock.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from yacs.config import CfgNode

from utils.distributed import DistInfo, all_gather_object
from utils.lock import STALE_AFTER_S, RunLock, RunLockedError
from utils.tensorboard import TENSORBOARD_DIR

# A folder holding any of these holds a run. Not config.yaml alone: a run stopped by a mistake in its data or flags
# before its first step leaves only that (and log.txt), and the corrected command must be able to start there.
RUN_MARKERS = ("last.pth", "best.pth", "metrics.jsonl")
LOCK_NAME = "train.lock"
# what --overwrite removes: the files a run writes (checkpoints, logs, configs, results) and its TensorBoard folder
RUN_FILE_SUFFIXES = (".pth", ".json", ".jsonl", ".yaml", ".txt", ".tmp")


class RunFolderError(ValueError):
    """A run would write into a folder that holds another run."""


@dataclass
class RunFolder:
    """The folder a run writes into and why there (``reason``); ``warnings`` are for the run's log (they happened
    before logging was set up); ``lock`` is held by rank 0 of a training until ``release`` (or the end of a ``with``
    block)."""

    path: Path
    reason: str = "<OUTPUT>/<MODEL_ID>"
    warnings: list[str] = field(default_factory=list)
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_dir_of(cfg: CfgNode) -> Path:
    """The folder of a training run: ``<OUTPUT>/<MODEL_ID>``."""
    return Path(cfg.OUTPUT) / cfg.MODEL_ID


def run_markers(folder: Path) -> list[str]:
    """The files of ``RUN_MARKERS`` that ``folder`` holds: non-empty when it holds a run."""
    return [name for name in RUN_MARKERS if (folder / name).is_file()]


def eval_run_dir(cfg: CfgNode, checkpoint: str | Path, named: bool) -> tuple[Path, str]:
    """Where an evaluation of ``checkpoint`` writes, and why there.

    Args:
        named: ``--model_id`` or ``--output`` was given on the command line (a config file's MODEL_ID names the
            training run it describes, not an evaluation's folder).
    Raises:
        RunFolderError: the folder named holds a run other than the checkpoint's.
    """
    checkpoint = Path(checkpoint)
    own = checkpoint.parent if (checkpoint.parent / "config.yaml").is_file() else None
    if named:
        path = Path(cfg.OUTPUT) / cfg.MODEL_ID
        found = run_markers(path)
        if found and (own is None or not _same_folder(path, own)):
            beside = f", or leave them out to write beside it in {own}" if own is not None else ""
            raise RunFolderError(
                f"--eval of {checkpoint} would write into {path}, which holds another run ({', '.join(found)}): "
                f"name another folder with --model_id / --output{beside}"
            )
        return path, "named by --model_id / --output"
    if own is not None:
        return own, "the run folder of the checkpoint"
    return Path(cfg.OUTPUT) / f"eval_{checkpoint.stem}", "named after the checkpoint; --model_id chooses another"


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _make_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"output folder {path} cannot be created or written ({type(e).__name__}: {e}); "
            "choose another with --output / --model_id"
        ) from e


def clear_run(path: Path) -> str:
    """Remove the files a run writes from ``path`` (not the lock); returns what was removed and kept, for the log."""
    removed, kept = [], []
    for entry in sorted(path.iterdir()):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and entry.name == TENSORBOARD_DIR:
            shutil.rmtree(entry)
            removed.append(entry.name + "/")
        elif entry.is_file() and entry.suffix in RUN_FILE_SUFFIXES:
            entry.unlink()
            removed.append(entry.name)
        else:
            kept.append(entry.name)
    note = f"--overwrite: removed the previous run's {', '.join(removed) or 'nothing'} from {path}"
    return note + (f"; kept {', '.join(kept)} (not written by a run)" if kept else "")


def prepare_run_dir(
    cfg: CfgNode,
    info: DistInfo,
    *,
    evaluate: str | None = None,
    named: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    stale_after_s: float = STALE_AFTER_S,
    hint: str = "",
) -> RunFolder:
    """The folder this run writes into, created, writable and (for a training) locked by rank 0; every rank gets
    rank 0's folder or raises rank 0's error.

    Args:
        evaluate: the checkpoint an evaluation scores (``eval_run_dir`` chooses the folder); None for a training.
        named: ``--model_id`` / ``--output`` given on the command line (evaluations only).
        resume, overwrite: how a training may use a folder that holds a run (continue it, or clear it first).
        stale_after_s: a lock of another host untouched this long is stale (``utils.lock``).
        hint: appended to the refusal of a folder that holds a run (e.g. how to name the demo's config).
    Raises:
        RunFolderError, RunLockedError, PermissionError: before anything on disk changed.
    """
    folder: RunFolder | None = None
    verdict: tuple[str, str] | BaseException = ("", "")  # rank 0's (path, reason), or its error
    if info.rank == 0:
        try:
            folder = _claim(cfg, evaluate, named, resume, overwrite, stale_after_s, hint)
            verdict = (str(folder.path), folder.reason)
        except (OSError, RunFolderError, RunLockedError) as e:
            verdict = e
    verdict = all_gather_object(verdict)[0]  # the other ranks wait here for rank 0's
    if isinstance(verdict, BaseException):
        raise verdict
    return folder if folder is not None else RunFolder(Path(verdict[0]), verdict[1])


def _claim(
    cfg: CfgNode, evaluate: str | None, named: bool, resume: bool, overwrite: bool, stale_after_s: float, hint: str
) -> RunFolder:
    if evaluate is not None:
        path, why = eval_run_dir(cfg, evaluate, named)
        _make_writable(path)
        return RunFolder(path, why)
    path = run_dir_of(cfg)
    _make_writable(path)
    lock = RunLock(path / LOCK_NAME, stale_after_s=stale_after_s)
    took_over = lock.acquire()
    folder = RunFolder(path, warnings=[took_over] if took_over else [], lock=lock)
    try:
        found = run_markers(path)
        if found and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"run folder {path} already holds a run ({', '.join(found)}): continue it with --resume, or "
                    f"delete its files and start over with --overwrite{hint}; nothing was changed"
                )
            folder.warnings.append(clear_run(path))
    except BaseException:
        folder.release()
        raise
    return folder

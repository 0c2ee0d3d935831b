"""Run folders: which folder a run writes into, and who owns it (``prepare_run_dir``).

- A training writes into ``<OUTPUT>/<MODEL_ID>``. A folder that already holds a run (``RUN_MARKERS``) is written into
  only to continue it (``--resume``) or, with ``--overwrite``, after the previous run's files are removed; otherwise
  the training is refused and nothing on disk changes. Rank 0 holds the folder's lock (``utils.lock.RunLock``,
  ``train.lock``) for the whole run, so a second training there is refused while the first runs.
- An evaluation (``eval_run_dir``) writes into the folder it is named (``--model_id`` / ``--output``) unless that
  folder holds another run, else into the run folder of the checkpoint it scores, else into
  ``<OUTPUT>/eval_<checkpoint stem>``: never into another run's folder. It holds a lock of its own there
  (``eval.<pid>@<host>.lock``), which keeps no other process out (evaluations run beside each other and beside the
  training of that folder) but refuses ``--overwrite`` the folder while it writes: its log, results and masks would be
  removed under it, or land in the new run's folder. A training holds ``overwrite.lock`` there while it looks for
  evaluations and removes the files; an evaluation that takes its lock meanwhile finds it and is refused. Each takes
  its own lock before it looks for the other's, so one of the two always sees the other.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from yacs.config import CfgNode

from utils.atomic import staged
from utils.checkpoint import write_text_atomic
from utils.distributed import DistInfo, all_gather_object
from utils.lock import STALE_AFTER_S, RunLock, RunLockedError, read_holder, slurm_incarnation, stale_reason
from utils.tensorboard import TENSORBOARD_DIR

from .checkpointing import BEST, LAST, METRICS
from .timing import TIMING_FILE

# A folder holding any of these holds a run. Not config.yaml alone: a run stopped by a mistake in its data or flags
# before its first step leaves only that (and log.txt), and the corrected command must be able to start there.
RUN_MARKERS = (LAST, BEST, METRICS)
LOCK_NAME = "train.lock"
CLEARING_NAME = "overwrite.lock"  # held by a training while its --overwrite looks for evaluations and removes files
# What --overwrite removes, by name: the files a run and its evaluations write (checkpoints, logs, configs, results,
# the image check's cache, the locks of ended evaluations) and their temporaries, the TensorBoard folder and the
# evaluations' mask folders (finished, or left unfinished by one that ended). Any other file is the user's (an
# exported checkpoint, notes, the config a run was started from) and is kept.
EVAL_LOCK = re.compile(r"eval\.\d+@.+\.lock")  # (a host name holds no "@")
RUN_FILE = re.compile(
    "|".join(map(re.escape, (*RUN_MARKERS, TIMING_FILE, "log.txt", ".image_check.json")))
    + r"|config(_eval(-\d+)?)?\.yaml|results_.+\.json|per_expression_.+\.jsonl|"
    + EVAL_LOCK.pattern
)
TEMPORARY = re.compile(r"(?P<target>.+)\.[^.]+\.tmp")  # .<name>.<random>.tmp (utils.atomic), <name>.<pid>.tmp
MASK_FOLDER = re.compile(r"masks_.+|\.masks_.+\.partial")


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


def write_run_config(run_dir: Path, text: str, evaluation: bool) -> Path:
    """The run's full config ``text`` written into ``run_dir``; returns the file. A training's is ``config.yaml``
    (replaced: a resumed run writes its own again); an evaluation's ``config_eval.yaml``, or where that is taken,
    ``config_eval-2.yaml``, ``-3``, ...: each evaluation in a folder keeps its own, those beside it at the same time
    too (the name is claimed as the file is placed, ``utils.atomic.staged(replace=False)``)."""
    if not evaluation:
        write_text_atomic(run_dir / "config.yaml", text)
        return run_dir / "config.yaml"
    number = 1
    while True:
        path = run_dir / ("config_eval.yaml" if number == 1 else f"config_eval-{number}.yaml")
        number += 1
        if os.path.lexists(path):  # (a link too)
            continue
        try:
            with staged([path], replace=False) as (tmp,):
                tmp.write_text(text, encoding="utf-8")
            return path
        except FileExistsError:  # taken meanwhile by an evaluation beside this one
            continue


class EvaluationLock(RunLock):
    """The lock an evaluation holds in the folder it writes into; ``acquire`` raises RunFolderError, holding
    nothing, while a training's ``--overwrite`` removes the files there (``CLEARING_NAME``)."""

    def acquire(self) -> str | None:
        took_over = super().acquire()
        clearing = _running_holder(self.path.parent / CLEARING_NAME, self.stale_after_s)
        if clearing is not None:
            self.release()
            raise RunFolderError(
                f"a training started with --overwrite is removing the files of {self.path.parent} ({clearing}): "
                "evaluate there once it has written a checkpoint; nothing was changed"
            )
        return took_over


def eval_lock_name() -> str:
    """``eval.<pid>@<host>.lock``: the lock an evaluation holds in the folder it writes into, of this process."""
    return f"eval.{os.getpid()}@{socket.gethostname()}.lock"


def evaluation_lock(path: Path, stale_after_s: float = STALE_AFTER_S) -> EvaluationLock:
    """The lock this process holds, as an evaluation, in the folder ``path`` it writes into (not yet acquired)."""
    return EvaluationLock(path / eval_lock_name(), stale_after_s=stale_after_s)


def _running_holder(lock: Path, stale_after_s: float) -> str | None:
    """The holder of ``lock`` described, if it is still running (``utils.lock``'s stale rule); else None."""
    holder = read_holder(lock)
    try:
        age_s = time.time() - lock.stat().st_mtime
    except FileNotFoundError:  # (none, or it just ended)
        return None
    if stale_reason(holder, age_s, stale_after_s, socket.gethostname(), slurm_incarnation()) is not None:
        return None
    return holder.describe() if holder else f"{lock.name}, being written"


def evaluations_writing(path: Path, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Who holds an evaluation's lock in ``path`` and is still running (``utils.lock``'s stale rule), described."""
    locks = [lock for lock in sorted(path.iterdir()) if EVAL_LOCK.fullmatch(lock.name)]
    running = (_running_holder(lock, stale_after_s) for lock in locks)
    return [who for who in running if who is not None]


def _is_mask_folder(folder: Path) -> bool:
    """Whether ``folder`` is an evaluation's mask folder: named as one, holding PNG files only (a folder of a user's
    is never taken for one)."""
    return MASK_FOLDER.fullmatch(folder.name) is not None and all(
        p.is_file() and p.suffix == ".png" for p in folder.iterdir()
    )  # fmt: skip


def is_run_file(name: str) -> bool:
    """Whether a file named ``name`` is one a run or its evaluations write, or a temporary of one."""
    temporary = TEMPORARY.fullmatch(name)
    targets = [name] if temporary is None else [temporary["target"], temporary["target"].removeprefix(".")]
    return any(RUN_FILE.fullmatch(target) for target in targets)


def clear_run(path: Path) -> str:
    """Remove the files a run writes from ``path`` (not the lock); returns what was removed and kept, for the log.
    The caller has made sure that no evaluation is writing there (``evaluations_writing``)."""
    removed, kept = [], []
    for entry in sorted(path.iterdir()):
        if entry.name in (LOCK_NAME, CLEARING_NAME):
            continue
        if entry.is_dir() and (entry.name == TENSORBOARD_DIR or _is_mask_folder(entry)):
            shutil.rmtree(entry)
            removed.append(entry.name + "/")
        elif entry.is_file() and is_run_file(entry.name):
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
        lock = evaluation_lock(path, stale_after_s)
        took_over = lock.acquire()  # (only a lock of an ended process that had this pid can be there)
        return RunFolder(path, why, warnings=[took_over] if took_over else [], lock=lock)
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
            with RunLock(path / CLEARING_NAME, stale_after_s=stale_after_s):  # before looking (EvaluationLock)
                writing = evaluations_writing(path, stale_after_s)
                if writing:
                    raise RunFolderError(
                        f"--overwrite would remove the files of the evaluation writing into {path} ({writing[0]}"
                        f"{f'; and {len(writing) - 1} more' if len(writing) > 1 else ''}): wait for it to end; "
                        "nothing was changed"
                    )
                folder.warnings.append(clear_run(path))
    except BaseException:
        folder.release()
        raise
    return folder

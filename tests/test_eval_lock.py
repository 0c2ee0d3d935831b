"""Evaluations sharing a run folder lose nothing. Each holds a lock of its own there (``eval.<pid>@<host>.lock``): a
training with ``--overwrite`` of that folder is refused while it runs (its log, results and masks would be removed
under it, or land in the new run's folder), and clears what an ended evaluation left (its lock, its mask folders).
Each keeps its config (``config_eval[-N].yaml``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

import engine.run_folder as run_folder
import main as main_module
from configs import get_config
from engine.run_folder import EVAL_LOCK, eval_lock_name, evaluations_writing, prepare_run_dir, write_run_config
from utils.distributed import DistInfo
from utils.lock import LockHolder

from .helpers_process import ended_process, lock_holder, snapshot
from .helpers_train import tiny_env, tiny_main_argv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch tiny run."""
    out = tmp_path_factory.mktemp("finished")
    main_module.main(tiny_main_argv(env, out, TRAIN__EPOCHS=1))
    return out / "tiny"


def _refused_in_one_line(argv: list[str], run_dir: Path, capsys, start: str, end: str) -> None:
    """``main.py argv`` ends with status 2 and one line of stderr, from ``start`` to ``end``; ``run_dir`` unchanged."""
    before = snapshot(run_dir)
    assert main_module.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start) and err[0].endswith(end), err
    assert snapshot(run_dir) == before


def test_an_evaluation_holds_its_lock_while_it_scores(env, finished, tmp_path, monkeypatch):
    """``main.py --eval`` of a run's checkpoint: while it scores, the run folder holds the evaluation's lock, naming
    this process; at the end the lock is gone."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(finished, run_dir)
    seen, real = [], main_module.run_evaluation

    def looking(*args, **kwargs):
        seen.extend(p.name for p in run_dir.iterdir() if EVAL_LOCK.fullmatch(p.name))
        return real(*args, **kwargs)

    monkeypatch.setattr(main_module, "run_evaluation", looking)
    main_module.main(tiny_main_argv(env, tmp_path, "--eval", "--pretrain", str(run_dir / "last.pth"), named=False))
    assert seen == [f"eval.{os.getpid()}@{socket.gethostname()}.lock"] == [eval_lock_name()]
    assert not any(EVAL_LOCK.fullmatch(p.name) for p in run_dir.iterdir())


def test_overwrite_is_refused_while_an_evaluation_writes_and_clears_what_an_ended_one_left(env, finished, tmp_path,
                                                                                           capsys):  # fmt: skip
    """A real process holds an evaluation's lock in the run folder: ``--overwrite`` is one line, nothing changed.
    Killed with ``kill -9``, its lock is stale: ``--overwrite`` removes it with the mask folders evaluations wrote
    (finished, and one left unfinished), and keeps folders of the user's."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(finished, run_dir)
    for folder, files in [("masks_synthetic_unc_val_each_network48", ["1_2.png"]),
                          (".masks_synthetic_unc_val_each_network48.99@elsewhere.partial", ["3_4.png"]),
                          ("masks_mine", ["notes.txt", "a.png"]), ("masks_nested", ["b.png"])]:  # fmt: skip
        (run_dir / folder).mkdir()
        for name in files:
            (run_dir / folder / name).write_bytes(b"x")
    (run_dir / "masks_nested" / "c.png").mkdir()  # a folder, not a mask
    lock = run_dir / "eval.12345@somewhere.lock"  # (the name is this test's; its holder is what counts)
    holder = lock_holder(lock)
    try:
        _refused_in_one_line(
            tiny_main_argv(env, tmp_path, "--overwrite", "--stop_after", "0"), run_dir, capsys,
            f"main.py: error: RunFolderError: --overwrite would remove the files of the evaluation writing into "
            f"{run_dir} (host {socket.gethostname()}, pid {holder.pid}, since 20",
            "): wait for it to end; nothing was changed",
        )  # fmt: skip
        mine = run_dir / "eval.1@here.lock"  # a second evaluation running: this process
        me = LockHolder(host=socket.gethostname(), pid=os.getpid(), started="now", command="python main.py --eval")
        mine.write_text(json.dumps(me.__dict__))
        assert main_module.cli(tiny_main_argv(env, tmp_path, "--overwrite", "--stop_after", "0")) == 2
        assert capsys.readouterr().err.strip().endswith(
            "; and 1 more): wait for it to end; nothing was changed"
        )
        mine.unlink()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        main_module.main(tiny_main_argv(env, tmp_path, "--overwrite", "--stop_after", "0"))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    log = (run_dir / "log.txt").read_text()
    assert (
        "--overwrite: removed the previous run's .image_check.json, "
        ".masks_synthetic_unc_val_each_network48.99@elsewhere.partial/, best.pth, config.yaml, "
        "eval.12345@somewhere.lock, last.pth, log.txt, masks_synthetic_unc_val_each_network48/, metrics.jsonl, "
        "tensorboard/, timing.jsonl from "
        f"{run_dir}; kept masks_mine, masks_nested (not written by a run)"
    ) in log
    left = sorted(p.name for p in run_dir.iterdir() if "mask" in p.name or p.suffix == ".lock")
    assert left == ["masks_mine", "masks_nested"]


def write_lock(path: Path, holder: LockHolder | None, age_s: float = 0.0) -> None:
    """A lock file at ``path`` naming ``holder`` (None: one still being written), its heartbeat ``age_s`` old."""
    path.write_text("{" if holder is None else json.dumps(holder.__dict__))
    os.utime(path, (time.time() - age_s,) * 2)


def test_which_evaluations_are_running(tmp_path):
    """``utils.lock``'s stale rule decides: this process (running) counts, an ended process does not; a lock of
    another host counts until its heartbeat is 30 minutes old; one being written counts; other names are no locks."""
    host = socket.gethostname()
    ended, ended_start = ended_process()

    def lock(name: str, holder: LockHolder | None, age_s: float = 0.0) -> None:
        write_lock(tmp_path / name, holder, age_s)

    me = LockHolder(host=host, pid=os.getpid(), started="2026-12-06T00:00:00Z", command="python main.py --eval")
    lock(f"eval.{os.getpid()}@{host}.lock", me)
    lock(f"eval.{ended}@{host}.lock", LockHolder(host=host, pid=ended, started="s", command="c", pid_start=ended_start))
    lock("eval.7@far.lock", LockHolder(host="far", pid=7, started="s", command="fresh"), age_s=29 * 60)
    lock("eval.8@far.lock", LockHolder(host="far", pid=8, started="s", command="old"), age_s=31 * 60)
    lock("eval.9@far.lock", None)
    lock("train.lock", me)
    lock("eval.x@far.lock", me)  # not an evaluation's name
    # (in the order of the lock files' names, which this process's pid places anywhere among them)
    assert sorted(evaluations_writing(tmp_path)) == sorted(
        [me.describe(), "host far, pid 7, since s, command: fresh", "eval.9@far.lock, being written"]
    )
    assert sorted(evaluations_writing(tmp_path, stale_after_s=10 * 60)) == sorted(
        [me.describe(), "eval.9@far.lock, being written"]
    )


def test_each_evaluation_keeps_its_config(tmp_path, monkeypatch):
    """An evaluation's config goes to the first free ``config_eval[-N].yaml``, past a broken link and past a name
    another evaluation takes in the instant before this one places its file (that one's file kept); a training's
    ``config.yaml`` is replaced."""
    assert write_run_config(tmp_path, "first", evaluation=True) == tmp_path / "config_eval.yaml"
    assert write_run_config(tmp_path, "second", evaluation=True) == tmp_path / "config_eval-2.yaml"
    (tmp_path / "config_eval-3.yaml").symlink_to(tmp_path / "nowhere")
    real = run_folder.staged

    def raced(targets, replace=True):
        for target in targets:
            if target.name == "config_eval-4.yaml":
                target.write_text("theirs")
        return real(targets, replace)

    monkeypatch.setattr(run_folder, "staged", raced)
    assert write_run_config(tmp_path, "third", evaluation=True) == tmp_path / "config_eval-5.yaml"
    texts = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    assert texts == {"config_eval.yaml": "first", "config_eval-2.yaml": "second", "config_eval-4.yaml": "theirs",
                     "config_eval-5.yaml": "third"}  # fmt: skip
    monkeypatch.undo()
    for text in ("a", "b"):
        assert write_run_config(tmp_path, text, evaluation=False) == tmp_path / "config.yaml"
    assert (tmp_path / "config.yaml").read_text() == "b"


def test_a_dead_processs_lock_under_this_pid_is_taken_over_with_a_warning(tmp_path):
    """The evaluation's lock name is already there, left by an ended process that had this pid (its start time
    differs): taken over, and said in the warnings for the run's log; released at the end."""
    (tmp_path / "eval_x").mkdir()
    lock = tmp_path / "eval_x" / eval_lock_name()
    gone = LockHolder(host=socket.gethostname(), pid=os.getpid(), started="then", command="old", pid_start=1)
    lock.write_text(json.dumps(gone.__dict__))
    cfg = get_config(None, ["OUTPUT", str(tmp_path)])
    info = DistInfo(0, 1, 0, False, torch.device("cpu"))
    with prepare_run_dir(cfg, info, evaluate=str(tmp_path / "x.pth")) as folder:
        assert folder.path == tmp_path / "eval_x" and json.loads(lock.read_text())["command"] != "old"
        assert folder.warnings == [
            f"took over the stale lock {lock} (pid {os.getpid()} now belongs to another process): {gone.describe()}"
        ]
    assert not lock.exists()


def test_an_evaluation_is_refused_while_an_overwrite_clears_the_folder(env, finished, tmp_path, capsys):
    """A training's ``--overwrite`` holds ``overwrite.lock`` while it looks for evaluations and removes the files
    (here a real process holds it): an evaluation that takes its lock meanwhile is one line, holds nothing, writes
    nothing. Killed with ``kill -9``, the holder's lock is stale and the evaluation goes on."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(finished, run_dir)
    argv = tiny_main_argv(env, tmp_path, "--eval", "--pretrain", str(run_dir / "last.pth"), named=False)
    holder = lock_holder(run_dir / run_folder.CLEARING_NAME)
    try:
        _refused_in_one_line(  # no evaluation lock left, no config, no log line
            argv, run_dir, capsys,
            f"main.py: error: RunFolderError: a training started with --overwrite is removing the files of {run_dir} "
            f"(host {socket.gethostname()}, pid {holder.pid}, since 20",
            "): evaluate there once it has written a checkpoint; nothing was changed",
        )  # fmt: skip
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert main_module.cli(argv) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert list(run_dir.glob("results_*.json")) and not any(EVAL_LOCK.fullmatch(p.name) for p in run_dir.iterdir())


@pytest.mark.parametrize("stale_after_s, refused", [(3600, True), (60, False)])
def test_an_overwrite_of_another_host_counts_until_the_evaluations_stale_limit(tmp_path, stale_after_s, refused):
    """A training's ``--overwrite`` lock of another host, its heartbeat 10 minutes old: an evaluation that counts a
    lock stale after an hour is refused and holds nothing; one that counts it stale after a minute takes its lock."""
    write_lock(tmp_path / run_folder.CLEARING_NAME, LockHolder(host="far", pid=7, started="s", command="c"), 600)
    lock = run_folder.evaluation_lock(tmp_path, stale_after_s=stale_after_s)
    if refused:
        with pytest.raises(run_folder.RunFolderError, match=rf"of {tmp_path} \(host far, pid 7, since s, command"):
            lock.acquire()
        assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.CLEARING_NAME]
    else:
        assert lock.acquire() is None
        assert (tmp_path / eval_lock_name()).exists()
        lock.release()


def test_the_overwrite_looks_for_evaluations_holding_its_own_lock(env, finished, tmp_path, monkeypatch):
    """The training takes ``overwrite.lock`` before it looks for evaluations and keeps it until the files are
    removed (so that an evaluation starting in between sees it), then releases it; the removal leaves it alone."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(finished, run_dir)
    seen, real_look, real_clear = [], run_folder.evaluations_writing, run_folder.clear_run

    def holder_of_the_clearing_lock(when: str) -> None:
        holder = json.loads((run_dir / run_folder.CLEARING_NAME).read_text())
        seen.append((when, holder["pid"]))

    def look(*args):
        holder_of_the_clearing_lock("look")
        return real_look(*args)

    def clear(*args):
        holder_of_the_clearing_lock("clear")
        return real_clear(*args)

    monkeypatch.setattr(run_folder, "evaluations_writing", look)
    monkeypatch.setattr(run_folder, "clear_run", clear)
    main_module.main(tiny_main_argv(env, tmp_path, "--overwrite", "--stop_after", "0"))
    assert seen == [("look", os.getpid()), ("clear", os.getpid())]
    assert not (run_dir / run_folder.CLEARING_NAME).exists()
    assert "overwrite.lock" not in (run_dir / "log.txt").read_text()  # neither removed nor listed as kept

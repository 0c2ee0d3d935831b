"""Runs sharing one DATA.ROOT make the synthetic dataset once (``engine.synthetic_once``): one that finds another
making it waits, then uses it; a dead holder's lock is taken over and its cut-off generation made anew."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data.synthetic import ensure_synthetic
from data.synthetic_root import (
    COMPLETE,
    GENERATION_LOCK,
    RUNNING,
    SyntheticRootError,
    check_synthetic_root,
    generation_lock,
)
from engine.synthetic_once import ensure_synthetic_once
from refer import REFER
from utils.lock import LockHolder, RunLock

from .helpers_process import ended_process

SMALL = dict(num_images=8, min_size=64, max_size=80, workers=1)


def images(root: Path) -> dict[str, bytes]:
    """Image name -> its bytes."""
    folder = root / "images" / "mscoco" / "images" / "train2014"
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def mark(root: Path, text: bytes) -> None:
    """Every image's bytes replaced by ``text``: only a generation writes them back."""
    for p in (root / "images" / "mscoco" / "images" / "train2014").iterdir():
        p.write_bytes(text)


def start_waiting(root: Path, done: list) -> threading.Thread:
    """``ensure_synthetic_once(root)`` in a thread (as another run would call it), its result appended to ``done``."""
    waiting = threading.Thread(target=lambda: done.append(ensure_synthetic_once(root, poll_s=0.02, **SMALL)))
    waiting.start()
    return waiting


def test_the_lock_is_no_file_of_a_dataset(tmp_path):
    """A root holding only the lock (and a copy its takeover sets aside) and the first file of a generation another
    run is starting is an empty root, not one refused; the lock's folder is made, and nothing in a root refused."""
    lock = generation_lock(tmp_path / "new")
    assert lock == tmp_path / "new" / "synthetic" / GENERATION_LOCK and lock.parent.is_dir()
    lock.write_text("{}")
    lock.with_name(f"{GENERATION_LOCK}.stale.1.ab").write_text("{}")
    (lock.parent / f"{RUNNING}.tmp").write_text("{")  # another run starting its generation
    assert check_synthetic_root(tmp_path / "new") == ({}, 0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SyntheticRootError, match="holds files but no synthetic dataset"):
        generation_lock(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    (tmp_path / "file").write_text("x")  # a root whose folders cannot be made (under a file): named, in one line
    where = re.escape(str((tmp_path / "file" / "set").resolve()))
    with pytest.raises(SyntheticRootError, match=f"^cannot create the synthetic dataset's folders in {where} "
                                                 r"\(DATA.ROOT, --root\): Not a directory$"):  # (no Errno, no path)
        generation_lock(tmp_path / "file" / "set")


def test_a_run_waits_for_the_one_making_the_dataset(tmp_path, caplog):
    """The lock held (here by this process, as by another run): the call waits, says for whom, and writes nothing;
    once the holder has made the dataset and let go, the call finds it complete and leaves its files as they are."""
    holder = RunLock(generation_lock(tmp_path))
    holder.acquire()
    who, done = holder.holder.describe(), []
    with caplog.at_level(logging.INFO, logger="lavt"):
        waiting = start_waiting(tmp_path, done)
        time.sleep(0.5)
        assert waiting.is_alive() and not (tmp_path / "images").exists()
        ensure_synthetic(tmp_path, **SMALL)  # the holder makes it
        mark(tmp_path, b"made by the holder")
        holder.release()
        waiting.join(timeout=30)
    assert done == [tmp_path / "synthetic"]
    assert list(images(tmp_path).values()) == [b"made by the holder"] * 8  # found complete, not written again
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert said == [f"waiting for another run to make the synthetic dataset in {tmp_path.resolve()} ({who})"]
    assert sorted(os.listdir(tmp_path / "synthetic")) == sorted(
        ["refs(unc).p", "instances.json", "attributes.json", COMPLETE]
    )  # the lock removed


def test_a_lock_file_being_written_is_waited_for_and_said_so(tmp_path, caplog):
    """A fresh lock file that does not parse yet (its holder still writing it) is held: the call waits, and says
    why it cannot name the holder."""
    lock = generation_lock(tmp_path)
    lock.write_text("{")
    done = []
    with caplog.at_level(logging.INFO, logger="lavt"):
        waiting = start_waiting(tmp_path, done)
        time.sleep(0.3)
        assert waiting.is_alive() and done == []
        lock.unlink()  # its holder gave up: the call takes the lock and makes the dataset
        waiting.join(timeout=30)
    assert done == [tmp_path / "synthetic"] and len(images(tmp_path)) == 8
    said = [m for m in caplog.messages if m.startswith("waiting for")]
    assert said == [f"waiting for another run to make the synthetic dataset in {tmp_path.resolve()} (its lock file "
                    "is being written)"]  # fmt: skip


def test_a_dead_holders_lock_is_taken_over_and_its_generation_made_anew(tmp_path, caplog):
    ensure_synthetic(tmp_path, **SMALL)
    before = images(tmp_path)
    mark(tmp_path, b"half written")
    (tmp_path / "synthetic" / COMPLETE).rename(tmp_path / "synthetic" / RUNNING)  # cut off, as by kill -9
    ended, start = ended_process()
    dead = LockHolder(host=socket.gethostname(), pid=ended, started="2026-12-06T00:00:00Z", command="python main.py",
                      pid_start=start)
    (tmp_path / "synthetic" / GENERATION_LOCK).write_text(json.dumps(dead.__dict__))
    with caplog.at_level(logging.INFO, logger="lavt"):
        ensure_synthetic_once(tmp_path, poll_s=0.02, **SMALL)
    took = [m for m in caplog.messages if m.startswith("took over the stale lock")]
    assert took == [f"took over the stale lock {tmp_path / 'synthetic' / GENERATION_LOCK} (its process {ended} is "
                    f"not running): {dead.describe()}"]  # fmt: skip
    assert any("was cut off while being generated" in m for m in caplog.messages)
    assert images(tmp_path) == before  # written anew (the same bytes: the same seed and arguments)
    assert not (tmp_path / "synthetic" / GENERATION_LOCK).exists()


def _make_after_the_other_started(root: Path, barrier, log: Path) -> None:
    logging.basicConfig(filename=log, level=logging.INFO, format="%(message)s")
    barrier.wait(timeout=60)
    ensure_synthetic_once(root, poll_s=0.05, num_images=60, min_size=64, max_size=96, workers=1)


def test_two_processes_started_together_make_one_dataset(tmp_path):
    """Real processes, released together: one makes the dataset, the other waits for it; neither removes the
    other's files, and the dataset is whole."""
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    root = tmp_path / "data"
    procs = [spawn.Process(target=_make_after_the_other_started, args=(root, barrier, log)) for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    texts = [log.read_text() for log in logs]
    assert sorted("generating a new synthetic dataset" in t for t in texts) == [False, True], texts
    assert not any("cut off" in t or "removed" in t for t in texts), texts
    refer = REFER(str(root), "synthetic", "unc")
    files = {img["file_name"] for img in refer.Imgs.values()}
    assert len(files) == 60 and files == set(images(root))


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_dataset_where_no_lock_can_be_written_is_read_as_it_is(tmp_path, monkeypatch, code):
    """A complete dataset on a read-only disk (made once, shared by many runs): used without a lock; other errors
    of the lock file are raised."""
    ensure_synthetic(tmp_path, **SMALL)
    mark(tmp_path, b"as it was")

    def cannot(self, me):
        raise OSError(code, os.strerror(code), str(self.path))

    monkeypatch.setattr(RunLock, "_create", cannot)
    assert ensure_synthetic_once(tmp_path, **SMALL) == tmp_path / "synthetic"
    assert list(images(tmp_path).values()) == [b"as it was"] * 8
    monkeypatch.setattr(RunLock, "_create", lambda self, me: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        ensure_synthetic_once(tmp_path, **SMALL)


def test_the_command_waits_for_the_run_making_the_dataset(tmp_path):
    """``python -m tools.synthetic`` (a real process) beside a run that holds the root's generation lock: it waits,
    says for whom, and writes nothing until the lock is let go; then it makes the dataset."""
    holder = RunLock(generation_lock(tmp_path))
    holder.acquire()
    who = holder.holder.describe()
    argv = [sys.executable, "-m", "tools.synthetic", "--root", str(tmp_path), "--num-images", "8", "--min-size", "64",
            "--max-size", "64", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not any("waiting for" in line for line in lines):  # its start (imports), then its look at the lock
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.05)
        time.sleep(0.5)  # (a few of its looks at the lock)
        assert proc.poll() is None and not (tmp_path / "images").exists()
    finally:
        holder.release()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 0, err
    waiting = [line for line in err.splitlines() if "waiting for" in line]
    assert len(waiting) == 1 and waiting[0].endswith(
        f"WARNING waiting for another run to make the synthetic dataset in {tmp_path.resolve()} "
        f"({who})"
    ), err
    assert len(images(tmp_path)) == 8 and not (tmp_path / "synthetic" / GENERATION_LOCK).exists()


def test_the_commands_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Any OSError (here the lock's disk failing) ends the command with one line and status 2; a ValueError of its
    numbers names the flags; Ctrl-C says that the next run cleans up, status 130."""
    from tools import synthetic as command

    argv = ["--root", str(tmp_path), "--num-images", "8", "--min-size", "64", "--max-size", "64"]
    monkeypatch.setattr(RunLock, "_create", lambda self, me: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert command.run(argv) == 2
    assert capsys.readouterr().err == "python -m tools.synthetic: error: OSError: [Errno 5] I/O error\n"
    monkeypatch.undo()
    assert command.run([*argv, "--max-objects", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m tools.synthetic: error: ValueError: need 1 <= --min-objects <= --max-objects, got "
        "--min-objects=2, --max-objects=1"
    )
    monkeypatch.setattr(command, "ensure_synthetic_once", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert command.run(argv) == 130
    assert capsys.readouterr().err == (
        "python -m tools.synthetic: interrupted (Ctrl-C); the next run into this root removes what it had written, "
        "if anything (nothing while it waited)\n"
    )
    assert not (tmp_path / "images").exists()


def test_arguments_it_would_refuse_are_refused_before_the_lock(tmp_path):
    """Numbers ``generate`` refuses: the ValueError comes before the lock's folders are made (nothing on disk)."""
    with pytest.raises(ValueError, match=r"^need 16 <= min_size <= max_size, got min_size=8, max_size=80$"):
        ensure_synthetic_once(tmp_path / "data", **{**SMALL, "min_size": 8})
    assert os.listdir(tmp_path) == []

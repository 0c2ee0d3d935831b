"""Run folders are owned: a second training is refused (nothing changed) unless --resume or --overwrite; the lock
names its holder, is released on exit (exceptions and SIGTERM included) and taken over when stale; evaluations never
write into another run's folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import engine.run_folder as run_folder
import main as main_module
import utils.lock as lock_module
from args import names_run_folder, parse_args
from configs import get_config
from engine.run_folder import LOCK_NAME, RunFolderError, eval_run_dir
from models import CheckpointError
from refer import ReferDataError
from utils.distributed import DistInfo
from utils.lock import RunLock, RunLockedError

from .helpers_process import lock_holder, snapshot
from .helpers_train import tiny_env, tiny_main_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch tiny run."""
    out = tmp_path_factory.mktemp("finished")
    main_module.main(tiny_main_argv(env, out, TRAIN__EPOCHS=1))
    return out / "tiny"


def test_second_training_is_refused_and_changes_nothing(env, finished, capsys):
    before = snapshot(finished)
    assert {"best.pth", "last.pth", "metrics.jsonl", "config.yaml", "log.txt"} <= before.keys()
    assert main_module.cli(tiny_main_argv(env, finished.parent, TRAIN__EPOCHS=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (
        f"main.py: error: RunFolderError: run folder {finished} already holds a run (last.pth, best.pth, "
        "metrics.jsonl): continue it with --resume, or delete its files and start over with --overwrite; nothing "
        "was changed"
    )
    assert snapshot(finished) == before  # byte for byte, the log included; no lock left behind


def test_overwrite_clears_the_previous_run_then_trains(env, finished, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(finished, run_dir)
    (run_dir / "notes.md").write_text("mine")
    users = ["exported_official.pth", "notes.txt", "my_recipe.yaml", "bench.json", ".mine.tmp"]
    for name in users:  # the user's: an export, notes, the config the run was started from, a benchmark's JSON
        (run_dir / name).write_text("mine")
    runs = ["config_eval.yaml", "config_eval-2.yaml", "results_x.json", "per_expression_x.jsonl",
            ".last.pth.k2j4x8ab.tmp", ".image_check.json.77.tmp"]  # fmt: skip
    for name in runs:  # an evaluation's files and the temporaries of a writer that was killed
        (run_dir / name).write_text("{}")
    (run_dir / "tensorboard").mkdir(exist_ok=True)
    (run_dir / "tensorboard" / "events.out.tfevents.old").write_bytes(b"")
    old_config = (run_dir / "config.yaml").read_bytes()
    main_module.main(tiny_main_argv(env, tmp_path, "--overwrite", "--stop_after", "0", "--seed", "5"))
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"config.yaml", "log.txt", "notes.md", ".image_check.json", "tensorboard", "timing.jsonl", *users}
    assert not (run_dir / "tensorboard" / "events.out.tfevents.old").exists()
    assert all((run_dir / name).read_text() == "mine" for name in ["notes.md", *users])
    assert (run_dir / "config.yaml").read_bytes() != old_config and "SEED: 5" in (run_dir / "config.yaml").read_text()
    log = (run_dir / "log.txt").read_text()
    assert "epoch 0:" not in log  # the previous run's log went with it
    assert (
        f"--overwrite: removed the previous run's .image_check.json, .image_check.json.77.tmp, .last.pth.k2j4x8ab.tmp, "
        f"best.pth, config.yaml, config_eval-2.yaml, config_eval.yaml, last.pth, log.txt, metrics.jsonl, "
        f"per_expression_x.jsonl, results_x.json, tensorboard/, timing.jsonl from {run_dir}; kept .mine.tmp, "
        f"bench.json, exported_official.pth, my_recipe.yaml, notes.md, notes.txt (not written by a run)"
    ) in log


@pytest.mark.parametrize("other", ["--resume", "--eval"])
def test_overwrite_contradicts_resume_and_eval(env, tmp_path, other):
    flags = ["--overwrite", other] + (["--pretrain", "x.pth"] if other == "--eval" else [])
    with pytest.raises(ValueError, match=f"^--overwrite .* contradicts {other}$"):
        main_module.main(tiny_main_argv(env, tmp_path, *flags))
    assert not tmp_path.joinpath("tiny").exists()


def test_lock_names_its_holder_and_is_taken_over_once_the_holder_is_killed(env, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    holder = lock_holder(lock)
    try:
        assert main_module.cli(tiny_main_argv(env, tmp_path, "--stop_after", "0")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(
            f"main.py: error: RunLockedError: run folder {run_dir} is in use by another training (host "
            f"{socket.gethostname()}, pid {holder.pid}, since 20"
        )
        command = shlex.join([Path(sys.executable).name, "-c", str(lock)])  # python -c: sys.argv is ["-c", ...]
        assert f"command: {command}); wait for it to end, or remove {lock} if you are sure" in err[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # refused: nothing written
        holder.send_signal(signal.SIGKILL)  # kill -9: nothing can release the lock
        holder.wait()
        assert lock.is_file()
        out = main_module.main(tiny_main_argv(env, tmp_path, "--stop_after", "0"))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    log = (Path(out["run_dir"]) / "log.txt").read_text()
    assert f"WARNING took over the stale lock {lock} (its process {holder.pid} is not running): host " in log
    assert not lock.exists()  # released when the run ended


def test_lock_released_on_sigterm(tmp_path):
    lock = tmp_path / LOCK_NAME
    holder = lock_holder(lock)
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=60) == 128 + signal.SIGTERM
    assert not lock.exists()


def test_lock_released_when_the_run_fails(env, tmp_path):
    # annotation files that exist (checked before the folder is claimed) but cannot be read (found once it is)
    broken = tmp_path / "broken" / "refcoco"
    broken.mkdir(parents=True)
    (broken / "refs(unc).p").write_bytes(b"not a pickle")
    (broken / "instances.json").write_text("{}")
    with pytest.raises(ReferDataError, match="cannot read REFER refs pickle"):
        main_module.main(tiny_main_argv(env, tmp_path, DATA__DATASET="refcoco", DATA__ROOT=str(broken.parent)))
    assert (tmp_path / "tiny" / "config.yaml").is_file() and not (tmp_path / "tiny" / LOCK_NAME).exists()
    # the corrected command starts in that folder: a config.yaml without checkpoints or metrics is not a run
    main_module.main(tiny_main_argv(env, tmp_path, TRAIN__EPOCHS=1))
    assert (tmp_path / "tiny" / "last.pth").is_file()


def _write_lock(path: Path, age_s: float, **fields) -> None:
    path.write_text(json.dumps({"started": "2026-01-01T00:00:00Z", "command": "python main.py", **fields}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_stale_rule_for_a_holder_on_another_host(tmp_path):
    lock = tmp_path / LOCK_NAME
    _write_lock(lock, 10 * 60, host="elsewhere", pid=1234, token="t")
    with pytest.raises(RunLockedError, match=r"in use by another training \(host elsewhere, pid 1234, since 2026"):
        RunLock(lock, stale_after_s=3600).acquire()
    _write_lock(lock, 2 * 3600, host="elsewhere", pid=1234, token="t")
    taker = RunLock(lock, stale_after_s=3600)
    note = taker.acquire()
    assert note.startswith(f"took over the stale lock {lock} (its holder on another host has not touched it for 120")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()
    assert not lock.exists()


def test_the_heartbeat_keeps_the_lock_fresh_and_ends_with_release(tmp_path, monkeypatch):
    lock = tmp_path / LOCK_NAME
    holder = RunLock(lock, heartbeat_s=0.02)
    holder.acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    deadline = time.time() + 30
    while lock.stat().st_mtime < old + 60:
        assert time.time() < deadline, "the heartbeat did not touch the lock"
        time.sleep(0.01)
    beating = [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]  # named in a stack dump
    assert len(beating) == 1 and beating[0].daemon  # a daemon: never the one thing keeping a process alive
    # release while a beat is touching the file: it waits for that beat, so no thread outlives it
    touching, utime = threading.Event(), os.utime

    def slow_utime(*args, **kwargs):
        touching.set()
        time.sleep(0.3)
        return utime(*args, **kwargs)

    monkeypatch.setattr(os, "utime", slow_utime)
    assert touching.wait(30)
    holder.release()
    assert not [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]
    assert not lock.exists()


@pytest.fixture
def east_of_utc(monkeypatch):
    """The process's local time 5 h 30 east of UTC (a POSIX TZ rule: no time zone files needed)."""
    monkeypatch.setenv("TZ", "LAVT-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_lock_names_its_process_and_a_token_of_its_own(tmp_path, east_of_utc):
    """What tells a live holder from a reused pid (its process's start time) and two takers apart (the token), and
    when it was taken (in UTC, not the local time); the file is readable by others and not executable."""
    lock = tmp_path / LOCK_NAME
    tokens = []
    umask = os.umask(0)  # the process's umask, read by setting another and put back at once
    os.umask(umask)
    for _ in range(2):
        before = datetime.now(timezone.utc).replace(microsecond=0)
        with RunLock(lock):
            written, mode = json.loads(lock.read_text()), stat.S_IMODE(lock.stat().st_mode)
        assert mode == 0o644 & ~umask  # others read who holds it (the refusal names the holder); never executable
        # when it was taken, in UTC, ISO 8601 to the second
        started = datetime.strptime(written["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        assert before <= started <= datetime.now(timezone.utc)
        assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
        # /proc/<pid>/stat field 22, counted after the parenthesised command name (field 2)
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert written["pid_start"] == start
        assert len(written["token"]) == 16 and int(written["token"], 16) >= 0
        tokens.append(written["token"])
    assert tokens[0] != tokens[1]


def test_the_lock_restores_sigterm_each_time_it_is_taken(tmp_path):
    """Taken where SIGTERM has its default action, the lock makes it an exit that releases it, and gives the default
    back on release; taken again under a handler of its caller's, it leaves that handler as it was, before and
    after."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        lock = RunLock(tmp_path / LOCK_NAME)
        lock.acquire()
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        with pytest.raises(SystemExit) as stopped:  # what SIGTERM does now: an exit with the status it would give
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stopped.value.code == 128 + signal.SIGTERM == 143
        lock.release()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def callers(signum, frame):
            raise AssertionError("not sent")

        signal.signal(signal.SIGTERM, callers)
        lock.acquire()
        assert signal.getsignal(signal.SIGTERM) is callers
        lock.release()
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_release_leaves_a_lock_another_process_has_taken(tmp_path):
    """A holder whose lock was taken over (it had gone silent past the stale time) releases only its own: the new
    holder's file, with its token, stays."""
    lock = tmp_path / LOCK_NAME
    holder = RunLock(lock)
    holder.acquire()
    taken = json.loads(lock.read_text())
    taken.update(token="f" * 16, pid=taken["pid"] + 1)
    lock.write_text(json.dumps(taken))
    holder.release()
    assert json.loads(lock.read_text()) == taken


def test_a_takeover_puts_back_a_fresh_lock_written_since_it_judged_the_old_one(tmp_path):
    """The stale lock's removal moves the file aside and looks again: a lock another process wrote in the meantime
    (another token) is put back, whole; the one judged stale is removed."""
    lock = tmp_path / LOCK_NAME
    stale = lock_module.LockHolder(host="far", pid=1, started="s", command="old", token="a" * 16)
    fresh = {**stale.__dict__, "command": "new", "token": "b" * 16}
    lock.write_text(json.dumps(fresh))
    RunLock(lock)._remove_if(stale)
    assert json.loads(lock.read_text()) == fresh and sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    lock.write_text(json.dumps(stale.__dict__))
    RunLock(lock)._remove_if(stale)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_removed_meanwhile_is_released_without_error(tmp_path, monkeypatch):
    """The lock file deleted by hand (or by a cleanup) between the holder's last look and its removal: the release
    ends quietly, as the file is gone either way."""
    lock = tmp_path / LOCK_NAME
    holder = RunLock(lock)
    holder.acquire()
    read = lock_module.read_holder

    def read_then_lose(path):
        current = read(path)
        Path(path).unlink()
        return current

    monkeypatch.setattr(lock_module, "read_holder", read_then_lose)
    holder.release()
    assert holder.holder is None and not lock.exists()


def test_stale_lock_minutes_reaches_the_lock(env, tmp_path, monkeypatch):
    """``--stale_lock_minutes``: a foreign holder silent for 90 s holds the run folder against 2 minutes and is
    taken over at 1 (the training itself is stood in for: only the folder's claim is run)."""
    monkeypatch.setattr(main_module, "_run_in", lambda args, cfg, info, folder, *rest: {"notes": folder.warnings})
    lock = tmp_path / "tiny" / LOCK_NAME
    lock.parent.mkdir()
    _write_lock(lock, 90, host="elsewhere", pid=1234, token="t")
    with pytest.raises(RunLockedError, match="host elsewhere, pid 1234"):
        main_module.main(tiny_main_argv(env, tmp_path, "--stale_lock_minutes", "2"))
    out = main_module.main(tiny_main_argv(env, tmp_path, "--stale_lock_minutes", "1"))
    assert len(out["notes"]) == 1 and "took over the stale lock" in out["notes"][0]
    assert "its holder on another host has not touched it for 2 min" in out["notes"][0]


def test_a_requeued_slurm_job_takes_over_its_own_lock_at_once(tmp_path, monkeypatch):
    lock = tmp_path / LOCK_NAME
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job in ("4242.1", "4243.0", "4242.2", ""):  # this very run, another job, a later run, not SLURM: all held
        _write_lock(lock, 60, host="elsewhere", pid=1234, token="t", slurm_job=job)
        with pytest.raises(RunLockedError, match="host elsewhere, pid 1234"):
            RunLock(lock, stale_after_s=3600).acquire()
    _write_lock(lock, 60, host="elsewhere", pid=1234, token="t", slurm_job="4242.0")  # before the requeue
    taker = RunLock(lock, stale_after_s=3600)
    assert "(it was taken by an earlier run of this SLURM job (4242.0; this is 4242.1))" in taker.acquire()
    assert json.loads(lock.read_text())["slurm_job"] == "4242.1"
    taker.release()
    monkeypatch.delenv("SLURM_JOB_ID")  # outside SLURM the lock names no job (the restart count alone is no job)
    with RunLock(lock):
        assert json.loads(lock.read_text())["slurm_job"] == ""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT")  # a first run: SLURM sets the count only once it requeues
    with RunLock(lock):
        assert json.loads(lock.read_text())["slurm_job"] == "77.0"


def test_a_holder_of_another_user_counts_as_running(monkeypatch):
    """Signal 0 to a live process of another user is refused (EPERM): it runs, and its lock is held; to no process
    (ESRCH): it does not. (This machine's tests run as root, who may signal anyone: os.kill is stubbed.)"""
    answers = {1234: PermissionError(1, "Operation not permitted"), 5678: ProcessLookupError(3, "No such process")}

    def kill(pid, signum):
        assert signum == 0
        if pid in answers:
            raise answers[pid]

    monkeypatch.setattr(lock_module.os, "kill", kill)
    assert [lock_module._pid_running(pid) for pid in (1234, 5678, 42)] == [True, False, True]


def test_stale_rule_on_this_host_and_unreadable_locks(tmp_path):
    lock, host = tmp_path / LOCK_NAME, socket.gethostname()
    _write_lock(lock, 0, host=host, pid=os.getpid(), pid_start=-1, token="t")  # a live pid, another process
    taker = RunLock(lock)
    assert f"(pid {os.getpid()} now belongs to another process)" in taker.acquire()
    taker.release()
    _write_lock(lock, 0, host=host, pid=os.getpid(), token="t")  # this very process, still running
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(lock).acquire()
    lock.write_text("{")  # being written, or damaged
    with pytest.raises(RunLockedError, match="its lock file is being written"):
        RunLock(lock, stale_after_s=60).acquire()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    taker = RunLock(lock, stale_after_s=60)
    assert taker.acquire() == (f"took over the stale lock {lock} (the unreadable lock file is untouched for 2 min "
                               "(stale after 1 min without a heartbeat)): unreadable lock file")  # fmt: skip
    taker.release()
    assert not lock.exists()


def _demo_like_config(tmp_path: Path) -> Path:
    """A config file naming a run folder, as configs/demo.yaml names checkpoint/demo."""
    cfg_file = tmp_path / "demo_like.yaml"
    cfg_file.write_text(f"OUTPUT: {tmp_path / 'out'}\nMODEL_ID: demo\n")
    return cfg_file


def test_eval_of_a_foreign_checkpoint_never_writes_into_the_configs_run_folder(env, finished, tmp_path):
    demo = tmp_path / "out" / "demo"
    shutil.copytree(finished, demo)  # the demo's own run, which the config file names
    before = snapshot(demo)
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    shutil.copy(finished / "best.pth", elsewhere / "model.pth")  # no config.yaml beside it: not a run folder
    flags = ["--cfg_file", str(_demo_like_config(tmp_path)), "--eval", "--pretrain", str(elsewhere / "model.pth")]
    out = main_module.main(tiny_main_argv(env, tmp_path, *flags, named=False))
    assert out["run_dir"] == str(tmp_path / "out" / "eval_model")
    assert snapshot(demo) == before
    written = {p.name for p in (tmp_path / "out" / "eval_model").iterdir()}
    assert {"config_eval.yaml", "log.txt"} <= written and any(n.endswith(".json") for n in written)
    assert "config.yaml" not in written and not (elsewhere / "config_eval.yaml").exists()


def test_eval_of_a_runs_checkpoint_writes_beside_it_without_touching_its_config(env, finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    config = (run_dir / "config.yaml").read_bytes()
    flags = ["--cfg_file", str(_demo_like_config(tmp_path)), "--eval", "--pretrain", str(run_dir / "best.pth")]
    out = main_module.main(tiny_main_argv(env, tmp_path, *flags, named=False))
    assert out["run_dir"] == str(run_dir) and not (tmp_path / "out").exists()
    assert (run_dir / "config.yaml").read_bytes() == config and (run_dir / "config_eval.yaml").is_file()
    assert not (run_dir / LOCK_NAME).exists()


def test_eval_folder_named_on_the_command_line(finished, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    cfg = get_config(None, ["OUTPUT", str(tmp_path), "MODEL_ID", "other"])
    with pytest.raises(RunFolderError, match=f"would write into {other}, which holds another run .*--model_id "
                       f"/ --output, or leave them out to write beside it in {finished}$"):
        eval_run_dir(cfg, finished / "best.pth", named=True)
    (tmp_path / "loose").mkdir()
    shutil.copy(finished / "best.pth", tmp_path / "loose" / "best.pth")  # no run folder of its own to suggest
    with pytest.raises(RunFolderError, match=r"which holds another run .*: name another folder with --model_id / "
                       r"--output$"):
        eval_run_dir(cfg, tmp_path / "loose" / "best.pth", named=True)
    assert eval_run_dir(cfg, other / "best.pth", named=True) == (other, "named by --model_id / --output")
    fresh = get_config(None, ["OUTPUT", str(tmp_path), "MODEL_ID", "fresh"])
    assert eval_run_dir(fresh, finished / "best.pth", named=True)[0] == tmp_path / "fresh"
    assert eval_run_dir(fresh, finished / "best.pth", named=False)[0] == finished


def test_same_folder_by_name_where_it_cannot_be_looked_up(tmp_path):
    """A folder that cannot be stat'ed (gone, or no permission) is compared by its resolved path."""
    from engine.run_folder import _same_folder

    gone = tmp_path / "gone"
    assert _same_folder(gone / "run", tmp_path / "gone" / "x" / ".." / "run")
    assert not _same_folder(gone / "run", gone / "other")
    assert _same_folder(tmp_path, tmp_path / ".") and not _same_folder(tmp_path, gone.parent.parent)


def test_what_names_the_run_folder_and_a_missing_checkpoint(env, tmp_path):
    assert names_run_folder(parse_args(["--model_id", "a"])) and names_run_folder(parse_args(["--output", "o"]))
    assert names_run_folder(parse_args(["--opts", "TRAIN.LR", "1e-4", "MODEL_ID", "a"]))
    assert not names_run_folder(parse_args(["--cfg_file", "configs/demo.yaml", "--opts", "TRAIN.LR", "1e-4"]))
    with pytest.raises(CheckpointError, match="^checkpoint not found: .*nothing.pth \\(--pretrain\\)$"):
        main_module.main(tiny_main_argv(env, tmp_path, "--eval", "--pretrain", str(tmp_path / "nothing.pth")))
    assert list(tmp_path.iterdir()) == []  # no folder made for results that cannot come


def test_process_start_read_past_a_name_with_parentheses():
    """/proc/<pid>/stat's second field is the executable's name in parentheses, which may hold ") " itself."""
    from utils.lock import process_start, start_from_stat

    fields = " ".join(str(n) for n in range(3, 30))  # field n holds n, from the state (field 3) on
    assert start_from_stat(f"42 (train) {fields}\n") == 22
    assert start_from_stat(f"42 (evil) 1 2) {fields}\n") == 22
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # a live process: a start time in clock ticks, the child's no earlier than its parent's
        assert 0 < process_start(os.getpid()) <= process_start(child.pid)
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None  # gone: unknown


def test_other_ranks_get_rank_zeros_folder_or_its_error(tmp_path, monkeypatch):
    """Rank 0 alone chooses and locks the folder; every other rank gets its path and reason (no lock of its own), or
    raises its error. The gathering across processes is stood in for: each rank receives rank 0's verdict first."""
    verdicts: list = []
    monkeypatch.setattr(run_folder, "all_gather_object", lambda obj: verdicts.append(obj) or [verdicts[0], obj])
    cpu = torch.device("cpu")
    ranks = [DistInfo(rank, 2, rank, True, cpu) for rank in (0, 1)]
    cfg = get_config(None, ["OUTPUT", str(tmp_path), "MODEL_ID", "run"])
    with run_folder.prepare_run_dir(cfg, ranks[0]) as zero:
        one = run_folder.prepare_run_dir(cfg, ranks[1])
        assert zero.lock is not None and (one.path, one.reason, one.lock) == (tmp_path / "run", zero.reason, None)
    (tmp_path / "run" / "last.pth").write_bytes(b"")  # now the folder holds a run: rank 0 refuses it
    verdicts.clear()
    with pytest.raises(RunFolderError) as refused:
        run_folder.prepare_run_dir(cfg, ranks[0])
    with pytest.raises(RunFolderError) as also:
        run_folder.prepare_run_dir(cfg, ranks[1])
    assert also.value is refused.value
    verdicts.clear()  # an evaluation's folder comes with the reason it was chosen, on every rank
    zero = run_folder.prepare_run_dir(cfg, ranks[0], evaluate=str(tmp_path / "run" / "last.pth"))
    one = run_folder.prepare_run_dir(cfg, ranks[1], evaluate=str(tmp_path / "run" / "last.pth"))
    zero.release()
    assert zero.reason and (one.path, one.reason, one.lock) == (zero.path, zero.reason, None)

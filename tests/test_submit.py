"""tools/submit.py, the submitit launcher: its command line, the sbatch header it asks for, the forwarding of
SLURM's signals to main.py, and a preempt/requeue cycle on submitit's local executor."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch

import main as main_module
from models import read_checkpoint
from tools import submit as submit_module

from .helpers_train import assert_same_weights_and_optimizer, tiny_env, tiny_opts, wait_for


@pytest.mark.slow
def test_submitit_job_preempted_and_requeued_ends_with_the_same_weights(tmp_path_factory, tmp_path, monkeypatch):
    """A training submitted with tools/submit.py to submitit's local executor, preempted mid-epoch the way SLURM
    does it (submitit's signal to the task and to everything it started) and requeued, ends with exactly the weights
    and optimizer state of the same training never interrupted.

    Submitit's own ``LocalJob._interrupt`` signals its local controller process, which has no handler for it and
    dies without requeueing (submitit 1.5.4), so the test signals the task's processes itself."""
    data_root, text = tiny_env(tmp_path_factory)
    # one epoch of 11 iterations (89 objects, batch 8), last.pth after iterations 2, 4, ...
    over = dict(TRAIN__EPOCHS=1, TRAIN__BATCH_SIZE=8, TRAIN__CHECKPOINT_EVERY=2, EVAL__AFTER_TRAIN=False)

    def argv(out: Path) -> list[str]:
        return ["--cfg_file", "", "--device", "cpu", "--opts", *tiny_opts(data_root, text, out, **over)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's processes (OMP_NUM_THREADS=1): the same arithmetic
    try:
        main_module.main(argv(tmp_path / "straight"))
    finally:
        torch.set_num_threads(threads)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=30)
    job = submit_module.submit(executor, submit_module.main_argv(argv(tmp_path / "submitted")), grace_s=60)
    run_dir = tmp_path / "submitted" / "tiny"
    try:
        wait_for(lambda: (run_dir / "last.pth").is_file(), "the first periodic checkpoint")  # after iteration 2
        task_pid, main_pid = map(int, re.search(r"\(pid (\d+)\): main.py started, pid (\d+)",
                                                Path(job.paths.stderr).read_text()).groups())  # fmt: skip
        os.kill(main_pid, signal.SIGSTOP)  # held mid-epoch until the stop request is on its way
        for pid in (task_pid, main_pid):  # SLURM signals every process of the task; main.py ignores submitit's
            os.kill(pid, submit_module.submitit_signal())
        wait_for(lambda: "forwarded to main.py" in Path(job.paths.stderr).read_text(), "the forwarded signal")
        os.kill(main_pid, signal.SIGCONT)
        wait_for(job.done, "the requeued job to finish", timeout=300)
    finally:
        if not job.done():
            job.cancel()
    assert job.result() is None
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "requeueing: main.py" in log and "Requeued job" in log
    assert log.count("main.py started") == 2  # the first run and the requeued one
    run_log = (run_dir / "log.txt").read_text()
    stopped = re.search(r"stopped: SIGUSR1 received: checkpoint .* written at epoch 0, iteration (\d+)", run_log)
    assert stopped and 2 <= int(stopped.group(1)) < 11, run_log  # mid-epoch
    assert "resumed from" in run_log

    a = read_checkpoint(tmp_path / "straight" / "tiny" / "last.pth")
    b = read_checkpoint(run_dir / "last.pth")
    assert (a["epoch"], a["iteration"], a["best"]) == (b["epoch"], b["iteration"], b["best"]) and a["epoch"] == 0
    assert_same_weights_and_optimizer(a, b)


def test_a_pickled_trainer_is_its_command():
    """submitit pickles the job to requeue it: what comes back runs the same command, with no process of its own."""
    trainer = submit_module.Trainer(["--epochs", "3", "--resume", "auto"], 45.0, script="/x/main.py")
    trainer._returncode = 0  # a finished child's state is not carried over
    again = pickle.loads(pickle.dumps(trainer))
    assert (again.argv, again.grace_s, again.script) == (["--epochs", "3", "--resume", "auto"], 45.0, "/x/main.py")
    assert again._proc is None and again._returncode is None


def test_submit_refuses_before_creating_anything(tmp_path, capsys):
    """tools/submit.py adds --resume auto itself; a --resume of the user's, or no main.py arguments, is one line and
    exit status 2 before the job folder exists."""
    assert submit_module.main_argv(["--epochs", "3"]) == ["--epochs", "3", "--resume", "auto"]
    job_dir = tmp_path / "jobs"
    for argv, message in [
        (["--", "--epochs", "3", "--resume"], "adds --resume auto itself: remove --resume"),
        (["--", "--resume=auto"], "adds --resume auto itself"),
        (["--", "--eval", "--pretrain", "x.pth"], "submits training"),
        ([], "no main.py arguments"),
        # what main.py would refuse when the job starts, after its wait in the queue
        (["--", "--epochs", "3", "--bogus"], "main.py's arguments: unrecognized arguments: --bogus"),
        (["--", "--epochs", "x"], "main.py's arguments: argument --epochs: invalid int value: 'x'"),
        (["--", "--epochs", "0"], "TRAIN.EPOCHS must be >= 1, got 0"),
        (["--", "--cfg_file", "configs/nope.yaml"],
         f"config file not found: configs/nope.yaml (the job runs main.py in {submit_module.REPO}: relative paths"),
        (["--", "--overwrite", "--model_id", "x"], "--overwrite (delete the run folder's previous run, then train) "
         "contradicts --resume"),  # (the --resume auto it adds)
        # resources no job can have
        (["--nodes", "0", "--", "--epochs", "3"], "--nodes must be >= 1, got 0"),
        (["--gpus_per_node", "0", "--", "--epochs", "3"], "--gpus_per_node must be >= 1, got 0"),
        (["--cpus_per_task", "0", "--", "--epochs", "3"], "--cpus_per_task must be >= 1, got 0"),
        (["--local", "--nodes", "2", "--", "--epochs", "3"],
         "--local runs one task on this machine: --nodes 2 needs SLURM (leave out --local)"),
        (["--time", "2", "--signal_delay_s", "120", "--", "--epochs", "3"],
         "--signal_delay_s 120 is not within the job's --time of 2 minute(s) (120 s)"),
    ]:  # fmt: skip
        assert submit_module.cli(["--job_dir", str(job_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tools/submit.py: error: ") and message in err[0], err
    assert not job_dir.exists()
    with pytest.raises(SystemExit) as shown:  # main.py's help, as asked, and nothing submitted
        submit_module.cli(["--job_dir", str(job_dir), "--", "--help"])
    assert shown.value.code == 0 and capsys.readouterr().out.startswith("usage: main.py ")
    assert not job_dir.exists()
    (tmp_path / "a_file").write_text("")
    in_the_way = tmp_path / "a_file" / "jobs"
    assert submit_module.cli(["--local", "--job_dir", str(in_the_way), "--", "--epochs", "3"]) == 2
    assert capsys.readouterr().err == (f"tools/submit.py: error: cannot create the job folder --job_dir {in_the_way}: "
                                       "Not a directory\n")  # fmt: skip


@pytest.mark.parametrize("delay,grace", [(120, 90), (30, 10)])
def test_submit_leaves_the_job_time_to_checkpoint(monkeypatch, capsys, tmp_path, delay, grace):
    """The run is told to stop 30 s after the signal, and never less than 10 s before it must (``grace_s``). The
    config's relative path is checked from the repository, where the job runs main.py, wherever submit runs."""
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_submit(executor, argv_main, grace_s):
        seen.update(executor=executor, argv=argv_main, grace_s=grace_s)
        return SimpleNamespace(job_id="7", paths=SimpleNamespace(stdout="o.log", stderr="e.log"))

    monkeypatch.setattr(submit_module, "build_executor", lambda args: "executor")
    monkeypatch.setattr(submit_module, "submit", fake_submit)
    config = "configs/swin_tiny_refcoco.yaml"  # (not in tmp_path)
    assert submit_module.cli(["--signal_delay_s", str(delay), "--", "--cfg_file", config]) == 0
    assert seen["grace_s"] == grace and seen["executor"] == "executor" and "--resume" in seen["argv"]
    assert capsys.readouterr().out == "submitted job 7: logs o.log and e.log\n"


def test_submit_help_explains_its_flags():
    text = " ".join(submit_module.get_parser().format_help().split())
    assert "one task (process) per GPU (default: 4)" in text and "job logs (%j: job id)" in text
    jobs = Path(submit_module.__file__).parents[1] / "checkpoint" / "submitit"  # as docs/cluster.md says
    assert f"(default: {jobs})" in text


def test_submit_slurm_resources(tmp_path, monkeypatch):
    """The sbatch header submitit writes for tools/submit.py's flags: one task per GPU, submitit's signal 120 s
    before the limit (``srun`` faked: submitit refuses to build a SLURM executor without it)."""
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    flags = ["--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu", "--account", "proj", "--time", "600"]
    args = submit_module.get_parser().parse_args([*flags, "--job_dir", str(tmp_path / "jobs")])
    text = submit_module.build_executor(args)._executor._make_submission_file_text("python -m x", "uid")
    header = {line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")}
    expected = {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
                "--account=proj", "--time=600", "--signal=USR2@120"}  # fmt: skip
    assert expected <= header, header
    assert not any(h.startswith("--mem") for h in header)  # the partition's default memory
    args = submit_module.get_parser().parse_args([*flags, "--mem_gb", "64", "--job_dir", str(tmp_path / "jobs")])
    text = submit_module.build_executor(args)._executor._make_submission_file_text("python -m x", "uid")
    assert "--mem=64GB" in {line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")}


def test_local_executor_takes_the_time_limits_and_requeues(tmp_path):
    """``--local``: submitit's local executor, one task, with the job's time limit, signal delay and requeue count."""
    flags = ["--local", "--time", "30", "--signal_delay_s", "90", "--max_num_timeout", "3"]
    args = submit_module.get_parser().parse_args([*flags, "--job_dir", str(tmp_path / "jobs")])
    executor = submit_module.build_executor(args)
    assert isinstance(executor, submitit.LocalExecutor) and executor.max_num_timeout == 3
    assert executor.parameters == {"timeout_min": 30, "signal_delay_s": 90, "tasks_per_node": 1}


# a stand-in for main.py: says when it is ready, counts the SIGUSR1s it gets, and ends on the first unless told to
# hold on (then it waits to be killed, as a training stuck past its grace period)
CHILD = """
import signal, sys, time
got = []
def on_stop(signum, frame):
    got.append(signum)
    print("stop", flush=True)
    if sys.argv[1] == "obeys":
        time.sleep(0.3)  # a second signal meanwhile would be counted
        sys.exit(0)
signal.signal(signal.SIGUSR1, on_stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def _started(trainer: submit_module.Trainer, mode: str) -> list[str]:
    """``trainer`` given the stand-in as its running main.py (what ``__call__`` starts), reaped as it reaps it."""
    trainer._proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    assert trainer._proc.stdout.readline() == "ready\n"
    threading.Thread(target=trainer._reap, daemon=True).start()
    return []


def test_signals_reach_main_py_once_and_checkpoint_waits_for_it(caplog):
    """Every signal the task gets calls submitit's handler, but main.py is asked to stop once (a second SIGUSR1
    would be another stop request); ``checkpoint`` waits for it to exit and requeues the same command; a main.py that
    does not stop within ``grace_s`` is killed; and nothing is sent to a main.py that has exited."""
    caplog.set_level("INFO", logger="tools.submit")
    trainer = submit_module.Trainer(["--epochs", "3", "--resume", "auto"], grace_s=30)
    handled = _started(trainer, "obeys")
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        trainer._on_signal(lambda s, f: handled.append(s), signum, None)
    requeued = trainer.checkpoint()
    assert handled == [signal.SIGUSR2, signal.SIGTERM] and trainer._returncode == 0  # exited by itself
    assert trainer._proc.stdout.read() == "stop\n"  # one request
    assert f"forwarded to main.py (pid {trainer._proc.pid}) as SIGUSR1" in caplog.text and "killed" not in caplog.text
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    again = requeued.function
    assert isinstance(again, submit_module.Trainer) and again is not trainer and again._proc is None
    assert (again.argv, again.grace_s, again.script) == (trainer.argv, 30, trainer.script)
    trainer._stop_sent = False  # even unsent: an exited main.py is not signalled (its pid may be another's now)
    trainer._stop_child()
    assert caplog.text.count("forwarded to main.py") == 1

    stuck = submit_module.Trainer([], grace_s=0.5)
    _started(stuck, "holds")
    t0 = time.monotonic()
    stuck.checkpoint()
    assert stuck._proc.wait(timeout=10) == -signal.SIGKILL and 0.5 <= time.monotonic() - t0 < 5
    assert stuck._proc.stdout.read() == "stop\n"  # asked first, by checkpoint itself
    assert "main.py did not stop within 0 s: killed" in caplog.text


def test_the_job_log_names_time_level_and_file_once(monkeypatch, capsys):
    """`_log_to_stderr` gives the job's stderr one line per message, dated and marked as this module's, however
    often a requeued job calls it, and none twice through the root logger."""
    fresh = logging.getLogger("tests.submit.fresh")
    monkeypatch.setattr(fresh, "handlers", [])
    monkeypatch.setattr(submit_module, "log", fresh)
    submit_module._log_to_stderr()
    submit_module._log_to_stderr()
    fresh.info("task %d started", 3)
    fresh.debug("not shown")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tools/submit.py: task 3 started\n", err), err
    assert not fresh.propagate


# a stand-in for main.py that reports how it was started, then exits with the status it is given
REPORTS = """
import json, os, signal, sys
report = {"argv": sys.argv[1:], "cwd": os.getcwd(), "usr2_ignored": signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN}
open(sys.argv[1], "w").write(json.dumps(report))
sys.exit(int(sys.argv[2]))
"""


def test_a_task_runs_main_py_in_the_repository_and_fails_with_it(tmp_path, monkeypatch, caplog):
    """``Trainer()`` on a task: main.py runs with the job's arguments from the repository, ignoring submitit's
    signal; the task ends when it ends, and fails with its status when it fails."""
    for key, value in {"_TEST_CLUSTER_": "local", "SUBMITIT_LOCAL_JOB_ID": "7", "SUBMITIT_LOCAL_NTASKS": "1",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(submit_module, "_log_to_stderr", lambda: None)  # caplog reads the lines instead
    monkeypatch.chdir(tmp_path)  # main.py runs from the repository wherever the job was submitted
    caplog.set_level("INFO", logger="tools.submit")
    script, report = tmp_path / "main.py", tmp_path / "report.json"
    script.write_text(REPORTS)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        trainer = submit_module.Trainer([str(report), "0"], grace_s=1, script=str(script))
        assert trainer() is None and trainer._returncode == 0
        assert json.loads(report.read_text()) == {"argv": [str(report), "0"], "cwd": str(submit_module.REPO),
                                                  "usr2_ignored": True}  # fmt: skip
        started = f"task 0 of 1 (pid {os.getpid()}): main.py started, pid {trainer._proc.pid}: "
        assert caplog.messages == [started + f"{sys.executable} -u {script} {report} 0"]
        with pytest.raises(RuntimeError, match=r"^main.py exited with status 3: see its lines above in this log$"):
            submit_module.Trainer([str(report), "3"], grace_s=1, script=str(script))()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

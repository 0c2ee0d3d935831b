"""Submit main.py's training to SLURM with submitit, requeued on preemption and time-out (DETR's run_with_submitit).

    python tools/submit.py --nodes 2 --gpus_per_node 4 --partition gpu --time 2880 -- \\
        --cfg_file configs/swin_base_refcoco.yaml --refer_data_root /shared/refer/data --output /shared/runs ...

Everything after ``--`` is main.py's command line; ``--resume auto`` is added. main.py's flags and config are checked
here first, as main.py checks them (``check_main_argv``), not when the job starts after its wait in the queue. Each
SLURM task (one per GPU) runs ``python main.py ... --resume auto`` as a child process, which joins the process group
from SLURM's variables (``utils.launcher``). The repository, the data and ``--output`` must be on a filesystem every
node sees.

Preemption and time-out. SLURM sends submitit's signal (SIGUSR2) to every task ``--signal_delay_s`` before the time
limit; on preemption it sends SIGTERM (which submitit only logs), followed by SIGUSR2 where the cluster is set up
for submitit, else by SLURM's own requeue (PreemptMode=REQUEUE). Submitit's handler runs in the task's main
thread, calls ``Trainer.checkpoint`` on rank 0, then requeues the job (``scontrol requeue``) and exits at once.
Training in that same thread could not reach its next iteration boundary before the exit, so
``engine.request_checkpoint()`` cannot serve here: the training runs in a child process instead, every task
forwards either signal to it as SIGUSR1 (main.py saves ``last.pth`` at the next iteration boundary and stops), and
``checkpoint`` waits for rank 0's child to exit (at most ``--signal_delay_s`` minus 30 s) before it hands submitit
the very same command to requeue. A child that does not stop in time is killed; the requeued job resumes from the
last periodic checkpoint (TRAIN.CHECKPOINT_EVERY).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import cloudpickle
import submitit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python tools/submit.py): main.py's checks are imported from here
    sys.path.insert(0, str(REPO))

from args import check_flags, config_from_args, parse_args  # noqa: E402
from engine.config_check import validate_config  # noqa: E402
from tools.cli import require_at_least  # noqa: E402

STOP_SIGNAL = signal.SIGUSR1  # what main.py handles as "save at the next iteration boundary and stop"
log = logging.getLogger("tools.submit")


def _log_to_stderr() -> None:
    """This module's lines in the job's stderr log, next to submitit's (which has its own handler)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s tools/submit.py: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def submitit_signal() -> signal.Signals:
    """The signal submitit asks SLURM for (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


class Trainer:
    """A submitit job: ``python main.py <argv>`` in a child process, stopped cleanly on preemption and requeued.

    Args:
        argv: main.py's arguments, ``--resume auto`` included (the requeued job runs exactly these).
        grace_s: how long ``checkpoint`` waits for main.py to save and exit before it kills it.
        script: the training script (main.py of this repository), run with the repository as working folder.
    """

    def __init__(self, argv: list[str], grace_s: float, script: str = str(REPO / "main.py")) -> None:
        self.argv, self.grace_s, self.script = list(argv), grace_s, script
        self._proc: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._stop_sent = False

    def __getstate__(self) -> dict[str, Any]:  # a requeued job starts from the command, not from a live process
        return {"argv": self.argv, "grace_s": self.grace_s, "script": self.script}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["argv"], state["grace_s"], state["script"])

    def __call__(self) -> None:
        _log_to_stderr()
        job = submitit.JobEnvironment()
        usr_sig = submitit_signal()
        # SLURM signals every process of the task: main.py ignores submitit's signal, whose default action would end
        # it before it saved, and stops on the SIGUSR1 this task sends it
        ignore = partial(signal.signal, usr_sig, signal.SIG_IGN) if usr_sig != STOP_SIGNAL else None
        cmd = [sys.executable, "-u", self.script, *self.argv]
        self._proc = subprocess.Popen(cmd, cwd=REPO, preexec_fn=ignore)
        log.info("task %d of %d (pid %d): main.py started, pid %d: %s", job.global_rank, job.num_tasks, os.getpid(),
                 self._proc.pid, shlex.join(cmd))  # fmt: skip
        # submitit's signal, and SLURM's SIGTERM on preemption (submitit only logs it): main.py stops at a boundary
        for sig in (usr_sig, signal.SIGTERM):
            signal.signal(sig, partial(self._on_signal, signal.getsignal(sig)))
        # a thread reaps the child: waiting in this thread would hold Popen's lock while a handler needs it
        threading.Thread(target=self._reap, daemon=True).start()
        while self._returncode is None:
            time.sleep(0.2)  # submitit's handler runs here, between two sleeps
        if not self._stop_sent:
            if self._returncode != 0:
                raise RuntimeError(f"main.py exited with status {self._returncode}: see its lines above in this log")
            return
        log.info("main.py stopped for a preemption (status %d)", self._returncode)
        if job.global_rank > 0:
            return  # rank 0 requeues the whole job
        deadline = time.monotonic() + self.grace_s  # SIGTERM first: give submitit's signal the time to follow
        while time.monotonic() < deadline:
            time.sleep(0.2)
        raise RuntimeError(
            f"main.py stopped on SIGTERM and no {usr_sig.name} followed within {self.grace_s:.0f} s to requeue the "
            "job: the cluster's preemption requeue, or the same tools/submit.py command, continues it (--resume auto)"
        )

    def _reap(self) -> None:
        assert self._proc is not None
        self._returncode = self._proc.wait()

    def _on_signal(self, submitit_handler: Any, signum: int, frame: Any) -> None:
        """Every task: tell main.py to stop, then let submitit's handler do its part (rank 0: ``checkpoint``,
        requeue, exit)."""
        self._stop_child()
        if callable(submitit_handler):
            submitit_handler(signum, frame)

    def _stop_child(self) -> None:
        if self._proc is not None and self._returncode is None and not self._stop_sent:
            self._stop_sent = True
            self._proc.send_signal(STOP_SIGNAL)
            log.info("preemption signal forwarded to main.py (pid %d) as %s", self._proc.pid, STOP_SIGNAL.name)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 on preemption or time-out: wait until main.py has saved and exited, then
        requeue the same command (its ``--resume auto`` continues from the checkpoint just written)."""
        self._stop_child()
        deadline = time.monotonic() + self.grace_s
        while self._proc is not None and self._returncode is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._proc is not None and self._returncode is None:
            log.warning("main.py did not stop within %.0f s: killed; the requeued job resumes from the last "
                        "checkpoint it wrote", self.grace_s)  # fmt: skip
            self._proc.kill()
        log.info("requeueing: main.py %s", shlex.join(self.argv))
        return submitit.helpers.DelayedSubmission(type(self)(self.argv, self.grace_s, self.script))


def main_argv(argv: list[str]) -> list[str]:
    """main.py's arguments with ``--resume auto`` added; one given already is refused (it would be ambiguous)."""
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        raise ValueError("tools/submit.py adds --resume auto itself: remove --resume from main.py's arguments")
    if "--eval" in argv:
        raise ValueError("tools/submit.py submits training; run --eval with srun or torchrun (docs/cluster.md)")
    return [*argv, "--resume", "auto"]


def check_main_argv(argv: list[str]) -> None:
    """main.py's own checks of its flags and config (``args``, ``engine.config_check``), here rather than when the
    job starts after its wait in the queue; run in the folder where the job runs main.py (the repository), so that
    relative paths mean what they will mean there. Its data and checkpoints are not looked at: only the nodes need
    to see them. ValueError (one line) for what main.py would refuse, FileNotFoundError for a missing config file."""
    previous, usage = os.getcwd(), io.StringIO()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stderr(usage):  # argparse's usage and error: kept to its last line
            args = parse_args(argv)
        cfg = config_from_args(args)
        validate_config(cfg)
        check_flags(args, cfg)
    except SystemExit as e:
        if not e.code:  # `-- --help`: main.py's help was shown
            raise
        error = usage.getvalue().strip().splitlines()[-1].removeprefix("main.py: error: ")
        raise ValueError(f"main.py's arguments: {error}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the job runs main.py in {REPO}: relative paths start there)") from None
    finally:
        os.chdir(previous)


def check_flags_of_the_job(args: argparse.Namespace) -> None:
    """ValueError (one line) for resources no job can have, or a signal that would come before the job starts."""
    require_at_least(args, {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 1, "mem_gb": 0, "time": 1,
                            "signal_delay_s": 0, "max_num_timeout": 0})  # fmt: skip
    if args.local and args.nodes > 1:
        raise ValueError(f"--local runs one task on this machine: --nodes {args.nodes} needs SLURM (leave out --local)")
    if args.signal_delay_s >= args.time * 60:
        raise ValueError(f"--signal_delay_s {args.signal_delay_s} is not within the job's --time of {args.time} "
                         f"minute(s) ({args.time * 60} s)")  # fmt: skip


def submit(executor: submitit.Executor, argv: list[str], grace_s: float) -> submitit.Job:
    """Submit ``Trainer(argv)`` to ``executor`` (``argv``: from ``main_argv``); returns the job."""
    # the job unpickles Trainer without importing this repository: its code travels by value
    if Trainer.__module__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[Trainer.__module__])
    return executor.submit(Trainer(argv, grace_s))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/submit.py",
        description="Submit main.py's training to SLURM (submitit), requeued with --resume auto on preemption and "
        "time-out. Usage: tools/submit.py [options] -- <main.py arguments>",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes per job")
    p.add_argument("--gpus_per_node", type=int, default=4, help="one task (process) per GPU")
    p.add_argument("--cpus_per_task", type=int, default=8, help="data loader workers + 1 is a good start")
    p.add_argument("--mem_gb", type=int, default=0, help="memory per node (0: the partition's default)")
    p.add_argument("--time", type=int, default=2880, help="time limit of each job, minutes")
    p.add_argument("--partition", type=str, help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", type=str, help="SLURM account to charge")
    p.add_argument("--qos", type=str, help="SLURM quality of service")
    p.add_argument("--constraint", type=str, help='node features, e.g. "a100"')
    p.add_argument("--job_name", type=str, default="lavt", help="the job's name in the queue")
    p.add_argument(
        "--job_dir",
        type=str,
        default=str(REPO / "checkpoint" / "submitit"),
        help="submitit's pickles and the job logs (%%j: job id); on a filesystem every node sees",
    )
    p.add_argument("--signal_delay_s", type=int, default=120, help="the signal comes this long before the limit")
    p.add_argument("--max_num_timeout", type=int, default=20, help="requeues after time-outs (preemptions: no limit)")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor (one task)")
    return p


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    """Submitit's SLURM executor with the job's resources (``--local``: its local executor, one task)."""
    if args.local:
        executor = submitit.LocalExecutor(folder=args.job_dir, max_num_timeout=args.max_num_timeout)
        executor.update_parameters(timeout_min=args.time, signal_delay_s=args.signal_delay_s, tasks_per_node=1)
        return executor
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster="slurm", slurm_max_num_timeout=args.max_num_timeout)
    extra = {k: v for k, v in {"account": args.account, "qos": args.qos}.items() if v}
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}),
        slurm_partition=args.partition,
        slurm_constraint=args.constraint,
        slurm_signal_delay_s=args.signal_delay_s,
        slurm_additional_parameters=extra,
    )
    return executor


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = get_parser().parse_args(ours)
    try:
        if not theirs:
            raise ValueError("no main.py arguments: tools/submit.py [options] -- --cfg_file ... --output ...")
        check_flags_of_the_job(args)
        argv_main = main_argv(theirs)  # refused before anything is created
        check_main_argv(argv_main)
        try:
            executor = build_executor(args)
        except OSError as e:
            raise ValueError(f"cannot create the job folder --job_dir {args.job_dir}: {e.strerror or e}") from e
        job = submit(executor, argv_main, grace_s=max(args.signal_delay_s - 30, 10))
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # bad flags, or no SLURM here ("Could not detect srun")
        print(f"tools/submit.py: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: logs {job.paths.stdout} and {job.paths.stderr}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

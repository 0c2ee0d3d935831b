"""Two Gloo processes killed for real: SIGKILL of both mid-epoch (wherever they are, a checkpoint write included),
then SIGTERM to one rank only; each time the same command continues, and the run ends bit-identical to an
uninterrupted one, with the same metrics lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import main as main_module
from models import CheckpointError, read_checkpoint

from .helpers_train import free_port, tiny_env, tiny_opts

ROOT = Path(__file__).resolve().parents[1]
OVER = {"TRAIN__BATCH_SIZE": 4, "TRAIN__EPOCHS": 2, "TRAIN__CHECKPOINT_EVERY": 2, "DATA__AUGMENT": True,
        "EVAL__AFTER_TRAIN": False}  # fmt: skip


# What torchrun does for 2 processes on one machine: RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT set, then
# main.py's cli with the same arguments in each rank. Importing main (torch, transformers) takes most of a launch on
# 2 shared cores, so one interpreter imports it once and forks every launch from there: a group leader (its own
# session, so that the whole launch can be signalled) and under it the 2 ranks, which write their pids (to signal
# one alone) and, when both ended, their exit statuses.
ZYGOTE = """
import json, logging, os, signal, sys
import main
from transformers import AutoTokenizer, BertConfig, BertModel  # what the ranks import lazily
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launch leaders are reaped without waiting
def publish(path, text):  # the test polls these files: a rename shows them whole, never empty or half-written
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)
sys.stdout.flush()
for line in sys.stdin:
    folder, argv, env = json.loads(line)
    leader = os.fork()
    if leader == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.environ.update(env)
        pids = []
        for rank in (0, 1):
            pid = os.fork()
            if pid == 0:
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
                out = os.open(os.path.join(folder, "output.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(out, 1), os.dup2(out, 2)
                status = main.cli(argv)
                logging.shutdown(), sys.stdout.flush(), sys.stderr.flush()
                os._exit(status)
            publish(os.path.join(folder, f"rank{rank}.pid"), str(pid))
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        publish(os.path.join(folder, "status.txt"), " ".join(map(str, codes)))
        os._exit(0)
    print(leader, flush=True)
"""


class Zygote:
    """The interpreter that forks launches (``ZYGOTE``)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def launch(self, folder: Path, argv: list[str]) -> int:
        """Start ``main.py argv`` as 2 ranks writing into ``folder``; returns the launch's process group."""
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        self.proc.stdin.write(json.dumps([str(folder), argv, env]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()  # holds no state worth an orderly exit (which takes seconds with torch loaded)
        self.proc.wait(timeout=60)


class Ranks:
    """One launch of ``main.py --resume auto`` as 2 ranks into ``out``; their output goes to ``folder/output.txt``."""

    def __init__(self, zygote: Zygote, env, out: Path, folder: Path) -> None:
        data_root, text = env
        self.folder = folder / f"launch_{time.monotonic_ns()}"
        self.folder.mkdir(parents=True)
        argv = ["--cfg_file", "", "--device", "cpu", "--resume", "auto", "--opts",
                *tiny_opts(data_root, text, out, **OVER)]  # fmt: skip
        self.group = zygote.launch(self.folder, argv)

    def pid(self, rank: int) -> int:
        path = self.folder / f"rank{rank}.pid"
        deadline = time.time() + 120
        while not path.is_file() or not path.read_text():
            assert time.time() < deadline, "the ranks did not start"
            time.sleep(0.02)
        return int(path.read_text())

    def running(self) -> bool:
        return not (self.folder / "status.txt").exists() and _alive(self.group)

    def signal_all(self, sig: int) -> None:
        os.killpg(self.group, sig)

    def wait(self, timeout: float = 300) -> list[int] | None:
        """The ranks' exit statuses, or None when the launch was killed before it could write them."""
        deadline = time.time() + timeout
        while self.running() or any(_alive(self.pid(r)) for r in (0, 1)):
            assert time.time() < deadline, "the launch did not end"
            time.sleep(0.05)
        status = self.folder / "status.txt"
        return [int(x) for x in status.read_text().split()] if status.exists() else None

    def output(self) -> str:
        path = self.folder / "output.txt"
        return path.read_text() if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_when(ranks: Ranks, run_dir: Path, ready: Callable[[dict], bool]) -> dict:
    """Freeze the ranks (SIGSTOP) as soon as last.pth satisfies ``ready``; return that checkpoint. Fails if the run
    ended first: the interruption must really happen mid-run."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert ranks.running(), "the run ended before it could be interrupted"
        try:
            ckpt = read_checkpoint(run_dir / "last.pth")
        except CheckpointError:  # not written yet
            ckpt = None
        if ckpt is not None and ready(ckpt):
            ranks.signal_all(signal.SIGSTOP)
            assert ranks.running(), "the run ended before it could be interrupted"
            return ckpt
        time.sleep(0.02)
    raise AssertionError("no checkpoint as awaited")


def global_step(ckpt: dict) -> int:
    return (ckpt["epoch"] + 1) * ckpt["iters_per_epoch"] + ckpt["iteration"]


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_time_s"} for x in lines]


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.mark.slow
def test_kill9_and_sigterm_then_same_command_equals_uninterrupted(zygote, tmp_path_factory, tmp_path):
    env = tiny_env(tmp_path_factory)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = Ranks(zygote, env, straight, tmp_path)
    assert reference.wait() == [0, 0], reference.output()[-3000:]
    run_dir = crashed / "tiny"

    # 1. kill -9 of both processes as soon as a mid-epoch checkpoint exists
    ranks = Ranks(zygote, env, crashed, tmp_path)
    first = stop_when(ranks, run_dir, lambda c: c["iteration"] > 0)
    ranks.signal_all(signal.SIGKILL)
    assert ranks.wait() is None  # killed: no exit status written
    # the checkpoint the resume starts from: a later one may have been written between the read and the SIGSTOP
    first = read_checkpoint(run_dir / "last.pth")
    assert first["epoch"] + 1 < OVER["TRAIN__EPOCHS"]

    # 2. the same command resumes; SIGTERM to rank 1 only, once it is past the checkpoint it resumed from
    ranks = Ranks(zygote, env, crashed, tmp_path)
    stop_when(ranks, run_dir, lambda c: global_step(c) > global_step(first))
    os.kill(ranks.pid(1), signal.SIGTERM)
    ranks.signal_all(signal.SIGCONT)
    assert ranks.wait() == [main_module.EXIT_PREEMPTED] * 2, ranks.output()[-3000:]  # both stop, at one boundary
    preempted = [x for x in ranks.output().splitlines() if x.startswith("main.py: preempted: ")]
    assert len(preempted) == 1 and "another process was asked to stop" in preempted[0]  # rank 0's line
    stopped = read_checkpoint(run_dir / "last.pth")
    assert global_step(first) < global_step(stopped) < OVER["TRAIN__EPOCHS"] * stopped["iters_per_epoch"]
    assert len(stopped["rng"]) == 2

    # 3. the same command finishes the run
    ranks = Ranks(zygote, env, crashed, tmp_path)
    assert ranks.wait() == [0, 0], ranks.output()[-3000:]
    a, b = read_checkpoint(straight / "tiny" / "last.pth"), read_checkpoint(run_dir / "last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["best"] == b["best"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    assert records(straight / "tiny") == records(run_dir) and len(records(run_dir)) == 2


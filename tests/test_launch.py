"""Launchers: SLURM's host lists and variables (read without a cluster), a process group formed from SLURM's
variables alone, and the submitit launcher's preempt/requeue cycle on submitit's local executor."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch

import main as main_module
from models import read_checkpoint
from tools import submit as submit_module
from utils.distributed import LaunchError, cuda_index, init_distributed_mode
from utils.launcher import PORT_BASE, Launch, detect_launch, expand_nodelist, port_from_job_id

from .helpers_train import tiny_env, tiny_opts

ROOT = Path(__file__).resolve().parents[1]

# expectations written by hand from SLURM's hostlist rules (``scontrol show hostnames``)
NODELISTS = [
    ("node01", ["node01"]),
    ("n1,n2", ["n1", "n2"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a[1,3]", ["gpu-a1", "gpu-a3"]),
    ("gpu-a[1,3],cpu7", ["gpu-a1", "gpu-a3", "cpu7"]),
    ("c[8-11]", ["c8", "c9", "c10", "c11"]),  # no padding: widths grow
    ("c[08-11]", ["c08", "c09", "c10", "c11"]),  # padding of the lower bound kept
    ("c[098-101]", ["c098", "c099", "c100", "c101"]),
    ("x[5]", ["x5"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),  # text after the brackets
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # the first bracket varies slowest
    ("a[1-2],b[3],c", ["a1", "a2", "b3", "c"]),
    ("node1.cluster.org,node2.cluster.org", ["node1.cluster.org", "node2.cluster.org"]),
    ("ip-10-0-0-[5-6]", ["ip-10-0-0-5", "ip-10-0-0-6"]),
    ("jrc[0001-0002,0010]", ["jrc0001", "jrc0002", "jrc0010"]),
]


@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS, ids=[n for n, _ in NODELISTS])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("", "empty host list"),
        ("a,,b", "empty host name"),
        ("a[1-3", r"'\[' without '\]'"),
        ("a]1", "unbalanced or nested brackets at character 1"),
        ("a[[1]]", "unbalanced or nested brackets"),
        ("a[]", "'' is not a number or a range"),
        ("a[x-y]", "'x-y' is not a number or a range"),
        ("a[1-2-3]", "'1-2-3' is not a number or a range"),
        ("a[5-3]", "range '5-3' runs backwards"),
    ],
)
def test_expand_nodelist_refuses(nodelist, message):
    named = "" if not nodelist else re.escape(f"host list {nodelist!r}: ") + ".*"  # the whole list, then the fault
    with pytest.raises(ValueError, match=f"^{named}{message}"):
        expand_nodelist(nodelist)


def test_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cuda_index(3) == 0  # one GPU shown to each task: it is that one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [cuda_index(r) for r in range(4)] == [0, 1, 2, 3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchError) as e:
        cuda_index(2)
    assert str(e.value) == (
        "local rank 2 but 2 GPU(s) visible on this node: start one process per GPU "
        "(torchrun --nproc_per_node / srun --ntasks-per-node = GPUs per node)"
    )


def test_port_from_job_id():
    assert PORT_BASE == 12000
    assert port_from_job_id("4242") == 16242
    assert port_from_job_id("123456") == 15456  # 123456 % 20000 = 3456
    assert port_from_job_id("77_3") == 12773  # an array id "77_3": its digits 773
    with pytest.raises(ValueError, match="no digits"):
        port_from_job_id("batch")


SLURM_2 = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Launch("none", 0, 1, 0)),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, Launch("slurm", 0, 1, 0)),
        ({**SLURM_2, "SLURM_JOB_NODELIST": "gpu[03-04]"}, Launch("slurm", 5, 8, 1, "gpu03", 16242)),
        ({**SLURM_2, "SLURM_NODELIST": "old[7,9]"}, Launch("slurm", 5, 8, 1, "old7", 16242)),  # older SLURM
        (
            {**SLURM_2, "SLURM_JOB_NODELIST": "a[1-2]", "MASTER_ADDR": "head", "MASTER_PORT": "2999"},
            Launch("slurm", 5, 8, 1, "head", 2999),  # explicit rendezvous wins
        ),
        (
            {**SLURM_2, "SLURM_JOB_NODELIST": "a[1-2]", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"},
            Launch("torchrun", 3, 4, 3),  # torchrun inside an allocation: its variables win
        ),
        ({"RANK": "1", "WORLD_SIZE": "2"}, Launch("torchrun", 1, 2, 1)),
    ],
    ids=["none", "slurm-one-task", "slurm", "slurm-old-nodelist", "master-env", "torchrun-wins", "torchrun"],
)
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


def test_launch_describes_itself_in_one_line():
    assert Launch("slurm", 3, 8, 1, "gpu01", 13456).describe() == (
        "slurm (srun): rank 3 of 8, local rank 1, rendezvous gpu01:13456"
    )
    assert Launch("torchrun", 1, 2, 1).describe() == "torchrun: rank 1 of 2, local rank 1"  # env:// rendezvous
    assert Launch("none", 0, 1, 0).describe() == "no launcher (RANK/WORLD_SIZE and SLURM_NTASKS unset): one process"


def test_one_process_logs_its_launcher(monkeypatch, caplog):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("INFO", logger="utils.distributed"):
        info = init_distributed_mode("cpu")
    assert (info.world_size, info.distributed) == (1, False)
    assert "launcher: no launcher (RANK/WORLD_SIZE and SLURM_NTASKS unset): one process" in caplog.messages


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a1"}, "SLURM_NTASKS=4 but SLURM_PROCID and SLURM_LOCALID unset"),
        ({**SLURM_2, "SLURM_PROCID": "8", "SLURM_JOB_NODELIST": "a1"}, r"SLURM_PROCID=8 is not a rank of SLURM_NTASKS"),
        ({**SLURM_2, "SLURM_LOCALID": "6", "SLURM_JOB_NODELIST": "a1"}, "SLURM_LOCALID=6 does not fit SLURM_PROCID=5"),
        (SLURM_2, "neither SLURM_JOB_NODELIST nor SLURM_NODELIST nor MASTER_ADDR"),
        ({**SLURM_2, "SLURM_JOB_NODELIST": "a[1-"}, r"SLURM_JOB_NODELIST: host list 'a\[1-'"),
        ({**SLURM_2, "SLURM_JOB_NODELIST": "a1", "SLURM_JOB_ID": ""}, "neither MASTER_PORT nor SLURM_JOB_ID"),
        ({**SLURM_2, "SLURM_PROCID": "five", "SLURM_JOB_NODELIST": "a1"}, "SLURM_PROCID must be an integer"),
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2"),
    ],
)
def test_detect_launch_refuses_inconsistent_variables(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch(env)


def _free_port_in_slurm_range() -> int:
    """A port ``port_from_job_id`` can produce that nothing listens on now."""
    for port in range(PORT_BASE + os.getpid() % 5000, PORT_BASE + 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


GROUP_SCRIPT = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from utils.distributed import all_reduce_sum, cleanup, init_distributed_mode
info = init_distributed_mode("cpu")
total = all_reduce_sum(torch.tensor([info.rank + 1.0]))
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "sum": total.item(),
                  "launcher": info.launcher}))
cleanup()
"""


def test_srun_variables_alone_form_one_group():
    """Two processes that see only what srun sets (no RANK/WORLD_SIZE, no torchrun) meet in one group of 2:
    the rendezvous host is the nodelist's first host, the port derived from SLURM_JOB_ID."""
    port = _free_port_in_slurm_range()
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.[1-4]")
    base["SLURM_JOB_ID"] = str(port - PORT_BASE)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GROUP_SCRIPT],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["local"], res["sum"]) == (r, 2, r, 3.0)  # 1 + 2: both ranks counted
        assert res["launcher"] == f"slurm (srun): rank {r} of 2, local rank {r}, rendezvous 127.0.0.1:{port}"
        assert f"launcher: slurm (srun): rank {r} of 2" in outs[r][1]  # logged


def test_group_that_cannot_form_is_one_clear_error(monkeypatch):
    """A taken rendezvous port ends as one LaunchError (a ValueError: main.py prints one line) naming the launch."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        for name, value in {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("SLURM_JOB_NODELIST", "127.0.0.1")
        with pytest.raises(LaunchError, match=rf"rank 0 of 2, .*127.0.0.1:{port}: the group of 2 processes did not"):
            init_distributed_mode("cpu")
    assert not torch.distributed.is_initialized()


def _wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


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
        _wait_for(lambda: (run_dir / "last.pth").is_file(), "the first periodic checkpoint")  # after iteration 2
        task_pid, main_pid = map(int, re.search(r"\(pid (\d+)\): main.py started, pid (\d+)",
                                                Path(job.paths.stderr).read_text()).groups())  # fmt: skip
        os.kill(main_pid, signal.SIGSTOP)  # held mid-epoch until the stop request is on its way
        for pid in (task_pid, main_pid):  # SLURM signals every process of the task; main.py ignores submitit's
            os.kill(pid, submit_module.submitit_signal())
        _wait_for(lambda: "forwarded to main.py" in Path(job.paths.stderr).read_text(), "the forwarded signal")
        os.kill(main_pid, signal.SIGCONT)
        _wait_for(job.done, "the requeued job to finish", timeout=300)
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
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)


FAKE_SLURM = {  # stand-ins for SLURM's commands: they record how the script calls them
    "srun": """#!/bin/bash
echo "$@" > "$FAKE/srun_args"; echo $$ > "$FAKE/srun.pid"
trap 'echo stopped > "$FAKE/srun_stopped"; exit 75' USR1
for _ in $(seq "${FAKE_SRUN_STEPS:-600}"); do sleep 0.05; done
""",
    "scancel": '#!/bin/bash\necho "$@" > "$FAKE/scancel_args"; kill -USR1 "$(cat "$FAKE/srun.pid")"\n',
    "scontrol": '#!/bin/bash\necho "$@ $(cat "$FAKE/srun_stopped" 2>/dev/null)" >> "$FAKE/scontrol_args"\n',
}


@pytest.mark.parametrize("time_limit", [True, False], ids=["time_limit_near", "finishes"])
def test_sbatch_script_stops_tasks_then_requeues(tmp_path, time_limit):
    """tools/slurm/train.sbatch with SLURM's commands faked: its USR1 (SLURM's pre-time-limit signal) reaches the
    tasks, and the job is requeued only after they stopped; a run that ends by itself is not requeued."""
    for name, text in FAKE_SLURM.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path), "SLURM_JOB_ID": "77"}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="n[1-2]", FAKE_SRUN_STEPS="600" if time_limit else "2")
    script = subprocess.Popen(
        ["bash", str(ROOT / "tools" / "slurm" / "train.sbatch")],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if time_limit:
        _wait_for(lambda: (tmp_path / "srun.pid").is_file(), "srun to start", timeout=30)
        script.send_signal(signal.SIGUSR1)
    out, _ = script.communicate(timeout=30)
    srun_args = (tmp_path / "srun_args").read_text().split()
    assert srun_args[:3] == ["python", "-u", "main.py"] and srun_args[-2:] == ["--resume", "auto"], out
    if time_limit:
        assert (tmp_path / "scancel_args").read_text().split() == ["--signal=USR1", "77"], out
        assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "77", "stopped"], out  # after the stop
    else:
        assert script.returncode == 0, out
        assert not (tmp_path / "scancel_args").exists() and not (tmp_path / "scontrol_args").exists()


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
    ]:
        assert submit_module.cli(["--job_dir", str(job_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tools/submit.py: error: ") and message in err[0]
    assert not job_dir.exists()


@pytest.mark.parametrize("delay,grace", [(120, 90), (30, 10)])
def test_submit_leaves_the_job_time_to_checkpoint(monkeypatch, capsys, delay, grace):
    """The run is told to stop 30 s after the signal, and never less than 10 s before it must (``grace_s``)."""
    seen = {}

    def fake_submit(executor, argv_main, grace_s):
        seen.update(executor=executor, argv=argv_main, grace_s=grace_s)
        return SimpleNamespace(job_id="7", paths=SimpleNamespace(stdout="o.log", stderr="e.log"))

    monkeypatch.setattr(submit_module, "build_executor", lambda args: "executor")
    monkeypatch.setattr(submit_module, "submit", fake_submit)
    assert submit_module.cli(["--signal_delay_s", str(delay), "--", "--cfg_file", "c.yaml"]) == 0
    assert seen["grace_s"] == grace and seen["executor"] == "executor" and "--resume" in seen["argv"]
    assert capsys.readouterr().out == "submitted job 7: logs o.log and e.log\n"


def test_submit_help_explains_its_flags():
    text = " ".join(submit_module.get_parser().format_help().split())
    assert "one task (process) per GPU (default: 4)" in text and "job logs (%j: job id)" in text


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

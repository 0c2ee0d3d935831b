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
from pathlib import Path

import pytest
import torch

from utils.distributed import LaunchError, cuda_index, init_distributed_mode
from utils.launcher import PORT_BASE, Launch, detect_launch, expand_nodelist, port_from_job_id

from .helpers_train import wait_for

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
        ("a[[1]]", "unbalanced or nested brackets at character 2"),  # the second '[', where the nesting starts
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
        ({"RANK": "0", "WORLD_SIZE": "1"}, Launch("torchrun", 0, 1, 0)),  # torchrun --nproc_per_node 1
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Launch("torchrun", 3, 4, 1)),  # 2nd of 2 nodes
    ],
    ids=["none", "slurm-one-task", "slurm", "slurm-old-nodelist", "master-env", "torchrun-wins", "torchrun",
         "torchrun-one-process", "torchrun-two-nodes"],
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
    assert info.launcher == "no launcher (RANK/WORLD_SIZE and SLURM_NTASKS unset): one process"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one SLURM task: a process of its own, said so
    assert init_distributed_mode("cpu").launcher == Launch("slurm", 0, 1, 0).describe() != info.launcher


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """torchrun's rank 1 of 2 on a node of 4 GPUs: GPU 1, set as the current device and named in its DistInfo (the
    group itself, NCCL's, is not formed here: no GPU)."""
    import torch.distributed as dist

    for name in ("SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    info = init_distributed_mode("cuda")
    assert chosen == [1] and info.device == torch.device("cuda", 1) and (info.rank, info.world_size) == (1, 2)
    joined = []  # the group NCCL's, as it would be formed
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    init_distributed_mode("cuda")
    assert [k.get("backend") for k in joined] == ["nccl"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a1"}, r"^SLURM_NTASKS=4 but SLURM_PROCID and SLURM_LOCALID "
         r"unset: this process was not started by srun; run `srun python main\.py \.\.\.` \(one task per GPU\), or "
         r"unset SLURM_NTASKS for one process$"),
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


@pytest.mark.parametrize("addr, url", [("head", "tcp://head:2999"), ("10.0.0.7", "tcp://10.0.0.7:2999"),
                                       ("fe80::1", "tcp://[fe80::1]:2999")])  # an IPv6 address in brackets
def test_rendezvous_url_of_the_named_host(monkeypatch, addr, url):
    """SLURM's rendezvous at MASTER_ADDR:MASTER_PORT, as the URL ``init_process_group`` is given."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "MASTER_ADDR": addr, "MASTER_PORT": "2999"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: joined.append(kw))
    init_distributed_mode("cpu")
    assert joined == [{"backend": "gloo", "init_method": url, "rank": 1, "world_size": 2}]


def _as_srun_rank_1_of_2(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "127.0.0.1",
           "MASTER_PORT": "29999"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_a_group_formed_already_is_used_as_it_is(monkeypatch):
    """Inside a process group formed before (``dist.is_initialized()``) nothing is joined again, and the process
    is where the launch's variables put it: rank 1 of 2, local rank 1, on the CPU with Gloo."""
    _as_srun_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined again"))
    info = init_distributed_mode("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (1, 2, 1, True)
    assert info.device == torch.device("cpu")
    assert info.launcher.startswith("slurm (srun): rank 1 of 2, local rank 1")


def test_a_rendezvous_error_without_a_message_is_named_by_its_type(monkeypatch):
    class StoreTimeout(RuntimeError):
        pass

    def refuse(*args, **kwargs):
        raise StoreTimeout("  ")

    _as_srun_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    with pytest.raises(LaunchError, match=r"the group of 2 processes did not form \(StoreTimeout\); were all 2"):
        init_distributed_mode("cpu")


FAKE_SLURM = {  # stand-ins for SLURM's commands: they record how the script calls them
    "srun": """#!/bin/bash
echo "$@" > "$FAKE/srun_args"
trap 'echo stopped > "$FAKE/srun_stopped"; exit 75' USR1
echo $$ > "$FAKE/srun.tmp"; mv "$FAKE/srun.tmp" "$FAKE/srun.pid"  # whole, and only once USR1 is trapped
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
        wait_for(lambda: (tmp_path / "srun.pid").is_file(), "srun to start", timeout=30)
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

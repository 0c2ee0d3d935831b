"""utils.stopwatch (laps that add up to the run) and utils.machine (what every timing names beside its figures)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from configs import get_config
from utils import machine
from utils.distributed import DistInfo
from utils.stopwatch import Stopwatch, format_seconds


class FakeClock:
    """The monotonic clock (``now``) and a system clock that keeps ``ahead`` of it from 2026 on."""

    def __init__(self, now: float = 100.0) -> None:
        self.now, self.ahead = now, 0.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.8e9 + self.now + self.ahead


def stopwatch(clock: FakeClock, start: float | None = None) -> Stopwatch:
    return Stopwatch(start, clock=clock, wall_clock=clock.wall)


def test_laps_are_contiguous_and_add_up_to_the_wall_time():
    clock = FakeClock()
    watch = stopwatch(clock, start=90.0)  # the process began 10 s before the stopwatch was made
    for seconds, name, group in [(3, "start-up", ""), (49, "data", ""), (24, "setup", "training"),
                                 (232, "epoch 0", "training"), (622, "epoch 1", "training"), (57, "evaluation", "")]:
        clock.now += seconds
        assert watch.lap(name, group) == (seconds + 10 if name == "start-up" else seconds)
    assert [(lap.name, lap.seconds, lap.group) for lap in watch.laps][:2] == [("start-up", 13, ""), ("data", 49, "")]
    assert watch.total == 997 == sum(lap.seconds for lap in watch.laps)
    assert watch.summary() == (
        "16 min 37 s: start-up 13 s (1%), data 49 s (5%), training 14 min 38 s (88%: setup 24 s, epoch 0 3 min 52 s, "
        "epoch 1 10 min 22 s), evaluation 57 s (6%)"
    )
    assert watch.as_dict() == {"wall_s": 997, "paused_s": 0, "laps": [
        {"name": "start-up", "seconds": 13, "group": "", "paused": 0},
        {"name": "data", "seconds": 49, "group": "", "paused": 0},
        {"name": "setup", "seconds": 24, "group": "training", "paused": 0},
        {"name": "epoch 0", "seconds": 232, "group": "training", "paused": 0},
        {"name": "epoch 1", "seconds": 622, "group": "training", "paused": 0},
        {"name": "evaluation", "seconds": 57, "group": "", "paused": 0},
    ]}  # fmt: skip
    assert (watch.started_wall, watch.ended_wall) == (1.8e9 + 90, 1.8e9 + 90 + 997)


def test_the_json_keeps_milliseconds_of_laps_and_pauses():
    """timing.jsonl's figures are rounded to the millisecond, the pauses as the laps (not to whole seconds)."""
    clock = FakeClock(0.0)
    watch = stopwatch(clock)
    clock.now += 100.12345
    clock.ahead += 2.34567  # a paused machine: its system clock ran 2.3 s ahead of the monotonic one
    watch.lap("epoch 0", "training")
    lap = watch.as_dict()["laps"][0]
    assert (lap["seconds"], lap["paused"]) == (102.469, 2.346)
    assert (watch.as_dict()["wall_s"], watch.as_dict()["paused_s"]) == (102.469, 2.346)


def test_a_group_is_one_entry_only_where_its_laps_follow_each_other():
    clock = FakeClock(0.0)
    watch = stopwatch(clock)
    for name, group in [("a", "g"), ("b", ""), ("c", "g"), ("d", "g")]:
        clock.now += 10
        watch.lap(name, group)
    assert watch.summary() == "40 s: g 10 s (25%: a 10 s), b 10 s (25%), g 20 s (50%: c 10 s, d 10 s)"


def test_a_paused_machine_counts_in_the_lap_it_paused():
    """A virtual machine paused by its host: its monotonic clock stops, its system clock jumps ahead on resuming.
    The lap holds the pause (the total is the time waited); a slew within 0.1% or 1 s, or a clock set back, is none."""
    clock = FakeClock(0.0)
    watch, returned = stopwatch(clock), []
    for name, group, seconds, ahead in [("data", "", 50, 0.9), ("epoch 0", "training", 200, 0.15),
                                        ("epoch 1", "training", 524, 25.0), ("evaluation", "", 52, 3.0),
                                        ("long", "", 5000, 3.0), ("after", "", 10, -60.0)]:  # fmt: skip
        clock.now += seconds
        clock.ahead += ahead
        returned.append(watch.lap(name, group))
    assert returned == [50, 200, 549, 55, 5000, 10]  # what ``lap`` returns holds its pause
    assert [lap.paused for lap in watch.laps] == [0, 0, 25, 3, 0, 0]  # 3 s in 5000: within the slew
    assert [lap.seconds for lap in watch.laps] == [50, 200, 549, 55, 5000, 10]
    assert watch.total == 5864 and watch.paused == 28
    assert watch.summary() == (
        "1 h 37 min: data 50 s (1%), training 12 min 29 s (13%: epoch 0 3 min 20 s, epoch 1 9 min 9 s with 25 s "
        "paused), evaluation 55 s (1%, 3.0 s paused), long 1 h 23 min (85%), after 10 s (0%)"
    )
    assert watch.as_dict()["paused_s"] == 28 and watch.as_dict()["laps"][2]["paused"] == 25
    assert watch.ended_wall == clock.wall()


def test_json_keeps_milliseconds():
    clock = FakeClock(0.0)
    watch = stopwatch(clock)
    clock.now = 1.23456
    watch.lap("a")
    assert watch.as_dict() == {"wall_s": 1.235, "paused_s": 0, "laps": [
        {"name": "a", "seconds": 1.235, "group": "", "paused": 0}]}  # fmt: skip


def test_no_lap_yet():
    watch = stopwatch(FakeClock())
    assert watch.total == 0 and watch.summary() == "0.0 s: "
    assert watch.as_dict() == {"wall_s": 0, "paused_s": 0, "laps": []}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (9.94, "9.9 s"), (10.2, "10 s"), (59.4, "59 s"), (59.6, "1 min 0 s"), (1000, "16 min 40 s"),
     (3599.4, "59 min 59 s"), (3600, "1 h 00 min"), (6600, "1 h 50 min"), (7199, "1 h 59 min"), (7530, "2 h 05 min")],
)  # fmt: skip
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 sha_ni
processor\t: 1
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 sha_ni
"""


def test_cpu_model_and_flags_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: CPUINFO.splitlines())
    assert machine.cpu_model() == "AMD EPYC 9R14 96-Core Processor"
    engineering_sample = "model name\t: AMD Eng Sample: 100-000000314-04_30/24_N"  # a colon in the name itself
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [engineering_sample])
    assert machine.cpu_model() == "AMD Eng Sample: 100-000000314-04_30/24_N"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: CPUINFO.splitlines())
    flags = machine.cpu_flags()
    assert flags == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False, "amx_tile": False}
    assert machine.vector_units(flags) == "AVX-512 bf16, native bf16"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert machine.cpu_family_model() == (25, 17)
    assert machine.describe_machine(torch.device("cpu")).startswith(
        "AMD EPYC 9R14 96-Core Processor (family 25, model 17), "
    ) and ", 3 threads, AVX-512 bf16, native bf16, torch " in machine.describe_machine(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {device}")
    gpu_line = machine.describe_machine(torch.device("cuda", 1))
    assert gpu_line.startswith("GPU cuda:1 on AMD EPYC 9R14 96-Core Processor (family 25, model 17), ")
    assert machine.machine_info(torch.device("cpu"))["cpu_family_model"] == (25, 17)
    no_numbers = [line for line in CPUINFO.splitlines() if not line.startswith("model\t")]  # "model name" stays
    monkeypatch.setattr(machine, "_cpuinfo", lambda: no_numbers)
    assert machine.cpu_family_model() is None
    assert machine.cpu_name() == "AMD EPYC 9R14 96-Core Processor"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [*no_numbers, "model\t\t: unknown"])
    assert machine.cpu_family_model() is None


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_cpuinfo_is_the_kernels():
    """On Linux the fields come from /proc/cpuinfo: one "processor" entry for each processor the kernel lists."""
    listed = [line for line in machine._cpuinfo() if line.split(":")[0].strip() == "processor"]
    assert len(listed) >= len(os.sched_getaffinity(0))  # (Linux: the skip above)


def test_no_cpuinfo(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [])
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "arm64")
    assert machine.cpu_model() == "arm64"
    monkeypatch.setattr(machine.platform, "machine", lambda: "")
    assert machine.cpu_model() == "unknown"
    assert machine.cpu_family_model() is None and machine.cpu_name() == "unknown"
    assert machine.cpu_flags() == dict.fromkeys(machine.CPU_FLAGS, False)
    assert machine.vector_units(machine.cpu_flags()) == "no AVX2 (CPU features unknown)"


@pytest.mark.parametrize(
    ("present", "text"),
    [({"amx_tile", "avx512_bf16", "avx512f", "avx2"}, "AMX, native bf16"), ({"amx_bf16"}, "AMX, native bf16"),
     ({"avx512f", "avx2"}, "AVX-512 without bf16"), ({"avx2"}, "AVX2 only, no native bf16"), ({"sse2"}, "no AVX2")],
)  # fmt: skip
def test_vector_units(present, text):
    flags = {name: name in present for name in (*machine.CPU_FLAGS, "sse2")}
    assert machine.vector_units(flags) == text


def test_code_version(tmp_path):
    assert machine.code_version(tmp_path) is None  # not a git checkout

    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    commit = git("rev-parse", "HEAD")
    version = machine.code_version(tmp_path)
    assert version is not None and len(version) >= 7 and commit.startswith(version)
    (tmp_path / "new.py").write_text("untracked files do not count\n")
    assert machine.code_version(tmp_path) == version
    (tmp_path / "a.py").write_text("x = 2\n")
    assert machine.code_version(tmp_path) == version + "+changes"


def test_code_version_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert machine.code_version(Path(__file__).parent) is None


def test_a_full_disk_costs_the_timing_record_only(tmp_path, monkeypatch, caplog):
    """No room for this run's line of timing.jsonl: a WARNING, the earlier lines as they were (no part of the new
    one), and the run ends normally with its record returned."""
    import engine.timing as timing

    clock = FakeClock()
    watch = stopwatch(clock)
    clock.now += 5
    watch.lap("start-up")
    earlier = '{"run": "train", "wall_s": 1.0}\n'
    (tmp_path / "timing.jsonl").write_text(earlier)
    real_open = open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(timing, "open", lambda *a, **k: HalfWritten(real_open(*a, **k)), raising=False)
    with caplog.at_level(logging.WARNING, logger="lavt"):
        record = timing.report_timing(watch, get_config(None), DistInfo(0, 1, 0, False, torch.device("cpu")), tmp_path,
                                      "train")  # fmt: skip
    assert record["laps"][0]["name"] == "start-up"
    assert (tmp_path / "timing.jsonl").read_text() == earlier
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"cannot write this run's line of {tmp_path / 'timing.jsonl'}: No space left on device; the run itself is "
        "complete"
    ]

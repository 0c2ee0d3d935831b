"""The machine a run or a benchmark ran on: CPU model and the features that decide the fast precision, the GPU, the
code's version. Every timing this project reports names these beside its figures."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

#: CPU features that decide which precision is fast (native bf16 needs avx512_bf16 or AMX)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def _first_processor() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...; all processors are alike), read
    once; empty where it cannot be read."""
    fields: dict[str, str] = {}
    for line in _cpuinfo():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
        elif fields:  # the blank line after the first processor
            break
    return fields


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    return _first_processor().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_family_model() -> tuple[int, int] | None:
    """The x86 family and model numbers from /proc/cpuinfo (None where they cannot be read). They tell apart CPUs that
    the model name does not: two 2-core machines both named "AMD EPYC" with AVX-512 bf16 ran this code's bf16
    training step at ~800 and ~450 ms, the faster of family 26 (the other's numbers went unrecorded;
    docs/performance.md)."""
    fields = _first_processor()
    try:
        return int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None


def cpu_name() -> str:
    """``cpu_model`` with the family and model numbers where known: "AMD EPYC (family 26, model 2)"."""
    numbers = cpu_family_model()
    return cpu_model() if numbers is None else f"{cpu_model()} (family {numbers[0]}, model {numbers[1]})"


def cpu_flags() -> dict[str, bool]:
    """Which of ``CPU_FLAGS`` /proc/cpuinfo lists (all False where it cannot be read)."""
    flags = _first_processor().get("flags", "").split()
    return {name: name in flags for name in CPU_FLAGS}


def vector_units(flags: dict[str, bool]) -> str:
    """What ``cpu_flags`` says about the CPU's arithmetic, in words: bf16 is fast only with AMX or AVX-512 bf16."""
    if flags.get("amx_tile") or flags.get("amx_bf16"):
        return "AMX, native bf16"
    if flags.get("avx512_bf16"):
        return "AVX-512 bf16, native bf16"
    if flags.get("avx512f"):
        return "AVX-512 without bf16"
    if flags.get("avx2"):
        return "AVX2 only, no native bf16"
    return "no AVX2 (CPU features unknown)" if not any(flags.values()) else "no AVX2"


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine as JSON: CPU, cores, torch's threads, native bf16 as torch sees it, versions, load average, OpenMP's
    spin count."""
    info = {
        "cpu": cpu_name(),
        "cpu_family_model": cpu_family_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "openmp_spin_count": os.environ.get("GOMP_SPINCOUNT"),  # None: libgomp's default (utils/openmp.py)
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(device: torch.device) -> str:
    """One line for logs: "AMD EPYC (family 26, model 2), 2 cores, 2 threads, AVX-512 bf16, native bf16, torch 2.14.1"
    (the GPU first on CUDA)."""
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {vector_units(cpu_flags())}"
    gpu = f"{torch.cuda.get_device_name(device)} on " if device.type == "cuda" else ""
    return f"{gpu}{cpu}, torch {torch.__version__}"


def code_version(root: str | Path) -> str | None:
    """The git commit of the code in ``root`` ("a8fdb28", "+changes" when the work tree differs from it), or None
    outside a git checkout."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if changed else commit

"""utils.allocator: glibc's malloc keeps freed memory for reuse (main.py, the benchmark's timings), or returns it at
once (the benchmark's peak memory); the user's own settings win."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from utils import allocator

ROOT = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="glibc's mallopt is not available here")

# A 64 MiB block (above glibc's largest dynamic mmap threshold, 32 MiB) allocated, written and freed 8 times: the
# minor page faults it took, and the resident set after the last free.
_CYCLES = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from utils import allocator
{setup}
libc = allocator.glibc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)  # every page written
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, rss_kb())
"""


def _cycles(setup: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    code = textwrap.dedent(_CYCLES).format(root=str(ROOT), setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    faults, rss_kb = out.stdout.split()
    return int(faults), int(rss_kb)


@needs_glibc
def test_kept_memory_is_reused_without_new_page_faults():
    pages = (64 << 20) // 4096
    default_faults, default_rss = _cycles("")
    kept_faults, kept_rss = _cycles("print(allocator.keep_freed_memory(), file=sys.stderr)")
    assert default_faults > 6 * pages  # glibc's default: every cycle maps fresh pages
    assert kept_faults < 2 * pages  # kept: the first cycle's pages serve the others
    assert kept_rss - default_rss > 48 << 10  # the freed block stays resident (KiB)


@needs_glibc
def test_returned_memory_leaves_the_resident_set_after_it_was_kept():
    faults, rss_kb = _cycles("allocator.keep_freed_memory(); allocator.return_freed_memory()")
    _, kept_rss = _cycles("allocator.keep_freed_memory()")
    assert kept_rss - rss_kb > 48 << 10  # PeakMemory after keep_freed_memory: freed blocks leave again
    assert faults > 6 * (64 << 20) // 4096


@pytest.fixture
def no_user_settings(monkeypatch):
    """An environment without the user's own malloc settings."""
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)


class _FakeLibc:
    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accepts = accepts

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(self.accepts)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_thresholds_set_and_said(monkeypatch, no_user_settings):
    fake = _FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    said = allocator.keep_freed_memory()
    assert fake.calls == [(-3, 256 << 20), (-1, 1 << 30)]  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert said.startswith("malloc: freed memory kept") and "mmap threshold 256 MiB, trim threshold 1024 MiB" in said
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")  # not a malloc setting
    assert allocator.keep_freed_memory() == said and len(fake.calls) == 4
    fake.calls.clear()
    assert allocator.return_freed_memory() is True  # and back to glibc's initial trim threshold, then trimmed
    assert fake.calls == [(-3, 64 << 10), (-1, 128 << 10), ("trim", 0)]


@pytest.mark.parametrize(
    "name, value, shown",
    [
        ("GLIBC_TUNABLES", "glibc.cpu.x86_ibt=on:glibc.malloc.trim_threshold=0", "glibc.malloc.trim_threshold=0"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_=0"),
        ("MALLOC_MMAP_THRESHOLD_", "65536", "MALLOC_MMAP_THRESHOLD_=65536"),
        ("MALLOC_TOP_PAD_", "0", "MALLOC_TOP_PAD_=0"),
    ],
)
def test_the_users_malloc_settings_are_kept(monkeypatch, name, value, shown):
    fake = _FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    monkeypatch.setenv(name, value)
    assert allocator.keep_freed_memory() == f"malloc: the environment's settings kept ({shown})"
    assert fake.calls == []


def test_several_user_settings_are_all_named():
    env = {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0:glibc.malloc.arena_max=2", "MALLOC_TOP_PAD_": "1",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "4"}  # fmt: skip
    assert allocator.user_malloc_settings(env) == (
        "MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=1 glibc.malloc.top_pad=0 glibc.malloc.arena_max=2"
    )


def test_without_glibc_or_when_refused_the_defaults_stay(monkeypatch, no_user_settings):
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    assert allocator.keep_freed_memory() == "malloc: the C library's defaults (no glibc mallopt)"
    assert allocator.return_freed_memory() is False
    allocator.trim_heap()  # nothing to do, no error
    monkeypatch.setattr(allocator, "glibc", lambda: _FakeLibc(accepts=False))
    assert allocator.keep_freed_memory() == "malloc: the C library's defaults (mallopt refused the thresholds)"

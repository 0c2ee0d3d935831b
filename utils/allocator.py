"""glibc's malloc: freed memory kept for reuse in training, or handed back at once to measure peak memory.

A CPU training step allocates its activations (many MB each) in the forward pass and frees them in the backward.
By default glibc serves blocks above a dynamic threshold (at most 32 MiB) with fresh ``mmap`` calls and gives the
top of its heap back once more than twice that is free: every step then touches its memory as new pages, each a
page fault that the kernel zeroes. The demo's 96-px step at batch 32 took 15-28k faults and 50-150 ms of system
time; with the thresholds below, ~1.2k faults and ~5 ms (docs/performance.md). The peak memory stays the same:
the process keeps what it has already used, up to ``TRIM_THRESHOLD`` of it free. ``return_freed_memory`` is the
opposite, for ``utils.profiling``'s peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = [
    "MMAP_THRESHOLD", "TRIM_THRESHOLD", "glibc", "keep_freed_memory", "return_freed_memory", "trim_heap",
    "user_malloc_settings",
]  # fmt: skip

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap, where a freed one is reused (glibc's default: dynamic, at most 32 MiB)
MMAP_THRESHOLD = 256 << 20
#: free memory at the top of the heap kept rather than returned (default: twice the mmap threshold)
TRIM_THRESHOLD = 1 << 30
# environment variables by which a user tunes glibc's malloc: any of them leaves the choice to the user
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, if it has glibc's ``mallopt`` and ``malloc_trim`` (None elsewhere: macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def user_malloc_settings(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The malloc settings the user gave in the environment ('' if none)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    return " ".join([f"{k}={environ[k]}" for k in _USER_VARIABLES if k in environ] + tunables)


def keep_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds (``MMAP_THRESHOLD``, ``TRIM_THRESHOLD``) for this process.

    Returns:
        what was done, for the log: the thresholds set, or why not (the user's own malloc settings, which are
        kept; a C library without ``mallopt``, e.g. macOS or musl).
    """
    user = user_malloc_settings()
    if user:
        return f"malloc: the environment's settings kept ({user})"
    libc = glibc()
    if libc is None:
        return "malloc: the C library's defaults (no glibc mallopt)"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "malloc: the C library's defaults (mallopt refused the thresholds)"
    return (
        f"malloc: freed memory kept for reuse (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
        f"{TRIM_THRESHOLD >> 20} MiB; docs/performance.md)"
    )


def return_freed_memory() -> bool:
    """Serve blocks of 64 KiB and more by mmap, so that a freed tensor leaves the resident set at once, and trim what
    the heap holds free now: for an RSS that follows the live tensors (``utils.profiling.PeakMemory``). It makes
    allocation slower: measure memory in its own run, not while timing. Called before the model is built; later,
    what earlier steps left in the heap stays counted (measured: +25% on a Swin-B 480 step). False without glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # also ends glibc's dynamic threshold for this process
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)  # glibc's initial value (keep_freed_memory may have raised it)
    trim_heap()
    return True


def trim_heap() -> None:
    """Hand the heap's free memory back to the system now (glibc; elsewhere nothing)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)

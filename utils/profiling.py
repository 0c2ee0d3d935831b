"""Measurement primitives for ``tools.benchmark``: timing, peak memory, FLOP counting, matmul peak, per-part timing.

Every timer synchronises the GPU before reading the clock, so that a CUDA time is the kernels' time and not the
launch time. CPU peak memory is the process's resident-set high-water mark (``VmHWM``), which Linux lets a
process reset (``/proc/self/clear_refs``); see ``PeakMemory``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .allocator import return_freed_memory, trim_heap

aten = torch.ops.aten


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Seconds of each of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    return time_interleaved([fn], device, warmup, runs)[0]


def time_interleaved(
    fns: list[Callable[[], object]], device: torch.device, warmup: int, runs: int, inner: int = 1,
    before: Callable[[], object] | None = None,
) -> list[list[float]]:
    """``time_runs`` for several functions taking turns, the first of each round rotating (A B C, B C A, ...):
    the seconds of each one's timed calls. On a machine shared with other work, each is slowed alike.

    inner: calls per timed turn, their mean reported (warm-up turns call once). before: run untimed before every
    turn (e.g. ``gc.collect``, so that the garbage one function leaves is not collected on another's clock)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + runs):
        calls = inner if r >= warmup else 1
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            if before is not None:
                before()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fns[i]()
            synchronize(device)
            if r >= warmup:
                times[i].append((time.perf_counter() - start) / calls)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is unavailable), after collecting unreachable objects
    and handing the allocator's free memory back to the system (glibc), so that neither is counted. A baseline
    that held garbage (tensors in a reference cycle) would drop below itself when it is collected during the
    measurement, and hide that much of the peak."""
    gc.collect()
    trim_heap()
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_bytes`` is the peak inside the block.

    GPU: ``torch.cuda.max_memory_allocated`` (reset on entry): every live tensor, the model's included.
    CPU: the process's peak resident set minus ``base_bytes`` (its resident set before the model was built, so
    that Python and the libraries are left out and the figure compares with the GPU one). On glibc, blocks of
    64 KiB and more are then served by mmap and returned on free, and the free heap is trimmed first, so that
    the resident set follows the live tensors rather than what the allocator kept from earlier (this makes
    allocation slower: measure memory in its own run, not while timing). ``exact`` is False where the peak
    could not be reset or glibc is absent (then it is an upper bound).
    """

    def __init__(self, device: torch.device, base_bytes: int = 0) -> None:
        self.device, self.base_bytes = device, base_bytes
        self.peak_bytes = 0
        self.exact = True

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()  # garbage left from before the block is not its memory
        if not return_freed_memory():
            self.exact = False
        try:
            _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        kb = _status_kb("VmHWM")
        if kb is None:
            self.exact = False
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the lifetime peak
        self.peak_bytes = max(kb * 1024 - self.base_bytes, 0)


# ----------------------------------------------------------------------------- FLOPs
Shape = Sequence[int]


def _cpu_flash_flop(query_shape: Shape, key_shape: Shape, value_shape: Shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape: Shape, query_shape: Shape, key_shape: Shape, value_shape: Shape,
                             *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU fused attention kernels have no formula in torch.utils.flop_counter: without these the fused path
# would look cheaper than the straightforward one, which does the same arithmetic.
_EXTRA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention): (total, per module name)."""
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_FLOPS)
    with counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, size: int | None = None, runs: int = 5) -> float:
    """The machine's dense square matmul FLOP/s in ``dtype`` (its fastest of ``runs``): the yardstick for a model."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = time_runs(lambda: torch.mm(a, b), device, warmup=2, runs=runs)
    return 2 * n**3 / min(times)


# ----------------------------------------------------------------------------- per-part timing
class PartTimer:
    """Forward (and, with ``backward``, backward) time of named submodules (nested ones allowed), by module hooks.

    A part is one module or several (a stage's blocks), whose times add up. Its forward runs from the forward
    pre-hook to the forward hook; its backward from the full-backward pre-hook (the output's gradient is ready) to the
    full-backward hook (the input's is): the autograd engine runs one node at a time on CPU. A module whose inputs
    need no gradient (a text encoder fed token ids) has no backward hook call, and no backward time.

    ``with timer.recording(): ...`` times one call; ``timer.medians()`` (or ``medians("backward")``) gives the median
    seconds per part over the recorded calls, for the parts that ran. Outside ``recording`` the hooks do nothing
    (e.g. the recomputation of a checkpointed stage during backward is not counted).
    """

    def __init__(
        self, parts: dict[str, nn.Module | Sequence[nn.Module]], device: torch.device, backward: bool = False
    ) -> None:
        self.device = device
        self.samples: dict[str, dict[str, list[float]]] = {"forward": {}, "backward": {}}
        self._current: dict[tuple[str, int], float] = {}
        self._active = False
        self._handles = []
        for name, modules in parts.items():
            for m in [modules] if isinstance(modules, nn.Module) else modules:
                hooks = [("forward", m.register_forward_pre_hook, m.register_forward_hook)]
                if backward:
                    hooks.append(("backward", m.register_full_backward_pre_hook, m.register_full_backward_hook))
                for phase, on_start, on_stop in hooks:
                    self._handles += [on_start(self._start(phase, m)), on_stop(self._stop(phase, name, m))]

    def _start(self, phase: str, module: nn.Module) -> Callable:
        def hook(*_: object) -> None:
            if self._active:
                synchronize(self.device)
                self._current[(phase, id(module))] = time.perf_counter()

        return hook

    def _stop(self, phase: str, name: str, module: nn.Module) -> Callable:
        def hook(*_: object) -> None:
            started = self._current.pop((phase, id(module)), None) if self._active else None
            if started is not None:
                synchronize(self.device)
                key = (phase, name)
                self._pending[key] = self._pending.get(key, 0.0) + time.perf_counter() - started

        return hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._active, self._pending = True, {}
        try:
            yield
        finally:
            self._active = False
            for (phase, name), seconds in self._pending.items():
                self.samples[phase].setdefault(name, []).append(seconds)

    def medians(self, phase: str = "forward") -> dict[str, float]:
        return {name: median(values) for name, values in self.samples[phase].items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

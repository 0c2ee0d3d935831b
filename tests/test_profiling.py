"""utils.profiling: FLOPs counted at the dispatcher, and the process's peak memory over a block."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from utils.profiling import PeakMemory, count_flops, current_rss_bytes


def test_flop_count_includes_fused_attention():
    q, k, v = torch.randn(2, 3, 49, 16), torch.randn(2, 3, 49, 16), torch.randn(2, 3, 49, 16)
    bias = torch.randn(1, 3, 49, 49)
    fused, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    expected = 2 * (2 * 2 * 3 * 49 * 49 * 16)  # q @ k^T and attn @ v
    assert fused == expected
    lin = torch.nn.Linear(16, 8)
    assert count_flops(lambda: lin(torch.randn(5, 16)))[0] == 2 * 5 * 16 * 8


def test_peak_memory_sees_a_large_allocation():
    device = torch.device("cpu")
    with PeakMemory(device) as small:
        torch.zeros(1000).sum()
    with PeakMemory(device) as big:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    if not big.exact:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert big.peak_bytes - small.peak_bytes > 48 * 2**20


def _cyclic_garbage(mib: int) -> None:
    """A touched tensor of ``mib`` MiB that only a reference cycle keeps, dropped: freed by a collection alone."""
    junk: list = [torch.ones(mib * 2**20 // 4)]
    junk.append(junk)


def test_memory_baseline_and_peak_leave_out_garbage():
    """Garbage collected during a measurement would take its memory off the baseline (a peak of 0 for a small
    model in a long-lived process) or, left at the block's start, count as the block's own."""
    device = torch.device("cpu")
    gc.disable()  # so that only the functions under test collect
    try:
        _cyclic_garbage(64)
        base = current_rss_bytes()
        gc.collect()
        assert base - current_rss_bytes() < 16 * 2**20
        _cyclic_garbage(64)
        with PeakMemory(device, base) as empty:
            pass
    finally:
        gc.enable()
    if not empty.exact:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert empty.peak_bytes < 16 * 2**20

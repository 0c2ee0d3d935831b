"""The decoder's 3x3 convolutions, one by one: oneDNN (``Conv3x3`` as it runs without ``MODEL.CONV_WINOGRAD``,
with its float32 weight gradient as matrix products) against Winograd (``models.winograd``: F(4x4, 3x3) in float32,
F(2x2, 3x3) in bf16; taken whatever ``winograd_pays`` says), the two taking turns; for each image size, batch, phase
(a forward and backward with the input's and the weight's gradients, or a forward without gradients) and precision.
What sets ``models.winograd.MIN_TILES_FLOAT32``, ``MIN_TILES_LOW_PRECISION``, ``CHUNK_PIXELS`` and ``MIN_TILES_F4``.

Run from the repository root (the figures: docs/performance.md)::

    python docs/bench_winograd.py --sizes 224 --batches 1,2,8 --json bench_winograd_224.json
    python docs/bench_winograd.py --sizes 480 --batches 1,2 --json bench_winograd_480.json
    python docs/bench_winograd.py --sizes 224 --batches 8 --chunk_pixels 1000000   # all of a map at once
    python docs/bench_winograd.py --sizes 224 --batches 1,2 --precisions float32 --float32_tile 2   # F(2x2, 3x3)
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python docs/bench_winograd.py --sizes 224 --batches 1,2 --precisions float32   # as on a CPU without AVX-512
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also when loaded by path
from models import conv as conv_module  # noqa: E402
from models import winograd  # noqa: E402
from models.conv import Conv3x3  # noqa: E402
from utils.profiling import median, time_interleaved  # noqa: E402


def decoder_convolutions(embed_dim: int, size: int) -> list[tuple[int, int, int]]:
    """(in, out channels, map side) of the official decoder's six 3x3 convolutions for a Swin of ``embed_dim`` at
    ``size`` px: stage 4 with stage 3 at size/16, then stage 2 at size/8, stage 1 at size/4; 4 x embed_dim wide."""
    hidden = 4 * embed_dim
    levels = ((8 * embed_dim + 4 * embed_dim, 16), (hidden + 2 * embed_dim, 8), (hidden + embed_dim, 4))
    return [conv for skip, down in levels for conv in ((skip, hidden, size // down), (hidden, hidden, size // down))]


def time_pair(direct: Conv3x3, forced: Conv3x3, x: torch.Tensor, train: bool, bf16: bool, repeats: int) -> list[float]:
    """Median seconds of ``direct`` and ``forced`` on x, taking turns after one warm-up call each."""

    def call(conv: Conv3x3) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
                out = conv(x.requires_grad_(train))
            if train:
                out.backward(torch.ones_like(out))

        return run

    times = time_interleaved([call(direct), call(forced)], torch.device("cpu"), warmup=1, runs=repeats)
    return [median(t) for t in times]


def measure(
    sizes: list[int], batches: list[int], embed_dim: int = 96, repeats: int = 5,
    phases: tuple[str, ...] = ("train", "eval"), precisions: tuple[str, ...] = ("bf16", "float32"),
) -> list[dict[str, Any]]:
    """One row per convolution, size, batch, phase and precision: milliseconds and oneDNN's time over Winograd's."""
    rows = []
    for size, batch, phase, precision in itertools.product(sizes, batches, phases, precisions):
        for in_chans, out_chans, side in decoder_convolutions(embed_dim, size):
            torch.manual_seed(0)
            direct = Conv3x3(in_chans, out_chans, matmul_grad=True)
            forced = Conv3x3(in_chans, out_chans, matmul_grad=True, winograd=True)
            forced.load_state_dict(direct.state_dict())
            x = torch.randn(batch, in_chans, side, side).contiguous(memory_format=torch.channels_last)
            conv_module.winograd_pays = lambda *_: True  # the Winograd side runs it whatever the rule says
            try:
                t_direct, t_wino = time_pair(direct, forced, x, phase == "train", precision == "bf16", repeats)
            finally:
                conv_module.winograd_pays = winograd.winograd_pays
            tiles = winograd.output_tiles(x)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            rows.append(dict(
                size=size, batch=batch, phase=phase, precision=precision, in_chans=in_chans, out_chans=out_chans,
                side=side, tiles=tiles, onednn_ms=1e3 * t_direct, winograd_ms=1e3 * t_wino,
                speedup=t_direct / t_wino, rule_takes_it=winograd.winograd_pays(in_chans, out_chans, tiles, dtype),
            ))
            r = rows[-1]
            print(f"{size} px  batch {batch}  {phase:5s} {precision:7s} {in_chans:4d} -> {out_chans:<4d} {side}x{side}"
                  f" {tiles:5d} tiles: oneDNN {r['onednn_ms']:7.1f} ms, Winograd {r['winograd_ms']:7.1f} ms,"
                  f" x{r['speedup']:.2f}{'  (taken)' if r['rule_takes_it'] else ''}", flush=True)
    return rows


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="224", help="image sides, comma-separated (default: 224)")
    p.add_argument("--batches", default="1,2,8", help="batch sizes, comma-separated (default: 1,2,8)")
    p.add_argument("--embed_dim", type=int, default=96, help="Swin's embed dim: 96 Swin-T/S, 128 Swin-B (default: 96)")
    p.add_argument("--repeats", type=int, default=5, help="timed turns of each (default: 5)")
    p.add_argument("--precisions", default="bf16,float32", help="bf16 and/or float32 (default: bf16,float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--chunk_pixels", type=int, default=0,
                   help=f"output pixels Winograd transforms and multiplies at a time (default: by tile side, "
                        f"{winograd.CHUNK_PIXELS})")
    p.add_argument("--float32_tile", type=int, choices=[2, 4], default=4,
                   help=f"float32 by 4: F(4x4, 3x3) where the rule takes it (from {winograd.MIN_TILES_F4} tiles), 2: "
                        "F(2x2, 3x3) everywhere (default: 4)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    a = get_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.chunk_pixels:
        winograd.CHUNK_PIXELS = dict.fromkeys(winograd.CHUNK_PIXELS, a.chunk_pixels)
    if a.float32_tile == 2:
        winograd.MIN_TILES_F4 = math.inf
    ints = [[int(v) for v in s.split(",")] for s in (a.sizes, a.batches)]
    rows = measure(ints[0], ints[1], a.embed_dim, a.repeats, precisions=tuple(a.precisions.split(",")))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""The floor: how much faster than the official LAVT code any implementation of the same arithmetic could run.

For each phase of ``docs/bench_official.py`` (a training step, an evaluation forward), the FLOPs each implementation
computes (``utils.profiling.count_flops``: matrix products, convolutions, attention) divided by this CPU's dense
matrix-product rate in the phase's precision (``utils.profiling.matmul_flops_per_s``, a 2048x2048 product, measured
in every round beside the two implementations) is the time of an implementation that ran every FLOP at the matrix
units' best rate and everything else for free. The official time over that floor bounds the speed-up any
implementation of the same network could reach on this machine. Same builders, batches and weights as
``docs/bench_official.py``; ``--amp bf16`` runs both under bf16 autocast and divides by the bf16 rate.

Run from the repository root (the figures: docs/performance.md)::

    python docs/bench_floor.py --official /path/to/LAVT-RIS --json docs/benchmarks/floor_fp32.json
    python docs/bench_floor.py --official /path/to/LAVT-RIS --amp bf16 --json docs/benchmarks/floor_bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_official beside this file, also when loaded by path
import bench_official as bo  # noqa: E402

from utils.amp import amp_dtype  # noqa: E402
from utils.profiling import count_flops, matmul_flops_per_s  # noqa: E402

#: (phase, image side, batch): the training step and evaluation of README's table, and evaluation at 480 px
PHASES = (("train", 224, 2), ("eval", 224, 1), ("eval", 480, 1))


def floor(
    fns: dict[str, Callable[[], object]], repeats: int, matmul_size: int = 2048, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Time ``fns`` taking turns (``bench_official.alternate``) with the ``dtype`` matmul rate measured before each
    round; returns per function its FLOPs, median ms, floor ms (FLOPs at the median rate) and time / floor."""
    flops = {name: count_flops(fn)[0] for name, fn in fns.items()}
    rates: list[float] = []

    def rate() -> None:
        rates.append(matmul_flops_per_s(dtype, torch.device("cpu"), size=matmul_size, runs=3))

    times = bo.alternate({"matmul_rate": rate, **fns}, warmup=1, repeats=repeats)
    rates = rates[1:]  # the warm-up round's left out
    rate_median = statistics.median(rates)
    out: dict[str, Any] = {"matmul_gflop_per_s": rate_median / 1e9, "matmul_rounds": [r / 1e9 for r in rates]}
    for name in fns:
        ms = 1e3 * statistics.median(times[name])
        floor_ms = 1e3 * flops[name] / rate_median
        out[name] = {"gflop": flops[name] / 1e9, "median_ms": ms, "floor_ms": floor_ms, "over_floor": ms / floor_ms}
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of github.com/yz93/LAVT-RIS (read only)")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds per phase")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32",
                   help="precision of both implementations (bf16: under autocast) and of the matmul rate")
    p.add_argument("--json", type=Path, default=Path("bench_floor.json"))
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": bo.machine_info(), "amp": args.amp, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as tmp_name:
        tmp = Path(tmp_name)
        modules = bo.import_official(args.official, tmp / "stubs")[:3]
        bert_dir, _, _ = bo.bert_folder(argparse.Namespace(bert=""), tmp)  # BERT-base shape, random, every phase
        for phase, size, batch_size in PHASES:
            setup = argparse.Namespace(size=size, batch_size=batch_size, window=7, seed=0, bert="", amp=args.amp)
            torch.manual_seed(0)
            repo = bo.build_repo(bo.repo_config(setup, bert_dir, fused_attention=True), False)
            official, _ = bo.build_official(*modules, bert_dir, repo.model, setup)
            batch = bo.make_batch(repo.model, repo.cfg, batch_size, size, torch.device("cpu"))
            amp = repo.cfg.TRAIN.AMP  # "bf16", or "" for float32 (bench_official.repo_config)
            official_fn, repo_fn = (
                (bo.official_train_fn, bo.repo_train_fn) if phase == "train" else (bo.official_eval_fn, bo.repo_eval_fn)
            )
            fns = {"official": official_fn(official, batch, amp), "repo": repo_fn(repo, batch, amp)}
            entry = floor(fns, args.repeats, dtype=amp_dtype(amp))
            key = f"{phase} {size} px, batch {batch_size}"
            results["phases"][key] = entry
            off, mine = entry["official"], entry["repo"]
            print(f"{key}: GFLOP official {off['gflop']:.1f}, repo {mine['gflop']:.1f}; matmul "
                  f"{entry['matmul_gflop_per_s']:.0f} GFLOP/s; official {off['median_ms']:.0f} ms, repo "
                  f"{mine['median_ms']:.0f} ms, floor {off['floor_ms']:.0f} ms: official / repo "
                  f"{off['median_ms'] / mine['median_ms']:.2f}x, official / floor {off['over_floor']:.2f}x",
                  flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""``python -m tools.benchmark``: where LAVT's time and memory go, and what each speed-up buys, side by side.

For one config, image size and batch size, every variant (a set of switches on top of the straightforward
float32 model) is measured for: a training step (forward + loss, backward, AdamW step), evaluation throughput
(expressions/s at batch 1 and at a larger batch), peak memory, FLOPs per image, the FLOP/s achieved beside the
machine's dense matmul FLOP/s in that dtype, and a per-part forward breakdown (text encoder, patch embedding,
each Swin stage with its PWAM, decoder). Timings are medians (``--stat min``: minima) of timed runs after
warm-up. On CPU each variant runs in its own process, so its peak memory is its own; ``--interleave`` instead
runs all variants in one process taking turns, so that on a machine shared with other work their ratios hold.

Example: ``python -m tools.benchmark --cfg_file configs/swin_tiny_refcoco.yaml --size 224
--compare fused,bf16,fused+bf16 --opts MODEL.TEXT.ENCODER minilm-l6 MODEL.PRETRAINED_SWIN ''``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from utils.openmp import set_spin_count

set_spin_count()  # before torch loads OpenMP, as main.py does: the benchmark times steps as they train

import torch  # noqa: E402

from models import build_model  # noqa: E402
from models.build import compile_model  # noqa: E402
from utils.allocator import keep_freed_memory, return_freed_memory  # noqa: E402
from utils.amp import amp_dtype, autocast  # noqa: E402
from utils.checkpoint import write_text_atomic  # noqa: E402
from utils.machine import machine_info  # noqa: E402
from utils.profiling import PeakMemory, current_rss_bytes, matmul_flops_per_s, time_interleaved, time_runs  # noqa: E402

from .bench_report import format_report  # noqa: E402
from .bench_workload import (  # noqa: E402
    MALLOC_MODES,
    MEMORY_MODES,
    PHASES,
    PRECISIONS,
    STATS,
    SWITCHES,
    BenchSpec,
    count_model_flops,
    eval_step,
    eval_summary,
    parse_variant,
    part_breakdown,
    train_step,
    train_summary,
    variant_setup,
)
from .cli import cli_parser, require_at_least, run_cli  # noqa: E402

logger = logging.getLogger("benchmark")


@dataclass
class _Variant:
    """One variant, built: its model, config, precision and the result filled in as it is measured."""

    spec: BenchSpec
    switches: set[str]
    amp: str
    device: torch.device
    cfg: Any
    model: torch.nn.Module
    result: dict[str, Any]
    base_rss: int


def _prepare(spec: BenchSpec) -> _Variant:
    if spec.malloc not in MALLOC_MODES:
        raise ValueError(f"BenchSpec.malloc must be one of {MALLOC_MODES}, got {spec.malloc!r}")
    if spec.malloc == "keep" and spec.memory != "only":  # (measure_memory returns freed memory instead)
        logger.info(keep_freed_memory())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    switches, amp, cfg = variant_setup(spec)
    base_rss = current_rss_bytes()
    model = build_model(cfg, pretrained=False, device=device, dtype=amp_dtype(amp))
    result = {
        "variant": spec.variant,
        "switches": sorted(switches),
        "amp": amp or "float32",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if "compile" in switches:
        # FLOPs are counted on the eager model; per-part hooks would break the compiled graphs: no breakdown
        if "flops" in spec.phases:
            result["flops"] = count_model_flops(model, cfg, spec, device, amp)
        compile_model(model)
    return _Variant(spec, switches, amp, device, cfg, model, result, base_rss)


def _finish(v: _Variant) -> dict[str, Any]:
    """FLOPs, the per-part breakdown and the matmul yardstick, after the timings."""

    spec, result = v.spec, v.result
    if "flops" in spec.phases and "flops" not in result:
        result["flops"] = count_model_flops(v.model, v.cfg, spec, v.device, v.amp)
    if "breakdown" in spec.phases and "compile" not in v.switches:
        result["breakdown"] = part_breakdown(v.model, v.cfg, spec, v.device, v.amp)
    dtypes = {"float32": torch.float32, result["amp"]: amp_dtype(v.amp)}  # float32 measured once
    size = spec.matmul_size or None
    result["matmul_flops_per_s"] = {name: matmul_flops_per_s(dtype, v.device, size) for name, dtype in dtypes.items()}
    _achieved(result, spec)
    return result


def run_variant(spec: BenchSpec) -> dict[str, Any]:
    """Measure one variant in this process; returns the JSON-ready result."""
    if spec.memory not in MEMORY_MODES:
        raise ValueError(f"BenchSpec.memory must be one of {MEMORY_MODES}, got {spec.memory!r}")
    if spec.memory == "only":
        return measure_memory(spec)
    v = _prepare(spec)
    model, cfg, device, amp, result = v.model, v.cfg, v.device, v.amp, v.result
    step = eval_run = None
    if "train" in spec.phases:
        step, split = train_step(model, cfg, spec, device, amp)
        first, times = _first_and_timed(step, device, spec)
        result["train"] = {**train_summary(times, split, spec.warmup, spec.stat), "first_call_s": first}
    if "eval" in spec.phases:
        result["eval"] = {}
        for bs in dict.fromkeys((1, spec.eval_batch_size)):
            eval_run = eval_step(model, cfg, bs, spec, device, amp)
            with autocast(amp if "cast_once" in v.switches else "", device):  # one region: weights cast once
                first, times = _first_and_timed(eval_run, device, spec)
            result["eval"][f"batch{bs}"] = {**eval_summary(times, bs, spec.stat), "first_call_s": first}
    _finish(v)
    if spec.memory == "inline":  # memory last, one more step each with an allocator that returns what is freed
        _peak_memory(v, step, eval_run)
    return result


def _first_and_timed(fn: Any, device: torch.device, spec: BenchSpec) -> tuple[float | None, list[float]]:
    """The first call's seconds, apart (what a run pays once: with ``compile``, the compiling), then ``spec.runs``
    timed calls after the rest of the warm-up."""
    if spec.warmup < 1:
        return None, time_runs(fn, device, 0, spec.runs)
    first = time_runs(fn, device, 0, 1)[0]
    return first, time_runs(fn, device, spec.warmup - 1, spec.runs)


def _peak_memory(v: _Variant, step: Any, eval_run: Any) -> None:
    if step is not None:
        with PeakMemory(v.device, v.base_rss) as mem:
            step()
        v.result["train"].update(peak_mb=mem.peak_bytes / 2**20, peak_exact=mem.exact)
    if eval_run is not None:
        with PeakMemory(v.device, v.base_rss) as mem:
            eval_run()
        entry = v.result["eval"].setdefault(f"batch{v.spec.eval_batch_size}", {})
        entry.update(peak_mb=mem.peak_bytes / 2**20, peak_exact=mem.exact)


def measure_memory(spec: BenchSpec) -> dict[str, Any]:
    """Peak memory only: one training step (after one that creates the optimizer state) and one evaluation forward
    of the larger batch, the allocator returning freed memory from the process start."""
    if spec.device == "cpu":
        return_freed_memory()
    v = _prepare(spec)
    step = eval_run = None
    if "train" in spec.phases:
        step, _ = train_step(v.model, v.cfg, spec, v.device, v.amp)
        step()
        v.result["train"] = {}
    if "eval" in spec.phases:
        eval_run = eval_step(v.model, v.cfg, spec.eval_batch_size, spec, v.device, v.amp)
        eval_run()
        v.result["eval"] = {}
    _peak_memory(v, step, eval_run)
    return v.result


def _merge_memory(result: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """The peaks of a ``memory="only"`` result into the timings of the same variant."""
    if "error" in memory:
        result["memory_error"] = memory["error"]
    if "train" in memory and "train" in result:
        result["train"].update(memory["train"])
    for key, entry in memory.get("eval", {}).items():
        if "eval" in result:
            result["eval"].setdefault(key, {}).update(entry)
    return result


def run_interleaved(specs: list[BenchSpec]) -> list[dict[str, Any]]:
    """All variants in this process, their timed runs taking turns (A B C, B C A, ...), so that a machine shared
    with other work slows every variant alike and their ratios hold. No peak memory (the models share a process).
    """

    if any("cast_once" in parse_variant(s.variant, s.dtype)[0] for s in specs):
        raise ValueError("cast_once needs one autocast region around a variant's runs: not with --interleave")
    variants = [_prepare(s) for s in specs]
    spec = specs[0]
    if "train" in spec.phases:
        steps = [train_step(v.model, v.cfg, v.spec, v.device, v.amp) for v in variants]
        times = time_interleaved([step for step, _ in steps], variants[0].device, spec.warmup, spec.runs)
        for v, (_, split), t in zip(variants, steps, times):
            v.result["train"] = train_summary(t, split, spec.warmup, spec.stat)
    if "eval" in spec.phases:
        for bs in dict.fromkeys((1, spec.eval_batch_size)):
            runs = [eval_step(v.model, v.cfg, bs, v.spec, v.device, v.amp) for v in variants]
            for v, t in zip(variants, time_interleaved(runs, variants[0].device, spec.warmup, spec.runs)):
                v.result.setdefault("eval", {})[f"batch{bs}"] = eval_summary(t, bs, spec.stat)
    return [_finish(v) for v in variants]


def _achieved(result: dict[str, Any], spec: BenchSpec) -> None:
    flops = result.get("flops")
    if not flops:
        return
    if "train" in result:
        result["train"]["achieved_flops_per_s"] = (
            flops["train_per_image"] * spec.batch_size / (result["train"]["step_ms"] / 1e3)
        )
    for entry in result.get("eval", {}).values():
        entry["achieved_flops_per_s"] = flops["eval_per_image"] * entry["expr_per_s"]


def run_isolated(spec: BenchSpec) -> dict[str, Any]:
    """``run_variant`` in a fresh Python process (its own peak memory); an error is returned, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [sys.executable, "-m", "tools.benchmark", "--_worker", str(spec_path), "--_result", str(out_path)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout)[-2000:]
            logger.error("variant %s failed (exit %s):\n%s", spec.variant, proc.returncode, tail)
            return {"variant": spec.variant, "error": f"exit {proc.returncode}: {tail[-500:]}"}
        return json.loads(out_path.read_text())


# the least value of each count flag (0: "the default" where the help says so)
LEAST = {"size": 1, "batch_size": 1, "eval_batch_size": 1, "warmup": 0, "runs": 1, "threads": 0, "matmul_size": 0}


def get_parser() -> argparse.ArgumentParser:
    p = cli_parser(
        "python -m tools.benchmark", __doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--cfg_file", default="", help="YAML config (configs/*.yaml); empty = the defaults")
    p.add_argument(
        "--opts",
        nargs="*",
        default=[],
        help="config overrides KEY VALUE ..., e.g. MODEL.TEXT.ENCODER "
        "minilm-l6 (a local text encoder) or MODEL.TEXT.ENCODER '' (precomputed language features)",
    )
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--batch_size", type=int, default=2, help="training batch")
    p.add_argument("--eval_batch_size", type=int, default=8, help="the larger evaluation batch (expressions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available")
    p.add_argument("--dtype", default="float32", choices=list(PRECISIONS), help="precision of variants naming none")
    p.add_argument(
        "--compare",
        default="fused,bf16,fused+bf16",
        help="variants measured after 'base' (every switch off), comma-separated; each joins switches "
        f"with '+': {', '.join(SWITCHES)} and a precision {', '.join(PRECISIONS)}",
    )
    p.add_argument("--no_base", action="store_true", help="do not measure the 'base' variant first")
    p.add_argument("--phases", default=",".join(PHASES), help=f"which of {', '.join(PHASES)} to run")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--matmul_size", type=int, default=0, help="side of the yardstick matmul (0: 2048 CPU, 8192 GPU)")
    p.add_argument(
        "--stat",
        choices=list(STATS),
        default="median",
        help="statistic of the timed runs reported (min: the least disturbed run, on a machine shared with others)",
    )
    p.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="each variant in its own process (auto: on CPU, where peak RSS is per process)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="all variants in one process, their timed runs taking turns: ratios that hold on a shared machine "
        "(no peak memory; not with cast_once)",
    )
    p.add_argument(
        "--malloc",
        choices=list(MALLOC_MODES),
        default="keep",
        help="glibc's malloc while timing: keep freed memory for reuse (as main.py does) or its default thresholds",
    )
    p.add_argument("--output", default="benchmark.json", help="JSON file written with every number")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the inputs")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args._worker:  # a child of run_isolated
        result = run_variant(BenchSpec(**json.loads(Path(args._worker).read_text())))
        Path(args._result).write_text(json.dumps(result))
        return result
    require_at_least(args, LEAST)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        raise ValueError(f"--phases: unknown {sorted(unknown)}, choose from {PHASES}")
    variants = ([] if args.no_base else ["base"]) + [v for v in args.compare.split(",") if v and v != "base"]
    # every BenchSpec field has its flag of the same name, except those set per variant or parsed here
    per_run = {"variant", "phases", "memory"}
    common = {f.name: getattr(args, f.name) for f in fields(BenchSpec) if f.name not in per_run} | {"phases": phases}
    for v in variants:
        variant_setup(BenchSpec(variant=v, **common))  # fail before measuring anything
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cpu")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {**common, "variants": variants, "interleave": args.interleave}
    report: dict[str, Any] = {"machine": machine_info(device), "settings": settings}
    results = []
    if args.interleave:
        logger.info("measuring %s, interleaved", ", ".join(variants))
        results = run_interleaved([BenchSpec(variant=v, **common) for v in variants])
    for v in variants if not args.interleave else []:
        logger.info("measuring %s", v)
        spec = BenchSpec(variant=v, **common)
        if not isolate:
            results.append(run_variant(spec))
        elif args.device == "cpu" and {"train", "eval"} & set(phases):
            # peak RSS in a fresh process of its own: after the timings the heap keeps freed blocks resident
            result = run_isolated(replace(spec, memory="skip"))
            if "error" not in result:
                result = _merge_memory(result, run_isolated(replace(spec, memory="only")))
            results.append(result)
        else:
            results.append(run_isolated(spec))
    report["machine"]["load_average_after"] = os.getloadavg()
    report["results"] = results
    print(format_report(report))  # first: a JSON that cannot be written (a full disk) loses no figure
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(report, indent=1))
    print(f"\nJSON: {args.output}")
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: a mistake in the flags or config is one line and status 2; 1 if a variant failed (its
    error is in the table and the JSON)."""
    reports: list[dict[str, Any]] = []
    status = run_cli("python -m tools.benchmark", lambda a: reports.append(main(a)), argv)
    failed = [r["variant"] for report in reports for r in report.get("results", ()) if "error" in r]
    if failed:
        print(f"python -m tools.benchmark: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and status == 0 else status


if __name__ == "__main__":
    sys.exit(cli())

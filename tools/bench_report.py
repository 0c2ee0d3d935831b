"""The benchmark's results as text tables (``tools.benchmark``; the machine: ``utils.machine``)."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _ratio(value: float | None, ref: float | None, inverse: bool = False) -> str:
    if not value or not ref:
        return ""
    return f" ({(ref / value if inverse else value / ref):.2f}x)"


def format_tables(results: list[dict[str, Any]], batch_size: int, eval_batch_size: int) -> str:
    """The summary table (speed-ups against the first row) and the per-part breakdown (eval, batch 1)."""
    ok = [r for r in results if "error" not in r]
    base = ok[0] if ok else {}
    big = f"batch{eval_batch_size}"
    b = eval_batch_size
    head = [
        "variant",
        f"train step ms (B={batch_size})",
        "fwd/bwd/opt ms",
        "train peak MB",
        "eval expr/s B=1",
        f"eval expr/s B={b}",
        f"eval peak MB (B={b})",
        "GFLOP/img eval/train",
        "achieved GFLOP/s train/eval",
        "matmul GFLOP/s",
        "first call s train/eval B=1",
    ]
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "failed: " + r["error"].splitlines()[-1][:60]] + [""] * (len(head) - 2))
            continue
        tr, ev, fl = r.get("train", {}), r.get("eval", {}), r.get("flops", {})
        bt, be = base.get("train", {}), base.get("eval", {})
        e1, eb = ev.get("batch1", {}), ev.get(big, {})
        rows.append(
            [
                r["variant"] + f" [{r['amp']}]",
                _fmt(tr.get("step_ms"), 0) + _ratio(tr.get("step_ms"), bt.get("step_ms"), inverse=True),
                "/".join(_fmt(tr.get(k), 0) for k in ("forward_ms", "backward_ms", "optimizer_ms")) if tr else "-",
                _fmt(tr.get("peak_mb"), 0) + _ratio(tr.get("peak_mb"), bt.get("peak_mb")),
                _fmt(e1.get("expr_per_s"), 2) + _ratio(e1.get("expr_per_s"), be.get("batch1", {}).get("expr_per_s")),
                _fmt(eb.get("expr_per_s"), 2) + _ratio(eb.get("expr_per_s"), be.get(big, {}).get("expr_per_s")),
                _fmt(eb.get("peak_mb"), 0),
                f"{fl.get('eval_per_image', 0) / 1e9:.3g}/{fl.get('train_per_image', 0) / 1e9:.3g}" if fl else "-",
                "/".join(
                    f"{e['achieved_flops_per_s'] / 1e9:.3g}" if "achieved_flops_per_s" in e else "-" for e in (tr, eb)
                ),
                "/".join(_fmt(v / 1e9, 0) for v in r["matmul_flops_per_s"].values()),
                "/".join(_fmt(d.get("first_call_s"), 1) for d in (tr, e1)),
            ]
        )
    out = [_grid(rows)]
    with_parts = [r for r in ok if "breakdown" in r]
    for key in ("eval_forward_batch1", f"eval_forward_batch{eval_batch_size}", f"train_forward_batch{batch_size}"):
        if not with_parts or key not in with_parts[0]["breakdown"]:
            continue
        names = list(with_parts[0]["breakdown"][key]["parts_ms"])
        rows = [[f"{key.replace('_', ' ')} ms"] + [r["variant"] for r in with_parts]]
        for name in names + ["total"]:
            row = [name]
            for r in with_parts:
                b = r["breakdown"][key]
                ms = b["total_ms"] if name == "total" else b["parts_ms"].get(name)
                row.append(f"{_fmt(ms)} ({100 * ms / b['total_ms']:.0f}%)" if ms is not None else "-")
            rows.append(row)
        out.append(_grid(rows))
    return "\n\n".join(out)


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The machine line (load average before and after), the settings line, then ``format_tables``."""
    m, st = report["machine"], report["settings"]
    gpu = f", {m['gpu']}" if "gpu" in m else ""
    return (
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads{gpu}), torch {m['torch']}; load average "
        f"{m['load_average'][0]:.2f} before, {m['load_average_after'][0]:.2f} after\n"
        f"config {st['cfg_file'] or 'defaults'} {' '.join(map(str, st['opts']))}; {st['size']} px; "
        f"{'medians' if st['stat'] == 'median' else 'minima'} of {st['runs']} runs after {st['warmup']} warm-up"
        f"{', variants interleaved' if st['interleave'] else ''}\n\n"
        + format_tables(report["results"], st["batch_size"], st["eval_batch_size"])
    )

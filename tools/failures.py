"""Failure analysis of an evaluation's per-expression results: IoU buckets, the words that come with failures, and
their figures (``AnalysisFailure.ipynb``).

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, as in ``tools.visualize``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

# failure buckets of the analysis: IoU < 0.1 (missed), 0.1 <= IoU < 0.5 (partial), IoU >= 0.5 (hit)
BUCKET_EDGES: tuple[float, float] = (0.1, 0.5)
# word families that referring expressions lean on; words outside them still get their own statistics
WORD_GROUPS: dict[str, frozenset[str]] = {
    "position": frozenset(
        "left right top bottom middle center centre upper lower front back leftmost rightmost topmost bottommost "
        "highest lowest far furthest farthest closest nearest corner side first second third last".split()
    ),
    "colour": frozenset(
        "red green blue yellow purple orange pink brown black white gray grey dark light striped".split()
    ),
    "size": frozenset("big small large little tiny huge tall short biggest smallest larger smaller".split()),
    "relation": frozenset("of above below over under beneath behind beside next near between with holding".split()),
}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
RESULT_KEYS = ("ref_id", "sentence", "IoU", "I", "U")


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Per-expression records of an evaluation (JSON lines: ref_id, sent_id, sentence, IoU, I, U, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-expression results not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: a JSON {type(record).__name__}, not a record (an object)")
            missing = [k for k in RESULT_KEYS if k not in record]
            if missing:
                raise ValueError(
                    f"{path}, line {number}: missing {missing} (expected per-expression records with "
                    f"{list(RESULT_KEYS)}; 'cat'/'avg' evaluations score objects, not expressions)"
                )
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as an aligned plain-text table (floats with 3 decimals), for notebook output and logs."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [columns] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def words(sentence: str) -> list[str]:
    """Lower-cased words of an expression, each once, in order of first appearance."""
    return list(dict.fromkeys(_WORD.findall(sentence.lower())))


def word_group(word: str, groups: dict[str, frozenset[str]] = WORD_GROUPS) -> str:
    return next((g for g, members in groups.items() if word in members), "other")


def word_failure_stats(
    sentences: Sequence[str], ious: Sequence[float], fail_below: float = 0.5, min_count: int = 3
) -> list[dict[str, Any]]:
    """Words that come with failures (IoU < ``fail_below``) more or less often than with successes.

    For each word in at least ``min_count`` expressions: ``fail_share`` = fraction of failed expressions that
    contain it, ``success_share`` = fraction of successful ones that do, and ``ratio`` = (fail_count + 0.5) /
    (n_fail + 1) over (success_count + 0.5) / (n_success + 1) (add-half smoothing keeps words seen on one side
    only finite). Sorted by ratio, highest first: the top words are those the model handles worst.
    """
    if len(sentences) != len(ious):
        raise ValueError(f"word_failure_stats: {len(sentences)} sentences but {len(ious)} IoU values")
    failed = np.asarray(ious, dtype=np.float64) < fail_below
    n_fail, n_success = int(failed.sum()), int((~failed).sum())
    counts: dict[str, list[int]] = {}  # word -> [in failures, in successes]
    for sentence, fail in zip(sentences, failed):
        for word in words(sentence):
            counts.setdefault(word, [0, 0])[0 if fail else 1] += 1
    rows = []
    for word, (f, s) in counts.items():
        if f + s < min_count:
            continue
        rows.append({
            "word": word, "group": word_group(word), "count": f + s, "fail_count": f, "success_count": s,
            "fail_share": f / n_fail if n_fail else math.nan,
            "success_share": s / n_success if n_success else math.nan,
            "fail_rate": f / (f + s),
            "ratio": ((f + 0.5) / (n_fail + 1)) / ((s + 0.5) / (n_success + 1)),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (-r["ratio"], -r["count"], r["word"]))


def group_failure_stats(
    sentences: Sequence[str], ious: Sequence[float], fail_below: float = 0.5
) -> list[dict[str, Any]]:
    """Per word group (``WORD_GROUPS``): expressions using any of its words, their failure rate and mean IoU.

    A last row ``all`` covers every expression, the baseline to compare the groups with.
    """
    if len(sentences) != len(ious):
        raise ValueError(f"group_failure_stats: {len(sentences)} sentences but {len(ious)} IoU values")
    ious = np.asarray(ious, dtype=np.float64)
    sets = [set(words(s)) for s in sentences]
    rows = []
    for group, members in [*WORD_GROUPS.items(), ("all", None)]:
        sel = np.array([members is None or bool(ws & members) for ws in sets], dtype=bool)
        n = int(sel.sum())
        rows.append({
            "group": group, "expressions": n,
            "fail_rate": float((ious[sel] < fail_below).mean()) if n else math.nan,
            "mean_IoU": float(ious[sel].mean()) if n else math.nan,
        })  # fmt: skip
    return rows


def figure_word_failures(stats: Sequence[dict[str, Any]], top: int = 15) -> Figure:
    """Horizontal bars of ``fail_share`` vs ``success_share`` for the ``top`` words of ``word_failure_stats``."""
    rows = list(stats)[:top]
    if not rows:
        raise ValueError("figure_word_failures: no words (lower min_count, or evaluate more expressions)")
    fig = Figure(figsize=(7, 0.32 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    ax.barh(
        y + 0.2,
        [100 * np.nan_to_num(r["fail_share"]) for r in rows],
        0.4,
        color="#cc3311",
        label="share of failures with the word",
    )
    ax.barh(
        y - 0.2,
        [100 * np.nan_to_num(r["success_share"]) for r in rows],
        0.4,
        color="#009988",
        label="share of successes with the word",
    )
    ax.set_yticks(y, [f"{r['word']} ({r['group']}, n={r['count']})" for r in rows], fontsize=8)
    ax.set(xlabel="% of expressions", title="words that come with failures (top) vs successes")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def failure_buckets(ious: Iterable[float], edges: tuple[float, float] = BUCKET_EDGES) -> list[dict[str, Any]]:
    """Counts and shares of IoU < lo, lo <= IoU < hi and IoU >= hi (``edges = (lo, hi)``)."""
    ious = np.asarray(list(ious), dtype=np.float64)
    lo, hi = edges
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"failure_buckets: edges must satisfy 0 <= lo < hi <= 1, got {edges}")
    counts = [(ious < lo).sum(), ((ious >= lo) & (ious < hi)).sum(), (ious >= hi).sum()]
    labels = [f"IoU < {lo:g}", f"{lo:g} <= IoU < {hi:g}", f"IoU >= {hi:g}"]
    n = len(ious)
    return [{"bucket": b, "count": int(c), "share": c / n if n else math.nan} for b, c in zip(labels, counts)]


def figure_iou_histogram(ious: Sequence[float], bins: int = 20, edges: tuple[float, float] = BUCKET_EDGES) -> Figure:
    """Histogram of per-expression IoU with the bucket edges marked, next to a bar chart of the bucket shares."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        raise ValueError("figure_iou_histogram: no IoU values (is the results file empty?)")
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_hist, ax_bar = fig.subplots(1, 2, width_ratios=[2, 1])
    ax_hist.hist(ious, bins=bins, range=(0, 1), color="#4477aa", edgecolor="white")
    for edge in edges:
        ax_hist.axvline(edge, color="#cc3311", linestyle="--", linewidth=1)
    ax_hist.set(
        xlabel="IoU", ylabel="expressions", xlim=(0, 1), title=f"{ious.size} expressions, mean IoU {ious.mean():.3f}"
    )
    buckets = failure_buckets(ious, edges)
    bars = ax_bar.bar(range(3), [b["share"] * 100 for b in buckets], color=["#cc3311", "#ee7733", "#009988"])
    ax_bar.bar_label(bars, labels=[f"{b['share']:.1%}\n({b['count']})" for b in buckets], fontsize=8)
    ax_bar.set_xticks(range(3), [b["bucket"].replace(" <= ", " <=\n") for b in buckets], fontsize=8)
    ax_bar.set(ylabel="% of expressions", ylim=(0, 115), title="failure buckets")
    return fig

"""How long ``tools.demo.Predictor.predict`` takes in float32 and under bf16 autocast (``--amp bf16`` of
``python -m tools.demo`` and ``python -m tools.web``): one photo-sized image, 1 and 3 expressions, the two precisions
taking turns on the same weights; medians, and the per-round ratio float32 / bf16.

The default is the authors' released model's shape (``configs/swin_base_refcoco.yaml``: Swin-B, window 12, 480 px)
with a BERT-base shaped text encoder, random weights (nothing is downloaded; the speed does not depend on the
values). Run from the repository root (the figures: docs/inference.md)::

    python docs/bench_predict.py --rounds 5 --threads 2 --json docs/benchmarks/predict_swin_b_480.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as docs/bench_predict.py

from configs import get_config  # noqa: E402
from models import build_model  # noqa: E402
from models.text import MINILM_ALIAS, load_tokenizer  # noqa: E402
from tools.demo import Predictor  # noqa: E402
from utils.machine import code_version, machine_info  # noqa: E402

EXPRESSIONS = ["the man on the left in a red shirt", "the dog", "a blue car parked near the tree"]


def time_predictors(
    predictors: dict[str, Predictor], image: np.ndarray, texts: list[str], rounds: int
) -> dict[str, Any]:
    """Each predictor once to warm up, then ``rounds`` rounds of one call each, in turn. Returns the median seconds
    per precision, the per-round ratios of the first precision's time over each other's, and their median."""
    for predictor in predictors.values():
        predictor.predict(image, texts)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict(image, texts)
            times[name].append(time.perf_counter() - start)
    first, *others = predictors
    out: dict[str, Any] = {"expressions": len(texts), "median_s": {n: statistics.median(t) for n, t in times.items()}}
    for name in others:
        ratios = [a / b for a, b in zip(times[first], times[name])]
        out[f"{first}_over_{name}"] = {"per_round": ratios, "median": statistics.median(ratios)}
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg_file", default="configs/swin_base_refcoco.yaml")
    p.add_argument("--opts", nargs="+", default=(), metavar="KEY VALUE", help="config overrides")
    p.add_argument("--image_size", default="480x640", help="the photo, HxW (default: %(default)s)")
    p.add_argument("--expressions", default="1,3", help="expression counts timed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ["MODEL.PRETRAINED_SWIN", "", *args.opts]
        if "MODEL.TEXT.ENCODER" not in opts:
            from transformers import BertConfig

            BertConfig().save_pretrained(Path(tmp) / "bert")  # bert-base-uncased's shape, random weights
            opts += ["MODEL.TEXT.ENCODER", str(Path(tmp) / "bert")]
        cfg = get_config(args.cfg_file, opts)
        torch.manual_seed(0)
        model = build_model(cfg, pretrained=False).eval()
    tokenizer = load_tokenizer(MINILM_ALIAS)  # bert-base-uncased's vocabulary
    predictors = {amp or "float32": Predictor(model, cfg, tokenizer, "cpu", amp) for amp in ("", "bf16")}
    h, w = (int(v) for v in args.image_size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rows = []
    for count in (int(c) for c in args.expressions.split(",")):
        row = time_predictors(predictors, image, (EXPRESSIONS * count)[:count], args.rounds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        setup = {"cfg_file": args.cfg_file, "opts": list(args.opts), "image": [h, w], "rounds": args.rounds,
                 "input": cfg.DATA.SIZE, "machine": machine_info(torch.device("cpu")),
                 "code": code_version(Path(__file__).resolve().parents[1])}  # fmt: skip
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()

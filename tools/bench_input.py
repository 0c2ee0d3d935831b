"""Input-pipeline throughput: ``ReferDataset`` items per second in one process (what one DataLoader worker gives).

    python -m tools.bench_input --size 480 --items 120

Builds a small RefCOCO-layout folder in a temporary directory: 640x480 JPEG photographs (scikit-learn's two sample
photographs, resized and saved at quality 90, ~100-200 KB like COCO's files), one object per image annotated with two
polygon parts that do not overlap (as an occluded object's), and times ``dataset[i]`` in training form (one
expression) and in evaluation form (all expressions, the original-size mask too): the official preprocessing
(``DATA.RESIZE pil``, ``DATA.MASK_PARTS official``) and the fast one (``cv2``, ``union``). One thread for torch and
OpenCV, as in a DataLoader worker on a busy machine. Prints one line per setting: items per CPU second (best of
``--repeats``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from utils.machine import cpu_name

from .cli import cli_parser, require_at_least, run_cli

__all__ = ["make_refer_folder", "bench", "main"]


def make_refer_folder(root: Path, images: int = 16, width: int = 640, height: int = 480) -> Path:
    """A RefCOCO-layout folder under ``root`` with ``images`` JPEGs and one two-part object each; returns ``root``."""
    import sklearn

    photos = Path(sklearn.__file__).parent / "datasets" / "images"
    sources = [Image.open(photos / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    infos, anns, refs = [], [], []
    for i in range(images):
        name = f"COCO_train2014_{i:012d}.jpg"
        photo = sources[i % 2].resize((width, height), Image.BICUBIC)
        if i >= 2:  # different pixels per file: no decoder-side caching of identical files
            photo = Image.fromarray(np.roll(np.asarray(photo), 7 * i, axis=1))
        photo.save(image_dir / name, quality=90)
        infos.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        x0, y0 = 40 + 10 * i, 60
        parts = [[x0, y0, x0 + 200, y0, x0 + 220, y0 + 180, x0, y0 + 200],
                 [x0 + 230, y0 + 10, x0 + 330, y0 + 20, x0 + 300, y0 + 200]]  # fmt: skip
        anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1, "segmentation": parts, "area": 1.0,
                     "bbox": [x0, y0, 300, 300], "iscrowd": 0})  # fmt: skip
        sents = [{"sent_id": 3 * i + k, "raw": s, "sent": s, "tokens": s.split()}
                 for k, s in enumerate(["the thing on the left", "big object", "the one in the middle near the top"])]
        refs.append({"ref_id": i, "ann_id": 100 + i, "image_id": i + 1, "category_id": 1, "split": "val",
                     "sentences": sents, "sent_ids": [s["sent_id"] for s in sents], "file_name": name})  # fmt: skip
    (root / "refcoco").mkdir(exist_ok=True)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    categories = [{"id": 1, "name": "thing", "supercategory": "thing"}]
    instances = {"images": infos, "annotations": anns, "categories": categories}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    return root


def bench(dataset: torch.utils.data.Dataset, items: int, repeats: int) -> float:
    """Items per CPU second of ``dataset[i]`` over ``items`` items cycling through the dataset, best of ``repeats``.

    CPU time of this process (one thread), not wall time: on a shared machine it is what one worker gives when it
    has a core to itself, and it does not move with the other processes' load."""
    dataset[0]  # first-call costs (imports, allocator) out of the timing
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for i in range(items):
            dataset[i % len(dataset)]
        best = max(best, items / (time.process_time() - start))
    return best


def get_parser() -> argparse.ArgumentParser:
    p = cli_parser("python -m tools.bench_input", __doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=480, help="network input size (square)")
    p.add_argument("--items", type=int, default=120, help="dataset items timed in each repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats: the best is reported")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_parser().parse_args(argv)
    require_at_least(args, {"size": 1, "items": 1, "repeats": 1})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from data import ReferDataset

    accepts = inspect.signature(ReferDataset).parameters
    settings = [("pil", "official"), ("cv2", "union")] if "resize" in accepts else [("(this version's)", "")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_refer_folder(Path(tmp))
        for method, parts in settings:
            for form, eval_mode in (("train", False), ("eval", True)):
                kwargs = {"resize": method, "mask_parts": parts} if "resize" in accepts else {}
                ds = ReferDataset(root, "refcoco", "unc", "val", "minilm-l6", image_size=args.size,
                                  eval_mode=eval_mode, **kwargs)  # fmt: skip
                rate = bench(ds, args.items, args.repeats)
                rows.append({"resize": method, "mask_parts": parts, "form": form, "size": args.size,
                             "items_per_cpu_s": round(rate, 1)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    print(f"# {cpu_name()}, {os.cpu_count()} cores, one thread; torch {torch.__version__}, Pillow "
          f"{Image.__version__}, OpenCV {cv2.__version__}")  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(run_cli("python -m tools.bench_input", main))

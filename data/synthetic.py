"""A synthetic referring-segmentation dataset in the REFER (RefCOCO) format.

Each image holds 2-5 coloured shapes (circle, heart, square, triangle, star; five colours; small or big; some
overlapping) on a textured background. Every object that can be told apart gets 1-3 expressions, each of which
identifies it uniquely among all objects of its image: first by the fewest attributes that suffice ("the red
one", "the big star"), then for variety by more attributes, by position among the objects that share its
attributes ("the left red circle", "the topmost square") or by a relation to another object ("the circle to the
left of the blue square"). Splits: train, val, testA (only round shapes are referred to, as RefCOCO's testA holds
people) and testB (only angular shapes).

Written files (the REFER layout, read by ``refer.REFER(root, 'synthetic', 'unc')``)::

    <root>/synthetic/refs(unc).p       refs as RefCOCO's, polygons in instances.json
    <root>/synthetic/instances.json
    <root>/synthetic/attributes.json   structured attributes of objects and expressions (for checks)
    <root>/synthetic/generator.json    generation parameters; written last, so its presence means complete
    <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg

The drawing of one image is in ``data.synthetic_draw``, the wording in ``data.synthetic_text``.
Run ``python -m data.synthetic --help``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.synthetic_draw import CAT_ID, CATEGORIES, COLOURS, SIZE_RANGES, SUPERCATEGORY, make_image
from data.synthetic_text import describe_object

__all__ = [
    "generate", "ensure_synthetic", "synthetic_sizes", "main", "CATEGORIES", "COLOURS", "SIZE_RANGES", "GROUP_OF_SPLIT",
    "SPLIT_ORDER",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
GROUP_OF_SPLIT = {"testA": "round", "testB": "angular"}
IMAGE_ID_OFFSET = 1_000_000  # ids above every COCO train2014 id, so files never collide with real COCO images
SPLIT_ORDER = ("train", "val", "testA", "testB")


def _split_sizes(num_images: int, split_sizes: dict[str, int] | None) -> dict[str, int]:
    if split_sizes is not None:
        unknown = set(split_sizes) - set(SPLIT_ORDER)
        if unknown:
            raise ValueError(f"split_sizes has unknown splits {sorted(unknown)}; expected {SPLIT_ORDER}")
        return {s: int(split_sizes.get(s, 0)) for s in SPLIT_ORDER}
    held_out = max(1, round(num_images / 11))
    if num_images < 4 * held_out:
        raise ValueError(f"num_images={num_images} is too small for train/val/testA/testB; give at least 4")
    return {"train": num_images - 3 * held_out, "val": held_out, "testA": held_out, "testB": held_out}


def synthetic_sizes(num_images: int, eval_images: int = 0) -> dict[str, Any]:
    """``generate`` / ``ensure_synthetic`` keyword arguments for ``num_images`` in all, ``eval_images`` of them in
    each of val, testA and testB (0: the default one eleventh each)."""
    if eval_images < 0:
        raise ValueError(f"images per held-out split must be >= 0 (0: the default), got {eval_images}")
    if eval_images == 0:
        return {"num_images": num_images}
    train = num_images - 3 * eval_images
    if train < 1:
        raise ValueError(
            f"{num_images} synthetic images leave none for train after 3 x {eval_images} for val, testA and testB "
            "(DATA.SYNTHETIC_IMAGES, DATA.SYNTHETIC_EVAL_IMAGES)"
        )
    return {"num_images": num_images,
            "split_sizes": {"train": train, "val": eval_images, "testA": eval_images, "testB": eval_images}}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate(
    root: str | Path,
    num_images: int = 1100,
    seed: int = 0,
    split_sizes: dict[str, int] | None = None,
    min_size: int = 128,
    max_size: int = 256,
    min_objects: int = 2,
    max_objects: int = 5,
    max_expressions: int = 3,
    repeat_prob: float = 0.3,
    spatial_weight: float = 0.5,
    jpeg_quality: int = 90,
    workers: int = 0,
) -> Path:
    """Write the synthetic dataset under ``root``; returns ``<root>/synthetic``.

    Args:
        num_images: total images; split 8:1:1:1 into train/val/testA/testB unless ``split_sizes`` is given
            (a dict split -> number of images; its total replaces ``num_images``).
        seed: the same seed and arguments give byte-identical annotations and images.
        min_size, max_size: the shorter image side is uniform in [min_size, max_size], the aspect at most 4:3.
        min_objects, max_objects: objects drawn per image (one that finds no room is dropped).
        max_expressions: each object gets 1..max_expressions expressions.
        repeat_prob: chance that a new object copies an existing object's colour (and, separately, kind).
        spatial_weight: weight of positional and of relational expressions (each) against attribute-only ones
            when drawing an object's expressions after the first; lower makes the task easier.
        workers: processes drawing images (0: one per available CPU); the files do not depend on it.
    """
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if max_expressions < 1:
        raise ValueError(f"max_expressions must be >= 1, got {max_expressions}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per available CPU), got {workers}")
    args = dict(
        min_size=min_size,
        max_size=max_size,
        min_objects=min_objects,
        max_objects=max_objects,
        max_expressions=max_expressions,
        repeat_prob=repeat_prob,
        spatial_weight=spatial_weight,
    )
    params = _params(num_images, split_sizes, seed=seed, jpeg_quality=jpeg_quality, **args)
    sizes = params["split_sizes"]

    root = Path(root)
    data_dir, image_dir = root / "synthetic", root / "images" / "mscoco" / "images" / "train2014"
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "generator.json").unlink(missing_ok=True)  # incomplete until rewritten at the end

    tic = time.time()
    splits = [s for s in SPLIT_ORDER for _ in range(sizes[s])]
    draw = partial(_draw_image, seed=seed, args=args, jpeg_quality=jpeg_quality, image_dir=image_dir)
    workers = min(workers or _available_cpus(), max(len(splits), 1))
    if workers > 1:
        # each image depends on its own generator only: the output is byte-identical for any number of workers.
        # The children (forked on Linux) run only NumPy, OpenCV and pycocotools, never torch.
        chunk = max(1, min(64, len(splits) // (4 * workers)))
        with ProcessPoolExecutor(workers) as pool:
            drawn = list(pool.map(draw, range(len(splits)), splits, chunksize=chunk))
    else:
        drawn = [draw(index, split) for index, split in enumerate(splits)]

    images, annotations, refs = [], [], []
    attributes: dict[str, dict] = {"objects": {}, "sentences": {}}
    for split, (image, objects, described) in zip(splits, drawn):
        image_id = image["id"]
        images.append(image)
        ann_ids = []
        for obj in objects:
            ann_id = len(annotations) + 1
            ann_ids.append(ann_id)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CAT_ID[obj["kind"]],
                    "segmentation": obj["segmentation"],
                    "area": obj["area"],
                    "bbox": obj["bbox"],
                    "iscrowd": 0,
                }
            )
            attributes["objects"][str(ann_id)] = {k: obj[k] for k in ("kind", "colour", "size", "occluded")}
        for t, expressions in described:
            sentences, sent_ids = [], []
            for desc, text, raw in expressions:
                sent_id = len(attributes["sentences"])
                sentences.append({"tokens": text.split(), "raw": raw, "sent_id": sent_id, "sent": text})
                sent_ids.append(sent_id)
                attributes["sentences"][str(sent_id)] = desc
            refs.append(
                {
                    "sent_ids": sent_ids,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_ids[t]}.jpg",
                    "ann_id": ann_ids[t],
                    "ref_id": len(refs),
                    "image_id": image_id,
                    "split": split,
                    "sentences": sentences,
                    "category_id": CAT_ID[objects[t]["kind"]],
                }
            )

    instances = {
        "info": {"description": "LAVT synthetic referring dataset", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    _atomic_write(data_dir / "instances.json", json.dumps(instances, separators=(",", ":")).encode())
    _atomic_write(data_dir / "refs(unc).p", pickle.dumps(refs, protocol=4))
    _atomic_write(data_dir / "attributes.json", json.dumps(attributes, separators=(",", ":")).encode())
    _atomic_write(data_dir / "generator.json", json.dumps(params, indent=1).encode())
    logger.info(
        "synthetic REFER dataset: %d images, %d objects, %d refs, %d sentences in %.1fs -> %s",
        len(images),
        len(annotations),
        len(refs),
        len(attributes["sentences"]),
        time.time() - tic,
        root,
    )
    return data_dir


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _draw_image(
    index: int, split: str, *, seed: int, args: dict[str, Any], jpeg_quality: int, image_dir: Path
) -> tuple[dict, list[dict], list]:
    """Draw image ``index`` of the dataset (``args``: ``make_image``'s), write its JPEG into ``image_dir`` and
    describe its objects. Returns the image's COCO record, its objects (attributes, polygons, area, bbox) and
    ``[(object index, [(description, text, raw), ...]), ...]`` for the objects that get expressions.
    """
    rng = np.random.default_rng([seed, index])
    group = GROUP_OF_SPLIT.get(split)
    img, objects = make_image(rng, args, group)
    image_id = IMAGE_ID_OFFSET + index
    file_name = f"COCO_train2014_{image_id:012d}.jpg"
    ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {file_name} as JPEG")
    (image_dir / file_name).write_bytes(jpeg.tobytes())
    described = []
    for t, obj in enumerate(objects):
        if group and SUPERCATEGORY[obj["kind"]] != group:
            continue
        expressions = describe_object(
            objects, t, img.shape[1], img.shape[0], rng, args["max_expressions"], args["spatial_weight"]
        )
        if not expressions:
            continue  # identical twins side by side: nothing tells this object apart
        # the random capitals are drawn right after each object's expressions, as they always were
        described.append((t, [(desc, text, text[0].upper() + text[1:] if rng.random() < 0.3 else text)
                              for desc, text in expressions]))
    record = {"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
    return record, objects, described


def _params(num_images: int, split_sizes: dict[str, int] | None, **args: Any) -> dict[str, Any]:
    """What generator.json records: the version, the split sizes and every other argument of ``generate``."""
    return dict(version=GENERATOR_VERSION, split_sizes=_split_sizes(num_images, split_sizes), **args)


def ensure_synthetic(root: str | Path, **kwargs: Any) -> Path:
    """``generate(root, **kwargs)`` unless a complete dataset made with the same arguments is already there."""
    bound = inspect.signature(generate).bind(root, **kwargs)
    bound.apply_defaults()
    wanted = {k: v for k, v in bound.arguments.items() if k not in ("root", "workers")}
    data_dir = Path(root) / "synthetic"
    meta = data_dir / "generator.json"
    if meta.is_file():
        if json.loads(meta.read_text()) == _params(**wanted):
            return data_dir
        logger.info("synthetic dataset in %s was made with other arguments; regenerating", data_dir)
    return generate(root, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic REFER-format referring segmentation dataset.")
    parser.add_argument("--root", default="data/synthetic_refer", help="REFER root (DATA.ROOT)")
    parser.add_argument("--num-images", type=int, default=1100, help="total images, split 8:1:1:1")
    parser.add_argument("--eval-images", type=int, default=0,
                        help="images in each of val, testA and testB (0: one eleventh of --num-images each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=128, help="smallest shorter image side")
    parser.add_argument("--max-size", type=int, default=256, help="largest image side")
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=5)
    parser.add_argument("--max-expressions", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes drawing images (0: one per available CPU); the files do not depend on it")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical dataset exists")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kwargs = dict(
        **synthetic_sizes(a.num_images, a.eval_images),
        seed=a.seed,
        min_size=a.min_size,
        max_size=a.max_size,
        min_objects=a.min_objects,
        max_objects=a.max_objects,
        max_expressions=a.max_expressions,
        workers=a.workers,
    )
    (generate if a.force else ensure_synthetic)(a.root, **kwargs)


if __name__ == "__main__":
    main()

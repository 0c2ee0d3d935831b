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
    <root>/synthetic/generating.json   the same, present only while a generation runs (or after one was cut off)
    <root>/synthetic/generation.lock   held by ``main.py`` and ``tools.synthetic`` while they ensure the dataset
                                       (``engine.synthetic_once``): not a file of the dataset, not written here
    <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg

``ensure_synthetic`` is the safe way in: it generates only into a new or empty folder, refuses a folder that holds
anything but a synthetic dataset, and before regenerating with other arguments removes the files the previous
generation wrote (and nothing else). ``generate`` writes without looking at what is there.

The drawing of one image is in ``data.synthetic_draw``, the wording in ``data.synthetic_text``, the checks of the
arguments in ``data.synthetic_args``, the root's layout and what it may hold in ``data.synthetic_root``.
The command line is ``python -m tools.synthetic``.
"""

from __future__ import annotations

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

import numpy as np

from data.opencv import cv2
from data.synthetic_args import SPLIT_ORDER, check_arguments, images_per_split, synthetic_sizes
from data.synthetic_draw import CAT_ID, CATEGORIES, COLOURS, SIZE_RANGES, SUPERCATEGORY, make_image
from data.synthetic_root import (
    ANNOTATION_FILES,
    COMPLETE,
    IMAGE_ID_OFFSET,
    IMAGE_SUBDIR,
    RUNNING,
    SyntheticRootError,
    check_synthetic_root,
    image_file,
    make_folders,
    remove_generation,
    temporary,
)
from data.synthetic_text import describe_object

__all__ = [
    "generate", "ensure_synthetic", "synthetic_sizes", "CATEGORIES", "COLOURS", "SIZE_RANGES", "GROUP_OF_SPLIT",
    "SPLIT_ORDER", "SyntheticRootError",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
GROUP_OF_SPLIT = {"testA": "round", "testB": "angular"}


def _write(path: Path, data: bytes) -> None:
    """``data`` into ``path``; a write that fails (a full disk, ...) is one SyntheticRootError naming the file, what
    it wrote of it removed (the run's generating.json lets the next run remove the rest)."""
    try:
        path.write_bytes(data)
    except OSError as e:
        path.unlink(missing_ok=True)
        why = f"{e.strerror or e}; the next run into that root removes what this one wrote"
        raise SyntheticRootError(f"cannot write the synthetic dataset's {path} (DATA.ROOT, --root): {why}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = temporary(path)
    _write(tmp, data)
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
    check_arguments(min_size, max_size, min_objects, max_objects, max_expressions, workers, seed)
    args = dict(min_size=min_size, max_size=max_size, min_objects=min_objects, max_objects=max_objects,
                max_expressions=max_expressions, repeat_prob=repeat_prob, spatial_weight=spatial_weight)  # fmt: skip
    params = _params(num_images, split_sizes, seed=seed, jpeg_quality=jpeg_quality, **args)
    sizes = params["split_sizes"]

    root = Path(root)
    data_dir, image_dir = root / "synthetic", root / IMAGE_SUBDIR
    make_folders(root, data_dir, image_dir)
    # before the first image: a cut-off run leaves a record of what it was writing (ensure_synthetic cleans it up)
    _atomic_write(data_dir / RUNNING, json.dumps(params, indent=1).encode())
    (data_dir / COMPLETE).unlink(missing_ok=True)  # incomplete until rewritten at the end

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
    instances_file, refs_file, attributes_file = ANNOTATION_FILES
    _atomic_write(data_dir / instances_file, json.dumps(instances, separators=(",", ":")).encode())
    # plain lists, dicts, strings and ints only: REFER reads refs through an unpickler that admits nothing else
    _atomic_write(data_dir / refs_file, pickle.dumps(refs, protocol=4))
    _atomic_write(data_dir / attributes_file, json.dumps(attributes, separators=(",", ":")).encode())
    _atomic_write(data_dir / COMPLETE, json.dumps(params, indent=1).encode())
    (data_dir / RUNNING).unlink()
    logger.info("synthetic REFER dataset: %d images, %d objects, %d refs, %d sentences in %.1fs -> %s", len(images),
                len(annotations), len(refs), len(attributes["sentences"]), time.time() - tic, root)  # fmt: skip
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
    image_id, file_name = IMAGE_ID_OFFSET + index, image_file(index)
    ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {file_name} as JPEG")
    _write(image_dir / file_name, jpeg.tobytes())
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
    return dict(version=GENERATOR_VERSION, split_sizes=images_per_split(num_images, split_sizes), **args)


def wanted_params(root: str | Path, **kwargs: Any) -> dict[str, Any]:
    """What ``generate(root, **kwargs)`` would record in generator.json; its arguments' refusals (ValueError) are
    raised here, before anything is written, removed or locked."""
    bound = inspect.signature(generate).bind(root, **kwargs)
    bound.apply_defaults()
    check_arguments(*(bound.arguments[k] for k in inspect.signature(check_arguments).parameters))
    return _params(**{k: v for k, v in bound.arguments.items() if k not in ("root", "workers")})


def ensure_synthetic(root: str | Path, force: bool = False, **kwargs: Any) -> Path:
    """``generate(root, **kwargs)`` unless a complete dataset made with the same arguments is already there
    (``force``: regenerate it all the same). Returns ``<root>/synthetic``.

    - ``root`` new, or holding no file: generated there, with a WARNING naming the absolute path (a mistyped
      DATA.ROOT shows at once).
    - ``root`` holding files but no synthetic dataset (no ``synthetic/generator.json``, nor the ``generating.json``
      of a generation cut off): SyntheticRootError, nothing written.
    - a dataset made with other arguments, or cut off: the images and annotation files it wrote are removed
      (nothing else), with a WARNING, then the dataset is generated anew: no stale image remains.
    """
    wanted = wanted_params(root, **kwargs)  # refused before a dataset made with others is removed for them
    root = Path(root)
    where = root.resolve()
    records, count = check_synthetic_root(root)
    if not records:
        make_folders(root, root)  # a root that cannot be: refused before the warning that it is new
        logger.warning("generating a new synthetic dataset in %s (there was none: check DATA.ROOT if you meant "
                       "an existing one)", where)
        return generate(root, **kwargs)
    previous = records.get(COMPLETE)
    # RUNNING wins over COMPLETE: both are present only when a run was cut off right after its start or before its end
    if RUNNING in records:
        reason = "was cut off while being generated"
    elif previous == wanted:
        if not force:
            return root / "synthetic"
        reason = "is regenerated on request (force)"
    else:
        changed = [f"{k} {previous.get(k)!r} -> {wanted.get(k)!r}"
                   for k in sorted(set(previous) | set(wanted)) if previous.get(k) != wanted.get(k)]
        reason = "was made with other arguments (" + "; ".join(changed) + ")"
    removed = remove_generation(root, count)
    logger.warning("synthetic dataset in %s %s: removed the %d files it wrote (its images and annotation files), "
                   "generating it anew", where, reason, removed)
    return generate(root, **kwargs)


if __name__ == "__main__":  # the command line is in tools/, where it can take the root's generation lock
    import sys

    print("python -m data.synthetic: error: the command is python -m tools.synthetic (same options)", file=sys.stderr)
    raise SystemExit(2)

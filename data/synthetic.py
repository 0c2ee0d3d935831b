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
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from data.synthetic_text import describe_object

__all__ = [
    "generate", "ensure_synthetic", "synthetic_sizes", "main", "CATEGORIES", "COLOURS", "SIZE_RANGES", "GROUP_OF_SPLIT",
    "SPLIT_ORDER",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 35),
    "purple": (145, 55, 195),
}
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "round"},
    {"id": 2, "name": "heart", "supercategory": "round"},
    {"id": 3, "name": "square", "supercategory": "angular"},
    {"id": 4, "name": "triangle", "supercategory": "angular"},
    {"id": 5, "name": "star", "supercategory": "angular"},
]
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}
SUPERCATEGORY = {c["name"]: c["supercategory"] for c in CATEGORIES}
GROUP_OF_SPLIT = {"testA": "round", "testB": "angular"}
# object extent (bounding size) as a fraction of the image's shorter side; the gap keeps "small"/"big" unambiguous
# even after an image of aspect <= 4:3 is squashed to a square (0.25 * 4/3 < 0.34). Referred objects in RefCOCO are
# large (people, animals, furniture); version 1's 0.13-0.18 / 0.26-0.34 made 12-px shapes at the demo's 96 px.
SIZE_RANGES = {"small": (0.19, 0.25), "big": (0.34, 0.42)}
IMAGE_ID_OFFSET = 1_000_000  # ids above every COCO train2014 id, so files never collide with real COCO images
MIN_VISIBLE = 0.8  # an occluded object keeps at least this fraction of its area
SPLIT_ORDER = ("train", "val", "testA", "testB")


def _shape_points(kind: str, r: float, angle: float) -> np.ndarray:
    """Outline of a shape of half-extent ``r`` around the origin, y down. Returns [K, 2]."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 36, endpoint=False)
        return r * np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y - (y.max() + y.min()) / 2], 1) * (r / 16)
    elif kind == "square":
        pts = 0.85 * r * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif kind == "triangle":
        t = np.deg2rad([-90, 30, 150])
        pts = 1.1 * r * np.stack([np.cos(t), np.sin(t)], 1)
        pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2  # centre the box, not the centroid
    elif kind == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.05 * r, 0.45 * r)
        pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {[c['name'] for c in CATEGORIES]}")
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted, low-saturation texture: smooth noise, optional stripes or checks, pixel noise. Returns [H, W, 3]."""
    base = rng.uniform(60, 200) + rng.uniform(-15, 15, 3)
    gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    # mostly brightness, little hue: object colours must stay the most saturated thing in the picture
    coarse = (rng.uniform(-35, 35, (gh, gw, 1)) + rng.uniform(-8, 8, (gh, gw, 3))).astype(np.float32)
    img = base + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    pattern = rng.integers(3)
    if pattern:
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        if pattern == 1:  # stripes at a random angle
            theta, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
            wave = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period)
        else:  # checks
            cell = int(rng.integers(6, 18))
            wave = ((xs // cell + ys // cell) % 2) * 2 - 1
        img += rng.uniform(6, 14) * wave[..., None]
    img += rng.normal(0, 4, (h, w, 1)).astype(np.float32)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Fill ``mask`` with ``rgb`` under a soft linear shading and slight noise, in place."""
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(theta) + ys * np.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    shade = 0.85 + 0.25 * ramp
    colour = np.clip(np.asarray(rgb, np.float32) + rng.uniform(-15, 15, 3), 0, 255)
    img[ys, xs] = colour * shade[:, None] + rng.normal(0, 3, (len(ys), 1))


def _rasterise(polygons: list[list[float]], h: int, w: int) -> tuple[dict, np.ndarray]:
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    return rle, mask_utils.decode(rle)


def _place_objects(
    rng: np.random.Generator, h: int, w: int, n: int, group: str | None, repeat_prob: float
) -> list[dict[str, Any]]:
    """Sample kinds, colours, sizes and positions; later objects lie on top. Returns objects with full masks."""
    kinds = [c["name"] for c in CATEGORIES]
    group_kinds = [k for k, g in SUPERCATEGORY.items() if g == group]
    colours = list(COLOURS)
    short = min(h, w)
    objects: list[dict[str, Any]] = []
    for i in range(n):
        # repeat_prob: copy an attribute of an existing object, so that colour or kind alone often does not
        # suffice and expressions need several attributes, positions or relations
        if i < 2 and group_kinds:
            kind = str(rng.choice(group_kinds))
        elif objects and rng.random() < repeat_prob:
            kind = objects[int(rng.integers(len(objects)))]["kind"]
        else:
            kind = str(rng.choice(kinds))
        if objects and rng.random() < repeat_prob:
            colour = objects[int(rng.integers(len(objects)))]["colour"]
        else:
            colour = str(rng.choice(colours))
        size = "big" if rng.random() < 0.5 else "small"
        r = rng.uniform(*SIZE_RANGES[size]) * short / 2
        angle = 0.0 if kind == "circle" else rng.uniform(-0.17, 0.17)
        rel = _shape_points(kind, r, angle)
        lo, hi = -rel.min(0) + 1, np.array([w, h]) - rel.max(0) - 1
        for _ in range(40):
            centre = rng.uniform(lo, hi)
            # centre distance >= 0.75 * (sum of half-extents): shapes may overlap a little, never nest; shapes of
            # one colour never touch, or they would merge into one blob
            if all(
                np.hypot(*(centre - o["centre"])) >= (1.15 if o["colour"] == colour else 0.75) * (r + o["r"])
                for o in objects
            ):
                poly = np.round(centre + rel, 2)
                mask = _rasterise([poly.ravel().tolist()], h, w)[1].astype(bool)
                if all(((o["visible"] & ~mask).sum() >= MIN_VISIBLE * o["full_area"]) for o in objects):
                    break
        else:
            continue  # no room: drop this object
        for o in objects:
            o["visible"] &= ~mask
        objects.append(
            dict(
                kind=kind,
                colour=colour,
                size=size,
                r=r,
                centre=centre,
                polygon=poly,
                full=mask,
                visible=mask.copy(),
                full_area=int(mask.sum()),
            )
        )
    return objects


def _segmentation(obj: dict[str, Any]) -> list[list[float]]:
    """RefCOCO-style polygons of the visible part: the exact outline if nothing covers it, else its contours."""
    if obj["visible"].sum() == obj["full_area"]:
        return [obj["polygon"].ravel().tolist()]
    contours, _ = cv2.findContours(obj["visible"].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _make_image(rng: np.random.Generator, args: dict[str, Any], group: str | None) -> tuple[np.ndarray, list[dict]]:
    """One image [H, W, 3] uint8 RGB and its objects (attributes, polygons, area, bbox, centre)."""
    short = int(rng.integers(args["min_size"], args["max_size"] + 1))
    long = min(args["max_size"], int(round(short * rng.uniform(1.0, 4 / 3))))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    n = int(rng.integers(args["min_objects"], args["max_objects"] + 1))
    group_kinds = {k for k, g in SUPERCATEGORY.items() if g == group}
    for _ in range(20):  # an object that finds no room is dropped; too few left -> draw the layout again
        objects = _place_objects(rng, h, w, n, group, args["repeat_prob"])
        in_group = sum(o["kind"] in group_kinds for o in objects)
        if len(objects) >= args["min_objects"] and (not group or in_group >= min(2, args["min_objects"])):
            break
    else:
        raise RuntimeError(f"cannot place {args['min_objects']} objects in a {w}x{h} image; lower min_objects")
    img = _background(rng, h, w)
    for obj in objects:
        _paint(img, obj["full"], COLOURS[obj["colour"]], rng)
    out = []
    for obj in objects:
        seg = _segmentation(obj)
        rle = _rasterise(seg, h, w)[0]
        x, y, bw, bh = (round(float(v), 2) for v in mask_utils.toBbox(rle))
        out.append(
            dict(
                kind=obj["kind"],
                colour=obj["colour"],
                size=obj["size"],
                segmentation=seg,
                area=float(mask_utils.area(rle)),
                bbox=[x, y, bw, bh],
                cx=x + bw / 2,
                cy=y + bh / 2,
                occluded=bool(obj["visible"].sum() < obj["full_area"]),
            )
        )
    return np.clip(img, 0, 255).astype(np.uint8), out


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
    """
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if max_expressions < 1:
        raise ValueError(f"max_expressions must be >= 1, got {max_expressions}")
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
    images, annotations, refs = [], [], []
    attributes: dict[str, dict] = {"objects": {}, "sentences": {}}
    splits = [s for s in SPLIT_ORDER for _ in range(sizes[s])]
    for index, split in enumerate(splits):
        rng = np.random.default_rng([seed, index])
        group = GROUP_OF_SPLIT.get(split)
        img, objects = _make_image(rng, args, group)
        image_id = IMAGE_ID_OFFSET + index
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {file_name} as JPEG")
        (image_dir / file_name).write_bytes(jpeg.tobytes())
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})

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
        for t, obj in enumerate(objects):
            if group and SUPERCATEGORY[obj["kind"]] != group:
                continue
            expressions = describe_object(objects, t, img.shape[1], img.shape[0], rng, max_expressions, spatial_weight)
            if not expressions:
                continue  # identical twins side by side: nothing tells this object apart
            sentences, sent_ids = [], []
            for desc, text in expressions:
                sent_id = len(attributes["sentences"])
                raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
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
                    "category_id": CAT_ID[obj["kind"]],
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


def _params(num_images: int, split_sizes: dict[str, int] | None, **args: Any) -> dict[str, Any]:
    """What generator.json records: the version, the split sizes and every other argument of ``generate``."""
    return dict(version=GENERATOR_VERSION, split_sizes=_split_sizes(num_images, split_sizes), **args)


def ensure_synthetic(root: str | Path, **kwargs: Any) -> Path:
    """``generate(root, **kwargs)`` unless a complete dataset made with the same arguments is already there."""
    bound = inspect.signature(generate).bind(root, **kwargs)
    bound.apply_defaults()
    wanted = {k: v for k, v in bound.arguments.items() if k != "root"}
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
    )
    (generate if a.force else ensure_synthetic)(a.root, **kwargs)


if __name__ == "__main__":
    main()

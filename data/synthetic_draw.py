"""Drawing one synthetic image: shapes, textured background, and the objects' polygons and masks.

``data.synthetic`` turns these images into the REFER dataset; each image depends only on its own random
generator, so images can be drawn in any order and in parallel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data.opencv import cv2

__all__ = ["COLOURS", "CATEGORIES", "CAT_ID", "SUPERCATEGORY", "SIZE_RANGES", "MIN_VISIBLE", "make_image"]

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
# object extent (bounding size) as a fraction of the image's shorter side; the gap keeps "small"/"big" unambiguous
# even after an image of aspect <= 4:3 is squashed to a square (0.25 * 4/3 < 0.34). Referred objects in RefCOCO are
# large (people, animals, furniture); version 1's 0.13-0.18 / 0.26-0.34 made 12-px shapes at the demo's 96 px.
SIZE_RANGES = {"small": (0.19, 0.25), "big": (0.34, 0.42)}
MIN_VISIBLE = 0.8  # an occluded object keeps at least this fraction of its area


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


def make_image(rng: np.random.Generator, args: dict[str, Any], group: str | None) -> tuple[np.ndarray, list[dict]]:
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
        raise ValueError(f"cannot place min_objects={args['min_objects']} objects in a {w}x{h} image (20 layouts "
                         "drawn); lower min_objects or raise min_size")  # fmt: skip
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


"""Masks from REFER annotations: a segmentation (polygons, an RLE, or a list of RLEs) -> RLE parts -> one binary
mask, the parts combined as LAVT's dataset does (``official``) or as the annotation means (``union``)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .errors import ReferDataError

__all__ = ["MASK_PARTS", "combine_parts", "segmentation_rles"]

logger = logging.getLogger(__name__)

# How ``getMask`` makes one mask of an object annotated in several parts (polygons, or a list of RLEs):
# - "official": the pixels covered by exactly one part. The original REFER sums the parts and LAVT's dataset keeps
#   sum == 1, so where two parts of one object overlap the pixel is background. Arguably a bug, but the paper's
#   numbers and the released checkpoints' scores are computed on these masks, so it is the default.
# - "union": the pixels covered by any part (what the annotation means).
MASK_PARTS: tuple[str, ...] = ("official", "union")


def segmentation_rles(seg: Any, height: int, width: int, where: str, on_degenerate: Any = None) -> list[dict]:
    """The RLEs of an annotation's parts: one per polygon, the RLE itself, or each RLE of a list of RLEs.

    Degenerate polygons (fewer than 3 points, or zero area) cover no pixel, as pycocotools rasterises them; they
    are left out and ``on_degenerate(left_out, total, empty)`` is called (an annotation with nothing else has an
    empty mask). A polygon with an odd number of coordinates, non-numbers or another format is refused naming
    ``where`` (the annotation, ref and dataset).
    """
    if isinstance(seg, dict):
        parts = [seg]
    elif isinstance(seg, list) and seg and all(isinstance(p, dict) for p in seg):
        parts = list(seg)
    elif isinstance(seg, list) and seg and all(isinstance(p, (list, tuple)) for p in seg):
        parts = _polygon_rles(seg, height, width, where, on_degenerate)
    else:
        raise ReferDataError(
            f"{where} has an unsupported segmentation ({type(seg).__name__}"
            f"{', empty' if isinstance(seg, list) and not seg else ''}): expected "
            "polygons [[x1, y1, ...], ...], an RLE dict or a list of RLE dicts"
        )
    rles = []
    for part in parts:
        if "counts" not in part or "size" not in part:
            raise ReferDataError(f"{where}: RLE without 'counts'/'size' (keys {sorted(part)})")
        if list(part["size"]) != [height, width]:
            raise ReferDataError(
                f"{where}: RLE size {list(part['size'])} differs from the image size {[height, width]}"
            )
        if isinstance(part["counts"], list):  # uncompressed RLE
            part = mask_utils.frPyObjects(part, height, width)
        elif isinstance(part["counts"], str):
            part = {"size": part["size"], "counts": part["counts"].encode("ascii")}
        rles.append(part)
    return rles


def _polygon_rles(seg: list, height: int, width: int, where: str, on_degenerate: Any) -> list[dict]:
    """One RLE per polygon of at least 3 points and non-zero area (see ``segmentation_rles``)."""
    polygons = []
    for i, p in enumerate(seg):
        if len(p) % 2 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in p):
            raise ReferDataError(
                f"{where}: polygon {i} is not a list of finite x, y pairs ({len(p)} values: {list(p)[:8]})"
            )
        polygons.append([float(v) for v in p])
    # pycocotools reads a first polygon of 4 values as a box: polygons of < 3 points never reach it
    long_enough = [p for p in polygons if len(p) >= 6]
    rles = mask_utils.frPyObjects(long_enough, height, width) if long_enough else []
    kept = [r for r, a in zip(rles, mask_utils.area(rles)) if a > 0]  # area([]) is []
    if len(kept) < len(polygons) and on_degenerate is not None:
        on_degenerate(len(polygons) - len(kept), len(polygons), not kept)
    return kept


def combine_parts(rles: list[dict], height: int, width: int, parts: str = "official") -> np.ndarray:
    """One [H, W] uint8 mask in {0, 1} (C order) from an object's RLE parts, combined as ``parts`` says."""
    if parts not in MASK_PARTS:
        raise ValueError(f"mask parts must be one of {MASK_PARTS}, got {parts!r}")
    union = mask_utils.merge(rles) if len(rles) > 1 else rles[0] if rles else None
    if union is None:
        return np.zeros((height, width), dtype=np.uint8)
    # (pycocotools' area() of 256 RLEs or more overflows a uint8 count: the sum below takes any number of parts)
    if parts == "union" or (len(rles) < 256 and mask_utils.area(union) == sum(int(a) for a in mask_utils.area(rles))):
        m = mask_utils.decode(union)  # parts that do not overlap: exactly one part is any part
    else:
        # the original's np.sum(..., axis=2).astype(np.uint8), then == 1; summing in uint8 wraps the same way
        m = (mask_utils.decode(rles).sum(axis=2, dtype=np.uint8) == 1).view(np.uint8)
    return np.ascontiguousarray(m)  # pycocotools decodes column-major

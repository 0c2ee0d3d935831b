"""Plots of a REFER dataset's refs (``REFER.showRef`` / ``showMask``); matplotlib is imported when one is drawn.

``refer`` is a ``refer.refer.REFER`` (typed ``Any`` here: REFER calls these, so this file does not import it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ReferFileNotFoundError

__all__ = ["show_mask", "show_ref"]

logger = logging.getLogger(__name__)


def show_ref(refer: Any, ref: dict, seg_box: str) -> None:
    """Draw the image, the object's outline (``seg``) or box (``box``), and its sentences as the title (also
    logged, one line each), on matplotlib's current axes."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon, Rectangle
    from PIL import Image

    if seg_box not in ("seg", "box"):
        raise ValueError(f"seg_box must be 'seg' or 'box', got {seg_box!r}")
    ax = plt.gca()
    image = refer._lookup(refer.Imgs, ref["image_id"], "image_id")
    path = Path(refer.IMAGE_DIR) / image["file_name"]
    if not path.is_file():
        raise ReferFileNotFoundError(
            f"image not found: {path} (expected the {refer.dataset} image {image['file_name']} in {refer.IMAGE_DIR})"
        )
    with Image.open(path) as im:
        ax.imshow(np.asarray(im.convert("RGB")))
    sentences = [f"{i + 1}. {s['sent']}" for i, s in enumerate(ref["sentences"])]
    for line in sentences:
        logger.info("%s", line)
    ax.set_title("\n".join(sentences), fontsize=9)
    ann = refer.refToAnn[ref["ref_id"]]
    if seg_box == "seg":
        seg = ann["segmentation"]
        if isinstance(seg, list) and seg and isinstance(seg[0], (list, tuple)):
            polygons = [Polygon(np.asarray(p, dtype=float).reshape(-1, 2), closed=True) for p in seg]
            ax.add_collection(PatchCollection(polygons, facecolors="none", edgecolors=(1, 1, 0, 1), linewidths=3))
            ax.add_collection(PatchCollection(polygons, facecolors="none", edgecolors=(1, 0, 0, 1), linewidths=1))
        else:
            m = refer.getMask(ref)["mask"]
            overlay = np.zeros((*m.shape, 4))
            overlay[..., :3] = np.array([2.0, 166.0, 101.0]) / 255
            overlay[..., 3] = m * 0.5
            ax.imshow(overlay)
    else:
        x, y, w, h = refer.getRefBox(ref["ref_id"])
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="green", linewidth=3))


def show_mask(refer: Any, ref: dict) -> None:
    """Draw the object's mask on matplotlib's current axes."""
    import matplotlib.pyplot as plt

    plt.gca().imshow(refer.getMask(ref)["mask"])

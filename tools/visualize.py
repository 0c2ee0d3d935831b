"""Overlays and figures of images and masks, shared by ``tools.demo``, ``tools.web`` and the notebooks.

Pixel work (mask overlays, the demo's captioned panels) is done with OpenCV and Pillow at the image's own
resolution (the demo's panels smaller where many would make too large a picture). Figures are
``matplotlib.figure.Figure`` objects built without pyplot: they need no display and no GUI backend (saving goes
through Agg), and a notebook shows them with ``display(fig)``.

Images are RGB ``uint8`` arrays ``[H, W, 3]``; masks are ``[H, W]`` arrays read as booleans (non-zero = object).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data.opencv import cv2
from utils.atomic import staged
from utils.metrics import intersection_union, iou_from_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# distinct, saturated overlay colours (RGB), one per expression
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)  # fmt: skip
GT_COLOUR = (255, 255, 255)
#: most panels in a row of the demo's picture
PANEL_COLUMNS = 4
#: most pixels of the demo's panels together; beyond it they are drawn smaller (the masks keep the image's size).
#: Pillow refuses to open a picture of more than ~179 megapixels and warns past 89: 30 expressions on a 6-MP photo
#: side by side made 183.
MAX_PANEL_PIXELS = 48_000_000


# ----------------------------------------------------------------------------- checks and overlays
def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be an RGB uint8 array [H, W, 3], got {got}")


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape[:2]):
        raise ValueError(f"{name} is {mask.shape}, expected the image's [H, W] = {tuple(shape[:2])}")
    return mask.astype(bool)


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = PALETTE[0],
    alpha: float = 0.5,
    outline: int = 2,
) -> np.ndarray:
    """image [H, W, 3] uint8, mask [H, W] -> [H, W, 3] uint8: masked pixels blended with ``colour``, outlined.

    Pixels outside the mask (and off its outline) keep their exact values.
    """
    _check_image(image)
    mask = _check_mask(mask, image.shape)
    out = image.copy()
    if mask.any():
        solid = np.empty_like(image)
        solid[:] = colour
        blended = cv2.addWeighted(image, 1.0 - alpha, solid, alpha, 0.0)
        out[mask] = blended[mask]
        if outline > 0:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), outline)
    return out


def draw_outline(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = GT_COLOUR, width: int = 1
) -> np.ndarray:
    """A copy of ``image`` with the outer contour of ``mask`` drawn (e.g. the ground truth over a prediction)."""
    _check_image(image)
    mask = _check_mask(mask, image.shape, "ground-truth mask")
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.drawContours(image.copy(), contours, -1, tuple(int(c) for c in colour), width)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two masks of one shape [H, W], as the evaluation computes it (``utils.metrics``: 0 when both are
    empty)."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    inter, union = intersection_union(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    return float(iou_from_counts(inter, union)[0])


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a single word wider than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def compose_panels(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    captions: Sequence[str],
    gap: int = 4,
    font_size: int | None = None,
    columns: int = PANEL_COLUMNS,
    max_pixels: int = MAX_PANEL_PIXELS,
) -> np.ndarray:
    """The demo's picture: one overlay panel per mask, each under its wrapped caption, in rows of ``columns``.

    Args:
        image: [H, W, 3] uint8; masks: E masks [H, W]; captions: E strings.
        max_pixels: most pixels of the E panels together. Beyond it every panel is drawn at h x w, the image scaled
            by the same factor (OpenCV's area filter; the masks by their nearest pixel).
    Returns:
        [R * (T + h) + (R - 1) * gap, C * c + (C - 1) * gap, 3] uint8 on white: C = min(E, columns) panels a row,
        R rows, T the caption band's height, h x w = H x W where E panels of H x W fit ``max_pixels``, the column
        width c = w, or the longest caption word's where that is wider. Panel e sits in row e // C, column e % C, at
        the left of its cell, under its caption, and is ``overlay_mask(image, masks[e], PALETTE[e])`` (of the scaled
        image and mask).
    """
    _check_image(image)
    masks = list(masks)
    if len(masks) != len(captions) or not masks:
        raise ValueError(
            f"compose_panels needs one caption per mask and at least one: {len(masks)} masks, {len(captions)} captions"
        )
    if columns < 1:
        raise ValueError(f"compose_panels needs at least one column, got {columns}")
    masks = [_check_mask(m, image.shape, f"mask {e}") for e, m in enumerate(masks)]
    big_h, big_w = image.shape[:2]
    scale = min(1.0, (max_pixels / (len(masks) * big_h * big_w)) ** 0.5)
    h, w = max(1, int(big_h * scale)), max(1, int(big_w * scale))
    if (h, w) != (big_h, big_w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        masks = [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for m in masks]
    size = font_size or int(np.clip(round(w / 20), 11, 24))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # a column as wide as its panel, or as the longest word of a caption where that is wider (a small image): no
    # caption is cut off or runs into the next panel
    words = [word for c in captions for word in c.split()]
    cell = max([w] + [int(np.ceil(probe.textlength(word, font=font))) + 4 for word in words])
    wrapped = [_wrap(probe, c, font, cell - 4) for c in captions]
    line_h = int(size * 1.25)
    band = max(len(lines) for lines in wrapped) * line_h + 6
    cols = min(len(masks), columns)
    rows = -(-len(masks) // cols)
    canvas = Image.new("RGB", (cols * cell + (cols - 1) * gap, rows * (band + h) + (rows - 1) * gap), "white")
    draw = ImageDraw.Draw(canvas)
    for e, (mask, lines) in enumerate(zip(masks, wrapped)):
        x, y = (e % cols) * (cell + gap), (e // cols) * (band + h + gap)
        colour = PALETTE[e % len(PALETTE)]
        canvas.paste(Image.fromarray(overlay_mask(image, mask, colour)), (x, y + band))
        for i, line in enumerate(lines):
            draw.text((x + 2, y + 3 + i * line_h), line, fill=tuple(c // 2 for c in colour), font=font)
    return np.asarray(canvas)


def load_mask(path: str | Path) -> np.ndarray:
    """A mask image (PNG etc.; any non-zero pixel is object) -> [H, W] bool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB [H, W, 3] or grey [H, W] uint8 array as PNG (folders created, atomically); returns the path."""
    return save_pngs({Path(path): array})[0]


def save_pngs(pictures: dict[Path, np.ndarray]) -> list[Path]:
    """Write several PNGs (path -> RGB [H, W, 3] or grey [H, W] uint8 array) all or none: each is encoded to a
    temporary file beside its target, then all are renamed onto their targets (``utils.atomic.staged``), so an
    overlay and its masks never come from two different runs. Folders are created. Returns the paths."""
    paths = [Path(p) for p in pictures]
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a folder is to be, a read-only place
            raise PermissionError(f"cannot write {path}: its folder {path.parent} cannot be made ({e.strerror})") from e
    with staged(paths) as temps:
        for tmp, array in zip(temps, pictures.values()):
            Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return paths


# ----------------------------------------------------------------------------- figures
def _figure(width_inches: float, height_inches: float) -> Figure:
    # matplotlib is imported here, where a figure is made: the demo and the web page draw with Pillow alone, and
    # importing matplotlib would add half a second to their start-up (docs/performance.md)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_inches, height_inches), layout="constrained")


def _show(ax: Any, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _wrap_title(text: str, width: int = 32) -> str:
    return "\n".join(textwrap.wrap(text, width))


def figure_side_by_side(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    captions: Sequence[str],
    gts: Sequence[np.ndarray | None] | None = None,
    panel_inches: float = 3.2,
) -> Figure:
    """The image with each expression's mask, side by side; where a ground truth is given, its outline (white)
    and the IoU go into that panel. masks/gts: E arrays [H, W] (a gt may be None)."""
    _check_image(image)
    masks = list(masks)
    gts = list(gts) if gts is not None else [None] * len(masks)
    if not (len(masks) == len(captions) == len(gts)) or not masks:
        raise ValueError(
            f"figure_side_by_side: {len(masks)} masks, {len(captions)} captions, {len(gts)} ground "
            "truths; give the same non-zero number of each"
        )
    h, w = image.shape[:2]
    fig = _figure(panel_inches * len(masks), panel_inches * h / w + 0.8)
    axes = fig.subplots(1, len(masks), squeeze=False)[0]
    for e, (ax, mask, caption, gt) in enumerate(zip(axes, masks, captions, gts)):
        picture = overlay_mask(image, mask, PALETTE[e % len(PALETTE)])
        title = _wrap_title(f'"{caption}"')
        if gt is not None:
            picture = draw_outline(picture, gt)
            title += f"\nIoU {mask_iou(mask, _check_mask(gt, image.shape, 'ground-truth mask')):.3f}"
        _show(ax, picture, title)
    return fig


def figure_cases(cases: Sequence[dict[str, Any]], panel_inches: float = 2.4) -> Figure:
    """One row per case: the image, the ground truth and the prediction, titled by the expression and its IoU.

    cases: dicts with ``image`` [H, W, 3] uint8, ``gt`` and ``pred`` [H, W], ``sentence`` str, ``iou`` float
    (e.g. the evaluation's), optional ``title`` (a first line, e.g. the ref id).
    """
    if not cases:
        raise ValueError("figure_cases: no cases to show")
    fig = _figure(3 * panel_inches, panel_inches * len(cases) + 0.3)
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for row, case in zip(axes, cases):
        image = case["image"]
        head = (case.get("title", "") + "\n" if case.get("title") else "") + _wrap_title(f'"{case["sentence"]}"', 40)
        _show(row[0], image, head)
        _show(row[1], draw_outline(overlay_mask(image, case["gt"], PALETTE[2]), case["gt"]), "ground truth")
        _show(
            row[2],
            draw_outline(overlay_mask(image, case["pred"], PALETTE[0]), case["gt"]),
            f"prediction, IoU {case['iou']:.3f}",
        )
    return fig

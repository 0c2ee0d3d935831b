"""One upload to the web page (tools/web.py): its limits, its checks, each with the one-line message the page
shows, and the answer's JSON (``segment``). No HTTP here: the server only moves bytes to and from these."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.checks import ExpressionError, check_user_text
from data.image_io import ImageReadError, open_rgb

from .demo import Predictor
from .visualize import PALETTE, overlay_mask

PREVIEW_SIDE = 1024  # overlays shown on the page are at most this long (the masks keep the image's size)


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; the page states them and the server refuses anything beyond with a message."""

    max_bytes: int = 20_000_000
    max_pixels: int = 12_000_000  # a 12-megapixel phone photo (4000x3000) fits
    max_expressions: int = 5
    max_text_chars: int = 2000
    # a connection that sends nothing for this long is closed (a stalled upload would hold its thread for ever);
    # per read, so a slow upload that keeps sending is never cut
    idle_seconds: float = 60.0

    def describe(self) -> str:
        return (f"Images: PNG, JPEG, WebP, BMP, TIFF ... up to {self.max_bytes / 1e6:g} MB and "
                f"{self.max_pixels / 1e6:g} megapixels (EXIF orientation applied). Up to {self.max_expressions} "
                f"expressions, {self.max_text_chars} characters in all.")  # fmt: skip


class UploadError(ValueError):
    """What is wrong with an upload, in one line for the page; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- checks of one upload
def shown(name: str) -> str:
    """An upload as an error names it: its file name quoted, or "the upload" (a client that sent none)."""
    return repr(name) if name else "the upload"


def check_bytes(count: int, name: str, limits: Limits) -> None:
    """UploadError (status 413) if a file of ``count`` bytes is over the limit."""
    if count > limits.max_bytes:
        raise UploadError(f"{shown(name)} has {count / 1e6:.1f} MB, more than the "
                          f"{limits.max_bytes / 1e6:g} MB this page accepts", 413)  # fmt: skip


def read_upload(data: bytes, name: str, limits: Limits) -> np.ndarray:
    """An uploaded file's bytes -> [H, W, 3] uint8 RGB after its EXIF orientation.

    The size in pixels is read from the header before anything is decoded, so an oversized image costs nothing.
    Raises UploadError (one line naming the file) for an empty file, a file that is not an image, or one beyond
    ``limits``.
    """
    if not data:
        raise UploadError("no image: choose an image file first")
    check_bytes(len(data), name, limits)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own guard, far above any sensible max_pixels
        raise UploadError(f"{shown(name)} is far too large: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UploadError(f"{shown(name)} is not an image this page can read (PNG, JPEG, WebP, BMP, TIFF, ...): "
                          f"{type(e).__name__}") from e  # fmt: skip
    if width * height > limits.max_pixels:
        raise UploadError(
            f"{shown(name)} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more "
            f"than the {limits.max_pixels / 1e6:g} megapixels this page accepts: make it smaller"
        )
    try:
        return np.asarray(open_rgb(io.BytesIO(data), exif=True))  # type: ignore[arg-type]  # PIL reads file objects
    except ImageReadError as e:  # a readable header over broken pixel data (a cut download, ...)
        reason = str(e.__cause__ or e)
        raise UploadError(f"{shown(name)} is damaged and cannot be decoded: {reason}") from e


def read_expressions(text: str, predictor: Predictor, limits: Limits) -> tuple[list[str], list[str]]:
    """The text box -> (expressions, one per non-blank line, stripped; a warning per expression, "" if none).

    Raises UploadError for no expression, one that tokenises to nothing (``data.checks.check_user_text``), too
    many of them or too much text.
    """
    if len(text) > limits.max_text_chars:
        raise UploadError(f"the text has {len(text)} characters, more than the {limits.max_text_chars} this page "
                          "accepts")  # fmt: skip
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > limits.max_expressions:
        raise UploadError(f"{len(lines)} expressions, more than the {limits.max_expressions} this page segments "
                          "at once: one expression per line")  # fmt: skip
    try:
        if not lines:
            check_user_text(predictor.tokenizer, text, predictor.max_tokens)  # raises its "empty" message
        warnings = [check_user_text(predictor.tokenizer, line, predictor.max_tokens) for line in lines]
    except ExpressionError as e:
        raise UploadError(str(e)) from e
    return lines, warnings


# ----------------------------------------------------------------------------- the answer
def png_data_url(array: np.ndarray) -> str:
    """[H, W] or [H, W, 3] uint8 -> ``data:image/png;base64,...``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def preview(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """image [H, W, 3] uint8, mask [H, W] bool -> the overlay shown on the page, [h, w, 3] uint8: ``overlay_mask``
    at the image's size, or on the image shrunk to PREVIEW_SIDE on its long side (bilinear; the mask nearest) for
    big photos, which would make heavy pages."""
    h, w = mask.shape
    scale = PREVIEW_SIDE / max(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return overlay_mask(image, mask, colour)


def segment(predictor: Predictor, data: bytes, name: str, text: str, limits: Limits) -> dict[str, Any]:
    """One upload -> the JSON answer of ``POST /predict`` (see the module docstring); UploadError if refused."""
    texts, warnings = read_expressions(text, predictor, limits)
    image = read_upload(data, name, limits)
    masks = predictor.predict(image, texts)  # [E, H, W] bool
    results = []
    for e, (expression, warning, mask) in enumerate(zip(texts, warnings, masks)):
        colour = PALETTE[e % len(PALETTE)]
        results.append({
            "text": expression,
            "warning": warning,
            "coverage": float(mask.mean()),
            "colour": "rgb({}, {}, {})".format(*colour),
            "overlay": png_data_url(preview(image, mask, colour)),
            "mask": png_data_url(mask.astype(np.uint8) * 255),
            "mask_name": f"{Path(name).stem or 'image'}_mask_{e}.png",
        })  # fmt: skip
    h, w = image.shape[:2]
    return {"results": results, "summary": f"{len(texts)} mask(s) of {w}x{h} pixels"}

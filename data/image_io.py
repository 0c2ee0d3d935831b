"""Reading images as 8-bit RGB, for every mode PIL opens.

The official LAVT reading is ``Image.open(path).convert("RGB")``; for 8-bit modes (``1``, ``L``, ``P``, ``RGB``,
``CMYK``, ``YCbCr``, ...) this module does exactly that, so the pixels are byte-identical to the official ones.
Modes with an alpha channel (``LA``, ``PA``, ``RGBA``, ``RGBa``) also go through ``convert("RGB")``, which drops
the alpha channel as the official code does (no compositing over a background: the colours under transparent
pixels are kept).

``convert("RGB")`` clips wider modes to 0..255 instead of scaling them: a 16-bit greyscale PNG (values up to
65535) would come out nearly all white. Those are read as grey levels scaled to 0..255, rounded to the nearest:

- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (unsigned 16-bit): ``v * 255 / 65535`` (i.e. ``v / 257``).
- ``I`` (32-bit signed) and ``F`` (32-bit float): their type range says nothing of their content, so the scale
  is the smallest of 0..1 (``F`` only), 0..255 and 0..65535 that holds every finite value; values outside all
  three (negative, or above 65535) are stretched linearly from their minimum (0) to their maximum (255), and an
  image of one such value reads 0. NaN reads 0, +inf 255 and -inf 0.

``exif=True`` first applies the EXIF orientation (``PIL.ImageOps.exif_transpose``): for user photos, which
cameras store sideways. Dataset images keep the official reading (``exif=False``): their annotations were made
on the pixels as stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from refer import ReferFileNotFoundError

__all__ = ["ImageReadError", "load_rgb", "open_rgb", "to_rgb"]


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def _grey_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """[H, W] values of a 16-bit, 32-bit integer or float image -> [H, W] uint8, scaled as the module says."""
    v = values.astype(np.float64)
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        ranges = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
        high = next((r for r in ranges if lo >= 0.0 and hi <= r), None)
        low = 0.0
        if high is None:
            low, high = lo, hi
    if high > low:
        # times 255 before the division: exact halves stay exact (100 * 255 / 200 = 127.5, which rounds up)
        scaled = (np.nan_to_num(v, nan=low, posinf=high, neginf=low) - low) * 255.0 / (high - low)
    else:  # one value outside every standard range: nothing to show
        scaled = np.zeros_like(v)
    return np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an RGB image: ``im.convert("RGB")`` (the official reading) except that 16-bit, 32-bit integer
    and float modes are scaled to 0..255 instead of clipped (see the module docstring)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return Image.fromarray(_grey_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str | Path, exif: bool = False) -> Image.Image:
    """The image at ``path`` as a loaded RGB PIL image (the file is closed on return).

    Args:
        exif: apply the EXIF orientation first (user photos); False is the official reading of dataset images.

    Raises:
        ReferFileNotFoundError (a FileNotFoundError) if there is no file at ``path``; ImageReadError (an OSError)
        naming the file if it cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            return to_rgb(ImageOps.exif_transpose(im) if exif else im)
    except FileNotFoundError:
        raise ReferFileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def load_rgb(path: str | Path, exif: bool = False) -> np.ndarray:
    """Any image PIL reads -> [H, W, 3] uint8 RGB (``open_rgb`` as an array; same arguments and errors)."""
    return np.asarray(open_rgb(path, exif))

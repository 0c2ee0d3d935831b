"""Image and mask transforms: square resize, ImageNet normalisation, optional mild augmentation.

As the paper: image and mask are resized to S x S (the aspect ratio is not kept), the mask with nearest
neighbour, the image normalised with ImageNet statistics. Two resize methods (``DATA.RESIZE``):

- ``pil`` (the official LAVT code, default): ``torchvision.transforms.functional.resize(img, (S, S))`` on a PIL
  image, which is ``img.resize((S, S), Image.BILINEAR)`` (bilinear that filters, i.e. antialiases, when it
  shrinks), and ``Image.NEAREST`` for the mask (samples the source at output pixel centres).
- ``cv2``: OpenCV, area averaging when shrinking both sides, else bilinear; ``INTER_NEAREST`` for the mask (it
  samples at ``floor(x * scale)``, not at pixel centres, so masks differ from the official ones on boundaries).

``to_tensor`` equals torchvision's ``normalize(to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)`` bit for bit. Augmentation
is off by default and never flips left/right or changes hue: expressions say "left", "right" and name colours.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .opencv import cv2

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_METHODS", "resize_image", "resize_mask", "to_tensor", "TrainAugment",
    "resize_batch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("pil", "cv2")  # DATA.RESIZE; "pil" is the official one
_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # fill value that normalises to ~0


def _normalise_table() -> np.ndarray:
    """[3, 256] float32: the normalised value of each 8-bit level per channel, with torchvision's operations in
    float32 (``x / 255``, then ``(x - mean) / std``), so a table look-up reproduces them bit for bit."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])


_NORMALISED = _normalise_table()


def _check_method(method: str) -> None:
    if method not in RESIZE_METHODS:
        raise ValueError(f"DATA.RESIZE must be one of {RESIZE_METHODS}, got {method!r}")


def resize_image(image: np.ndarray | Image.Image, size: int, method: str = "pil") -> np.ndarray:
    """image: [H, W, 3] uint8 RGB array or RGB PIL image -> [S, S, 3] uint8 (see the module docstring for
    ``method``). A PIL image is resized as it is (the official path: no array round trip)."""
    _check_method(method)
    if method == "pil":
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != "RGB":
            raise ValueError(f"resize_image takes an RGB image, got PIL mode {image.mode!r}")
        return np.asarray(image.resize((size, size), Image.BILINEAR))
    image = np.asarray(image)
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int, method: str = "pil") -> np.ndarray:
    """mask: [H, W] uint8 -> [S, S] uint8, nearest neighbour (labels stay labels); ``pil`` samples at pixel
    centres as the official ``Image.NEAREST`` resize of the mode "P" mask (same index values as mode "L")."""
    _check_method(method)
    if method == "pil":
        im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
        return np.asarray(im.resize((size, size), Image.NEAREST))
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """image: [H, W, 3] uint8 RGB -> [3, H, W] float32, ImageNet-normalised exactly as torchvision's
    ``normalize(to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)``."""
    # one table look-up per channel plane, written straight into the channel-first layout: no float temporaries,
    # no transposed copy, no torch intra-op threads (which cost milliseconds per item when DataLoader workers share
    # cores); timed against torchvision's to_tensor + normalize in docs/performance.md
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)  # [3, H, W]
    for c, plane in enumerate(cv2.split(np.ascontiguousarray(image))):
        written = cv2.LUT(plane, _NORMALISED[c], dst=out[c])
        if not np.shares_memory(written, out):  # OpenCV allocated elsewhere instead of filling out[c]
            out[c] = written
    return torch.from_numpy(out)


def resize_batch(images: torch.Tensor, targets: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch at another resolution (``TRAIN.LOW_RES_SIZE``): images [B, 3, S, S] (normalised) ->
    [B, 3, size, size], bilinear with antialiasing; targets [B, S, S] -> [B, size, size], nearest at pixel centres.

    Normalisation is an affine map per channel and bilinear weights sum to one, so resizing the normalised batch
    equals normalising the resized image (up to rounding): no second pass over the uint8 images.
    """
    if size < 1:
        raise ValueError(f"resize_batch: size must be positive, got {size}")
    if images.shape[-2:] == (size, size):
        return images, targets
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    labels = torch.nn.functional.interpolate(targets[:, None].float(), size=(size, size), mode="nearest-exact")
    return images, labels[:, 0].to(targets.dtype)


class TrainAugment:
    """Random scale/shift (same warp for image and mask) and brightness/contrast jitter.

    Randomness comes from ``torch``: the ``generator`` given (the dataset seeds one per item) or the global stream.
    Areas uncovered by the warp are filled with the ImageNet mean colour (zero after normalisation), not mirrored: a
    mirror would add objects that the expressions do not account for.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.9, 1.1),
        shift: float = 0.05,
        brightness: float = 0.2,
        contrast: float = 0.2,
    ) -> None:
        self.scale, self.shift, self.brightness, self.contrast = scale, shift, brightness, contrast

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """image: [S, S, 3] uint8, mask: [S, S] uint8 -> the same shapes."""
        h, w = mask.shape
        r = torch.rand(5, generator=generator).tolist()
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * r[0]
        tx, ty = (2 * r[1] - 1) * self.shift * w, (2 * r[2] - 1) * self.shift * h
        matrix = np.array([[s, 0, (1 - s) * w / 2 + tx], [0, s, (1 - s) * h / 2 + ty]], dtype=np.float64)
        image = cv2.warpAffine(
            image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=_MEAN_PIXEL
        )
        mask = cv2.warpAffine(
            mask, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        alpha = 1 + (2 * r[3] - 1) * self.contrast
        beta = (2 * r[4] - 1) * self.brightness * 255 + (1 - alpha) * float(image.mean())  # contrast about the mean
        # alpha * x + beta rounded and clipped to [0, 255]; convertScaleAbs would take |.| and turn the darkest
        # pixels of a darkened image bright
        image = cv2.addWeighted(image, alpha, image, 0.0, beta)
        return image, mask

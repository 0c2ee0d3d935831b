"""Image and mask transforms (OpenCV): square resize, ImageNet normalisation, optional mild augmentation.

As the paper: image and mask are resized to S x S (the aspect ratio is not kept), the mask with nearest
neighbour, the image normalised with ImageNet statistics. Augmentation is off by default and never flips
left/right or changes hue: expressions say "left", "right" and name colours.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "resize_image", "resize_mask", "to_tensor", "TrainAugment"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# normalised = pixel * _SCALE + _SHIFT, one multiply-add per channel
_SCALE = [1 / (255 * s) for s in IMAGENET_STD]
_SHIFT = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # fill value that normalises to ~0


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """image: [H, W, 3] uint8 -> [S, S, 3] uint8. Area averaging when shrinking both sides, else bilinear."""
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """mask: [H, W] uint8 -> [S, S] uint8, nearest neighbour (labels stay labels)."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """image: [H, W, 3] uint8 RGB -> [3, H, W] float32, ImageNet-normalised."""
    # numpy per channel, straight into the channel-first layout: no transposed copy, and no torch intra-op
    # threads (which cost milliseconds per item when DataLoader workers share a few cores)
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)  # [3, H, W]
    for c in range(3):
        np.multiply(image[..., c], np.float32(_SCALE[c]), out=out[c], dtype=np.float32)
        out[c] += np.float32(_SHIFT[c])
    return torch.from_numpy(out)


class TrainAugment:
    """Random scale/shift (same warp for image and mask) and brightness/contrast jitter.

    Randomness comes from ``torch`` so that DataLoader worker seeding makes it reproducible. Areas uncovered by
    the warp are filled with the ImageNet mean colour (zero after normalisation), not mirrored: a mirror would add
    objects that the expressions do not account for.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.9, 1.1),
        shift: float = 0.05,
        brightness: float = 0.2,
        contrast: float = 0.2,
    ) -> None:
        self.scale, self.shift, self.brightness, self.contrast = scale, shift, brightness, contrast

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image: [S, S, 3] uint8, mask: [S, S] uint8 -> the same shapes."""
        h, w = mask.shape
        r = torch.rand(5).tolist()
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
        image = cv2.convertScaleAbs(image, alpha=alpha, beta=beta)  # saturating uint8
        return image, mask

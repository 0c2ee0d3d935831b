"""data.transforms: ``to_tensor`` against torchvision's normalisation, and ``TrainAugment``, the training
augmentation: image and mask warped together (nearest neighbour for the mask, never flipped: expressions say left
and right), the warp read back as the documented scale and shift, and the photometric jitter as one affine map of
the intensities, saturated as uint8."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, resize_image, resize_mask, to_tensor


def _coordinate_image(size: int) -> np.ndarray:
    """[S, S, 3] uint8: red = 4 * column, green = 4 * row, blue 128. A warp that interpolates linearly keeps
    these linear ramps exact, so each output pixel tells where in the source it was sampled."""
    ramp = np.arange(size, dtype=np.uint8) * 4
    return np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(128)), -1).astype(np.uint8)


def test_augment_moves_image_and_mask_together_without_flipping():
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 4:20] = 1  # an object on the left
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    torch.manual_seed(0)
    geometric = TrainAugment(brightness=0, contrast=0)
    for _ in range(20):
        img_a, mask_a = geometric(image, mask)
        assert img_a.shape == (64, 64, 3) and mask_a.shape == (64, 64) and img_a.dtype == mask_a.dtype == np.uint8
        assert set(np.unique(mask_a)) <= {0, 1} and mask_a.sum() > 0.7 * mask.sum()
        # object 255, background 0, uncovered border the ImageNet mean (< 130): one warp for both
        assert ((img_a[..., 0] > 190) != mask_a.astype(bool)).mean() < 0.02
        assert np.nonzero(mask_a)[1].mean() < 20  # still on the left: never flipped


def test_augment_warps_the_mask_with_nearest_neighbour():
    """The mask is sampled at the nearest source pixel of the warp (labels stay labels), checked against the warp
    read back from a coordinate image: a noise mask makes any interpolation show."""
    size = 48
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, (size, size), dtype=np.uint8)
    aug = TrainAugment(brightness=0, contrast=0)
    for seed in range(4):
        torch.manual_seed(seed)
        img_a, mask_a = aug(_coordinate_image(size), mask)
        inside = (img_a[..., 2] == 128) & (img_a[..., 0] < 4 * size - 8) & (img_a[..., 1] < 4 * size - 8)
        inside[[0, -1], :] = inside[:, [0, -1]] = False  # away from the border fill
        # the affine map output pixel -> source pixel, fitted to the coordinates read back (exact up to uint8)
        ys, xs = np.nonzero(inside)
        design = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
        src = [np.linalg.lstsq(design, img_a[ys, xs, c] / 4.0, rcond=None)[0] @ design.T for c in (0, 1)]
        sx, sy = src
        clear = (np.abs(sx % 1 - 0.5) > 0.05) & (np.abs(sy % 1 - 0.5) > 0.05)  # no tie between two neighbours
        expected = mask[np.rint(sy[clear]).astype(int), np.rint(sx[clear]).astype(int)]
        assert clear.sum() > 0.5 * size * size
        np.testing.assert_array_equal(mask_a[ys[clear], xs[clear]], expected)


def test_augment_warp_is_the_documented_scale_and_shift():
    """The warp read back from a coordinate image (output pixel -> source pixel, fitted) is the inverse of the
    documented one, written out here from the same five draws: a scale s in [0.9, 1.1] about the centre, a shift of
    (2 r1 - 1) * shift * width across and (2 r2 - 1) * shift * height down. The image is wider than high, so that a
    width taken for a height (or one draw for another) shows."""
    h, w, shift = 40, 56, 0.1
    # float32 coordinates (OpenCV warps them as it warps uint8), so that no rounding hides a fraction of a pixel
    xs_, ys_ = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    image = np.stack([xs_, ys_, np.full_like(xs_, 128)], -1)
    aug = TrainAugment(shift=shift, brightness=0, contrast=0)
    for seed in range(4):
        r = torch.rand(5, generator=torch.Generator().manual_seed(seed)).tolist()
        out, _ = aug(image, np.zeros((h, w), np.uint8), torch.Generator().manual_seed(seed))
        s = 0.9 + 0.2 * r[0]
        offset = ((1 - s) * w / 2 + (2 * r[1] - 1) * shift * w, (1 - s) * h / 2 + (2 * r[2] - 1) * shift * h)
        inside = out[..., 2] == 128
        inside[[0, -1], :] = inside[:, [0, -1]] = False  # away from the border fill
        ys, xs = np.nonzero(inside)
        design = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
        for c, off in enumerate(offset):
            fitted = np.linalg.lstsq(design, out[ys, xs, c], rcond=None)[0]
            expected = np.zeros(3)
            expected[c], expected[2] = 1 / s, -off / s  # source = (output - offset) / s
            np.testing.assert_allclose(fitted, expected, atol=0.02)


def test_augment_fills_the_uncovered_border_with_the_imagenet_mean():
    """What the shift uncovers is the ImageNet mean as 8-bit levels (which normalises to ~0, no black frame), the
    mask there 0. The levels written out: 255 x (0.485, 0.456, 0.406) rounded."""
    image, mask = np.full((40, 56, 3), (10, 200, 90), np.uint8), np.ones((40, 56), np.uint8)
    out, out_mask = TrainAugment(shift=0.3, brightness=0, contrast=0)(image, mask, torch.Generator().manual_seed(1))
    uncovered = out_mask == 0
    assert 0.05 < uncovered.mean() < 0.9
    inner = uncovered & ~cv2.dilate((~uncovered).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert inner.any() and (out[inner] == (124, 116, 104)).all()
    assert (out[~uncovered & (cv2.erode((~uncovered).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)]
            == (10, 200, 90)).all()  # fmt: skip


def test_augment_jitters_brightness_and_contrast():
    """With the same random draws, the photometric augmentation is the geometric one's image under one affine map
    of the intensities (contrast 1 +- 0.2, brightness within +- 0.2 * 255), not the identity; the mask is the same."""
    size = 48
    image = _coordinate_image(size) // 5 + 110  # levels 110-147: no saturation at 0 or 255 for these factors
    mask = (np.arange(size)[:, None] < np.arange(size)[None, :]).astype(np.uint8)
    gains = []
    for seed in range(8):
        torch.manual_seed(seed)
        geo_img, geo_mask = TrainAugment(brightness=0, contrast=0)(image, mask)
        torch.manual_seed(seed)
        img, msk = TrainAugment()(image, mask)
        np.testing.assert_array_equal(msk, geo_mask)
        unsaturated = (img > 0) & (img < 255)
        g, p = geo_img[unsaturated].astype(np.float64), img[unsaturated].astype(np.float64)
        (a, b), *_ = np.linalg.lstsq(np.stack([g, np.ones_like(g)], 1), p, rcond=None)
        assert np.abs(a * g + b - p).max() < 1.0  # one map for every pixel and channel (rounded to uint8)
        assert 0.8 - 1e-3 <= a <= 1.2 + 1e-3 and abs(p.mean() - g.mean()) <= 0.2 * 255 + 1
        gains.append((a, b))
    assert all(abs(a - 1) > 1e-3 or abs(b) > 0.5 for a, b in gains)  # jitter on every draw
    assert len({round(a, 3) for a, _ in gains}) == len(gains)  # and a new one each time


def test_augment_jitter_by_hand():
    """The jitter's factors from the draws themselves: contrast alpha = 1 + (2 r3 - 1) 0.2 about the warped image's
    mean, brightness (2 r4 - 1) 0.2 x 255 levels; alpha x + beta rounded and clipped, computed here in numpy."""
    size = 48
    image = _coordinate_image(size)
    mask = np.zeros((size, size), np.uint8)
    for seed in range(6):
        geo_img, _ = TrainAugment(brightness=0, contrast=0)(image, mask, torch.Generator().manual_seed(seed))
        img, _ = TrainAugment()(image, mask, torch.Generator().manual_seed(seed))
        r = torch.rand(5, generator=torch.Generator().manual_seed(seed)).tolist()
        alpha = 1 + (2 * r[3] - 1) * 0.2
        beta = (2 * r[4] - 1) * 0.2 * 255 + (1 - alpha) * geo_img.astype(np.float64).mean()
        expected = np.clip(np.round(alpha * geo_img.astype(np.float64) + beta), 0, 255)
        diff = np.abs(img.astype(np.float64) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (seed, diff.max(), (diff > 0).mean())


def test_augment_jitter_saturates_dark_pixels_at_zero():
    """A darkening draw clips below 0 (uint8 saturation), never folds dark pixels back up (|.|), and clips above 255."""
    size = 32
    image = np.repeat(np.linspace(0, 255, size * size).reshape(size, size, 1), 3, 2).round().astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    darkened = brightened = 0
    for seed in range(40):
        torch.manual_seed(seed)
        geo, _ = TrainAugment(brightness=0, contrast=0)(image, mask)
        torch.manual_seed(seed)
        out, _ = TrainAugment(brightness=0.5, contrast=0.2)(image, mask)
        g, p = geo.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        mid = (p > 0) & (p < 255)
        (a, b), *_ = np.linalg.lstsq(np.stack([g[mid], np.ones(mid.sum())], 1), p[mid], rcond=None)
        expected = np.clip(a * g + b, 0, 255)  # the affine map, saturated by hand
        assert np.abs(expected - p).max() <= 1.5
        darkened += (a * g + b < -5).any()
        brightened += (a * g + b > 260).any()
    assert darkened and brightened  # both saturations were exercised


def test_to_tensor_is_torchvisions_also_where_opencv_writes_elsewhere(monkeypatch):
    """``to_tensor`` is torchvision's ``normalize(to_tensor(img))`` bit for bit, also where OpenCV's table look-up
    returns an array of its own instead of filling the one it was given (the fallback copy)."""
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert torch.equal(to_tensor(image), expected)
    real = cv2.LUT
    monkeypatch.setattr(cv2, "LUT", lambda src, lut, dst=None: real(src, lut))  # never into dst
    assert torch.equal(to_tensor(image), expected)


def test_resizing_defaults_to_the_official_pil_path():
    """Called without a method, masks and images are resized as the official code does: masks nearest at pixel
    centres (PIL's ``NEAREST``: source index floor((i + 0.5) * H / S), computed here by hand), images with PIL's
    bilinear filter (OpenCV's area filter, the other method, gives other values on this downscale)."""
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (37, 53), dtype=np.uint8)
    rows, cols = (np.floor((np.arange(24) + 0.5) * n / 24).astype(int) for n in mask.shape)
    assert np.array_equal(resize_mask(mask, 24), mask[rows][:, cols])
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR))
    assert np.array_equal(resize_image(image, 24), expected)
    assert not np.array_equal(resize_image(image, 24, "cv2"), expected)
    grey = Image.fromarray(image[..., 0])  # the official path reads every image as RGB: another mode is a mistake
    with pytest.raises(ValueError, match=r"^resize_image takes an RGB image, got PIL mode 'L'$"):
        resize_image(grey, 24)
    for resize in (resize_image, resize_mask):  # a method named by hand, not through the config's check
        with pytest.raises(ValueError, match=r"^DATA\.RESIZE must be one of \('pil', 'cv2'\), got 'bilinear'$"):
            resize(image if resize is resize_image else mask, 24, "bilinear")

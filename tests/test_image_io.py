"""Image reading (data.image_io): every PIL mode to 8-bit RGB, wide modes scaled (not clipped), 8-bit modes
byte-identical to the official ``Image.open(p).convert("RGB")``, EXIF orientation on request, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import data.dataset
from data.image_io import ImageReadError, load_rgb, open_rgb, to_rgb
from refer import ReferFileNotFoundError


def grey(values: list) -> np.ndarray:
    """[1, N] grey levels -> the [1, N, 3] uint8 RGB array expected."""
    g = np.array([values], dtype=np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def save(tmp_path: Path, im: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------------- 8-bit modes
def test_bilevel_grey_palette(tmp_path: Path):
    bits = Image.new("1", (3, 1))
    bits.putdata([0, 1, 0])
    assert np.array_equal(load_rgb(save(tmp_path, bits, "b.png")), grey([0, 255, 0]))

    lum = Image.new("L", (3, 1))
    lum.putdata([0, 7, 200])
    assert np.array_equal(load_rgb(save(tmp_path, lum, "l.png")), grey([0, 7, 200]))

    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([1, 0])
    assert np.array_equal(load_rgb(save(tmp_path, pal, "p.png")), np.array([[[200, 100, 50], [10, 20, 30]]], np.uint8))


def test_alpha_is_dropped_as_the_official_reading(tmp_path: Path):
    la = Image.merge("LA", [Image.new("L", (2, 1), 50), Image.new("L", (2, 1), 0)])
    la.putpixel((1, 0), (60, 255))
    assert np.array_equal(load_rgb(save(tmp_path, la, "la.png")), grey([50, 60]))

    rgba = np.array([[[1, 2, 3, 0], [250, 128, 9, 255]]], np.uint8)  # colour under a transparent pixel kept
    path = save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png")
    assert np.array_equal(load_rgb(path), rgba[..., :3])


def test_cmyk(tmp_path: Path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 100, 200, 50), (255, 0, 0, 0)])
    # PIL's CMYK -> RGB: each channel (255 - ink) * (255 - black) / 255, rounded: 155 * 205 / 255 = 124.6
    expected = np.array([[[205, 125, 44], [0, 255, 255]]], np.uint8)
    assert np.array_equal(load_rgb(save(tmp_path, cmyk, "c.tif")), expected)


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"),
                                       ("L", "PNG"), ("P", "PNG"), ("1", "PNG")])
def test_byte_identical_to_the_official_reading(tmp_path: Path, mode: str, fmt: str):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "CMYK": 4}.get(mode, 1)
    pixels = rng.integers(0, 256, (37, 53, channels), dtype=np.uint8)
    im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else mode)
    if mode in ("P", "1"):
        im = im.convert(mode)
    path = save(tmp_path, im, f"x.{fmt.lower()}", format=fmt)
    with Image.open(path) as official:
        assert official.mode == mode
        expected = np.asarray(official.convert("RGB"))
    got = load_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (37, 53, 3)
    assert got.tobytes() == expected.tobytes()
    assert open_rgb(path).mode == "RGB" and np.asarray(open_rgb(path)).tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------------------------------- wide modes
def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257, 1000, 32896, 65535, 129, 51529]], np.uint16)
    path = save(tmp_path, Image.fromarray(values), "g16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("RGB"))[0, 1:5, 0].tolist() == [255] * 4  # what convert alone does: clipped
    # v / 257 rounded: 1000 / 257 = 3.89; 129 / 257 = 0.502 (from 0, not from 1: 128 / 257 would round to 0);
    # 51529 / 257 = 200.502 (a scale of 65536 levels instead of 65535 would give 200.499)
    assert np.array_equal(load_rgb(path), grey([0, 1, 4, 128, 255, 1, 201]))


def test_dark_16_bit_image_keeps_the_16_bit_scale():
    """A 16-bit image whose values all fit 0..255 is still 16-bit: v / 257, near black (not read as 8-bit levels)."""
    im = Image.frombytes("I;16", (3, 1), np.array([0, 100, 255], dtype="<u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(im)), grey([0, 0, 1]))  # 100 / 257 = 0.39, 255 / 257 = 0.99


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_16_bit_byte_orders(mode: str, dtype: str):
    im = Image.frombytes(mode, (3, 1), np.array([0, 514, 65535], dtype=dtype).tobytes())
    assert np.array_equal(np.asarray(to_rgb(im)), grey([0, 2, 255]))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 100, 255], [0, 100, 255]),  # fits 0..255: as is
        ([0, 1, 1], [0, 1, 1]),  # fits 0..1 too, but 0..1 is a range of float images only: still as is
        ([0, 1000, 65535], [0, 4, 255]),  # fits 0..65535: / 257
        ([-100, 0, 100], [0, 128, 255]),  # outside both: stretched from min to max (127.5 rounds up)
        ([0, 70000, 35000], [0, 255, 128]),
        ([-5, -5], [0, 0]),  # one value outside the ranges: nothing to show
    ],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # (a uniform image divided by its zero range: nan, warned)
def test_32_bit_integer(tmp_path: Path, values: list, expected: list):
    path = save(tmp_path, Image.fromarray(np.array([values], np.int32)), "i.tif")
    with Image.open(path) as im:
        assert im.mode == "I"
    assert np.array_equal(load_rgb(path), grey(expected))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # fits 0..1: x 255
        ([0.0, 2.0, 254.6], [0, 2, 255]),  # fits 0..255: rounded
        ([0.0, 1000.0, 65535.0], [0, 4, 255]),
        ([-1.0, 0.0, 1.0], [0, 128, 255]),
        ([np.nan, np.inf, -np.inf, 0.25], [0, 255, 0, 64]),  # range from the finite values: 0..1
    ],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float(tmp_path: Path, values: list, expected: list):
    path = save(tmp_path, Image.fromarray(np.array([values], np.float32)), "f.tif")
    with Image.open(path) as im:
        assert im.mode == "F"
    assert np.array_equal(load_rgb(path), grey(expected))


# ---------------------------------------------------------------------------------------------------- EXIF, errors
def test_exif_orientation_only_on_request(tmp_path: Path):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned; shown rotated 90 degrees clockwise
    path = save(tmp_path, Image.fromarray(stored), "o.png", exif=exif)
    assert np.array_equal(load_rgb(path), stored)  # the official reading: pixels as stored
    assert np.array_equal(load_rgb(path, exif=True), np.rot90(stored, k=-1))
    assert load_rgb(path, exif=True).shape == (3, 2, 3)


def test_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ReferFileNotFoundError, match=r"image not found: .*nothing\.jpg"):
        load_rgb(tmp_path / "nothing.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"cannot read image .*text\.jpg: UnidentifiedImageError"):
        load_rgb(tmp_path / "text.jpg")
    rgb = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    data_bytes = save(tmp_path, rgb, "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(ImageReadError, match=r"cannot read image .*cut\.jpg: OSError: .*[Tt]runcated"):
        load_rgb(tmp_path / "cut.jpg")


def test_same_function_everywhere():
    assert data.load_rgb is data.dataset.load_rgb is load_rgb
    assert data.ImageReadError is ImageReadError

"""The synthetic set's arguments (``data.synthetic_args``): split sizes, the refusals of impossible numbers before
anything is written or removed, and their names as the command line's flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.synthetic import ensure_synthetic, generate
from data.synthetic_args import check_arguments, images_per_split, synthetic_sizes
from refer import REFER
from tools.synthetic import main


def test_synthetic_sizes():
    assert synthetic_sizes(2400) == {"num_images": 2400}  # the default split, one eleventh each:
    assert images_per_split(2400, None) == {"train": 1746, "val": 218, "testA": 218, "testB": 218}  # 218.2
    assert images_per_split(9654, None) == {"train": 7020, "val": 878, "testA": 878, "testB": 878}  # 877.6
    assert images_per_split(4, None) == {"train": 1, "val": 1, "testA": 1, "testB": 1}  # the fewest
    for n in range(4, 400):  # every split gets images, and all of them are used
        sizes = images_per_split(n, None)
        assert sum(sizes.values()) == n and min(sizes.values()) >= 1
        assert sizes["val"] == sizes["testA"] == sizes["testB"]
    assert synthetic_sizes(1000, 100)["split_sizes"] == {"train": 700, "val": 100, "testA": 100, "testB": 100}
    assert images_per_split(50, {"train": 7, "val": 3}) == {"train": 7, "val": 3, "testA": 0, "testB": 0}
    with pytest.raises(ValueError, match="num_images=9 leaves none for train after 3 x eval_images=3"):
        synthetic_sizes(9, 3)
    message = r"^eval_images \(per held-out split\) must be >= 0 \(0: the default\), got -218$"
    with pytest.raises(ValueError, match=message):
        synthetic_sizes(6754, -218)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_size=200, max_size=100), "min_size <= max_size"),
        (dict(min_objects=0), "1 <= min_objects"),
        (dict(num_images=3), "too small for train/val/testA/testB"),
        (dict(split_sizes={"test": 3}), "unknown splits"),
        (dict(max_expressions=0), "max_expressions must be >= 1"),
        (dict(workers=-1), "workers must be >= 0"),
        (dict(seed=-3), "seed must be >= 0, got -3"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str):
    """Refused before anything is written, and, over a dataset made with other arguments, before it is removed."""
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "new", **kwargs)
    assert not (tmp_path / "new").exists()
    small = dict(num_images=4, min_size=64, max_size=64)
    generate(tmp_path / "old", **small)
    before = {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=match):
        ensure_synthetic(tmp_path / "old", **{**small, **kwargs})
    assert {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()} == before


def test_objects_that_cannot_fit_are_one_error_naming_the_flags(tmp_path: Path):
    """30 objects in 16 x 16 pixels: a ValueError naming the flags (it was a RuntimeError's traceback from a drawing
    process); what was written is marked as cut off, and the next run into the root removes it."""
    small = ["--root", str(tmp_path), "--num-images", "4", "--min-size", "16", "--max-size", "16"]
    with pytest.raises(ValueError) as caught:
        main([*small, "--min-objects", "30", "--max-objects", "30"])
    assert str(caught.value) == ("cannot place --min-objects=30 objects in a 16x16 image (20 layouts drawn); lower "
                                 "--min-objects or raise --min-size")  # fmt: skip
    assert (tmp_path / "synthetic" / "generating.json").is_file()
    main([*small, "--min-objects", "1", "--max-objects", "2"])
    assert len(REFER(tmp_path, "synthetic").Imgs) == 4 and not (tmp_path / "synthetic" / "generating.json").exists()


def test_the_bounds_themselves_are_accepted():
    """Each range of ``check_arguments`` includes its ends: 16 px, one size, one object count, one expression, ..."""
    for min_size, max_size, min_objects, max_objects in ((16, 16, 1, 1), (64, 64, 3, 3), (16, 300, 1, 9)):
        check_arguments(min_size, max_size, min_objects, max_objects, max_expressions=1, workers=0, seed=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-images", "3"], "--num-images=3 is too small for train/val/testA/testB; give at least 4"),
        (["--num-images", "9", "--eval-images", "3"],
         "--num-images=9 leaves none for train after 3 x --eval-images=3 for val, testA and testB"),
        (["--eval-images", "-2"], "--eval-images (per held-out split) must be >= 0 (0: the default), got -2"),
        (["--min-size", "300"], "need 16 <= --min-size <= --max-size, got --min-size=300, --max-size=256"),
        (["--max-objects", "1"], "need 1 <= --min-objects <= --max-objects, got --min-objects=2, --max-objects=1"),
        (["--max-expressions", "0"], "--max-expressions must be >= 1, got 0"),
        (["--workers", "-1"], "--workers must be >= 0 (0: one per available CPU), got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
    ],
)  # fmt: skip
def test_command_line_errors_name_the_flags(tmp_path: Path, argv: list[str], message: str):
    with pytest.raises(ValueError) as caught:
        main(["--root", str(tmp_path / "data"), *argv])
    assert str(caught.value) == message
    assert not (tmp_path / "data").exists()

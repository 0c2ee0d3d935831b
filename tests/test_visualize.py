"""tools.visualize: overlays, the demo's panel strip, figures, failure buckets and word statistics (no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from tools import failures
from tools import visualize as vis


def _grey(h: int = 40, w: int = 50, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _square(h: int = 40, w: int = 50, y0: int = 10, y1: int = 30, x0: int = 10, x1: int = 25) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- overlays
def test_overlay_blends_inside_and_keeps_outside():
    image, mask = _grey(), _square()
    out = vis.overlay_mask(image, mask, colour=(255, 0, 0), alpha=0.25, outline=0)
    # 0.75 * 100 + 0.25 * 255 = 138.75 -> 139; 0.75 * 100 + 0.25 * 0 = 75
    assert out[mask].tolist() == [[139, 75, 75]] * int(mask.sum())
    assert np.array_equal(out[~mask], image[~mask])
    assert np.array_equal(image, _grey()), "the input must not be modified"


def test_overlay_outline_stays_on_the_mask_border():
    image, mask = _grey(), _square()
    out = vis.overlay_mask(image, mask, colour=(0, 0, 255), alpha=0.5, outline=1)
    changed = np.any(out != image, axis=2)
    assert np.array_equal(changed, mask)  # a 1-pixel contour lies on the mask's own border pixels
    assert out[10, 10].tolist() == [0, 0, 255] and out[20, 17].tolist() != [0, 0, 255]


def test_overlay_empty_mask_is_identity():
    image = _grey()
    assert np.array_equal(vis.overlay_mask(image, np.zeros((40, 50), bool)), image)


@pytest.mark.parametrize(
    "image, mask, match",
    [
        (_grey(), np.zeros((40, 49), bool), r"mask is \(40, 49\), expected the image's \[H, W\] = \(40, 50\)"),
        (_grey().astype(np.float32), _square(), r"RGB uint8 array \[H, W, 3\], got float32"),
        (_grey()[..., 0], _square(), r"RGB uint8 array \[H, W, 3\], got uint8 \(40, 50\)"),
    ],
)
def test_overlay_bad_inputs(image, mask, match):
    with pytest.raises(ValueError, match=match):
        vis.overlay_mask(image, mask)


def test_mask_iou_hand_values():
    a, b = _square(x0=10, x1=20), _square(x0=15, x1=25)  # 20 rows; 10 + 10 columns overlapping on 5
    assert vis.mask_iou(a, b) == pytest.approx(100 / 300)
    assert vis.mask_iou(a, a) == 1.0
    empty = np.zeros_like(a)
    assert vis.mask_iou(empty, empty) == 0.0 and vis.mask_iou(a, empty) == 0.0
    with pytest.raises(ValueError, match=r"prediction \(40, 50\) and ground truth \(4, 5\)"):
        vis.mask_iou(a, np.zeros((4, 5)))


def test_draw_outline_touches_only_the_border():
    image, mask = _grey(), _square()
    out = vis.draw_outline(image, mask, colour=(255, 255, 255), width=1)
    changed = np.any(out != image, axis=2)
    assert changed[mask].any() and not changed[~mask].any() and not changed[15:25, 12:23].any()
    with pytest.raises(ValueError, match=r"^ground-truth mask is \(40, 49\), expected the image's \[H, W\] = \(40, "):
        vis.draw_outline(image, mask[:, :49])


def test_compose_panels_layout_and_content():
    image = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
    masks = [_square(), _square(x0=30, x1=45)]
    out = vis.compose_panels(image, masks, ["the left one", "a much longer caption that has to wrap"], gap=4)
    band = out.shape[0] - 40
    assert out.dtype == np.uint8 and out.shape[1:] == (2 * 50 + 4, 3) and band > 0
    for e, mask in enumerate(masks):
        panel = out[band:, e * 54 : e * 54 + 50]
        assert np.array_equal(panel, vis.overlay_mask(image, mask, vis.PALETTE[e]))
        assert (out[:band, e * 54 : e * 54 + 50] != 255).any(), "caption text missing"
    assert (out[:, 50:54] == 255).all(), "gap between panels must stay white"
    with pytest.raises(ValueError, match="one caption per mask"):
        vis.compose_panels(image, masks, ["one caption"])


def test_compose_panels_in_rows_of_columns():
    """Five panels in rows of two: row e // 2, column e % 2, each under its caption; gaps and the empty cell white."""
    image = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
    masks = [_square(x0=5 * e, x1=5 * e + 10) for e in range(5)]
    out = vis.compose_panels(image, masks, [f"object {e}" for e in range(5)], gap=4, columns=2)
    band = (out.shape[0] - 3 * 40 - 2 * 4) // 3
    assert out.shape == (3 * (band + 40) + 2 * 4, 2 * 50 + 4, 3) and band > 0
    for e, mask in enumerate(masks):
        x, y = (e % 2) * 54, (e // 2) * (band + 40 + 4)
        assert np.array_equal(out[y + band : y + band + 40, x : x + 50], vis.overlay_mask(image, mask, vis.PALETTE[e]))
        assert (out[y : y + band, x : x + 50] != 255).any(), "caption text missing"
    assert (out[band + 40 : band + 44] == 255).all() and (out[:, 50:54] == 255).all()
    assert (out[-40:, 54:] == 255).all(), "the sixth cell is empty"
    with pytest.raises(ValueError, match="at least one column, got 0"):
        vis.compose_panels(image, masks, [""] * 5, columns=0)


def test_compose_panels_of_a_small_image_keep_whole_words():
    """A 12 x 16 image: each column is as wide as the longest caption word (11-px font) needs, the panel at its left,
    the rest of the cell and the gaps white, the word's ink reaching past the panel's width (not cut there), and the
    captions wrapped to the cell's width."""
    image = np.full((12, 16, 3), 90, np.uint8)
    masks = [_square(h=12, w=16, y0=2, y1=8, x0=3, x1=9), np.zeros((12, 16), bool)]
    out = vis.compose_panels(image, masks, ["rightmost", "a dot"], gap=4)
    font = ImageFont.load_default(size=11)
    cell = math.ceil(font.getlength("rightmost")) + 4
    band = out.shape[0] - 12
    assert out.shape[1] == 2 * cell + 4 and band == int(11 * 1.25) + 6  # one line each: "a dot" fits the cell
    for e, mask in enumerate(masks):
        x = e * (cell + 4)
        assert np.array_equal(out[band:, x : x + 16], vis.overlay_mask(image, mask, vis.PALETTE[e]))
        assert (out[band:, x + 16 : x + cell] == 255).all()
    assert (out[:, cell : cell + 4] == 255).all()  # the gap
    assert (out[:band, 20:cell] != 255).any()  # "rightmost" past the panel's 16 pixels
    caption = Image.new("RGB", (cell, band), "white")  # drawn here in the 11-px font, in half the panel's colour
    ImageDraw.Draw(caption).text((2, 3), "rightmost", fill=tuple(c // 2 for c in vis.PALETTE[0]), font=font)
    assert np.array_equal(out[:band, :cell], np.asarray(caption))


def test_compose_panels_scaled_to_the_pixel_budget():
    """Three panels of a 40 x 50 image within 3 x 20 x 25 pixels: each drawn at 20 x 25 from the image averaged over
    2 x 2 blocks (here constant blocks, so exactly the small image) and the mask's top-left pixel of each block."""
    small = (np.arange(20 * 25 * 3) % 251).astype(np.uint8).reshape(20, 25, 3)
    image = small.repeat(2, axis=0).repeat(2, axis=1)
    masks = [_square(y0=11, x0=11), _square(x0=30, x1=45), np.zeros((40, 50), bool)]  # (odd edges: half a block)
    out = vis.compose_panels(image, masks, ["a", "b", "c"], gap=4, max_pixels=3 * 20 * 25)
    band = out.shape[0] - 20
    assert out.shape[1] == 3 * 25 + 2 * 4
    for e, mask in enumerate(masks):
        expected = vis.overlay_mask(small, mask[::2, ::2], vis.PALETTE[e])
        assert np.array_equal(out[band:, e * 29 : e * 29 + 25], expected)
    assert vis.compose_panels(image, masks, ["a", "b", "c"], max_pixels=3 * 40 * 50).shape[1] == 3 * 50 + 2 * 4


def test_png_round_trip(tmp_path):
    mask = _square()
    path = vis.save_png(mask.astype(np.uint8) * 255, tmp_path / "sub" / "m.png")
    assert np.array_equal(vis.load_mask(path), mask)
    assert Image.open(path).size == (50, 40)
    with pytest.raises(FileNotFoundError, match="mask file not found: .*nope.png"):
        vis.load_mask(tmp_path / "nope.png")


# ----------------------------------------------------------------------------- figures
def test_side_by_side_figure_titles_and_iou(tmp_path):
    image, pred, gt = _grey(), _square(x0=10, x1=20), _square(x0=15, x1=25)
    fig = vis.figure_side_by_side(image, np.stack([pred, gt]), ["left", "right"], gts=[gt, None])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.axes[0].get_title() == '"left"\nIoU 0.333' and fig.axes[1].get_title() == '"right"'
    # two panels of 3.2 inches, each as tall as the 40 x 50 image's shape asks (2.56), and 0.8 for the titles
    assert tuple(fig.get_size_inches()) == pytest.approx((6.4, 3.36))
    fig.savefig(tmp_path / "f.png")  # headless: no display needed
    assert Image.open(tmp_path / "f.png").size[0] > 100
    with pytest.raises(ValueError, match="2 masks, 1 captions, 2 ground truths"):
        vis.figure_side_by_side(image, [pred, gt], ["left"])


def test_histogram_figure_counts():
    ious = [0.0, 0.05, 0.2, 0.55, 0.95, 1.0]
    fig = failures.figure_iou_histogram(ious, bins=10)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [2, 0, 1, 0, 0, 1, 0, 0, 0, 2]  # 1.0 falls in the last bin
    axes = fig.axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_xlim()) == ("IoU", "expressions", (0.0, 1.0))
    assert axes.get_title() == "6 expressions, mean IoU 0.458"  # (0 + 0.05 + 0.2 + 0.55 + 0.95 + 1) / 6
    assert [round(p.get_height(), 6) for p in fig.axes[1].patches] == [round(100 * 2 / 6, 6), round(100 / 6, 6),
                                                                        50.0]  # fmt: skip
    with pytest.raises(ValueError, match="no IoU values"):
        failures.figure_iou_histogram([])


def test_bucket_shares_keep_one_scale_with_room_above_100_percent():
    """Two models' bucket bars compare at a glance (the same 0-based axis) and a 100% bar keeps its label inside."""
    axes = [failures.figure_iou_histogram(ious).axes[1] for ious in ([1.0] * 6, [0.0, 0.3, 0.9])]
    assert axes[0].get_ylim() == axes[1].get_ylim() and axes[0].get_ylim()[0] == 0 and axes[0].get_ylim()[1] >= 110


def test_cases_figure_grid():
    image, gt, pred = _grey(), _square(), _square(x0=30, x1=45)
    cases = [{"image": image, "gt": gt, "pred": pred, "sentence": "s", "iou": 0.0, "title": "ref 3"}] * 2
    fig = vis.figure_cases(cases)
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title() == 'ref 3\n"s"' and fig.axes[2].get_title() == "prediction, IoU 0.000"
    untitled = vis.figure_cases([{k: v for k, v in cases[0].items() if k != "title"}])
    assert untitled.axes[0].get_title() == '"s"'  # the sentence alone, no empty line above it
    with pytest.raises(ValueError, match="no cases"):
        vis.figure_cases([])


def test_word_figure_rows():
    stats = failures.word_failure_stats(*SENTENCES_IOUS, min_count=2)
    fig = failures.figure_word_failures(stats, top=2)
    ax = fig.axes[0]
    position = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert set(position) == {"left (position, n=2)", "ball (other, n=3)"}
    assert position["left (position, n=2)"] > position["ball (other, n=3)"], "the top-ranked word is drawn highest"
    assert len(ax.patches) == 4  # a failure bar and a success bar per word
    assert (ax.get_xlabel(), ax.get_title()) == ("% of expressions", "words that come with failures (top) vs successes")
    widths = [p.get_width() for p in ax.patches]  # the failure bars first, in percent
    assert widths == pytest.approx([100 * r[k] for k in ("fail_share", "success_share") for r in stats[:2]])
    with pytest.raises(ValueError, match="no words"):
        failures.figure_word_failures([])


# ----------------------------------------------------------------------------- statistics
def test_failure_buckets_edges():
    rows = failures.failure_buckets([0.0, 0.05, 0.1, 0.3, 0.5, 0.9])  # 0.1 and 0.5 belong to the upper buckets
    assert [r["bucket"] for r in rows] == ["IoU < 0.1", "0.1 <= IoU < 0.5", "IoU >= 0.5"]
    assert [r["count"] for r in rows] == [2, 2, 2] and [r["share"] for r in rows] == [pytest.approx(1 / 3)] * 3
    assert all(math.isnan(r["share"]) for r in failures.failure_buckets([]))
    for edges in [(0.5, 0.1), (0.5, 0.5), (-0.1, 0.5), (0.1, 1.1)]:  # an empty middle bucket is refused too
        with pytest.raises(ValueError, match=rf"0 <= lo < hi <= 1, got \({edges[0]}, {edges[1]}\)"):
            failures.failure_buckets([0.2], edges=edges)
    assert [r["count"] for r in failures.failure_buckets([0.0, 1.0], edges=(0.0, 1.0))] == [0, 1, 1]  # edges inclusive


SENTENCES_IOUS = (["Left red ball", "left blue ball, ball", "right red ball", "red cup"], [0.1, 0.2, 0.9, 0.8])


def test_word_failure_stats_hand_values():
    stats = failures.word_failure_stats(*SENTENCES_IOUS, fail_below=0.5, min_count=2)
    by_word = {r["word"]: r for r in stats}
    assert [r["word"] for r in stats] == ["left", "ball", "red"]  # blue, right, cup: one expression each
    left = by_word["left"]  # in both failures, no success
    assert (left["fail_count"], left["success_count"], left["fail_share"], left["success_share"]) == (2, 0, 1.0, 0.0)
    assert left["ratio"] == pytest.approx((2.5 / 3) / (0.5 / 3)) and left["group"] == "position"
    ball = by_word["ball"]  # counted once in "left blue ball, ball"
    assert (ball["count"], ball["fail_count"], ball["success_count"]) == (3, 2, 1)
    assert ball["ratio"] == pytest.approx(2.5 / 1.5) and ball["fail_rate"] == pytest.approx(2 / 3)
    assert by_word["red"]["ratio"] == pytest.approx(1.5 / 2.5) and by_word["red"]["group"] == "colour"
    with pytest.raises(ValueError, match="4 sentences but 3 IoU values"):
        failures.word_failure_stats(SENTENCES_IOUS[0], [0.1, 0.2, 0.3])


def test_group_failure_stats_hand_values():
    rows = {r["group"]: r for r in failures.group_failure_stats(*SENTENCES_IOUS)}
    assert rows["position"]["expressions"] == 3 and rows["position"]["fail_rate"] == pytest.approx(2 / 3)
    assert rows["position"]["mean_IoU"] == pytest.approx(0.4)
    assert rows["colour"]["expressions"] == 4 and rows["colour"]["fail_rate"] == 0.5
    assert rows["relation"]["expressions"] == 0 and math.isnan(rows["relation"]["fail_rate"])
    assert rows["all"]["expressions"] == 4 and rows["all"]["mean_IoU"] == pytest.approx(0.5)


def test_words_and_groups():
    assert failures.words("The LEFT-most man's hat, left") == ["the", "left", "most", "man's", "hat"]
    assert failures.word_group("leftmost") == "position" and failures.word_group("under") == "relation"
    assert failures.word_group("giraffe") == "other"


def test_text_table():
    text = failures.text_table([{"a": 1, "b": 0.5}, {"a": 22, "b": float("nan")}])
    assert text.splitlines() == ["a   b", "-----", "1   0.500", "22  nan"]
    assert failures.text_table([]) == "(no rows)"


def test_load_results(tmp_path):
    good = {"ref_id": 1, "sent_id": 2, "sentence": "left dog", "IoU": 0.5, "I": 5, "U": 10}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "sent_id": 3}) + "\n")
    assert [r["sent_id"] for r in failures.load_results(path)] == [2, 3]
    path.write_text(json.dumps(good) + "\n" + json.dumps({"ref_id": 1, "sentences": ["a"], "IoU": 0.1}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl, line 2: missing \['sentence', 'I', 'U'\]"):
        failures.load_results(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        failures.load_results(path)
    for line, kind in (('"ref_id sentence IoU I U"', "str"), ("[1, 2]", "list"), ("7", "int")):
        path.write_text(json.dumps(good) + "\n" + line + "\n")  # names of the keys in a string are not a record
        with pytest.raises(ValueError, match=rf"r.jsonl, line 2: a JSON {kind}, not a record \(an object\)$"):
            failures.load_results(path)
    path.write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        failures.load_results(path)
    with pytest.raises(FileNotFoundError, match="per-expression results not found"):
        failures.load_results(tmp_path / "missing.jsonl")


def test_png_pair_written_all_or_nothing(tmp_path):
    """An overlay and its mask appear together: if one cannot be written, neither target changes."""
    overlay, mask = tmp_path / "out" / "run" / "overlay.png", tmp_path / "out" / "run" / "mask.png"  # folders made
    vis.save_pngs({overlay: np.full((4, 5, 3), 7, np.uint8), mask: np.zeros((4, 5), np.uint8)})
    before = overlay.read_bytes(), mask.read_bytes()
    with pytest.raises(TypeError):  # PIL cannot make an image of float64 RGB: the second file fails
        vis.save_pngs({overlay: np.zeros((4, 5, 3), np.uint8), mask: np.zeros((4, 5, 3), np.float64)})
    assert (overlay.read_bytes(), mask.read_bytes()) == before
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["mask.png", "overlay.png"]  # no temporary left
    assert np.array_equal(np.asarray(Image.open(overlay)), np.full((4, 5, 3), 7, np.uint8))
    folder = overlay.parent / "folder.png"
    folder.mkdir()  # a folder where a file is to go: named, refused before any is written
    with pytest.raises(IsADirectoryError, match=r"^.*folder\.png is a folder: a file cannot be written in its place"):
        vis.save_pngs({overlay: np.zeros((4, 5, 3), np.uint8), folder: np.zeros((4, 5), np.uint8)})
    assert (overlay.read_bytes(), mask.read_bytes()) == before
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["folder.png", "mask.png", "overlay.png"]


def test_pngs_where_nothing_can_be_written_are_one_line(tmp_path):
    """A folder that cannot be made (a file has its name) or written (here a file given as the folder, which the
    temporary file cannot go into): PermissionError naming the target, not the temporary file."""
    from utils.atomic import staged

    (tmp_path / "afile").write_text("")
    with pytest.raises(PermissionError, match=r"^cannot write .*afile/o\.png: its folder .*afile cannot be made "):
        vis.save_pngs({tmp_path / "afile" / "o.png": np.zeros((4, 5), np.uint8)})
    with pytest.raises(PermissionError, match=r"^cannot write .*afile/o\.png: Not a directory in .*afile$"):
        with staged([tmp_path / "afile" / "o.png"]):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

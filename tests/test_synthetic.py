"""The synthetic REFER dataset: format, splits, pixels agreeing with annotations, every expression singling out its
object (checked by an evaluator written here, independent of the generator's), wording, determinism, speed."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import data.synthetic as synthetic
from data.synthetic import (
    CATEGORIES,
    COLOURS,
    GROUP_OF_SPLIT,
    SIZE_RANGES,
    SPLIT_ORDER,
    SyntheticRootError,
    ensure_synthetic,
    generate,
)
from data.synthetic_draw import _background, _segmentation, _shape_points
from data.synthetic_text import (
    KIND_WORDS,
    POSITION_WORDS,
    RELATION_WORDS,
    SIZE_WORDS,
    _candidates,
    describe_object,
)
from refer import REFER
from tools.synthetic import main

REPO = Path(__file__).resolve().parents[1]
SUPER = {c["id"]: c["supercategory"] for c in CATEGORIES}
NATIVE_POINTS = {"circle": 36, "heart": 40, "square": 4, "triangle": 3, "star": 10}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate(root, num_images=66, seed=5)
    return root


@pytest.fixture(scope="module")
def refer(root: Path) -> REFER:
    return REFER(root, "synthetic", "unc")


@pytest.fixture(scope="module")
def attributes(root: Path) -> dict:
    return json.loads((root / "synthetic" / "attributes.json").read_text())


def scene(refer: REFER, attributes: dict, image_id: int) -> dict[int, dict]:
    """ann_id -> attributes and visible-box centre (x right, y down)."""
    out = {}
    for ann in refer.imgToAnns[image_id]:
        x, y, w, h = ann["bbox"]
        out[ann["id"]] = dict(attributes["objects"][str(ann["id"])], cx=x + w / 2, cy=y + h / 2)
    return out


def attr_match(obj: dict, desc: dict) -> bool:
    return all(obj[a] == desc[a] for a in ("size", "colour", "kind") if a in desc)


def holds(desc: dict, ann_id: int, objs: dict[int, dict]) -> bool:
    """Does ``desc`` describe object ``ann_id``? Strict inequalities, no margins."""
    # written independently of the generator's table: x for left/right, y (down) otherwise
    axis = {d: ("cx" if d in ("left", "right") else "cy", -1 if d in ("left", "top", "above") else 1)
            for d in ("left", "right", "top", "bottom", "above", "below")}
    obj = objs[ann_id]
    if not attr_match(obj, desc):
        return False
    if "position" in desc:
        key, sign = axis[desc["position"]]
        rivals = [o for a, o in objs.items() if a != ann_id and attr_match(o, desc)]
        return all(sign * (obj[key] - o[key]) > 0 for o in rivals)
    if "relation" in desc:
        landmarks = [a for a, o in objs.items() if attr_match(o, desc["relation"]["landmark"])]
        assert len(landmarks) == 1, f"landmark {desc['relation']['landmark']} names {len(landmarks)} objects"
        key, sign = axis[desc["relation"]["direction"]]
        return landmarks[0] != ann_id and sign * (obj[key] - objs[landmarks[0]][key]) > 0
    return True


def test_files_and_format(root: Path, refer: REFER):
    data_dir = root / "synthetic"
    assert {p.name for p in data_dir.iterdir()} == {
        "refs(unc).p",
        "instances.json",
        "attributes.json",
        "generator.json",
    }
    instances = json.loads((data_dir / "instances.json").read_text())
    assert set(instances) == {"info", "images", "annotations", "categories"}  # COCO's layout (pycocotools' info())
    generator = json.loads((data_dir / "generator.json").read_text())
    assert instances["info"] == {"description": "LAVT synthetic referring dataset", "version": generator["version"]}
    assert {c["supercategory"] for c in instances["categories"]} == {"round", "angular"}
    for img in instances["images"]:
        assert set(img) >= {"id", "file_name", "height", "width"}
        assert img["file_name"] == f"COCO_train2014_{img['id']:012d}.jpg"
        with Image.open(Path(refer.IMAGE_DIR) / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])
        assert 128 <= min(img["height"], img["width"]) and max(img["height"], img["width"]) <= 256
        assert max(img["height"], img["width"]) <= round(4 / 3 * min(img["height"], img["width"]))
        assert 2 <= len(refer.imgToAnns[img["id"]]) <= 5
    shapes = [(img["height"] > img["width"]) - (img["height"] < img["width"]) for img in instances["images"]]
    assert {-1, 1} <= set(shapes)  # upright and lying images (up to 4:3, above)
    for ann in instances["annotations"]:
        assert set(ann) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        seg = ann["segmentation"]
        assert isinstance(seg, list) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
        img = refer.Imgs[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
        assert ann["area"] == mask_utils.area(rle) > 0
        assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist(), abs=0.01)
    for ann in instances["annotations"]:  # whole inside the picture, 1 px from its edges (0.01-px rounding)
        img = refer.Imgs[ann["image_id"]]
        for poly in ann["segmentation"]:
            xs, ys = poly[0::2], poly[1::2]
            assert 0.99 <= min(xs) <= max(xs) <= img["width"] - 0.99
            assert 0.99 <= min(ys) <= max(ys) <= img["height"] - 0.99
    coords = [c for ann in instances["annotations"] for poly in ann["segmentation"] for c in poly]
    assert all(round(c, 2) == c for c in coords) and any(c != round(c) for c in coords)  # 0.01-px outlines
    for split, n_images in (("train", 48), ("val", 6), ("testA", 6), ("testB", 6)):  # 66 images, 8:1:1:1
        assert 0.75 * n_images <= len({r["image_id"] for r in refer.data["refs"] if r["split"] == split}) <= n_images
    for ref in refer.data["refs"]:
        assert ref["file_name"] == refer.Imgs[ref["image_id"]]["file_name"][:-4] + f"_{ref['ann_id']}.jpg"
        assert 1 <= len(ref["sentences"]) <= 3 and ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert ref["category_id"] == refer.Anns[ref["ann_id"]]["category_id"]
        for sent in ref["sentences"]:
            assert sent["sent"] == sent["raw"].lower() and sent["tokens"] == sent["sent"].split()


def test_test_splits_by_category_group(refer: REFER):
    for split, group in GROUP_OF_SPLIT.items():
        refs = [refer.Refs[r] for r in refer.getRefIds(split=split)]
        assert refs and all(SUPER[r["category_id"]] == group for r in refs)
        for image_id in {r["image_id"] for r in refs}:
            assert sum(SUPER[a["category_id"]] == group for a in refer.imgToAnns[image_id]) >= 2
    train_groups = {SUPER[refer.Refs[r]["category_id"]] for r in refer.getRefIds(split="train")}
    assert train_groups == {"round", "angular"}


def test_pixels_agree_with_annotations(refer: REFER, attributes: dict):
    """The inside of every object has the colour its attributes name; small shapes are smaller than big ones."""
    palette = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    sizes = set()
    for image_id, img in list(refer.Imgs.items())[:30]:
        pixels = np.asarray(Image.open(Path(refer.IMAGE_DIR) / img["file_name"]).convert("RGB"), dtype=float)
        short = min(img["height"], img["width"])
        for ann in refer.imgToAnns[image_id]:
            obj = attributes["objects"][str(ann["id"])]
            assert [c["name"] for c in CATEGORIES if c["id"] == ann["category_id"]] == [obj["kind"]]
            m = mask_utils.decode(
                mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
            )
            inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
            mean = pixels[inner].mean(0)
            assert names[int(np.argmin(((palette - mean) ** 2).sum(1)))] == obj["colour"]
            extent = max(ann["bbox"][2:]) / short
            sizes.add(obj["size"])
            if obj["size"] == "small":
                assert extent < SIZE_RANGES["small"][1] + 0.02  # polygon rounding
            elif not obj["occluded"]:
                assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) == 2 * NATIVE_POINTS[obj["kind"]]
                assert extent > 0.8 * SIZE_RANGES["big"][0] > SIZE_RANGES["small"][1] + 0.02  # a square fills 0.85
    assert sizes == {"small", "big"}  # both were checked


def test_every_expression_singles_out_its_object(refer: REFER, attributes: dict):
    checked = 0
    for ref in refer.data["refs"]:
        objs = scene(refer, attributes, ref["image_id"])
        assert len(objs) >= 2  # ignoring the sentence cannot beat picking an object at random
        for sent in ref["sentences"]:
            desc = attributes["sentences"][str(sent["sent_id"])]
            matching = [a for a in objs if holds(desc, a, objs)]
            assert matching == [ref["ann_id"]], (sent["sent"], desc, matching)
            checked += 1
    assert checked > 300


def test_positions_hold_with_the_documented_margin(refer: REFER, attributes: dict):
    """docs/data.md: a position or relation is used only when it holds by 8% of the image side along its axis
    (checked here between the visible-box centres of objects that are not occluded)."""
    axis = {"left": ("cx", "width"), "right": ("cx", "width"), "top": ("cy", "height"), "bottom": ("cy", "height"),
            "above": ("cy", "height"), "below": ("cy", "height")}  # fmt: skip
    gaps = []
    for ref in refer.data["refs"]:
        objs, img = scene(refer, attributes, ref["image_id"]), refer.Imgs[ref["image_id"]]
        target = objs[ref["ann_id"]]
        for sent in ref["sentences"]:
            desc = attributes["sentences"][str(sent["sent_id"])]
            if "position" in desc:
                direction = desc["position"]
                others = [o for a, o in objs.items() if a != ref["ann_id"] and attr_match(o, desc)]
            elif "relation" in desc:
                direction = desc["relation"]["direction"]
                others = [o for o in objs.values() if attr_match(o, desc["relation"]["landmark"])]
            else:
                continue
            key, side = axis[direction]
            for other in others:
                if not (target["occluded"] or other["occluded"]):
                    gaps.append(abs(target[key] - other[key]) / img[side])
    assert len(gaps) > 100 and min(gaps) >= 0.08 - 1e-3, (len(gaps), min(gaps))


@pytest.mark.parametrize("twin_x,offered", [(39.5, True), (40.5, False)])
def test_a_relation_is_offered_only_when_no_look_alike_lies_that_way(twin_x: float, offered: bool):
    """"the circle right of the square": the target lies right of the landmark by the margin, and no other object
    the words fit lies right of it at all (a look-alike half a pixel to the right makes the phrase ambiguous)."""
    circle = dict(size="small", colour="red", kind="circle", cy=50.0)
    objects = [dict(circle, cx=80.0), dict(size="big", colour="blue", kind="square", cx=40.0, cy=50.0),
               dict(circle, cx=twin_x)]  # fmt: skip
    _, _, relations = _candidates(objects, 0, 100, 100)
    assert any(r["relation"]["direction"] == "right" for r in relations) is offered


def test_an_object_with_few_descriptions_gets_each_once_when_more_are_asked():
    """Twins apart from their position: the left one has 8 descriptions, "left" with any set of its attributes.
    Asked for up to 20 expressions, it gets the shortest first and never one twice; where the draw asks for more than
    there are, all 8."""
    twin = {"size": "big", "colour": "red", "kind": "circle"}
    objects = [dict(twin, cx=20.0, cy=50.0), dict(twin, cx=80.0, cy=50.0)]
    every = [{**{k: twin[k] for k in keys}, "position": "left"} for n in range(4) for keys in combinations(twin, n)]
    counts = []
    for seed in range(6):
        descriptions = [d for d, _ in describe_object(objects, 0, 100, 100, np.random.default_rng(seed), 20, 0.5)]
        assert descriptions[0] == {"position": "left"} and all(d in every for d in descriptions)
        assert len({str(sorted(d.items())) for d in descriptions}) == len(descriptions)  # none twice
        counts.append(len(descriptions))
    assert len(every) == 8 and max(counts) == 8, counts


def test_square_circle_triangle_and_heart_outlines():
    """Unrotated, a square's corners lie at (+-0.85 r, +-0.85 r); rotated, its sides stay 1.7 r; a circle's points
    lie at r from the centre; the triangle (corners at 1.1 r, one up) and the heart have their boxes centred on the
    object's centre, where the expressions' positions are measured from."""
    with pytest.raises(ValueError, match=r"unknown shape kind 'oval'; expected one of \['circle', "):
        _shape_points("oval", 10.0, 0.0)
    corners = sorted(map(tuple, _shape_points("square", 10.0, 0.0).round(9)))
    assert corners == [(-8.5, -8.5), (-8.5, 8.5), (8.5, -8.5), (8.5, 8.5)]
    square = _shape_points("square", 10.0, 0.3)
    assert np.linalg.norm(np.roll(square, -1, 0) - square, axis=1) == pytest.approx([17.0] * 4)
    assert np.linalg.norm(_shape_points("circle", 10.0, 0.0), axis=1) == pytest.approx([10.0] * 36)
    # corners at 1.1 r towards -90, 30 and 150 degrees: y -11, 5.5, 5.5, moved up by (5.5 - 11) / 2
    triangle = sorted(map(tuple, _shape_points("triangle", 10.0, 0.0)))
    x = 11 * math.cos(math.radians(30))
    assert triangle == [pytest.approx((-x, 8.25)), pytest.approx((0.0, -8.25), abs=1e-9), pytest.approx((x, 8.25))]
    heart = _shape_points("heart", 10.0, 0.0)
    assert heart.max(0) + heart.min(0) == pytest.approx([0.0, 0.0], abs=1e-9)


def test_an_object_without_expressions_leaves_the_others_described(tmp_path, monkeypatch):
    """An object that nothing tells apart (identical twins side by side) gets no ref; the objects after it still do."""
    args = dict(min_size=128, max_size=256, min_objects=4, max_objects=4, max_expressions=3, repeat_prob=0.0,
                spatial_weight=0.5)  # fmt: skip
    real = synthetic.describe_object
    monkeypatch.setattr(synthetic, "describe_object", lambda objects, t, *a: [] if t == 1 else real(objects, t, *a))
    _, objects, described = synthetic._draw_image(0, "train", seed=3, args=args, jpeg_quality=90, image_dir=tmp_path)
    assert len(objects) == 4 and [t for t, _ in described] == [0, 2, 3]


def test_background_varies_in_brightness_not_in_hue():
    """The textured background: muted, its brightness changing across the picture (so that a plain colour does not
    mark the background), with little hue (object colours stay the most saturated thing). Over 6x6 blocks of 16 px
    (finer than the smooth noise, coarser than the stripes, checks and pixel noise), for 20 draws."""
    for seed in range(20):
        blocks = _background(np.random.default_rng(seed), 96, 96).reshape(6, 16, 6, 16, 3).mean((1, 3))
        brightness = blocks.mean(-1)
        assert brightness.max() - brightness.min() > 25, seed
        assert np.abs(blocks - brightness[..., None]).max() < 30, seed


def test_heart_stands_upright():
    """Unrotated, a heart's point is at the bottom (y down) and its two lobes are above its centre; its box is
    centred on the origin, half-extent ``r`` across."""
    pts = _shape_points("heart", 10.0, 0.0)
    x, y = pts[:, 0], pts[:, 1]
    assert x.max() == pytest.approx(10.0) and x.min() == pytest.approx(-10.0)
    assert y.max() == pytest.approx(-y.min())
    bottom = pts[np.argmax(y)]
    assert abs(bottom[0]) < 1e-9 and bottom[1] > 0  # the point, straight below the centre
    widest = pts[np.abs(x) > 0.9 * 10.0]
    assert len(widest) >= 2 and (widest[:, 1] < 0).all()  # the lobes: the widest rows are above the centre


def test_wording_matches_description(refer: REFER, attributes: dict):
    colour_words, size_words = set(COLOURS), {w for ws in SIZE_WORDS.values() for w in ws}
    kind_words = {w for ws in KIND_WORDS.values() for w in ws}
    kinds_seen = {"position": 0, "relation": 0, "attributes": 0}
    # one article per noun phrase: never "the the ..." nor "the left the ..."
    before_the = {w for group in POSITION_WORDS.values() for before, _ in group.values() for w in before} | {"the"}
    for sent_id, sent in refer.Sents.items():
        desc = attributes["sentences"][str(sent_id)]
        tokens, text = set(sent["tokens"]), " " + sent["sent"] + " "
        assert not any(f" {w} the " in text for w in before_the), sent["sent"]
        parts = [desc] + ([desc["relation"]["landmark"]] if "relation" in desc else [])
        assert tokens & colour_words == {p["colour"] for p in parts if "colour" in p}, sent["sent"]
        assert tokens & kind_words == {w for p in parts if "kind" in p for w in KIND_WORDS[p["kind"]]} & tokens
        assert all(tokens & set(KIND_WORDS[p["kind"]]) for p in parts if "kind" in p), sent["sent"]
        assert tokens & size_words == {w for p in parts if "size" in p for w in SIZE_WORDS[p["size"]]} & tokens
        assert all(tokens & set(SIZE_WORDS[p["size"]]) for p in parts if "size" in p), sent["sent"]
        if "position" in desc:
            phrases = [w for group in POSITION_WORDS.values() for ws in group[desc["position"]] for w in ws]
            assert any(f" {w} " in text for w in phrases), sent["sent"]
            kinds_seen["position"] += 1
        elif "relation" in desc:
            assert any(f" {w} " in text for w in RELATION_WORDS[desc["relation"]["direction"]]), sent["sent"]
            kinds_seen["relation"] += 1
        else:
            kinds_seen["attributes"] += 1
    assert min(kinds_seen.values()) > 20, kinds_seen


@pytest.mark.parametrize("workers", [1, 3])
def test_deterministic(root: Path, tmp_path: Path, workers: int):
    # the module fixture is drawn by one process per CPU: any number of workers writes the same bytes
    generate(tmp_path / "a", num_images=66, seed=5, workers=workers)
    for name in ("refs(unc).p", "instances.json", "attributes.json", "generator.json"):
        assert (tmp_path / "a" / "synthetic" / name).read_bytes() == (root / "synthetic" / name).read_bytes(), name
    images = sorted((root / "images/mscoco/images/train2014").iterdir())
    assert len(images) == 66
    for path in images:
        assert (tmp_path / "a/images/mscoco/images/train2014" / path.name).read_bytes() == path.read_bytes()
    generate(tmp_path / "b", num_images=66, seed=6)
    refs_a = pickle.loads((root / "synthetic/refs(unc).p").read_bytes())
    refs_b = pickle.loads((tmp_path / "b/synthetic/refs(unc).p").read_bytes())
    assert [r["sentences"] for r in refs_a] != [r["sentences"] for r in refs_b]


def test_ensure_synthetic_generates_only_when_needed(tmp_path: Path, caplog):
    instances = tmp_path / "synthetic" / "instances.json"
    ensure_synthetic(tmp_path, num_images=8, min_size=64, max_size=80)
    stamp = instances.stat().st_mtime_ns
    os.utime(instances, ns=(stamp - 10**9, stamp - 10**9))
    stamp = instances.stat().st_mtime_ns
    ensure_synthetic(tmp_path, num_images=8, min_size=64, max_size=80)
    assert instances.stat().st_mtime_ns == stamp  # same arguments: kept
    ensure_synthetic(tmp_path, num_images=8, min_size=64, max_size=80, workers=1)
    assert instances.stat().st_mtime_ns == stamp  # the number of workers does not change the data
    with caplog.at_level(logging.WARNING, logger="data.synthetic"):
        ensure_synthetic(tmp_path, num_images=8, min_size=64, max_size=80, seed=1)
    assert instances.stat().st_mtime_ns != stamp  # other arguments: regenerated, and said why
    assert caplog.records[-1].getMessage() == (
        f"synthetic dataset in {tmp_path.resolve()} was made with other arguments (seed 0 -> 1): removed the 12 files "
        "it wrote (its images and annotation files), generating it anew"
    )  # 8 images, the 3 annotation files and generator.json
    stamp = instances.stat().st_mtime_ns
    os.utime(instances, ns=(stamp - 10**9, stamp - 10**9))
    stamp = instances.stat().st_mtime_ns
    ensure_synthetic(tmp_path, force=True, num_images=8, min_size=64, max_size=80, seed=1)
    assert instances.stat().st_mtime_ns != stamp  # force: regenerated all the same
    with pytest.raises(TypeError, match="num_image"):
        ensure_synthetic(tmp_path, num_image=8)


def test_a_removal_cut_off_is_resumed_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Regenerating with other arguments first removes the old files; killed midway, the markers, removed last, are
    still there, so the next run removes the rest and generates anew instead of refusing a folder of stray files."""
    args = {"num_images": 8, "min_size": 64, "max_size": 80}
    ensure_synthetic(tmp_path, **args)
    unlink, count = Path.unlink, []

    def killed_after_three(self, *a, **k):
        if len(count) == 3:
            raise KeyboardInterrupt("killed")
        count.append(self)
        return unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, seed=1, **args)
    monkeypatch.undo()
    assert len(count) == 3 and (tmp_path / "synthetic" / "generator.json").is_file()
    ensure_synthetic(tmp_path, seed=1, **args)
    assert json.loads((tmp_path / "synthetic" / "generator.json").read_text())["seed"] == 1
    assert len(REFER(tmp_path, "synthetic").Imgs) == 8


def test_the_generation_logs_what_it_wrote_and_how_long_it_took(tmp_path: Path, caplog):
    """One INFO line: the images, objects, refs and sentences written (counted here from the files) and the
    seconds taken, at most the time the call took."""
    start = time.time()
    with caplog.at_level(logging.INFO, logger="data.synthetic"):
        generate(tmp_path, num_images=6, min_size=64, max_size=64, workers=1)
    took = time.time() - start
    said = [r.getMessage() for r in caplog.records if r.name == "data.synthetic"]
    refer = REFER(tmp_path, "synthetic")
    sentences = sum(len(r["sentences"]) for r in refer.Refs.values())
    line = re.fullmatch(
        rf"synthetic REFER dataset: 6 images, {len(refer.Anns)} objects, {len(refer.Refs)} refs, {sentences} "
        rf"sentences in (\d+\.\d)s -> {re.escape(str(tmp_path))}",
        said[-1],
    )  # fmt: skip
    assert line is not None, said
    assert 0 <= float(line[1]) <= took + 0.05


def test_a_larger_set(tmp_path: Path):
    """220 images: the expected number of objects (2-5 an image). (No wall-clock check: the
    timing of generation is reported in README.md, not asserted.)"""
    generate(tmp_path, num_images=220, seed=1)
    annotations = json.loads((tmp_path / "synthetic/instances.json").read_text())["annotations"]
    assert 2 * 220 <= len(annotations) <= 5 * 220 and len(annotations) > 600


def test_command_line(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "tools.synthetic", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "--num-images" in out and "--root" in out
    main(["--root", str(tmp_path), "--num-images", "4", "--min-size", "64", "--max-size", "64", "--seed", "2",
          "--min-objects", "2", "--max-objects", "3", "--max-expressions", "2"])
    assert len(REFER(tmp_path, "synthetic").Imgs) == 4
    # --seed 2 is the seed 2, --max-expressions 2 the number 2, ...
    generate(tmp_path / "a", num_images=4, min_size=64, max_size=64, seed=2, min_objects=2, max_objects=3,
             max_expressions=2)  # fmt: skip
    for name in ("instances.json", "generator.json"):  # the same images, and the arguments recorded as numbers
        assert (tmp_path / "synthetic" / name).read_bytes() == (tmp_path / "a" / "synthetic" / name).read_bytes()
    main(["--root", str(tmp_path / "b"), "--num-images", "9", "--eval-images", "2", "--min-size", "64",
          "--max-size", "64"])
    refer = REFER(tmp_path / "b", "synthetic")
    images = {s: len({refer.Refs[r]["image_id"] for r in refer.getRefIds(split=s)}) for s in SPLIT_ORDER}
    assert images == {"train": 3, "val": 2, "testA": 2, "testB": 2}
    done = subprocess.run([sys.executable, "-m", "tools.synthetic", "--root", str(tmp_path / "cli"), "--num-images",
                           "4", "--min-size", "64", "--max-size", "64"], cwd=REPO, capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert " INFO synthetic REFER dataset: 4 images, " in done.stderr  # what it wrote, as it goes
    old = subprocess.run([sys.executable, "-m", "data.synthetic", "--root", str(tmp_path / "old")], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert (old.returncode, old.stderr) == (
        2, "python -m data.synthetic: error: the command is python -m tools.synthetic (same options)\n"
    )  # the command's former name: said where it is, nothing written
    assert not (tmp_path / "old").exists()


def test_a_full_disk_is_one_error_and_the_next_run_cleans_up(tmp_path: Path, monkeypatch):
    """The disk fills at the third image: a SyntheticRootError naming that file, no part of it left; the next run
    with room removes what the first wrote and generates the set."""
    real, written = Path.write_bytes, []

    def fills(path, data):
        if len(written) == 3:  # generating.json, then two images
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", fills)
    small = dict(num_images=4, min_size=64, max_size=64, workers=1)
    with pytest.raises(SyntheticRootError) as caught:
        ensure_synthetic(tmp_path, **small)
    third = tmp_path / "images/mscoco/images/train2014/COCO_train2014_000001000002.jpg"
    assert str(caught.value) == (f"cannot write the synthetic dataset's {third} (DATA.ROOT, --root): No space left on "
                                 "device; the next run into that root removes what this one wrote")  # fmt: skip
    assert not third.exists() and (tmp_path / "synthetic/generating.json").is_file()
    monkeypatch.setattr(Path, "write_bytes", real)
    ensure_synthetic(tmp_path, **small)
    assert len(REFER(tmp_path, "synthetic").Imgs) == 4 and third.is_file()


def test_the_visible_part_of_a_covered_object_keeps_a_three_point_outline():
    """A covered object whose visible part is a right triangle: its one contour has 3 points (OpenCV's simple chain:
    the corners), a polygon RefCOCO-style; outlines of fewer points (no area) are left out."""
    visible = np.zeros((20, 20), bool)
    visible[2:10, 2:10] = np.tril(np.ones((8, 8), bool))
    obj = {"visible": visible, "full_area": int(visible.sum()) + 10, "polygon": np.zeros((3, 2))}
    assert _segmentation(obj) == [[2.0, 2.0, 2.0, 9.0, 9.0, 9.0]]
    line = np.zeros((20, 20), bool)
    line[5, 2:12] = True  # a contour of 2 points
    assert _segmentation({**obj, "visible": line}) == []

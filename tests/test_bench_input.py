"""``tools.bench_input``: the input pipeline's benchmark, its rows and the REFER folder of JPEGs it times."""

from __future__ import annotations

import json
from pathlib import Path

from tools import bench_input


def test_input_benchmark_smoke(capsys, monkeypatch):
    """``tools.bench_input``: one row per preprocessing and form, printed as JSON lines, then the machine line; each
    row times a dataset built as the row says."""
    import cv2

    cv2.setNumThreads(2)
    timed, real = [], bench_input.bench
    monkeypatch.setattr(bench_input, "bench", lambda ds, *a: timed.append((ds.resize, ds.mask_parts,
                                                                          ds.eval_mode)) or real(ds, *a))  # fmt: skip
    rows = bench_input.main(["--size", "48", "--items", "3", "--repeats", "1"])
    assert timed == [("pil", "official", False), ("pil", "official", True), ("cv2", "union", False),
                     ("cv2", "union", True)]  # fmt: skip
    assert cv2.getNumThreads() == 1  # as DataLoader workers run it (data/opencv.py)
    assert [(r["resize"], r["mask_parts"], r["form"], r["size"]) for r in rows] == [
        ("pil", "official", "train", 48), ("pil", "official", "eval", 48),
        ("cv2", "union", "train", 48), ("cv2", "union", "eval", 48),
    ]  # fmt: skip
    assert all(r["items_per_cpu_s"] > 0 for r in rows)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines[:-1]] == rows and lines[-1].startswith("# ")


def test_the_input_benchmarks_folder_holds_photo_like_jpegs(tmp_path):
    """``make_refer_folder``: REFER-readable, refs in RefCOCO's format, each image a JPEG of the size given, saved
    at quality 90 (the quantisation tables of a JPEG PIL writes at 90: what a decoder's time depends on), no two
    files alike."""
    from PIL import Image

    from refer import REFER

    bench_input.make_refer_folder(tmp_path, images=3, width=64, height=48)
    refer = REFER(tmp_path, "refcoco", "unc")
    files = [Path(refer.IMAGE_DIR) / img["file_name"] for img in refer.Imgs.values()]
    reference = tmp_path / "q90.jpg"
    Image.new("RGB", (64, 48)).save(reference, quality=90)
    tables = Image.open(reference).quantization
    for path in files:
        with Image.open(path) as im:
            assert (im.format, im.size, im.quantization) == ("JPEG", (64, 48), tables)
    assert len({p.read_bytes() for p in files}) == 3
    # each ref holds the keys of an entry of RefCOCO's refs(unc).p, its sent_ids those of its sentences
    official_keys = {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences", "sent_ids", "file_name"}
    for ref in refer.data["refs"]:
        assert set(ref) == official_keys and ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]

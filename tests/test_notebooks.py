"""inference.ipynb and AnalysisFailure.ipynb: committed without outputs, and run top to bottom headless."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_demo import first_image, make_tiny_run
from tools import failures
from tools import visualize as vis

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("inference.ipynb", "AnalysisFailure.ipynb")


def execute(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel from the repository root, its first cell reading ``env``."""
    from nbclient import NotebookClient

    # one intra-op thread in the kernel: a tiny model on a small shared CPU is 100x slower with OpenMP spinning
    for key, value in {"OMP_NUM_THREADS": "1", **env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(REPO / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)  # fmt: skip


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                   if out.output_type == "stream" and out.name == "stdout")  # fmt: skip


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = nbformat.read(REPO / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", []), "parameters belong in the first code cell"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield make_tiny_run(tmp_path_factory.mktemp("nb_run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def official(run) -> dict[str, str]:
    """The run's model in the authors' layout (no config: the architecture comes from the weights), in a folder of
    its own, and the LAVT_OPTS the notebooks need for it (the text encoder folder, the data root)."""
    from models import read_checkpoint, to_official
    from tools.open_checkpoint import open_checkpoint

    _, model = open_checkpoint(run["checkpoint"])
    folder = run["folder"] / "official"
    folder.mkdir()
    path = folder / "lavt_synthetic.pth"
    cfg = run["cfg"]
    torch.save(to_official(model, "lavt", img_size=cfg.DATA.SIZE, dataset="synthetic", splitBy="unc"), path)
    assert "config" not in read_checkpoint(path)
    opts = ["MODEL.TEXT.ENCODER", cfg.MODEL.TEXT.ENCODER, "DATA.ROOT", cfg.DATA.ROOT, "DATA.WORKERS", "0",
            "MODEL.TEXT.MAX_TOKENS", str(cfg.MODEL.TEXT.MAX_TOKENS)]  # fmt: skip
    return {"LAVT_CHECKPOINT": str(path), "LAVT_OPTS": json.dumps(opts)}


@pytest.mark.slow
def test_inference_on_a_dataset_image(run, monkeypatch, tmp_path):
    """Defaults: a val image with two or more referred objects, its expressions, ground truths and IoUs."""
    overlay = tmp_path / "overlay.png"
    env = {"LAVT_CHECKPOINT": str(run["checkpoint"]), "LAVT_DEVICE": "cpu", "LAVT_SAVE_OVERLAY": str(overlay)}
    nb = execute("inference.ipynb", env, monkeypatch)
    assert images_shown(nb) == 2  # the side-by-side figure and the demo's panel strip
    text = stdout(nb)
    found = re.search(r"\.jpg: (\d+)x(\d+)$", text, re.MULTILINE)
    assert found, text
    width, height, expressions = int(found[1]), int(found[2]), text.count(", IoU ")
    assert expressions >= 2, text
    size = Image.open(overlay).size  # the panels: one per expression, 4 white pixels apart
    assert size[0] == expressions * width + (expressions - 1) * 4 and size[1] > height


@pytest.mark.slow
def test_inference_on_any_image_with_ground_truth(run, official, monkeypatch, tmp_path):
    """An official-format checkpoint, a photo of one's own stored sideways (EXIF orientation 8: turn 90 degrees
    counter-clockwise to show), a ground-truth mask drawn on the upright picture."""
    rgb = np.asarray(Image.fromarray(first_image(run["cfg"])).resize((80, 60)))
    image = tmp_path / "mine.png"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=-1))).save(image, exif=exif)  # stored turned clockwise
    gt = np.zeros((60, 80), dtype=np.uint8)
    gt[10:40, 20:50] = 255
    vis.save_png(gt, tmp_path / "gt.png")
    env = {
        **official, "LAVT_DEVICE": "cpu", "LAVT_IMAGE": str(image),
        "LAVT_EXPRESSIONS": json.dumps(["the red circle"]), "LAVT_GT_MASKS": json.dumps([str(tmp_path / "gt.png")]),
        "LAVT_SAVE_OVERLAY": str(tmp_path / "overlay.png"),
    }  # fmt: skip
    nb = execute("inference.ipynb", env, monkeypatch)
    assert images_shown(nb) == 2
    written = np.asarray(Image.open(tmp_path / "overlay.png"))
    band = written.shape[0] - 60
    assert written.shape[1] == 80
    # the mask the notebook drew is the overlay's tinted region; its IoU with the ground truth is printed
    mask = np.any(written[band:] != rgb, axis=2)
    from tools.demo import Predictor

    pred = Predictor.from_checkpoint(run["checkpoint"], device="cpu").predict(rgb, ["the red circle"])[0]
    assert np.array_equal(written[band:], vis.overlay_mask(rgb, pred, vis.PALETTE[0])) and mask.any()
    assert f"'the red circle': {pred.mean():.1%} of the image, IoU {vis.mask_iou(pred, gt):.3f}" in stdout(nb)


@pytest.mark.slow
def test_analysis_runs_the_evaluation_and_draws_its_figures(official, monkeypatch):
    """On the official-format checkpoint: no results beside it, so the notebook evaluates first."""
    results = Path(official["LAVT_CHECKPOINT"]).parent / "per_expression_synthetic_unc_val_each_network64.jsonl"
    assert not results.exists()
    env = {**official, "LAVT_DEVICE": "cpu", "LAVT_NUM_WORST": "3", "LAVT_MIN_COUNT": "2"}
    nb = execute("AnalysisFailure.ipynb", env, monkeypatch)
    assert results.is_file(), "the notebook must evaluate when the per-expression results are missing"
    records = failures.load_results(results)
    assert images_shown(nb) == 3  # IoU histogram, worst cases, word statistics
    text = stdout(nb)
    ious = [r["IoU"] for r in records]
    assert failures.text_table(failures.failure_buckets(ious)) in text
    assert failures.text_table(failures.group_failure_stats([r["sentence"] for r in records], ious, 0.5)) in text
    sentences = [r["sentence"] for r in records]
    columns = ["word", "group", "count", "fail_count", "success_count", "fail_share", "success_share", "ratio"]
    assert failures.text_table(failures.word_failure_stats(sentences, ious, 0.5, 2)[:20], columns) in text
    assert f"{results}: {len(records)} expressions" in text

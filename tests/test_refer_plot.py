"""The REFER port's plots (refer/plot.py): matplotlib imported only when drawing, the outline, box and mask overlay
of a ref on the current axes, its sentences logged, and clear errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer import REFER, ReferFileNotFoundError, ReferKeyError


def test_plotting_is_lazy_and_works(syn: REFER):
    code = "import sys, refer, data; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = syn.data["refs"][0]
    for seg_box in ({"seg_box": "seg"}, {}):  # the outline, also by default
        plt.figure()
        syn.showRef(ref, **seg_box)
        assert len(plt.gca().collections) == 2 and ref["sentences"][0]["sent"] in plt.gca().get_title()
        assert not plt.gca().patches
        # the official outline: a wide yellow line under a thin red one
        lines = [(c.get_edgecolor().tolist(), c.get_linewidth().tolist()) for c in plt.gca().collections]
        assert lines == [([[1, 1, 0, 1]], [3]), ([[1, 0, 0, 1]], [1])]
        assert [c.get_facecolor().size for c in plt.gca().collections] == [0, 0]  # outlines only, never filled
        # each outline is the annotation's polygon, closed back to its first point
        polygon = np.asarray(syn.refToAnn[ref["ref_id"]]["segmentation"][0], dtype=float).reshape(-1, 2)
        for collection in plt.gca().collections:
            (path,) = collection.get_paths()
            np.testing.assert_array_equal(path.vertices, np.concatenate([polygon, polygon[:1]]))
            assert path.codes[-1] == matplotlib.path.Path.CLOSEPOLY
    plt.figure()
    syn.showRef(ref, seg_box="box")
    assert len(plt.gca().patches) == 1
    plt.figure()
    syn.showMask(ref)
    assert len(plt.gca().images) == 1
    plt.close("all")
    with pytest.raises(ValueError, match="seg_box must be 'seg' or 'box'"):
        syn.showRef(ref, seg_box="outline")
    with pytest.raises(ReferKeyError, match=r"^image_id 987654 is not in synthetic \(unc\)"):
        syn.showRef({**ref, "image_id": 987654})


def test_plot_details(syn_root: Path, tmp_path: Path, caplog):
    """showRef logs the sentences, draws the box as given (green, width 3), overlays a non-polygon mask in its
    colour, and names a missing image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refer = REFER(syn_root, "synthetic", "unc")
    ref = refer.data["refs"][0]
    with caplog.at_level(logging.INFO, logger="refer"):
        plt.figure()
        refer.showRef(ref, seg_box="box")
    assert f"1. {ref['sentences'][0]['sent']}" in caplog.messages
    lines = [f"{i}. {sentence['sent']}" for i, sentence in enumerate(ref["sentences"], 1)]
    assert plt.gca().get_title() == "\n".join(lines) and len(lines) > 1  # one line a sentence
    box = plt.gca().patches[0]
    x, y, w, h = refer.getRefBox(ref["ref_id"])
    assert (box.get_xy(), box.get_width(), box.get_height(), box.get_linewidth()) == ((x, y), w, h, 3)
    assert box.get_edgecolor() == (0.0, 128 / 255, 0.0, 1.0)  # matplotlib's "green"
    mask = refer.getMask(ref)["mask"]
    refer.refToAnn[ref["ref_id"]] = dict(
        refer.refToAnn[ref["ref_id"]], segmentation=mask_utils.encode(np.asfortranarray(mask))
    )  # an RLE: drawn as a mask overlay
    plt.figure()
    refer.showRef(ref, seg_box="seg")
    overlay = plt.gca().images[-1].get_array()
    assert not np.ma.is_masked(overlay)  # imshow masks NaN, which a comparison of masked arrays would skip
    np.testing.assert_array_equal(overlay[..., 3], mask * 0.5)
    np.testing.assert_allclose(overlay[mask == 1][:, :3], np.tile([2 / 255, 166 / 255, 101 / 255], (mask.sum(), 1)))
    plt.close("all")
    refer.IMAGE_DIR = str(tmp_path)
    with pytest.raises(ReferFileNotFoundError, match=r"image not found: .*\.jpg \(expected the synthetic image"):
        refer.showRef(ref)
    with pytest.raises(ValueError, match="^getMaskByRef needs a ref or a ref_id$"):
        refer.getMaskByRef()

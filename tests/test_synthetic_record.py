"""The synthetic set a generator version writes, recorded: a change to what ``data.synthetic`` draws or writes must
come with a new ``GENERATOR_VERSION``, since ``ensure_synthetic`` reuses a set on disk whose ``generator.json``
matches, and the demo's measured scores are those of the recorded data.

After a deliberate change: bump ``GENERATOR_VERSION``, then record again with ``python -m tests.test_synthetic_record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import GENERATOR_VERSION, generate

RECORD = Path(__file__).resolve().parent / "fixtures" / "synthetic_record.json"
ARGS = {"num_images": 66, "seed": 5}
ANNOTATIONS = ("refs(unc).p", "instances.json", "attributes.json", "generator.json")
# a JPEG or resampling round-off of a few pixels moves a channel's mean by ~1e-4; any change in drawing by far more
MEAN_TOLERANCE = 0.01


def fingerprint(root: Path) -> dict:
    """sha256 of each annotation file; each image's mean per channel (its decoded pixels)."""
    files = {name: hashlib.sha256((root / "synthetic" / name).read_bytes()).hexdigest() for name in ANNOTATIONS}
    images = sorted((root / "images/mscoco/images/train2014").iterdir())
    means = {p.name: np.asarray(Image.open(p).convert("RGB"), np.float64).mean((0, 1)).round(4).tolist()
             for p in images}  # fmt: skip
    return {"version": GENERATOR_VERSION, "args": ARGS, "annotations": files, "image_means": means}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("record")
    generate(root, **ARGS, workers=1)  # drawn in this process: the mutation tool sees which functions it ran
    return fingerprint(root)


def test_the_generator_writes_what_its_version_recorded(written: dict):
    recorded = json.loads(RECORD.read_text())
    assert recorded["version"] == GENERATOR_VERSION, (
        f"GENERATOR_VERSION is {GENERATOR_VERSION}, the record is of version {recorded['version']}: record again"
    )
    assert written["args"] == recorded["args"]
    for name in ANNOTATIONS:
        assert written["annotations"][name] == recorded["annotations"][name], f"{name} differs from version " + (
            f"{GENERATOR_VERSION}'s: a change to the generator needs a new GENERATOR_VERSION (module docstring)"
        )
    assert written["image_means"].keys() == recorded["image_means"].keys()
    for name, means in recorded["image_means"].items():
        assert written["image_means"][name] == pytest.approx(means, abs=MEAN_TOLERANCE), name


if __name__ == "__main__":  # record the current generator's output
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, **ARGS)
        RECORD.write_text(json.dumps(fingerprint(Path(folder)), indent=1) + "\n")
    sys.stdout.write(f"recorded version {GENERATOR_VERSION} in {RECORD}\n")

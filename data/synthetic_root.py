"""A synthetic dataset's root on disk: its layout, the markers of a generation, what a root may hold before one is
written into it (``check_synthetic_root``), and the removal of what a generation wrote.

Layout: ``<root>/synthetic/`` holds the annotation files and the markers (``generator.json``: complete, written
last; ``generating.json``: under way, or cut off), and ``generation.lock`` while a run of ``main.py`` ensures the
dataset (``engine.synthetic_once``; not a file of the dataset); the images are ``<root>/images/mscoco/images/
train2014/COCO_train2014_<12-digit id>.jpg``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

IMAGE_ID_OFFSET = 1_000_000  # ids above every COCO train2014 id, so files never collide with real COCO images
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
COMPLETE, RUNNING = "generator.json", "generating.json"  # markers in <root>/synthetic: done / under way
GENERATION_LOCK = "generation.lock"  # in <root>/synthetic: a lock of the runs sharing the root, no dataset file
ANNOTATION_FILES = ("instances.json", "refs(unc).p", "attributes.json")


class SyntheticRootError(ValueError):
    """The synthetic dataset's root folder cannot be used as it is (names the folder and why)."""


def image_file(index: int) -> str:
    """The file name of image ``index`` of a generation (ids above every COCO train2014 id)."""
    return f"COCO_train2014_{IMAGE_ID_OFFSET + index:012d}.jpg"


def temporary(path: Path) -> Path:
    """The file an atomic write of ``path`` writes first (then renames to ``path``); one a cut-off run may leave."""
    return path.with_name(path.name + ".tmp")


def make_folders(root: Path, *folders: Path) -> None:
    """Create ``folders`` (with their parents); SyntheticRootError naming ``root`` where that fails."""
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a path under /proc, a read-only disk, a file on the way, ...)
        raise SyntheticRootError(f"cannot create the synthetic dataset's folders in {root.resolve()} (DATA.ROOT, "
                                 f"--root): {e.strerror or e}") from None  # fmt: skip


def generation_lock(root: str | Path) -> Path:
    """``<root>/synthetic/generation.lock``, its folder created, for the runs that share ``root`` to hold while they
    ensure the dataset; a root ``ensure_synthetic`` would refuse is refused first (SyntheticRootError), untouched."""
    root = Path(root)
    check_synthetic_root(root)
    make_folders(root, root / "synthetic")
    return root / "synthetic" / GENERATION_LOCK


def check_synthetic_root(root: str | Path) -> tuple[dict[str, dict], int]:
    """What ``ensure_synthetic`` refuses, checked without writing anything (``main.py`` does so before its run
    folder): ``root`` a file, a folder holding files but no synthetic dataset, a dataset whose marker files cannot
    be read (SyntheticRootError). Returns the markers found (name -> record; none for a new or empty folder) and
    the most images they say were written."""
    root = Path(root)
    where = root.resolve()
    if root.exists() and not root.is_dir():
        raise SyntheticRootError(f"the synthetic dataset's root {where} is a file, not a folder (DATA.ROOT)")
    markers = [root / "synthetic" / m for m in (RUNNING, COMPLETE) if (root / "synthetic" / m).is_file()]
    if not markers and root.is_dir() and any(_files_under(root)):
        raise SyntheticRootError(
            f"refusing to write the synthetic dataset into {where}: the folder holds files but no synthetic "
            f"dataset (no synthetic/{COMPLETE}); give DATA.ROOT (--root) a new or empty folder"
        )
    records, count = {}, 0
    for marker in markers:
        try:
            records[marker.name] = json.loads(marker.read_text())
            count = max(count, sum(records[marker.name]["split_sizes"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SyntheticRootError(
                f"cannot tell which files the synthetic dataset in {where} holds: {marker} is unreadable "
                f"({type(e).__name__}: {e}); remove that dataset by hand"
            ) from None
    return records, count


def _files_under(root: Path) -> Iterator[Path]:
    """The files under ``root``, but for the lock of the runs that share it (and its aside copies) and a marker's
    temporary file (a generation's first file: where it alone is there, another run is just starting one)."""
    markers_written = {temporary(Path(marker)).name for marker in (RUNNING, COMPLETE)}
    for folder, _, files in os.walk(root):
        for name in files:
            ours = name.startswith(GENERATION_LOCK) or name in markers_written
            if not (Path(folder) == root / "synthetic" and ours):
                yield Path(folder) / name


def remove_generation(root: Path, num_images: int) -> int:
    """Delete what a generation of ``num_images`` images wrote under ``root``; returns the number of files removed.
    The markers go last, so that a removal cut off is resumed by the next ``ensure_synthetic``."""
    data_dir = root / "synthetic"
    paths = [root / IMAGE_SUBDIR / image_file(i) for i in range(num_images)]
    paths += [data_dir / name for name in ANNOTATION_FILES + (COMPLETE, RUNNING)]
    paths += [temporary(p) for p in paths[num_images:]]  # atomic writes' temporaries, if cut off
    paths.sort(key=lambda p: p.name in (COMPLETE, RUNNING))
    removed = 0
    for path in paths:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed

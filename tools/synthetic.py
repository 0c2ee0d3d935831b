"""Write the synthetic REFER-format dataset (``data.synthetic``) from the command line.

    python -m tools.synthetic --root data/synthetic_refer --num-images 9654 --eval-images 218  # the demo's
    python -m tools.synthetic --root /tmp/syn  # the default 1100 images: 800 train, 100 val, 100 testA, 100 testB

The dataset is ensured as ``main.py`` ensures it (``engine.synthetic_once``): under the root's generation lock, so
that a run of this command beside a ``main.py`` (or another of itself) on the same root waits for the other instead
of taking its generation for a cut-off one and removing its files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from data.synthetic_args import NUMBERS, renamed, synthetic_sizes
from data.synthetic_root import SyntheticRootError
from engine.synthetic_once import ensure_synthetic_once

from .cli import USER_ERRORS, cli_parser, run_cli

PROG = "python -m tools.synthetic"


def get_parser() -> argparse.ArgumentParser:
    p = cli_parser(PROG, "Write the synthetic REFER-format referring segmentation dataset.")
    p.add_argument("--root", default="data/synthetic_refer", help="REFER root (DATA.ROOT)")
    p.add_argument("--num-images", type=int, default=1100, help="total images, split 8:1:1:1")
    p.add_argument("--eval-images", type=int, default=0,
                   help="images in each of val, testA and testB (0: one eleventh of --num-images each)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and arguments write the same files")
    p.add_argument("--min-size", type=int, default=128, help="smallest shorter image side")
    p.add_argument("--max-size", type=int, default=256, help="largest image side")
    p.add_argument("--min-objects", type=int, default=2, help="fewest objects in an image")
    p.add_argument("--max-objects", type=int, default=5, help="most objects in an image")
    p.add_argument("--max-expressions", type=int, default=3, help="most expressions for an object")
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing images (0: one per available CPU); the files do not depend on it")
    p.add_argument("--force", action="store_true",
                   help="regenerate even if an identical dataset exists (its files are removed first)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: errors in its numbers raise a ValueError naming the flags. Returns ``<root>/synthetic``."""
    a = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shapes = {k: getattr(a, k) for k in ("min_size", "max_size", "min_objects", "max_objects", "max_expressions")}
    try:  # (the numbers are checked before anything is written, removed or locked)
        sizes = synthetic_sizes(a.num_images, a.eval_images)
        return ensure_synthetic_once(a.root, force=a.force, **sizes, seed=a.seed, workers=a.workers, **shapes)
    except SyntheticRootError:  # names DATA.ROOT and a path, in which no word is a flag's
        raise
    except ValueError as e:  # the numbers', or the drawing's (no room for min_objects): named as the flags
        raise ValueError(renamed(str(e), {k: "--" + k.replace("_", "-") for k in NUMBERS})) from None


def run(argv: Sequence[str] | None = None) -> int:
    """``main`` as the command runs it: any OSError, the disk's (full, read-only) or the root's, is one line and
    status 2, as ``main.py`` says it. Returns the exit status."""
    after = "the next run into this root removes what it had written, if anything (nothing while it waited)"
    return run_cli(PROG, main, argv, errors=(*USER_ERRORS, OSError), after_interrupt=after)


if __name__ == "__main__":
    raise SystemExit(run())

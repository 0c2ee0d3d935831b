"""The arguments of a synthetic dataset (``data.synthetic``): its split sizes and the checks of its numbers.

Errors name the keyword arguments (``num_images=3``); ``renamed`` writes them as the caller's names: the command
line's flags, ``main.py``'s config keys.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["NUMBERS", "SPLIT_ORDER", "check_arguments", "images_per_split", "renamed", "synthetic_sizes"]

SPLIT_ORDER = ("train", "val", "testA", "testB")
# the numeric arguments that the errors name (those of synthetic_sizes and check_arguments)
NUMBERS = ("num_images", "eval_images", "seed", "min_size", "max_size", "min_objects", "max_objects",
           "max_expressions", "workers")  # fmt: skip


def images_per_split(num_images: int, split_sizes: dict[str, int] | None) -> dict[str, int]:
    """Images per split: ``split_sizes`` completed with zeros, or by default one eleventh of ``num_images`` in each of
    val, testA and testB (at least one) and the rest in train."""
    if split_sizes is not None:
        unknown = set(split_sizes) - set(SPLIT_ORDER)
        if unknown:
            raise ValueError(f"split_sizes has unknown splits {sorted(unknown)}; expected {SPLIT_ORDER}")
        return {s: int(split_sizes.get(s, 0)) for s in SPLIT_ORDER}
    if num_images < 4:  # (from 4 on, one eleventh each, at least one, leaves at least one to train on)
        raise ValueError(f"num_images={num_images} is too small for train/val/testA/testB; give at least 4")
    held_out = max(1, round(num_images / 11))
    return {"train": num_images - 3 * held_out, "val": held_out, "testA": held_out, "testB": held_out}


def synthetic_sizes(num_images: int, eval_images: int = 0) -> dict[str, Any]:
    """``generate`` / ``ensure_synthetic`` keyword arguments for ``num_images`` in all, ``eval_images`` of them in
    each of val, testA and testB (0: the default one eleventh each)."""
    if eval_images < 0:
        raise ValueError(f"eval_images (per held-out split) must be >= 0 (0: the default), got {eval_images}")
    train = num_images - 3 * eval_images
    if eval_images and train < 1:
        raise ValueError(
            f"num_images={num_images} leaves none for train after 3 x eval_images={eval_images} for val, testA "
            "and testB"
        )
    sizes = {"train": train, "val": eval_images, "testA": eval_images, "testB": eval_images}
    images_per_split(num_images, sizes if eval_images else None)  # too few images: the error now, not at generation
    return {"num_images": num_images, "split_sizes": sizes} if eval_images else {"num_images": num_images}


def check_arguments(
    min_size: int, max_size: int, min_objects: int, max_objects: int, max_expressions: int, workers: int, seed: int
) -> None:
    """``generate``'s refusals of its numbers (ValueError), checked before anything is written or removed."""
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got min_objects={min_objects}, "
                         f"max_objects={max_objects}")  # fmt: skip
    if max_expressions < 1:
        raise ValueError(f"max_expressions must be >= 1, got {max_expressions}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per available CPU), got {workers}")
    if seed < 0:  # (NumPy's generators refuse it, but only once the images are being drawn)
        raise ValueError(f"seed must be >= 0, got {seed}")


def renamed(message: str, names: dict[str, str]) -> str:
    """An error ``message`` of this module with the keyword arguments it names written as the caller's names for
    them (``names``: argument -> name, e.g. a flag or a config key)."""
    return re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m.group(1)], message)

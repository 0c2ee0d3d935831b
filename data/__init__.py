"""Data: REFER datasets for training and evaluation, transforms, and the synthetic REFER-format dataset.

The dataset names load on first use, so ``python -m data.synthetic`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ImageReadError", "ReferDataset", "build_dataset", "check_refer_files", "collate_eval", "load_refer", "load_rgb",
    "load_tokenizer", "tokenize",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".dataset", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

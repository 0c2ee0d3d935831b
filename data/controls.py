"""Control experiment: score each object with the expressions of another object of the same image.

A model that reads the expression segments the object it names, so with the expressions moved to another
object of the image it should score far lower than with its own; a model that ignores the language (e.g.
segments the most salient object) would score about the same.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import Dataset


class ShuffledExpressions(Dataset):
    """An eval-mode ``data.ReferDataset`` whose objects carry the expressions of another object of their image.

    Within each image the objects are put in a random order (``seed``) and each takes the expressions of the
    next one, cyclically, so no object keeps its own. Objects that are alone in their image (in this split)
    have no one to swap with and are left out.

    Uses the dataset's pre-tokenised tables (``refs``, ``offsets``, ``input_ids``, ``attention_masks``,
    ``cat_input_ids``, ``cat_attention_masks``): the donor's image is never decoded.
    """

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        if not getattr(dataset, "eval_mode", False):
            raise ValueError("ShuffledExpressions needs an eval-mode ReferDataset (eval_mode=True)")
        self.dataset = dataset
        by_image: dict[int, list[int]] = defaultdict(list)
        for index, ref in enumerate(dataset.refs):
            by_image[ref["image_id"]].append(index)
        g = torch.Generator().manual_seed(seed)
        self.donor: dict[int, int] = {}
        for indices in by_image.values():
            if len(indices) < 2:
                continue
            order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
            for k, index in enumerate(order):
                self.donor[index] = order[(k + 1) % len(order)]
        self.indices = sorted(self.donor)
        self.left_out = len(dataset) - len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        d, ds = self.donor[index], self.dataset
        item = ds[index]
        start, stop = ds.offsets[d], ds.offsets[d + 1]
        item.update(
            input_ids=ds.input_ids[start:stop].clone(),
            attention_mask=ds.attention_masks[start:stop].clone(),
            cat_input_ids=ds.cat_input_ids[d].clone(),
            cat_attention_mask=ds.cat_attention_masks[d].clone(),
            sentences=[s["raw"] for s in ds.refs[d]["sentences"]],
            sent_ids=[s["sent_id"] for s in ds.refs[d]["sentences"]],
        )
        return item

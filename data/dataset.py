"""``ReferDataset``: one item per referred object of a REFER split, and ``collate_eval`` for evaluation batches.

Tokenisation follows the official LAVT code: ``tokenizer.encode(raw_sentence, add_special_tokens=True)``, cut to
``max_tokens`` by slicing (so a long sentence loses its [SEP]), zero-padded, attention mask 1 on kept tokens.
All sentences are tokenised once, in ``__init__``; ``__getitem__`` decodes one image and one mask.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refer import REFER, ReferDataError, ReferFileNotFoundError
from refer.refer import MASK_PARTS

from .checks import expression_report, warn_expressions
from .image_io import ImageReadError, load_rgb, open_rgb  # re-exported: data.load_rgb, data.ImageReadError
from .synthetic_root import check_synthetic_root
from .transforms import RESIZE_METHODS, TrainAugment, resize_image, resize_mask, to_tensor

__all__ = [
    "ReferDataset", "build_dataset", "collate_eval", "load_refer", "load_tokenizer", "load_rgb", "tokenize",
    "ImageReadError",
]

logger = logging.getLogger(__name__)


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is; a local folder or alias (e.g. "minilm-l6") through ``models.text.load_tokenizer``
    (FileNotFoundError naming the folder and what it should hold)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from models.text import load_tokenizer as load_text_tokenizer  # the one place that knows the aliases

    return load_text_tokenizer(str(tokenizer))


def tokenize(tokenizer: Any, sentences: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official LAVT tokenisation of a list of sentences.

    Returns:
        input_ids [len(sentences), max_tokens] int64 (0-padded), attention_mask [len(sentences), max_tokens] int64.
    """
    input_ids = torch.zeros(len(sentences), max_tokens, dtype=torch.int64)
    attention_mask = torch.zeros(len(sentences), max_tokens, dtype=torch.int64)
    if sentences:
        encoded = tokenizer(list(sentences), add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(encoded):
            ids = ids[:max_tokens]
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


class ReferDataset(torch.utils.data.Dataset):
    """Referred objects of one split of a REFER dataset.

    Args:
        root, dataset, split_by, image_dir: as ``refer.REFER`` (``split_by`` is its ``splitBy``).
        split: ``train`` | ``val`` | ``test`` | ``testA`` | ``testB`` | ... (REFER's split rules).
        tokenizer: a tokenizer object, a local Hugging Face folder, or an alias (``"minilm-l6"``).
        image_size: S, the side of the square network input.
        max_tokens: token budget of one expression (official: 20).
        eval_mode: all expressions of an object per item (else one at random) plus the original-size mask.
        augment: mild scale/shift and brightness/contrast jitter, training mode only.
        resize: ``pil`` (official: PIL bilinear for the image, PIL nearest for the mask) or ``cv2`` (faster, other
            pixels): see ``data.transforms``.
        mask_parts: ``official`` (pixels covered by exactly one polygon part of the annotation, as LAVT) or
            ``union``: see ``refer.refer.MASK_PARTS``.
        cat_max_tokens: token budget of all expressions of an object joined with " , " (``cat_input_ids``).
        refer: the ``REFER`` of ``root`` / ``dataset`` / ``split_by`` / ``image_dir`` if already loaded (several
            splits share one instead of each reading the annotations again); None loads it.
        seed: None: the random choices of an item (training form: the expression, the augmentation) come from torch's
            global random stream of the process that loads it; an integer: from a generator seeded with (``seed``,
            the epoch set by ``set_epoch``, the item's index, the split), so that an item is the same whichever
            process loads it, in whatever order, whatever the number of DataLoader workers, also after a mid-epoch
            resume that skips the items already seen (``build_dataset`` passes TRAIN.SEED).
        cache: training form only: keep each image and mask, decoded and resized to S x S (uint8), after its
            first use, so later epochs skip reading and resizing (augmentation still runs on every use). Memory:
            3 S^2 bytes per image and S^2 per object (96 px: 28 KB and 9 KB) in the process that reads them, so
            with ``DATA.WORKERS 0`` (non-persistent DataLoader workers end, with their caches, after each epoch).

    Train item: image [3, S, S] float32, target [S, S] int64 in {0, 1}, input_ids [N] int64,
    attention_mask [N] int64, ref_id int. The expression is drawn with ``torch.randint`` (see ``seed``).
    Eval item: image, target, input_ids [E, N], attention_mask [E, N], cat_input_ids [Nc],
    cat_attention_mask [Nc], target_orig [H0, W0] uint8, ref_id, image_id, file_name, sentences (E str),
    sent_ids (E int).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split_by: str,
        split: str,
        tokenizer: Any,
        image_size: int = 480,
        max_tokens: int = 20,
        eval_mode: bool = False,
        image_dir: str | Path | None = None,
        augment: bool = False,
        cat_max_tokens: int = 64,
        refer: REFER | None = None,
        cache: bool = False,
        resize: str = "pil",
        mask_parts: str = "official",
        seed: int | None = None,
    ) -> None:
        if image_size < 1 or max_tokens < 1 or cat_max_tokens < 1:
            raise ValueError(
                f"image_size, max_tokens and cat_max_tokens must be positive, got {image_size}, "
                f"{max_tokens}, {cat_max_tokens}"
            )
        if resize not in RESIZE_METHODS or mask_parts not in MASK_PARTS:
            raise ValueError(
                f"resize must be one of {RESIZE_METHODS} and mask_parts one of {MASK_PARTS}, got {resize!r}, "
                f"{mask_parts!r}"
            )
        self.resize, self.mask_parts = resize, mask_parts
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.seed, self.epoch = seed, 0
        if refer is None:
            refer = REFER(root, dataset, split_by, image_dir=image_dir or None)
        else:
            expected = REFER.paths(root, dataset, image_dir or None)
            given = (refer.DATA_DIR, refer.IMAGE_DIR)
            if [Path(p).resolve() for p in given] != [Path(p).resolve() for p in expected] or refer.splitBy != split_by:
                raise ValueError(
                    f"the REFER given is {refer.DATA_DIR} ({refer.splitBy}, images {refer.IMAGE_DIR}), not "
                    f"{expected[0]} ({split_by}, images {expected[1]})"
                )
        self.refer = refer
        self.split, self.image_size, self.max_tokens, self.eval_mode = split, image_size, max_tokens, eval_mode
        self.image_dir = Path(self.refer.IMAGE_DIR)
        where = f"{dataset} ({split_by}) in {self.refer.DATA_DIR}"
        if not self.image_dir.is_dir():
            raise ReferFileNotFoundError(
                f"image folder not found: {self.image_dir} (expected the images of {where}; "
                "COCO train2014 for RefCOCO/+/g; set image_dir / DATA.IMAGE_DIR)"
            )
        self.ref_ids = self.refer.getRefIds(split=split)
        if not self.ref_ids:
            present = sorted({ref["split"] for ref in self.refer.data["refs"]})
            raise ValueError(f"split {split!r} of {where} holds no refs; its refs have splits {present}")
        self.refs = self.refer.loadRefs(self.ref_ids)
        self.augment = TrainAugment() if augment and not eval_mode else None
        self.cache = cache and not eval_mode  # evaluation also needs the original-size mask: never cached
        self._images: dict[int, np.ndarray] = {}  # image id -> [S, S, 3] uint8
        self._masks: dict[int, np.ndarray] = {}  # item index -> [S, S] uint8

        tokenizer = load_tokenizer(tokenizer)
        sentences, offsets = [], [0]
        for ref in self.refs:
            if not ref["sentences"]:
                raise ReferDataError(f"ref {ref['ref_id']} of {where} has no sentences")
            raws = [sent.get("raw") for sent in ref["sentences"]]  # (dicts: REFER's index refuses anything else)
            bad = next((k for k, raw in enumerate(raws) if not isinstance(raw, str)), None)
            if bad is not None:
                raise ReferDataError(f"ref {ref['ref_id']} of {where}: sentence {bad} has no text ('raw' is "
                                     f"{raws[bad]!r}, expected a string)")  # fmt: skip
            sentences += raws
            offsets.append(len(sentences))
        self.offsets = offsets  # expressions of item i: rows offsets[i]:offsets[i + 1]
        self.input_ids, self.attention_masks = tokenize(tokenizer, sentences, max_tokens)  # [sum E, N]
        tokenized = (self.input_ids, self.attention_masks)  # reused: only the rows filling the budget are redone
        warn_expressions(expression_report(tokenizer, sentences, max_tokens, tokenized), logger, f"{where} {split}")
        if eval_mode:
            joined = [" , ".join(s["raw"] for s in ref["sentences"]) for ref in self.refs]
            self.cat_input_ids, self.cat_attention_masks = tokenize(tokenizer, joined, cat_max_tokens)  # [R, Nc]
        logger.info("ReferDataset %s %s: %d objects, %d expressions", where, split, len(self.refs), len(sentences))

    def __len__(self) -> int:
        return len(self.refs)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the seeded random choices of the next items belong to (call it before iterating a DataLoader:
        its workers copy the dataset when the iteration starts)."""
        self.epoch = int(epoch)

    def item_generator(self, index: int) -> torch.Generator | None:
        """The generator of item ``index``'s random choices in the current epoch (None: the global stream)."""
        if self.seed is None:
            return None
        words = [self.seed, self.epoch, index, zlib.crc32(self.split.encode())]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.refs[index]
        info = self.refer.Imgs[ref["image_id"]]
        image_s = self._images.get(ref["image_id"]) if self.cache else None
        mask_s = self._masks.get(index) if self.cache else None
        if mask_s is None:
            mask = self.refer.getMask(ref, self.mask_parts)["mask"]  # [H0, W0] in {0, 1}
            if image_s is None:
                path = self.image_dir / info["file_name"]
                image = open_rgb(path)  # decoded once; resized as it is (PIL) or as an array (cv2)
                if (image.height, image.width) != mask.shape:
                    raise ReferDataError(
                        f"image {path} is {image.width}x{image.height} (WxH) but "
                        f"instances.json says {mask.shape[1]}x{mask.shape[0]} for image {ref['image_id']}"
                    )
                image_s = resize_image(image, self.image_size, self.resize)  # [S, S, 3] uint8
            mask_s = resize_mask(mask, self.image_size, self.resize)
            if self.cache:  # what follows (augmentation, to_tensor, int64) copies: the cached arrays stay as stored
                self._images[ref["image_id"]], self._masks[index] = image_s, mask_s
        generator = self.item_generator(index) if not self.eval_mode else None
        if self.augment is not None:
            image_s, mask_s = self.augment(image_s, mask_s, generator)
        item = {"image": to_tensor(image_s), "target": torch.from_numpy(mask_s.astype(np.int64))}
        start, stop = self.offsets[index], self.offsets[index + 1]
        if not self.eval_mode:
            row = start + int(torch.randint(stop - start, (), generator=generator).item())
            item.update(
                input_ids=self.input_ids[row].clone(),
                attention_mask=self.attention_masks[row].clone(),
                ref_id=ref["ref_id"],
            )
            return item
        item.update(
            input_ids=self.input_ids[start:stop].clone(),
            attention_mask=self.attention_masks[start:stop].clone(),
            cat_input_ids=self.cat_input_ids[index].clone(),
            cat_attention_mask=self.cat_attention_masks[index].clone(),
            target_orig=torch.from_numpy(mask),
            ref_id=ref["ref_id"],
            image_id=ref["image_id"],
            file_name=info["file_name"],
            sentences=[s["raw"] for s in ref["sentences"]],
            sent_ids=[s["sent_id"] for s in ref["sentences"]],
        )
        return item


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch eval items whose objects have different numbers of expressions E_b.

    Returns image [B, 3, S, S], target [B, S, S], input_ids / attention_mask [sum E_b, N], expr_index [sum E_b]
    int64 (the batch position of each expression's object), cat_input_ids / cat_attention_mask [B, Nc], and
    lists of length B: target_orig ([H0, W0] each), ref_id, image_id, file_name, sentences, sent_ids.
    """
    if not items:
        raise ValueError("collate_eval got an empty batch")
    if "sentences" not in items[0]:
        raise ValueError(
            f"collate_eval takes eval-mode items (ReferDataset(..., eval_mode=True)); got keys {sorted(items[0])}"
        )
    counts = torch.tensor([it["input_ids"].shape[0] for it in items])
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "input_ids": torch.cat([it["input_ids"] for it in items]),
        "attention_mask": torch.cat([it["attention_mask"] for it in items]),
        "expr_index": torch.repeat_interleave(torch.arange(len(items)), counts),
        "cat_input_ids": torch.stack([it["cat_input_ids"] for it in items]),
        "cat_attention_mask": torch.stack([it["cat_attention_mask"] for it in items]),
    }
    for key in ("target_orig", "ref_id", "image_id", "file_name", "sentences", "sent_ids"):
        batch[key] = [it[key] for it in items]
    return batch


def check_refer_files(cfg: Any) -> None:
    """The config's REFER annotation files exist (``REFER.files``): refused naming them before a run writes anything.
    The synthetic dataset is generated on first use: its root is checked for what generation would refuse."""
    if cfg.DATA.DATASET == "synthetic":
        check_synthetic_root(cfg.DATA.ROOT)
    else:
        REFER.files(cfg.DATA.ROOT, cfg.DATA.DATASET, cfg.DATA.SPLIT_BY)


def load_refer(cfg: Any) -> REFER:
    """The ``REFER`` of a config's dataset (DATA.ROOT, DATASET, SPLIT_BY, IMAGE_DIR), to share between splits."""
    return REFER(cfg.DATA.ROOT, cfg.DATA.DATASET, cfg.DATA.SPLIT_BY, image_dir=cfg.DATA.IMAGE_DIR or None)


def build_dataset(
    cfg: Any, split: str, eval_mode: bool, tokenizer: Any = None, augment: bool | None = None,
    refer: REFER | None = None,
) -> ReferDataset:
    """``ReferDataset`` from a config (DATA.*, MODEL.TEXT.MAX_TOKENS); the tokenizer defaults to MODEL.TEXT.ENCODER.
    ``augment`` defaults to DATA.AUGMENT in training mode; the per-epoch validation (training form: one random
    expression per object) passes False. ``refer``: the config's ``REFER`` already loaded (``load_refer``).

    Does not generate the synthetic dataset: call ``data.synthetic.ensure_synthetic`` once (main process) first.
    """
    if tokenizer is None:
        tokenizer = cfg.MODEL.TEXT.ENCODER
        if not tokenizer:
            raise ValueError("MODEL.TEXT.ENCODER is empty: pass the tokenizer (object or folder) to build_dataset")
    return ReferDataset(
        cfg.DATA.ROOT,
        cfg.DATA.DATASET,
        cfg.DATA.SPLIT_BY,
        split,
        tokenizer,
        image_size=cfg.DATA.SIZE,
        max_tokens=cfg.MODEL.TEXT.MAX_TOKENS,
        eval_mode=eval_mode,
        image_dir=cfg.DATA.IMAGE_DIR or None,
        augment=(cfg.DATA.AUGMENT and not eval_mode) if augment is None else augment,
        refer=refer,
        cache=cfg.DATA.CACHE,
        resize=cfg.DATA.RESIZE,
        mask_parts=cfg.DATA.MASK_PARTS,
        seed=cfg.TRAIN.SEED,
    )

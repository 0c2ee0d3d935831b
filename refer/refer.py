"""The REFER API (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF) for Python 3.

Same class, methods, arguments and index dicts as the original API by Licheng Yu, so code written against it
keeps working:

- ``Refs`` {ref_id: ref}, ``Anns`` {ann_id: ann}, ``Imgs`` {image_id: image}, ``Cats`` {category_id: name},
  ``Sents`` {sent_id: sent}, ``imgToRefs`` {image_id: [ref]}, ``imgToAnns`` {image_id: [ann]},
  ``refToAnn`` {ref_id: ann}, ``annToRef`` {ann_id: ref}, ``catToRefs`` {category_id: [ref]},
  ``sentToRef`` {sent_id: ref}, ``sentToTokens`` {sent_id: [token]}.

Layout on disk (as the original)::

    <data_root>/<dataset>/refs(<splitBy>).p      pickled list of refs
    <data_root>/<dataset>/instances.json          COCO-style images, annotations, categories
    <data_root>/images/mscoco/images/train2014    COCO train2014 images (refcoco, refcoco+, refcocog, synthetic)
    <data_root>/images/saiapr_tc-12               ImageCLEF images (refclef)

Differences from the original, all in the direction of "what it meant to do": ``getRefIds(image_ids=...)``
returns a flat list (the original built a list of lists), ``getAnnIds(ref_ids=...)`` applies the ref filter (the
original computed and dropped it), ``getImgIds``/``getCatIds`` return lists, ``getMask`` returns a binary 0/1 mask
(the original returned the sum of the parts of a multi-polygon object; by default ``getMask`` keeps the pixels where
that sum is 1, as LAVT's dataset does: see ``MASK_PARTS``), and every bad input
raises an error naming the file, key or value instead of printing and calling ``sys.exit``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ReferDataError, ReferFileNotFoundError, ReferKeyError
from .masks import MASK_PARTS, combine_parts, segmentation_rles
from .plot import show_mask, show_ref
from .safe_pickle import load_plain_pickle

__all__ = [
    "MASK_PARTS",
    "REFER",
    "ReferDataError",
    "ReferFileNotFoundError",
    "ReferKeyError",
    "DATASETS",
    "SPLITS",
]

logger = logging.getLogger(__name__)

# dataset name -> default image folder relative to data_root
DATASETS: dict[str, str] = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
    "synthetic": "images/mscoco/images/train2014",
}

# every split name getRefIds understands (the original's rules)
SPLITS: tuple[str, ...] = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")


def _as_list(value: Any) -> list:
    """The original accepts a list or a single id; also take tuples, sets, ranges and numpy arrays."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    if isinstance(value, np.ndarray):
        return value.ravel().tolist()
    return list(value)


def _malformed(error: KeyError | TypeError, item: Any) -> str:
    """Why a REFER record failed to index: a missing key, a record that is not a dict, or a bad value in one."""
    if isinstance(error, KeyError):
        return f"missing key {error} in {item!r:.200}"
    if not isinstance(item, dict):
        return f"not a dict but a {type(item).__name__}: {item!r:.200}"
    return f"{error} in {item!r:.200}"  # e.g. an unhashable id


class REFER:
    """Referring-expression annotations over COCO-style instances.

    Args:
        data_root: folder holding ``<dataset>/`` and ``images/``.
        dataset: ``refcoco`` | ``refcoco+`` | ``refcocog`` | ``refclef`` | ``synthetic``.
        splitBy: ``unc`` | ``google`` | ``umd`` | ``berkeley`` (whichever ``refs(<splitBy>).p`` exists).
        image_dir: the image folder, if not the default under ``data_root``.
    """

    @staticmethod
    def paths(data_root: str | Path, dataset: str, image_dir: str | Path | None = None) -> tuple[str, str]:
        """(annotation folder, image folder) of ``dataset`` under ``data_root``, as ``DATA_DIR`` and ``IMAGE_DIR``."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown REFER dataset {dataset!r}; expected one of {sorted(DATASETS)}")
        image_folder = Path(image_dir) if image_dir else Path(data_root) / DATASETS[dataset]
        return str(Path(data_root) / dataset), str(image_folder)

    def __init__(
        self, data_root: str | Path, dataset: str = "refcoco", splitBy: str = "unc", image_dir: str | Path | None = None
    ) -> None:
        logger.info("loading dataset %s (%s) into memory...", dataset, splitBy)
        tic = time.time()
        self.DATA_DIR, self.IMAGE_DIR = self.paths(data_root, dataset, image_dir)
        self.ROOT_DIR = str(Path(data_root))
        self.dataset = dataset
        self.splitBy = splitBy
        ref_file, instances_file = self.files(data_root, dataset, splitBy)

        self.data: dict[str, Any] = {"dataset": dataset, "refs": self._load_refs(ref_file)}
        instances = self._load_instances(instances_file)
        for key in ("images", "annotations", "categories"):
            self.data[key] = instances[key]
        self._ref_file, self._instances_file = ref_file, instances_file
        self._degenerate_reported: set[int] = set()  # annotations whose left-out polygons were logged
        self.createIndex()
        logger.info("DONE (t=%.2fs)", time.time() - tic)

    @staticmethod
    def files(data_root: str | Path, dataset: str, splitBy: str) -> tuple[Path, Path]:
        """(refs file, instances file) of ``dataset`` split by ``splitBy``: missing ones are refused naming the path
        and what belongs there (cheap: a run checks them before it writes anything)."""
        data_dir = Path(REFER.paths(data_root, dataset)[0])
        if not data_dir.is_dir():
            raise ReferFileNotFoundError(
                f"REFER annotation folder not found: {data_dir} (expected refs({splitBy}).p and instances.json of "
                f"{dataset} there, e.g. unzipped from the REFER repository's {dataset}.zip)"
            )
        ref_file = data_dir / f"refs({splitBy}).p"
        if not ref_file.is_file():
            present = sorted(p.name for p in data_dir.glob("refs(*).p"))
            raise ReferFileNotFoundError(
                f"REFER refs file not found: {ref_file} (expected the pickled list of {dataset} referring "
                f"expressions split by {splitBy!r}; this folder has {present or 'no refs(*).p file'})"
            )
        instances_file = data_dir / "instances.json"
        if not instances_file.is_file():
            raise ReferFileNotFoundError(
                f"REFER instances file not found: {instances_file} (expected the COCO-style images, annotations "
                f"and categories of {dataset})"
            )
        return ref_file, instances_file

    @staticmethod
    def _load_refs(ref_file: Path) -> list[dict]:
        try:
            # plain data only: a refs file naming any class or function (os.system, eval, ...) is refused unrun
            refs = load_plain_pickle(ref_file)
        except Exception as e:  # pickle raises many types on corrupt input
            raise ReferDataError(f"cannot read REFER refs pickle {ref_file}: {type(e).__name__}: {e}") from e
        if not isinstance(refs, list):
            raise ReferDataError(f"REFER refs pickle {ref_file} holds a {type(refs).__name__}, expected a list of refs")
        return refs

    @staticmethod
    def _load_instances(instances_file: Path) -> dict:
        try:
            with open(instances_file, encoding="utf-8") as f:
                instances = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReferDataError(f"cannot read REFER instances JSON {instances_file}: {e}") from e
        if not isinstance(instances, dict):
            raise ReferDataError(
                f"REFER instances file {instances_file} holds a {type(instances).__name__}, "
                "expected an object with images, annotations and categories"
            )
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise ReferDataError(
                    f"REFER instances file {instances_file} has no {key!r} entry (found {sorted(instances)})"
                )
        return instances

    def createIndex(self) -> None:
        """Build the id -> object dicts (see the module docstring)."""
        logger.debug("creating index...")
        Anns, Imgs, Cats, imgToAnns = {}, {}, {}, {}
        entry: Any = None
        try:
            for entry in self.data["annotations"]:
                Anns[entry["id"]] = entry
                imgToAnns.setdefault(entry["image_id"], []).append(entry)
            for entry in self.data["images"]:
                Imgs[entry["id"]] = entry
            for entry in self.data["categories"]:
                Cats[entry["id"]] = entry["name"]
        except (KeyError, TypeError) as e:
            raise ReferDataError(
                f"malformed entry in {getattr(self, '_instances_file', 'instances')}: {_malformed(e, entry)}"
            ) from e

        Refs, imgToRefs, refToAnn, annToRef, catToRefs = {}, {}, {}, {}, {}
        Sents, sentToRef, sentToTokens = {}, {}, {}
        ref_file = getattr(self, "_ref_file", "refs")
        for ref in self.data["refs"]:
            try:
                ref_id, ann_id = ref["ref_id"], ref["ann_id"]
                image_id, category_id = ref["image_id"], ref["category_id"]
                sentences = ref["sentences"]
                ref["split"]  # noqa: B018 - every ref must carry its split
            except (KeyError, TypeError) as e:
                raise ReferDataError(f"malformed ref in {ref_file}: {_malformed(e, ref)}") from e
            if ann_id not in Anns:
                raise ReferDataError(
                    f"ref {ref_id} in {ref_file} points at ann_id {ann_id}, which "
                    f"{getattr(self, '_instances_file', 'instances')} does not hold"
                )
            Refs[ref_id] = ref
            imgToRefs.setdefault(image_id, []).append(ref)
            catToRefs.setdefault(category_id, []).append(ref)
            refToAnn[ref_id] = Anns[ann_id]
            annToRef[ann_id] = ref
            for k, sent in enumerate(sentences):
                try:
                    Sents[sent["sent_id"]] = sent
                    sentToRef[sent["sent_id"]] = ref
                    sentToTokens[sent["sent_id"]] = sent["tokens"]
                except (KeyError, TypeError) as e:
                    why = _malformed(e, sent)
                    raise ReferDataError(f"malformed sentence {k} of ref {ref_id} in {ref_file}: {why}") from e

        self.Refs, self.Anns, self.Imgs, self.Cats, self.Sents = Refs, Anns, Imgs, Cats, Sents
        self.imgToRefs, self.imgToAnns, self.refToAnn, self.annToRef = imgToRefs, imgToAnns, refToAnn, annToRef
        self.catToRefs, self.sentToRef, self.sentToTokens = catToRefs, sentToRef, sentToTokens
        logger.debug("index created.")

    # ------------------------------------------------------------------ queries
    def _lookup(self, table: dict, key: Any, what: str) -> Any:
        try:
            return table[key]
        except (KeyError, TypeError):
            raise ReferKeyError(
                f"{what} {key!r} is not in {self.dataset} ({self.splitBy}) at {self.DATA_DIR}"
            ) from None

    def getRefIds(
        self,
        image_ids: Any = (),
        cat_ids: Any = (),
        ref_ids: Any = (),
        split: str = "",
    ) -> list:
        """Ref ids filtered by image, category, ref id and split.

        Split rules (the original's): ``testA``/``testB``/``testC`` keep refs whose split contains that letter
        (so also ``testAB`` ...), ``testAB``/``testBC``/``testAC`` match exactly, ``test`` keeps every split
        containing "test", ``train``/``val`` match exactly.
        """
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if split and split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for {self.dataset} ({self.splitBy}); expected one of {SPLITS}")
        if image_ids:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = self.data["refs"]
        if cat_ids:
            cat_set = set(cat_ids)
            refs = [ref for ref in refs if ref["category_id"] in cat_set]
        if ref_ids:
            ref_set = set(ref_ids)
            refs = [ref for ref in refs if ref["ref_id"] in ref_set]
        if split in ("testA", "testB", "testC"):
            refs = [ref for ref in refs if split[-1] in ref["split"]]
        elif split in ("testAB", "testBC", "testAC"):
            refs = [ref for ref in refs if ref["split"] == split]
        elif split == "test":
            refs = [ref for ref in refs if "test" in ref["split"]]
        elif split in ("train", "val"):
            refs = [ref for ref in refs if ref["split"] == split]
        return [ref["ref_id"] for ref in refs]

    def getAnnIds(self, image_ids: Any = (), cat_ids: Any = (), ref_ids: Any = ()) -> list:
        """Annotation ids filtered by image, category and ref."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            anns = [ann for image_id in image_ids for ann in self.imgToAnns.get(image_id, [])]
        else:
            anns = self.data["annotations"]
        if cat_ids:
            cat_set = set(cat_ids)
            anns = [ann for ann in anns if ann["category_id"] in cat_set]
        ann_ids = [ann["id"] for ann in anns]
        if ref_ids:
            keep = {self._lookup(self.Refs, ref_id, "ref_id")["ann_id"] for ref_id in ref_ids}
            ann_ids = [ann_id for ann_id in ann_ids if ann_id in keep]
        return ann_ids

    def getImgIds(self, ref_ids: Any = ()) -> list:
        """Ids of the images of the given refs (all images if none given)."""
        ref_ids = _as_list(ref_ids)
        if ref_ids:
            # dict.fromkeys: unique, in first-seen order (the original's set had no stable order)
            return list(dict.fromkeys(self._lookup(self.Refs, r, "ref_id")["image_id"] for r in ref_ids))
        return list(self.Imgs)

    def getCatIds(self) -> list:
        return list(self.Cats)

    def loadRefs(self, ref_ids: Any = ()) -> list[dict]:
        return [self._lookup(self.Refs, r, "ref_id") for r in _as_list(ref_ids)]

    def loadAnns(self, ann_ids: Any = ()) -> list[dict]:
        return [self._lookup(self.Anns, a, "ann_id") for a in _as_list(ann_ids)]

    def loadImgs(self, image_ids: Any = ()) -> list[dict]:
        return [self._lookup(self.Imgs, i, "image_id") for i in _as_list(image_ids)]

    def loadCats(self, cat_ids: Any = ()) -> list[str]:
        """Category names (``Cats`` maps id -> name, as the original)."""
        return [self._lookup(self.Cats, c, "category_id") for c in _as_list(cat_ids)]

    def getRefBox(self, ref_id: int) -> list[float]:
        """The referred object's box ``[x, y, w, h]``."""
        self._lookup(self.Refs, ref_id, "ref_id")
        return self.refToAnn[ref_id]["bbox"]

    # ------------------------------------------------------------------ masks (refer/masks.py)
    def getMask(self, ref: dict, parts: str = "official") -> dict[str, Any]:
        """The referred object's mask.

        Args:
            parts: how the parts of a multi-part annotation combine, ``official`` (pixels covered by exactly one
                part, as LAVT) or ``union``: see ``MASK_PARTS``.
        Returns:
            {'mask': [H, W] uint8 in {0, 1} at the image's size, 'area': float, its pixel count}.
        """
        if not isinstance(ref, dict) or "ref_id" not in ref:
            raise TypeError(f"getMask takes a ref (a dict with its ref_id, as loadRefs returns it), got {ref!r:.80}; "
                            "getMaskByRef(ref_id=...) takes the id")  # fmt: skip
        ref_id = ref["ref_id"]
        ann = self._lookup(self.refToAnn, ref_id, "ref_id")
        # (a ref written by hand may leave its image out: its annotation names it)
        image = self._lookup(self.Imgs, ref.get("image_id", ann.get("image_id")), "image_id")
        height, width = int(image["height"]), int(image["width"])
        ann_id = ann.get("id")
        where = f"annotation {ann_id!r} (ref {ref_id!r}) of {self.dataset}"

        def report(left_out: int, total: int, empty: bool) -> None:  # once per annotation
            if ann_id not in self._degenerate_reported:
                self._degenerate_reported.add(ann_id)
                logger.warning(
                    "%s: %d of its %d polygons have fewer than 3 points or no area and are left out%s",
                    where, left_out, total, "; its mask is empty" if empty else "",
                )  # fmt: skip

        rles = segmentation_rles(ann.get("segmentation"), height, width, where, report)
        m = combine_parts(rles, height, width, parts)
        return {"mask": m, "area": float(np.count_nonzero(m))}

    def getMaskByRef(
        self, ref: dict | None = None, ref_id: int | None = None, parts: str = "official"
    ) -> dict[str, Any]:
        """``getMask`` given either a ref or its id."""
        if ref is None:
            if ref_id is None:
                raise ValueError("getMaskByRef needs a ref or a ref_id")
            ref = self._lookup(self.Refs, ref_id, "ref_id")
        return self.getMask(ref, parts)

    # ------------------------------------------------------------------ plots (refer/plot.py)
    def showRef(self, ref: dict, seg_box: str = "seg") -> None:
        """Draw the image, the object's outline (``seg``) or box (``box``), and its sentences as the title."""
        show_ref(self, ref, seg_box)

    def showMask(self, ref: dict) -> None:
        """Draw the object's mask."""
        show_mask(self, ref)

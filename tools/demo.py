"""Predict masks for one's own image and expressions; the model side of the notebooks.

    python -m tools.demo --checkpoint checkpoint/demo/best.pth --image photo.jpg \\
        --text "the red circle" --text "the big star" --out overlay.png --mask_out mask.png

Any LAVT checkpoint opens (``tools.open_checkpoint``): this project's rebuild the network from their stored
config, the official releases from their weights. User images are turned upright by their EXIF orientation.
Images are prepared as the dataset prepares them (square resize to DATA.SIZE, ImageNet normalisation),
expressions tokenised as the dataset tokenises them; the logits are resized bilinearly to the image's own size
before the argmax, as the evaluation at ``original`` resolution does. Expressions are checked as the web page checks
them (``data.checks.check_user_text``): one the tokenizer reads nothing of is refused, one cut gets a WARNING. The
overlay and masks are written all or none, replacing files of those names, but never the input image or each other
(refused before predicting).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from configs import DEMO_CONFIG, get_config
from data import load_refer, load_rgb, tokenize
from data.checks import check_user_text
from data.transforms import resize_image, to_tensor
from engine.evaluation import find_per_expression, run_evaluation
from engine.run_folder import evaluation_lock
from models.text import load_tokenizer
from utils.amp import autocast, resolve_amp
from utils.distributed import DistInfo, resolve_device

from .cli import cli_parser, run_cli
from .open_checkpoint import open_checkpoint
from .visualize import compose_panels, mask_iou, save_pngs

logger = logging.getLogger(__name__)


def default_checkpoint() -> Path:
    """``<OUTPUT>/<MODEL_ID>/best.pth`` of the built-in demo run (``python main.py``, configs/demo.yaml)."""
    cfg = get_config(DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    return Path(cfg.OUTPUT) / cfg.MODEL_ID / "best.pth"


def checkpoint_or_demo(checkpoint: str | Path | None) -> Path:
    """``checkpoint``, or when none is given (None or "") the demo run's (``default_checkpoint``); FileNotFoundError
    (one line: how to make it) if that one is not there yet."""
    if checkpoint:
        return Path(checkpoint)
    demo = default_checkpoint()
    if not demo.exists():
        raise FileNotFoundError(f"no checkpoint given, and the built-in demo's {demo} is not there: train the demo "
                                "with `python main.py`, or give a checkpoint")  # fmt: skip
    return demo


def check_batch_size(batch_size: int) -> int:
    """``Predictor``'s ``batch_size``, or ValueError (one line) if it is below 1."""
    if batch_size < 1:
        raise ValueError(f"Predictor's batch_size must be at least 1, got {batch_size}")
    return batch_size


class Predictor:
    """A LAVT model with its tokenizer and input size: image + expressions -> masks at the image's size.

    Build it with ``Predictor.from_checkpoint(path)``; ``predict(image, texts)`` returns ``[E, H, W]`` bool.

    amp: "" predicts in float32, as the official code evaluates; "bf16" / "fp16" under autocast, as ``engine.evaluate``
    runs with ``TRAIN.AMP``; "auto": bf16 where the device computes it natively, else float32 (``utils.amp``).
    batch_size: expressions per forward: many expressions are predicted in batches of this many, and each mask is
    resized to the image on its own, so that memory stays bounded (a 12-megapixel photo: 48 MB per float map).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: CfgNode,
        tokenizer: Any,
        device: torch.device | str,
        amp: str = "",
        batch_size: int = 8,
    ) -> None:
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        self.model = model.to(self.device).eval()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.size, self.max_tokens = int(cfg.DATA.SIZE), int(cfg.MODEL.TEXT.MAX_TOKENS)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        cfg_file: str | Path | None = None,
        opts: Sequence[Any] = (),
        amp: str = "",
        batch_size: int = 8,
    ) -> Predictor:
        """Any LAVT checkpoint (``tools.open_checkpoint``: this project's, exported or official); ``cfg_file`` and
        ``opts`` (KEY VALUE ...) as there. device: None = cuda if available; amp, batch_size: as for ``Predictor``."""
        device = resolve_device(device)
        resolve_amp(amp, device)  # a wrong precision or batch size fails before the checkpoint is read
        check_batch_size(batch_size)
        cfg, model = open_checkpoint(path, cfg_file, opts)
        if not cfg.MODEL.TEXT.ENCODER:
            raise ValueError(
                f"checkpoint {path}: MODEL.TEXT.ENCODER is empty, but predicting from text needs the "
                "text encoder (set it with --opts MODEL.TEXT.ENCODER <folder or minilm-l6>)"
            )
        predictor = cls(model, cfg, load_tokenizer(cfg.MODEL.TEXT.ENCODER), device, amp, batch_size)
        logger.info("model of %s %s", path, predictor.describe())
        return predictor

    def describe(self) -> str:
        """The device, input size and precision ("on cpu, input 480x480, float32"), as the demo logs them and the web
        page shows them after the model's name."""
        return f"on {self.device}, input {self.size}x{self.size}, {self.amp or 'float32'}"

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input_ids [E, N], attention_mask [E, N]) int64, exactly as ``data.ReferDataset``."""
        return tokenize(self.tokenizer, list(texts), self.max_tokens)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """image [H, W, 3] uint8 RGB -> [1, 3, S, S] float32 normalised, as the dataset's evaluation items (with the
        resizing the model was trained with, ``DATA.RESIZE``)."""
        return to_tensor(resize_image(image, self.size, self.cfg.DATA.RESIZE)).unsqueeze(0)

    @torch.no_grad()
    def predict(self, image: np.ndarray | str | Path, texts: Sequence[str], exif: bool = True) -> np.ndarray:
        """Masks of each expression: image ([H, W, 3] uint8 RGB or a file), E texts -> [E, H, W] bool.

        exif: a file is turned upright by its EXIF orientation first, as photo viewers show it (False: the pixels as
        stored, the official reading of dataset images)."""
        if isinstance(image, (str, Path)):
            image = load_rgb(image, exif=exif)
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"predict needs a list of non-empty expressions, got {texts!r}")
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"predict needs an RGB uint8 image [H, W, 3], got {got}")
        ids, mask = self.tokenize(texts)
        x = self.prepare(image).to(self.device)
        masks = np.empty((len(texts), *image.shape[:2]), dtype=bool)
        for start in range(0, len(texts), self.batch_size):
            part = slice(start, start + self.batch_size)
            with autocast(self.amp, self.device):
                lang_feats, lang_mask = self.model.encode_text(ids[part].to(self.device), mask[part].to(self.device))
                logits = self.model.segment(x.expand(len(lang_feats), -1, -1, -1), lang_feats, lang_mask)
            logits = logits.float()  # [e, 2, S, S]
            # resizing is linear, so the resized logit difference decides the argmax (ties go to background)
            for e, margin in enumerate(logits[:, 1:] - logits[:, :1], start):  # margin [1, S, S]
                up = F.interpolate(margin[None], size=image.shape[:2], mode="bilinear", align_corners=False)
                masks[e] = (up[0, 0] > 0).cpu().numpy()
        return masks


def mask_paths(mask_out: str | Path, count: int) -> list[Path]:
    """``mask.png`` for one expression; ``mask_0.png``, ``mask_1.png``, ... for several."""
    path = Path(mask_out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{e}{path.suffix or '.png'}") for e in range(count)]


def check_outputs(image: str | Path, outputs: Sequence[Path]) -> None:
    """ValueError, before anything is predicted, if two outputs are one file (one would be lost) or one is the
    input image (it would be overwritten)."""
    seen = {os.path.realpath(image): "the input image"}
    for path in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{path} is {seen[real]}: it would be overwritten (give --out and --mask_out other names)")
        seen[real] = "another output"


def run_demo(
    checkpoint: str | Path | None,
    image: str | Path,
    texts: Sequence[str],
    out: str | Path,
    mask_out: str | Path | None = None,
    device: str | None = None,
    cfg_file: str | Path | None = None,
    opts: Sequence[Any] = (),
    predictor: Predictor | None = None,
    exif: bool = True,
) -> dict[str, Any]:
    """Predict and write the overlay PNG (one captioned panel per expression) and the mask PNG(s) (0/255, the
    image's size), all or none (``visualize.save_pngs``). Returns ``masks`` [E, H, W] bool and the written paths
    (``out``, ``mask_out``: a list).

    ``predictor``, when given, is used instead of loading ``checkpoint``. ``exif``: honour the image's EXIF
    orientation (user photos; False for dataset images, read as the official code reads them)."""
    paths = mask_paths(mask_out, len(texts)) if mask_out is not None else []
    check_outputs(image, [Path(out), *paths])
    rgb = load_rgb(image, exif=exif)
    if predictor is None:
        if checkpoint is None:
            raise ValueError("run_demo needs a checkpoint or a predictor")
        predictor = Predictor.from_checkpoint(checkpoint, device, cfg_file, opts)
    for k, text in enumerate(texts, 1):  # the web page's checks of a typed expression (data.checks)
        cut = check_user_text(predictor.tokenizer, text, predictor.max_tokens)
        if cut:
            logger.warning("expression %d: %s", k, cut)
    masks = predictor.predict(rgb, texts)
    pictures = {Path(out): compose_panels(rgb, masks, list(texts))}
    pictures.update({path: m.astype(np.uint8) * 255 for path, m in zip(paths, masks)})
    save_pngs(pictures)
    written = {"masks": masks, "out": Path(out), "mask_out": paths}
    for text, m in zip(texts, masks):
        logger.info("%r: %.1f%% of the image", text, 100 * m.mean())
    return written


# ----------------------------------------------------------------------------- dataset helpers for the notebooks
def dataset_example(refer: Any, split: str = "val", index: int = 0, max_objects: int = 3) -> dict[str, Any]:
    """The ``index``-th image of ``split`` with at least two referred objects: its path, the first expression of
    (up to ``max_objects``) of them and their ground-truth masks ([H, W] uint8), for the inference notebook."""
    by_image: dict[int, list[dict]] = {}
    for ref_id in refer.getRefIds(split=split):
        ref = refer.Refs[ref_id]
        by_image.setdefault(ref["image_id"], []).append(ref)
    images = [refs for refs in by_image.values() if len(refs) >= 2]
    if index >= len(images):
        raise ValueError(
            f"split {split!r} of {refer.DATA_DIR} has {len(images)} images with two or more referred "
            f"objects; asked for number {index}"
        )
    refs = images[index][:max_objects]
    info = refer.Imgs[refs[0]["image_id"]]
    return {
        "image": Path(refer.IMAGE_DIR) / info["file_name"],
        "expressions": [ref["sentences"][0]["raw"] for ref in refs],
        "gts": [refer.getMask(ref)["mask"] for ref in refs],
        "ref_ids": [ref["ref_id"] for ref in refs],
    }


def ensure_results(
    predictor: Predictor, checkpoint: str | Path, split: str = "val", resolution: str = "network"
) -> Path:
    """The per-expression results of ``checkpoint`` on ``split`` (``each`` protocol), the newest found under its
    folder (``engine.evaluation.find_per_expression``); when there are none, the predictor's model evaluates the
    split first, every expression scored alone, as ``main.py --eval`` does, writing into that folder (holding an
    evaluation's lock there, as it does: a training with ``--overwrite`` of the folder waits for it)."""
    run_dir = Path(checkpoint).parent
    cfg = predictor.cfg.clone()
    cfg.defrost()
    cfg.EVAL.MODE, cfg.EVAL.RESOLUTION, cfg.EVAL.SPLITS = "each", resolution, [split]
    cfg.EVAL.SHUFFLE_EXPRESSIONS = cfg.EVAL.SHUFFLED_CONTROL = cfg.EVAL.SAVE_MASKS = False
    cfg.freeze()
    path = find_per_expression(run_dir, cfg, split)
    if path is None:
        info = DistInfo(0, 1, 0, False, predictor.device)
        with evaluation_lock(run_dir):
            run_evaluation(cfg, predictor.model, predictor.tokenizer, info, run_dir, str(checkpoint))
        path = find_per_expression(run_dir, cfg, split)
    return path


def worst_cases(predictor: Predictor, records: Sequence[dict[str, Any]], refer: Any, k: int = 6) -> list[dict]:
    """The ``k`` lowest-IoU expressions with image, ground truth and the prediction redone at the image's size,
    ready for ``visualize.figure_cases``."""
    cases = []
    for r in sorted(records, key=lambda r: (r["IoU"], r["ref_id"], r.get("sent_id", 0)))[:k]:
        ref = refer.Refs[r["ref_id"]]
        image = load_rgb(Path(refer.IMAGE_DIR) / refer.Imgs[ref["image_id"]]["file_name"])
        gt = refer.getMask(ref)["mask"]
        pred = predictor.predict(image, [r["sentence"]])[0]
        cases.append(
            {
                "image": image,
                "gt": gt,
                "pred": pred,
                "sentence": r["sentence"],
                "iou": mask_iou(pred, gt),
                "title": f"ref {r['ref_id']}, evaluation IoU {r['IoU']:.3f}",
            }
        )
    return cases


# ----------------------------------------------------------------------------- command line
def add_amp_argument(p: argparse.ArgumentParser) -> None:
    """``--amp``, the precision of the predictions (``Predictor``'s ``amp``; absent: float32)."""
    p.add_argument(
        "--amp",
        default=None,
        choices=["bf16", "fp16", "auto"],
        help="predict under mixed precision (default: float32, as the official code); auto: bf16 where the device "
        "computes it natively, else float32",
    )


def get_parser() -> argparse.ArgumentParser:
    p = cli_parser(
        "python -m tools.demo",
        "Segment what each expression refers to in an image: writes the overlay PNG (one captioned "
        "panel per expression) and the mask PNG(s) at the image's size.",
    )
    p.add_argument("--checkpoint", help="LAVT checkpoint (default: the demo run's best.pth)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="any image file Pillow reads (give its expressions with --text)")
    source.add_argument(
        "--example",
        type=int,
        metavar="N",
        help="the N-th val image of the checkpoint's dataset with two or more referred objects; --text defaults "
        "to one annotated expression per object",
    )
    p.add_argument("--text", action="append", help="a referring expression; repeat for more")
    p.add_argument("--out", default="overlay.png", help="overlay PNG")
    p.add_argument("--mask_out", help="mask PNG (0/255); several expressions: <stem>_<i>.png")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    add_amp_argument(p)
    p.add_argument(
        "--cfg_file", default=None, help="config for a checkpoint without one, where its weights leave a setting open"
    )
    p.add_argument(
        "--opts", nargs="+", default=(), metavar="KEY VALUE", help="config overrides, e.g. MODEL.TEXT.ENCODER minilm-l6"
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.image is not None and not args.text:
        parser.error("--image needs at least one --text")
    blank = [k for k, text in enumerate(args.text or (), 1) if not text.strip()]
    if blank:  # before the model is loaded
        parser.error(f"--text number {blank[0]} is blank: each --text is one referring expression")
    if args.example is not None and args.example < 0:
        parser.error(f"--example must be >= 0, got {args.example}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    checkpoint = checkpoint_or_demo(args.checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, args.device, args.cfg_file, args.opts, args.amp or "")
    image, texts = args.image, args.text
    if args.example is not None:
        example = dataset_example(load_refer(predictor.cfg), "val", args.example)
        image, texts = example["image"], texts or example["expressions"]
        logger.info("example %d: %s", args.example, image)
    # a dataset image is read as the official code reads it (no EXIF turn), as its annotations were made on it
    written = run_demo(None, image, texts, args.out, args.mask_out, predictor=predictor, exif=args.example is None)
    logger.info(
        "overlay: %s%s",
        written["out"],
        "; masks: " + ", ".join(map(str, written["mask_out"])) if written["mask_out"] else "",
    )
    return {**written, "image": Path(image), "texts": list(texts)}


if __name__ == "__main__":
    raise SystemExit(run_cli("python -m tools.demo", main))

"""Export a LAVT checkpoint: the authors' file layout, or safetensors.

    python -m tools.export checkpoint/refcoco/best.pth --to official --out lavt_refcoco.pth
    python -m tools.export checkpoint/refcoco/best.pth --to safetensors --out lavt_refcoco.safetensors

- ``official``: ``{'model', 'bert_model', 'args'}`` (packaging ``lavt``) or ``{'model', 'args'}`` with the text
  encoder inside (``lavt_one``), as the authors' ``train.py`` saves them and their ``test.py`` loads them
  (``models.to_official``). The config itself is not in that layout: reading the file back, ``open_checkpoint``
  infers the architecture from the weights and ``args`` (PWAM heads, input size, dataset).
- ``safetensors``: this project's key layout, weights only, with the config YAML in the metadata (``config``).

Both read back with ``models.load_weights`` and ``tools.open_checkpoint`` to the same tensors. Any checkpoint
``open_checkpoint`` reads can be exported (an official file to safetensors, and back). The output is written
atomically and an existing file is refused, also one written there meanwhile (``--force`` replaces it; never the
checkpoint being exported).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode

from models.official import PACKAGINGS, official_args, to_official
from utils.atomic import staged

from .cli import cli_parser, run_cli
from .open_checkpoint import open_checkpoint

logger = logging.getLogger(__name__)
FORMATS = ("official", "safetensors")


def official_gaps(model: torch.nn.Module, cfg: CfgNode) -> list[str]:
    """What of this network the authors' code cannot build (it reads ``swin_type`` and ``window12`` only, one patch
    stem, the official decoder width and MLP ratio, no refinement, padded windows); empty for the released
    architectures."""
    args = official_args(model, cfg.MODEL.NAME)
    gaps = [] if "swin_type" in args else [
        f"embed dim {cfg.MODEL.SWIN.EMBED_DIM}, depths {list(cfg.MODEL.SWIN.DEPTHS)}, heads "
        f"{list(cfg.MODEL.SWIN.NUM_HEADS)} are no official swin_type"
    ]  # fmt: skip
    if "window12" not in args:
        gaps.append(f"window {cfg.MODEL.SWIN.WINDOW_SIZE} (official: 7 or 12)")
    if cfg.MODEL.SWIN.STEM != "patch" or cfg.MODEL.SWIN.PATCH_SIZE != 4:
        gaps.append(f"stem {cfg.MODEL.SWIN.STEM} with patch size {cfg.MODEL.SWIN.PATCH_SIZE}")
    if cfg.MODEL.DECODER_HIDDEN or cfg.MODEL.SWIN.MLP_RATIO != 4.0:
        gaps.append(f"decoder width {cfg.MODEL.DECODER_HIDDEN}, MLP ratio {cfg.MODEL.SWIN.MLP_RATIO}")
    if cfg.MODEL.REFINE:
        gaps.append(f"edge refinement of width {cfg.MODEL.REFINE}")
    if cfg.MODEL.SWIN.FIT_WINDOW:
        gaps.append("maps smaller than the window attended unpadded (MODEL.SWIN.FIT_WINDOW)")
    return gaps


def export(
    checkpoint: str | Path,
    to: str,
    out: str | Path,
    packaging: str | None = None,
    cfg_file: str | Path | None = None,
    opts: Sequence[Any] = (),
    force: bool = False,
) -> Path:
    """Write ``checkpoint``'s weights to ``out`` in format ``to`` (``FORMATS``); returns ``out``.

    packaging: ``lavt`` | ``lavt_one`` for ``official`` (default: the checkpoint's MODEL.NAME).
    cfg_file, opts: for ``open_checkpoint``. force: replace an existing ``out``.
    """
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if packaging is not None and (to != "official" or packaging not in PACKAGINGS):
        raise ValueError(f"--packaging takes {' or '.join(PACKAGINGS)}, with --to official only; got {packaging!r}")
    out = Path(out)
    if os.path.realpath(out) == os.path.realpath(checkpoint):  # (--force is for an older export, not the source)
        raise ValueError(f"--out {out} is the checkpoint being exported: it would be replaced; choose another --out")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: choose another --out, or --force to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    cfg, model = open_checkpoint(checkpoint, cfg_file, opts)
    try:
        with staged([out], replace=force) as (tmp,):  # (without --force, not over a file another process wrote)
            if to == "official":
                packaging = packaging or cfg.MODEL.NAME
                data = {"img_size": cfg.DATA.SIZE, "dataset": cfg.DATA.DATASET, "splitBy": cfg.DATA.SPLIT_BY}
                torch.save(to_official(model, packaging, **data), tmp)
                gaps = official_gaps(model, cfg)
                if gaps:
                    logger.warning("the authors' code cannot build this network (%s); %s reads back here only",
                                   "; ".join(gaps), out)  # fmt: skip
            else:
                from safetensors.torch import save_file

                # own copies: safetensors refuses tensors that share memory or are not contiguous
                state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
                save_file(state, str(tmp), metadata={"config": cfg.dump(), "format": "pt"})
    except FileExistsError:
        taken = f"{out} appeared while exporting: choose another --out, or --force to replace it"
        raise FileExistsError(taken) from None
    logger.info("%s -> %s (%s%s)", checkpoint, out, to, f", {packaging}" if to == "official" else "")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = cli_parser("python -m tools.export", __doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="any LAVT checkpoint: this project's .pth / .safetensors, or an official file")
    p.add_argument("--to", required=True, choices=FORMATS, help="the authors' layout, or safetensors")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--packaging", choices=PACKAGINGS,
                   help="official layout: lavt (BERT under 'bert_model') or lavt_one (inside 'model'); default: the "
                   "checkpoint's MODEL.NAME")  # fmt: skip
    p.add_argument("--cfg_file", help="config, for a file without one where its weights leave it open")
    p.add_argument("--opts", nargs="+", default=(), metavar="KEY VALUE", help="config overrides")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return export(args.checkpoint, args.to, args.out, args.packaging, args.cfg_file, args.opts, args.force)


if __name__ == "__main__":
    raise SystemExit(run_cli("python -m tools.export", main))

"""Loading weights: this project's checkpoints, the official LAVT releases, and Swin ImageNet initialisers.

Every file is read with ``torch.load(weights_only=True)``, or as safetensors (``tools.export``; recognised by its
content). The official releases pickle an ``argparse.Namespace`` under ``'args'``; that one plain class is
allow-listed, nothing else.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .patch_embed import PatchEmbed

logger = logging.getLogger(__name__)

#: Buffers that some files carry and that hold no learned state (derivable, or unused by this model).
IGNORED_SUFFIXES = ("relative_position_index", "attn_mask", "position_ids", "token_type_ids")
TEXT_PREFIX = "text_encoder."


class CheckpointError(RuntimeError):
    """A weights file that cannot be read or does not fit the model; the message names the file."""


def is_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file (an 8-byte little-endian header length, then a JSON header), whatever
    its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    # (safetensors refuses a header over 100,000,000 bytes: its MAX_HEADER_SIZE)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file as ``read_checkpoint`` returns files: ``{'model': tensors, 'config': YAML text}`` (the
    config from the metadata, when ``tools.export`` stored one)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {str(err)[:500]}") from err
    content: dict[str, Any] = {"model": state}
    if "config" in metadata:
        content["config"] = metadata["config"]
    return content


def checkpoint_format(path: str | Path) -> str:
    """``"safetensors"`` or ``"torch"`` (a ``torch.save`` zip archive, or its legacy pickle format), read from the
    first bytes: a missing, empty or foreign file is refused (``CheckpointError``) before anything is loaded."""
    path = Path(path)
    if path.is_dir():  # a run folder, most likely: name the checkpoints in it
        inside = sorted(p.name for p in path.glob("*.pth")) + sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (it holds {', '.join(inside)})" if inside else " (with no .pth or .safetensors file in it)"
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: give one of its checkpoints{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    # a zip archive's local header (a damaged one too: torch.load then names the damage); legacy torch.save files
    # open with a pickle protocol byte
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    what = "the file is empty" if not head else "neither a PyTorch (torch.save) nor a safetensors file"
    raise CheckpointError(f"cannot read checkpoint {path}: {what}")


def _load_failure(path: Path, err: Exception) -> CheckpointError:
    """One line for a ``torch.load`` failure: torch's several-paragraph advice reduced to its cause."""
    text = " ".join(str(err).split())
    if isinstance(err, EOFError):
        why = "the file is cut short"
    elif "central directory" in text:  # a zip archive without its end
        why = f"the file is cut short or damaged ({text.split('. ', 1)[0]})"
    elif 'hasRecord("version")' in text:  # a whole zip archive, but not one torch.save wrote
        why = "a zip archive without PyTorch's records: not a torch.save file (a zip of the weights? unpack it)"
    elif "WeightsUnpickler error:" in text:  # weights_only=True met something else than tensors and plain values
        cause = text.split("WeightsUnpickler error:", 1)[1]
        cause = cause.split(" Please use", 1)[0].split(" Check the documentation", 1)[0].strip()
        if cause.startswith("Unsupported global"):
            why = f"it holds objects other than tensors and plain values, which are never loaded ({cause})"
        else:
            why = f"damaged or not a checkpoint ({cause})"
    else:
        why = f"{type(err).__name__}: {text[:300]}"
    return CheckpointError(f"cannot read checkpoint {path}: {why}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict stored in ``path``: a ``torch.save`` file (safe loading; the official files' argparse Namespace
    allowed) or a safetensors file (``read_safetensors``)."""
    path = Path(path)
    if checkpoint_format(path) == "safetensors":
        return read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as err:
        raise _load_failure(path, err) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of weights")
    return obj


def checkpoint_filter_fn(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One LAVT state dict in this project's key layout from any supported file content.

    Accepts this project's checkpoints (``{'model': ..., 'config': ...}``), official ``lavt`` files
    (``{'model': ..., 'bert_model': ...}``: the text encoder moves under ``text_encoder.``), official
    ``lavt_one`` files (``{'model': ...}`` with ``text_encoder.`` inside) and bare state dicts; strips a DDP
    ``module.`` prefix and drops the buffers in ``IGNORED_SUFFIXES`` and a BERT pooler (unused by LAVT).
    """
    def strip(key: str) -> str:
        return key[len("module."):] if key.startswith("module.") else key

    merged = {strip(k): v for k, v in checkpoint.get("model", checkpoint).items()}
    merged.update({TEXT_PREFIX + strip(k): v for k, v in (checkpoint.get("bert_model") or {}).items()})
    cleaned = {}
    for key, value in merged.items():
        dropped = key.endswith(IGNORED_SUFFIXES) or key.startswith(TEXT_PREFIX + "pooler.")
        if isinstance(value, torch.Tensor) and not dropped:
            cleaned[key] = value
    return cleaned


def load_weights(model: nn.Module, path: str | Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load every weight of ``model`` from ``path``, or raise ``CheckpointError`` saying what does not fit.

    Never loads part of a model silently: missing keys, unexpected keys and shape mismatches are all listed.
    Returns the file's whole content (optimizer state etc. for resuming). ``checkpoint``: the file's content when
    the caller has read it already (``read_checkpoint(path)``), so that it is not read twice.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    state = checkpoint_filter_fn(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        key = "backbone.patch_embed.norm.weight"  # the token width, whichever the stem
        dims = (len(state[key]) if key in state else -1, len(expected[key]))
        stems = tuple("conv" if any(k.startswith("backbone.patch_embed.stem.") for k in keys) else "patch"
                      for keys in (state, expected))
        raise CheckpointError(_mismatch_message(path, missing, unexpected, wrong, dims, stems))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path)
    return checkpoint


def _mismatch_message(
    path: str | Path, missing: list[str], unexpected: list[str], wrong: list[str], embed_dims: tuple[int, int],
    stems: tuple[str, str] = ("patch", "patch"),
) -> str:
    lines = [f"checkpoint {path} does not fit this model (is it another configuration?):"]
    if wrong:
        lines.append(f"  {len(wrong)} shape mismatches: {_listed(wrong)}")
    if missing:
        lines.append(f"  {len(missing)} weights missing from the file: {_listed(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} weights in the file that the model lacks: {_listed(unexpected)}")
    if any(k.startswith(TEXT_PREFIX) for k in missing):
        lines.append("  the model has a text encoder the file lacks: an official 'lavt' file needs its 'bert_model'.")
    if any(k.startswith(TEXT_PREFIX) for k in unexpected):
        lines.append("  the file has a text encoder: set MODEL.TEXT.ENCODER (--ck_bert) to a folder of that BERT.")
    if stems[0] != stems[1]:
        lines.append(f"  MODEL.SWIN.STEM is {stems[0]} in the file, {stems[1]} here.")
    if embed_dims[0] != -1 and embed_dims[0] != embed_dims[1]:
        lines.append(f"  MODEL.SWIN.EMBED_DIM is {embed_dims[0]} in the file, {embed_dims[1]} here.")
    if any("relative_position_bias_table" in w for w in wrong):  # (attention masks are never in a state dict)
        lines.append("  relative-position tables differ: check MODEL.SWIN.WINDOW_SIZE (the released files use 12).")
    return "\n".join(lines)


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """table: [(2w-1)^2, heads] -> [(2 * window - 1)^2, heads], bicubic, as the Swin segmentation initialiser."""
    L, heads = table.shape
    side, new_side = int(L**0.5), 2 * window - 1
    if side == new_side:
        return table
    grid = table.permute(1, 0).reshape(1, heads, side, side)  # [1, heads, 2w-1, 2w-1]
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic")
    return grid.reshape(heads, new_side * new_side).permute(1, 0)


#: What a Swin ImageNet classification file holds beyond the backbone: its head and final norm (LAVT has neither).
SWIN_CLASSIFIER_KEYS = ("head.", "norm.")
#: Parts of the names of backbone weights that no Swin ImageNet file holds: PWAM's and the language gates'.
LAVT_ONLY = (".fusion.", ".res_gate.")
#: The backbone's output norm of each stage, which no Swin ImageNet file holds either (a classifier has one, ``norm.``).
STAGE_NORMS = tuple(f"norm{i}." for i in range(4))


def _lavt_only(key: str) -> bool:
    return any(part in key for part in LAVT_ONLY) or key.startswith(STAGE_NORMS)


def _listed(keys: list[str], at_most: int = 8) -> str:
    more = f" and {len(keys) - at_most} more" if len(keys) > at_most else ""
    return ", ".join(keys[:at_most]) + more


def load_pretrained_swin(backbone: nn.Module, path: str | Path) -> list[str]:
    """Initialise the backbone from a Swin ImageNet checkpoint (original Swin key layout, ``{'model': ...}``).

    Loads every Swin weight of the backbone, resizing relative-position tables bicubically when the window differs.
    Skips (and reports) only what a Swin classifier holds and LAVT does not (the head, the final norm), the
    buffers, and with a conv stem (``MODEL.SWIN.STEM conv``) the patch embedding: the stem stays at its init.
    Anything else that does not fit would leave a half-initialised backbone, so it is refused. Returns what was
    skipped.

    Raises:
        CheckpointError: naming the file and the keys, when nothing matches (not a Swin checkpoint), when a weight's
            shape differs (another Swin size: embed dim, heads), when the file holds backbone weights the model
            lacks or lacks some the model has (other depths).
    """
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    own = backbone.state_dict()
    conv_stem = not isinstance(backbone.patch_embed, PatchEmbed)
    load, skipped, mismatched, unexpected = {}, [], [], []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith(SWIN_CLASSIFIER_KEYS):
            skipped.append(key)
        elif key.startswith("patch_embed.") and conv_stem:
            skipped.append(f"{key} (the conv stem has no ImageNet counterpart)")
        elif key not in own:
            unexpected.append(key)
        else:
            if key.endswith("relative_position_bias_table") and value.shape != own[key].shape:
                if value.shape[1] == own[key].shape[1]:
                    value = resize_relative_position_table(value, int((own[key].shape[0] ** 0.5 + 1) / 2))
            if value.shape != own[key].shape:
                mismatched.append(f"{key} (file {list(value.shape)} vs model {list(own[key].shape)})")
            else:
                load[key] = value
    if not load:
        raise CheckpointError(f"{path} shares no weight with the Swin backbone: is it a Swin ImageNet checkpoint?")
    in_file = {k[len("module."):] if k.startswith("module.") else k for k in state}
    missing = sorted(k for k in own if k not in in_file and not _lavt_only(k) and not k.endswith(IGNORED_SUFFIXES)
                     and not (conv_stem and k.startswith("patch_embed.")))
    problems = [f"{len(keys)} {what}: {_listed(keys)}" for what, keys in (
        ("weights of another shape", mismatched), ("weights the backbone lacks", unexpected),
        ("backbone weights missing from the file", missing)) if keys]
    if problems:
        raise CheckpointError(
            f"{path} does not fit the Swin backbone (MODEL.SWIN.EMBED_DIM / DEPTHS / NUM_HEADS of another Swin "
            f"size?), nothing loaded: " + "; ".join(problems)
        )
    backbone.load_state_dict(load, strict=False)
    not_loaded = sorted(set(own) - set(load))
    logger.info("Swin init from %s: %d tensors loaded; skipped from the file: %s; left at their init: %d tensors "
                "(PWAM, gates, stage norms)", path, len(load), ", ".join(skipped) or "nothing", len(not_loaded))
    return skipped

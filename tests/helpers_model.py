"""Small builders shared by the model tests."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs import get_config

from .conftest import FIXTURE, tiny_opts

__all__ = ["FIXTURE", "NOT_CPU", "KernelLayouts", "assert_close", "fixture_cfg", "save_tiny_bert", "tiny_cfg"]

# A device other than the CPU, for the tests of where tensors go: the suite never has a GPU, and torch refuses to mix
# ``meta`` tensors (shapes and dtypes, no values) with CPU tensors as it refuses to mix a GPU's with them.
NOT_CPU = torch.device("meta")


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` is ``ref`` up to float32 round-off: within 1e-5 of ref's largest magnitude (of 1 when that is
    smaller), the same shape."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = (out - ref).abs().max().item()
    assert err < 1e-5 * max(ref.abs().max().item(), 1.0), f"max abs error {err:.3g}"


def tiny_cfg(**over):
    """The tiny LAVT config (tests/conftest.py: ``TINY``); keyword overrides use '__' for '.'
    (``MODEL__SWIN__EMBED_DIM=16``)."""
    return get_config(None, tiny_opts(**over))


def fixture_cfg(reference: dict, **over):
    c = reference["config"]
    return tiny_cfg(MODEL__SWIN__EMBED_DIM=c["embed_dim"], MODEL__SWIN__DEPTHS=c["depths"],
                    MODEL__SWIN__NUM_HEADS=c["num_heads"], MODEL__SWIN__WINDOW_SIZE=c["window_size"],
                    MODEL__FUSION__NUM_HEADS=c["num_heads_fusion"], MODEL__TEXT__DIM=c["lang_dim"], **over)


def save_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, vocab: int = 64) -> Path:
    """A random BERT saved as a local HF folder (config.json + weights)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(folder)
    return folder


class KernelLayouts(TorchDispatchMode):
    """Records, for each call of a kernel whose name contains ``part`` (``batch_norm``, ``upsample``), the layouts of
    its 4-d tensor arguments, "nchw" (contiguous), "cl" (channels-last) or "strided": ``seen[kernel]``, one list a
    call."""

    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part
        self.seen: dict[str, list[list[str]]] = {}

    @staticmethod
    def layout(t: torch.Tensor) -> str:
        if t.is_contiguous():
            return "nchw"
        return "cl" if t.is_contiguous(memory_format=torch.channels_last) else "strided"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.part in name:
            layouts = [self.layout(a) for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
            self.seen.setdefault(name, []).append(layouts)
        return func(*args, **(kwargs or {}))

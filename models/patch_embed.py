"""The Swin's first layer: images to stage-1 tokens, one per ``patch_size`` x ``patch_size`` pixels.

Two stems give the same token grid (``ceil(H / patch_size)`` x ``ceil(W / patch_size)``) and output layout:
- ``patch`` (official Swin / LAVT): one ``patch_size``-strided convolution, then LayerNorm;
- ``conv``: a convolutional stem (after Xiao et al., "Early Convolutions Help Transformers See Better", 2021):
  3x3 conv-BN-ReLU layers, a 1x1 convolution, then LayerNorm. Not in LAVT, and ImageNet Swin weights have no
  counterpart for it; trained from scratch it learns shapes much sooner (the demo's model trained for one epoch:
  val mIoU 69.5 instead of 57.8).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["STEMS", "PatchEmbed", "ConvStem", "build_stem"]

STEMS = ("patch", "conv")


class PatchEmbed(nn.Module):
    """Non-overlapping patches: images [B, in_chans, H, W] -> tokens [B, Hp * Wp, C] with Hp = ceil(H / patch)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return tokens(self.proj(pad_to_multiple(x, self.patch_size)), self.norm)


class ConvStem(nn.Module):
    """Convolutional stem: images [B, in_chans, H, W] -> tokens [B, Hp * Wp, C], Hp = ceil(H / patch).

    ``log2(patch_size)`` 3x3 stride-2 conv-BN-ReLU layers, their widths doubling up to ``embed_dim`` (patch 4:
    C/2, C), ``extra_layers`` 3x3 stride-1 conv-BN-ReLU layers of width C, then a 1x1 convolution and LayerNorm.
    Patch 4, one extra layer, embed 32: 19 MFLOP per 96-pixel image (the patch convolution: 1.8; the demo's image
    model: ~370).

    Args:
        patch_size: a power of two, at least 2.
        in_chans: image channels.
        embed_dim: token channels.
        extra_layers: stride-1 layers after the last stride-2 one (the demo's model trained for one epoch: val
            mIoU 64.3, 69.5, 70.5 with 0, 1, 2; each costs ~2% of its training step). ``MODEL.SWIN.STEM conv``
            builds 1.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, extra_layers: int = 1) -> None:
        super().__init__()
        down = patch_size.bit_length() - 1
        if patch_size < 2 or patch_size != 1 << down:
            raise ValueError(f"the conv stem needs a patch size that is a power of two (>= 2), got {patch_size}")
        if embed_dim % (1 << (down - 1)):
            raise ValueError(f"the conv stem halves embed_dim {embed_dim} {down - 1} times: it must divide evenly")
        if extra_layers < 0:
            raise ValueError(f"extra_layers must be >= 0, got {extra_layers}")
        self.patch_size = patch_size
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_chans
        for i in range(down + extra_layers):
            out = embed_dim >> max(down - 1 - i, 0)
            # no conv bias: the BatchNorm's shift replaces it; "norm" in the name keeps it out of weight decay
            stem[f"conv{i}"] = nn.Conv2d(width, out, 3, stride=2 if i < down else 1, padding=1, bias=False)
            stem[f"norm{i}"] = nn.BatchNorm2d(out)
            stem[f"act{i}"] = nn.ReLU()
            width = out
        self.stem = nn.Sequential(stem)
        self.proj = nn.Conv2d(width, embed_dim, 1)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # padded as PatchEmbed, so that both stems give the same grid and see the same pixels
        return tokens(self.proj(self.stem(pad_to_multiple(x, self.patch_size))), self.norm)


def pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    """x: [B, C, H, W] -> [B, C, ceil(H / p) * p, ceil(W / p) * p], zeros on the bottom/right."""
    H, W = x.shape[-2:]
    if H % p or W % p:
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
    return x


def tokens(x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, int, int]:
    """A stem's map x: [B, C, Hp, Wp] -> (norm(tokens) [B, Hp * Wp, C], Hp, Wp)."""
    Hp, Wp = x.shape[-2:]
    return norm(x.flatten(2).transpose(1, 2)), Hp, Wp


def build_stem(stem: str, patch_size: int, in_chans: int, embed_dim: int) -> PatchEmbed | ConvStem:
    """``stem``: ``patch`` (official) or ``conv``."""
    if stem == "patch":
        return PatchEmbed(patch_size, in_chans, embed_dim)
    if stem == "conv":
        return ConvStem(patch_size, in_chans, embed_dim)
    raise ValueError(f"unknown stem {stem!r} (MODEL.SWIN.STEM); expected one of {STEMS}")

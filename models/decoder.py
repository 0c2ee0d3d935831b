"""LAVT's lightweight top-down decoder (the official ``SimpleDecoding``)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Conv3x3, training_layout
from .layers import checkpoint_batchnorm, grad_in_layout, recomputes


class SimpleDecoder(nn.Module):
    """Fuses the four stage maps top-down into 2-class logits at stage-1 resolution.

    Stage 4 is upsampled (bilinear, align_corners=True) and concatenated with stage 3, then two 3x3
    conv-BN-ReLU; the same with stage 2 and stage 1; then a 1x1 conv to 2 channels.

    Args:
        c4_dims: channels of stage 4 (``8 * embed_dim``); stages 3, 2, 1 have 1/2, 1/4, 1/8 of it.
        factor: channel ratio between the backbone's stages (stages 3, 2, 1 have ``c4_dims // factor**k``).
        hidden: width of the fused maps; None is the official ``c4_dims // factor``. At stage-1 resolution the
            decoder's convolutions cost more than a small backbone (embed 32: 0.53 of 0.73 GFLOP per 96-px image).
        channels_last: run the convolutions in channels_last memory format.
        grad_checkpoint: in training, recompute each level in the backward pass instead of keeping its
            activations (at 480 px the largest a training step holds); BatchNorm statistics are updated once.
        matmul_grad: the 3x3 convolutions' weight gradients as matrix products in float32 CPU training, in those
            wide enough for it to pay (``models.conv``; the same results to round-off).
        winograd: the 3x3 convolutions on CPU by Winograd where it pays (``models.winograd``; the same results to
            round-off: float32's within ~3x oneDNN's, bf16's about 2-3x).
        weight_layouts: the storage orders of the two 3x3 weights of levels 4, 3 and 2 (``models.conv.training_layout``,
            ``decoder_layouts``): speed only, the values are the same.
    """

    def __init__(
        self, c4_dims: int, factor: int = 2, channels_last: bool = False, grad_checkpoint: bool = False,
        hidden: int | None = None, matmul_grad: bool = False, winograd: bool = False,
        weight_layouts: Sequence[tuple[str, str]] = (("oihw", "oihw"),) * 3,
    ):
        super().__init__()
        hidden, skips = decoder_widths(c4_dims, factor, hidden)
        self.channels_last, self.grad_checkpoint = channels_last, grad_checkpoint
        # flat attributes (conv1_4, bn1_4, ...) keep the official checkpoint key names
        for level, skip, (layout1, layout2) in zip("432", skips, weight_layouts, strict=True):
            self.add_module(f"conv1_{level}", Conv3x3(skip, hidden, matmul_grad, winograd, layout1))
            self.add_module(f"bn1_{level}", nn.BatchNorm2d(hidden))
            self.add_module(f"relu1_{level}", nn.ReLU())
            self.add_module(f"conv2_{level}", Conv3x3(hidden, hidden, matmul_grad, winograd, layout2))
            self.add_module(f"bn2_{level}", nn.BatchNorm2d(hidden))
            self.add_module(f"relu2_{level}", nn.ReLU())
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def _fuse(self, x: torch.Tensor, skip: torch.Tensor, level: str) -> torch.Tensor:
        """x: [B, C, h, w] (coarser); skip: [B, C_s, H, W] -> [B, hidden, H, W]."""
        if x.shape[-2] < skip.shape[-2] or x.shape[-1] < skip.shape[-1]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            # its gradient, a channel slice of the concatenation's, would reach the upsampling's backward strided
            if x.device.type == "cpu" and x.requires_grad:
                x = grad_in_layout(x)
        x = torch.cat([x, skip], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = getattr(self, f"relu1_{level}")(getattr(self, f"bn1_{level}")(getattr(self, f"conv1_{level}")(x)))
        return getattr(self, f"relu2_{level}")(getattr(self, f"bn2_{level}")(getattr(self, f"conv2_{level}")(x)))

    def _fuse_checkpointed(self, x: torch.Tensor, skip: torch.Tensor, level: str) -> torch.Tensor:
        bns = [getattr(self, f"bn1_{level}"), getattr(self, f"bn2_{level}")]
        return checkpoint_batchnorm(self._fuse, x, skip, level, bns=bns)

    def forward(self, x_c4: torch.Tensor, x_c3: torch.Tensor, x_c2: torch.Tensor, x_c1: torch.Tensor) -> torch.Tensor:
        """x_ci: [B, C_i, H_i, W_i] -> logits [B, 2, H_1, W_1]."""
        fuse = self._fuse_checkpointed if recomputes(self) else self._fuse
        x = fuse(x_c4, x_c3, "4")
        x = fuse(x, x_c2, "3")
        x = fuse(x, x_c1, "2")
        return self.conv1_1(x)


def decoder_widths(c4_dims: int, factor: int = 2, hidden: int | None = None) -> tuple[int, tuple[int, int, int]]:
    """(the fused maps' width, the input widths of levels 4, 3 and 2): each level's first 3x3 convolution reads the
    coarser map (stage 4's, then ``hidden``) concatenated with stage 3's, 2's, 1's (``c4_dims // factor**k``).
    ``hidden`` None is the official ``c4_dims // factor``."""
    c3, c2, c1 = c4_dims // factor, c4_dims // factor**2, c4_dims // factor**3
    hidden = c3 if hidden is None else hidden
    if hidden < 1:
        raise ValueError(f"decoder hidden width must be positive, got {hidden}")
    return hidden, (c4_dims + c3, hidden + c2, hidden + c1)


def decoder_layouts(
    embed_dim: int, hidden: int, batch: int, image_size: int, dtype: torch.dtype, device_type: str,
    matmul_grad: bool, winograd: bool,
) -> tuple[tuple[str, str], ...]:
    """``training_layout`` of the two 3x3 weights of levels 4, 3 and 2 in training on ``batch`` images of
    ``image_size`` px: they run at the stage-3, 2 and 1 maps (``image_size / 16``, ``/ 8``, ``/ 4``, rounded up)."""
    layouts = []
    for stage, skip in zip((3, 2, 1), decoder_widths(8 * embed_dim, 2, hidden)[1]):
        side = math.ceil(image_size / 2 ** (stage + 1))
        tiles = batch * math.ceil(side / 2) ** 2
        layouts.append(tuple(
            training_layout(c, hidden, tiles, dtype, device_type, matmul_grad, winograd)
            for c in (skip, hidden)
        ))  # fmt: skip
    return tuple(layouts)


def build_decoder(
    embed_dim: int, channels_last: bool = False, grad_checkpoint: bool = False, hidden: int = 0,
    matmul_grad: bool = False, winograd: bool = False, train_batch: int = 0, image_size: int = 0,
    dtype: torch.dtype = torch.float32, device_type: str = "cpu",
) -> SimpleDecoder:
    """The decoder of a Swin with ``embed_dim``; ``hidden`` 0 is the official width (``4 * embed_dim``). With
    ``train_batch`` > 0 its 3x3 weights are stored as training on ``train_batch`` images of ``image_size`` px in
    ``dtype`` on ``device_type`` reads them (``decoder_layouts``); else in the usual [O, C, 3, 3] order."""
    hidden = decoder_widths(8 * embed_dim, 2, hidden or None)[0]
    layouts = (("oihw", "oihw"),) * 3
    if train_batch > 0:
        layouts = decoder_layouts(embed_dim, hidden, train_batch, image_size, dtype, device_type, matmul_grad, winograd)
    return SimpleDecoder(8 * embed_dim, 2, channels_last, grad_checkpoint, hidden, matmul_grad, winograd, layouts)

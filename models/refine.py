"""An optional edge refinement of LAVT's logits at the input resolution (``MODEL.REFINE``; not in LAVT).

LAVT's decoder predicts at stage-1 resolution (1/4 of the input) and the logits are upsampled bilinearly: a mask
cannot follow an object's corners closer than a few pixels. That bounds the IoU of small objects (the demo's are
18-24 px across at 96 px, 6 cells of the decoder's grid). The refinement reads the upsampled logits beside the
image itself and adds a correction: two 3x3 conv-BN-ReLU layers and a 1x1 convolution, which starts at zero so that
an untrained refinement returns the logits unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import BatchNorm2d, checkpoint_batchnorm, recomputes

__all__ = ["EdgeRefine", "build_refine"]


class EdgeRefine(nn.Module):
    """logits [B, 2, H, W] + images [B, 3, H, W] -> logits [B, 2, H, W], corrected near the image's edges.

    Args:
        hidden: channels of the two 3x3 layers (their receptive field: 5x5 pixels around each output pixel).
        in_chans: the image's channels.
        grad_checkpoint: in training, recompute the two hidden maps (full resolution: [B, hidden, H, W] each, with
            their BatchNorm and ReLU outputs) in the backward pass instead of keeping them (``MODEL.GRAD_CHECKPOINT``).
    """

    def __init__(self, hidden: int, in_chans: int = 3, grad_checkpoint: bool = False) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"the refinement's width must be positive, got {hidden}")
        self.conv1 = nn.Conv2d(2 + in_chans, hidden, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(hidden)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(hidden, 2, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity on the logits
        nn.init.zeros_(self.proj.bias)
        self.grad_checkpoint = grad_checkpoint

    def _correction(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        x = torch.cat([logits, images.to(logits.dtype)], dim=1)  # [B, 2 + in_chans, H, W]
        if x.device.type == "cpu":
            # oneDNN runs these few-channel, full-resolution convolutions faster channels-last (measured in
            # docs/performance.md); other devices are left as they are
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.proj(x)

    def forward(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if recomputes(self):
            correction = checkpoint_batchnorm(self._correction, logits, images, bns=[self.bn1, self.bn2])
        else:
            correction = self._correction(logits, images)
        return logits + correction


def build_refine(hidden: int, grad_checkpoint: bool = False) -> EdgeRefine | None:
    """``MODEL.REFINE``: 0 is none (the official network), else an ``EdgeRefine`` of that width."""
    return EdgeRefine(hidden, grad_checkpoint=grad_checkpoint) if hidden else None

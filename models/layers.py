"""Small layers of the Swin backbone, with timm's semantics (the official LAVT code takes them from timm).

Written here rather than imported: ``import timm`` pulls in torchvision and ``torch._dynamo``, paid by every process
that only wants to print an error or a help text (docs/performance.md, "Small choices"). tests/test_layers.py checks
each against timm's, seed for seed. And ``recomputes`` (whether a module checkpoints now),
``checkpoint_batchnorm``, activation checkpointing of conv-BN blocks (the decoder's and the refinement's),
``grad_in_layout``, which hands a gradient on in its tensor's layout, and ``BatchNorm2d``, which trains narrow
channels-last maps on CPU in the contiguous layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std^2) truncated to the absolute bounds [a, b] (timm's convention: the
    bounds are not scaled by ``std``), by inverting the normal CDF on uniform samples. Returns ``tensor``."""

    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf(a / std), cdf(b / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    return tensor.clamp_(min=a, max=b)


class DropPath(nn.Module):
    """Stochastic depth: in training each sample's residual branch is dropped with probability ``p`` and the kept
    ones are scaled by ``1 / (1 - p)``; the identity in evaluation."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ...] -> [B, ...]."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Sequential):
    """The transformer block's feed-forward: ``fc2(GELU(fc1(x)))``, hidden width ``hidden`` (state-dict keys
    ``fc1.*``, ``fc2.*`` as the official checkpoints)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


def recomputes(module: nn.Module) -> bool:
    """Whether ``module`` checkpoints its activations in this call: its ``grad_checkpoint`` is set (``MODEL.
    GRAD_CHECKPOINT``), it trains and gradients are recorded (nothing is kept for a backward pass otherwise)."""
    return module.grad_checkpoint and module.training and torch.is_grad_enabled()


def checkpoint_batchnorm(fn: Callable[..., torch.Tensor], *args: object, bns: list[nn.BatchNorm2d]) -> torch.Tensor:
    """``fn(*args)`` with its activations recomputed in the backward pass (``torch.utils.checkpoint``), where the
    BatchNorms ``bns`` inside ``fn`` run in training mode a second time: their running statistics are put back after
    the recomputation, so that they move once per step, as without checkpointing."""
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _keep_running_stats(bns))
    )


@contextlib.contextmanager
def _keep_running_stats(bns: list[nn.BatchNorm2d]) -> Iterator[None]:
    saved = [[t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)] for bn in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, state in zip(bns, saved):
                for t, s in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), state):
                    t.copy_(s)


#: below this many channels a channels-last map is batch-normalised in the contiguous layout in CPU training
NARROW_CHANNELS = 16


class _GradInLayout(torch.autograd.Function):
    """The identity; its backward hands on the gradient contiguous in the input's memory format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.memory_format)


def grad_in_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself; in the backward pass its gradient is made contiguous in x's memory format (NCHW or channels-last)
    before it reaches the operation that made x. CPU kernels given a gradient in another layout than their input, or
    a strided one (a channel slice of a concatenation's gradient), take 3-4x longer (docs/performance.md)."""
    return _GradInLayout.apply(x)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters and buffers, the same results up to round-off) that, in CPU training,
    normalises a channels-last map of fewer than ``NARROW_CHANNELS`` channels in the contiguous (NCHW) layout, forward
    and backward, and hands it back channels-last: PyTorch's CPU kernels train such maps faster that way, the two
    copies included (8 channels, 96 x 96, batch 32, forward and backward: bf16 3.7 against 11.2 ms, float32 9.1
    against 11.0; at 16 and 32 channels channels-last is the faster; docs/performance.md). Evaluation, other devices
    and wider maps go to ``nn.BatchNorm2d`` as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W], in x's memory format."""
        narrow = self.num_features < NARROW_CHANNELS and x.is_contiguous(memory_format=torch.channels_last)
        if not (narrow and self.training and x.device.type == "cpu"):
            return super().forward(x)
        # the gradient arrives from the channels-last copy channels-last: made contiguous for the kernel's backward
        y = grad_in_layout(super().forward(x.contiguous()))
        return y.contiguous(memory_format=torch.channels_last)

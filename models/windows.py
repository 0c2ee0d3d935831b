"""The layout of Swin's windows: padding a map to whole windows, cutting it into windows and back, the
relative-position index of a window and the official shift mask, as the official LAVT backbone builds them."""

from __future__ import annotations

import torch

__all__ = ["padded", "window_partition", "window_reverse", "relative_position_index", "window_kinds", "kind_masks"]


def padded(n: int, window: int) -> int:
    """``n`` rounded up to a multiple of ``window``: the side of a stage's map once padded for its windows."""
    return -(-n // window) * window


def window_partition(x: torch.Tensor, window: int, as_heads: bool) -> torch.Tensor:
    """x: [B, Hp, Wp, C] with Hp, Wp multiples of ``window`` -> windows of N = window^2 tokens, row-major (as the
    shift mask and the official code order them): [B, N, nW, C] with ``as_heads``, else [B * nW, N, 1, C]."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    if as_heads:
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, window * window, -1, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, 1, C)


def window_reverse(windows: torch.Tensor, window: int, Hp: int, Wp: int, as_heads: bool) -> torch.Tensor:
    """The inverse of ``window_partition``: windows in either layout -> [B, Hp, Wp, C]."""
    C = windows.shape[-1]
    nH, nW = Hp // window, Wp // window
    if as_heads:
        x = windows.view(-1, window, window, nH, nW, C).permute(0, 3, 1, 4, 2, 5)
    else:
        x = windows.view(-1, nH, nW, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, Hp, Wp, C)


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the ``(2 * window - 1)^2`` relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2], from 0
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_kinds(nH: int, nW: int, device: torch.device | None = None) -> torch.Tensor:
    """[nH * nW] (windows row-major): 0 inside, 1 last column, 2 last row, 3 bottom-right corner.

    The official shift mask splits the padded, rolled map's rows (and columns) at ``side - window`` and ``side -
    shift``. ``side - window`` falls between windows, so only the last row (column) of windows is split: into its
    first ``window - shift`` rows (columns) and the rest. A window's mask is therefore one of four (``kind_masks``).
    """
    last_row = torch.arange(nH, device=device).eq(nH - 1)
    last_col = torch.arange(nW, device=device).eq(nW - 1)
    return (2 * last_row[:, None] + last_col[None, :]).flatten()


def kind_masks(window: int, shift: int) -> torch.Tensor:
    """[4, N, N] additive shift masks of the ``window_kinds``: -100 between tokens of different regions, else 0."""
    second = (torch.arange(window) >= window - shift).long()  # rows (columns) in the split's second part
    region = 2 * second[:, None] + second[None, :]  # [window, window]: a corner window's four regions
    label = torch.stack([region * 0, region & 1, region & 2, region]).view(4, -1)  # [4, N]: kinds 0-3
    return torch.where(label[:, :, None] != label[:, None, :], -100.0, 0.0)

"""Test oracle: the official LAVT backbone read literally, step by step, with the weights of this project's modules.

Each function follows the official code's order of operations and layouts (channels-first 1x1 convolutions, windows
in the batch, attention matrices written out), and shares no code with ``models/``: it takes a module only for its
weights and sub-layers (Linear, LayerNorm, Conv1d, Mlp). Index tables, masks, padding and window layouts are built
here independently, so that a test comparing the model with it checks them. Slow (Python loops over windows and
tokens where the official code has vectorised forms): for small maps and widths only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """table [(2 * window - 1)^2, heads] -> [heads, N, N]: entry (i, j) is the table row of the offset (dy, dx) from
    token j to token i of a window (tokens row-major), row (dy + window - 1) * (2 * window - 1) + dx + window - 1."""
    N = window * window
    rows = [[(i // window - j // window + window - 1) * (2 * window - 1) + i % window - j % window + window - 1
             for j in range(N)] for i in range(N)]
    return table[torch.tensor(rows)].permute(2, 0, 1)


def shift_mask(Hp: int, Wp: int, window: int, shift: int) -> torch.Tensor:
    """[nW, N, N] on the padded Hp x Wp grid, windows row-major: -100 between tokens of different regions, 0 within.

    The rolled map's rows (and columns) fall in three regions: before ``size - window``, up to ``size - shift``, the
    rest; a token's region is (row region, column region)."""

    def part(v: int, size: int) -> int:
        return 0 if v < size - window else (1 if v < size - shift else 2)

    masks = []
    for top in range(0, Hp, window):
        for left in range(0, Wp, window):
            label = torch.tensor([3 * part(top + a, Hp) + part(left + b, Wp) for a in range(window)
                                  for b in range(window)])
            masks.append((label[:, None] != label[None, :]).float() * -100.0)
    return torch.stack(masks)


def window_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Official ``WindowAttention.forward``: x [B * nW, N, C] (windows in the batch); mask [nW, N, N] or None."""
    B_, N, C = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (C // h) ** -0.5
    scores = q @ k.transpose(-2, -1) + relative_bias(attn.relative_position_bias_table, attn.window).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        scores = scores.view(B_ // nW, nW, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, h, N, N)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B_, N, C)
    return attn.proj(out)


def swin_block(blk: nn.Module, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Official ``SwinTransformerBlock.forward`` (eval: no drop path): x [B, H * W, C] -> [B, H * W, C].

    Pads the normalised map bottom/right to a multiple of the window BEFORE the cyclic shift, masks on the padded
    grid, crops after the reverse shift."""
    B, L, C = x.shape
    ws, s = blk.window, blk.shift
    shortcut = x
    x = blk.norm1(x).view(B, H, W, C)
    pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, Hp, Wp, _ = x.shape
    if s > 0:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
    windows = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    out = window_attention(blk.attn, windows, shift_mask(Hp, Wp, ws, s).to(x) if s > 0 else None)
    x = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if s > 0:
        x = torch.roll(x, shifts=(s, s), dims=(1, 2))
    x = x[:, :H, :W, :].reshape(B, H * W, C)
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


def patch_merging(pm: nn.Module, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Official ``PatchMerging.forward``: odd sides padded by one at the bottom/right; [B, H * W, C] -> [B, L', 2C]."""
    B, L, C = x.shape
    x = x.view(B, H, W, C)
    if H % 2 == 1 or W % 2 == 1:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    x0, x1, x2, x3 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
    return pm.reduction(pm.norm(x))


def image_language_attention(
    m: nn.Module, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor
) -> torch.Tensor:
    """Official ``SpatialImageLanguageAttention.forward``, channels first: x [B, HW, C_v], lang [B, C_l, N],
    lang_mask [B, N, 1] -> [B, HW, C_out]."""
    B, HW = x.size(0), x.size(1)
    x = x.permute(0, 2, 1)
    lang_mask = lang_mask.permute(0, 2, 1)  # [B, 1, N]
    query = m.f_query(x).permute(0, 2, 1)  # Conv1d then InstanceNorm1d, [B, HW, C_k]
    key = m.f_key(lang) * lang_mask
    value = m.f_value(lang) * lang_mask
    n_l = value.size(-1)
    h = m.num_heads
    query = query.reshape(B, HW, h, m.key_channels // h).permute(0, 2, 1, 3)
    key = key.reshape(B, h, m.key_channels // h, n_l)
    value = value.reshape(B, h, m.value_channels // h, n_l)
    lang_mask = lang_mask.unsqueeze(1)  # [B, 1, 1, N]
    sim_map = (m.key_channels**-0.5) * torch.matmul(query, key)
    sim_map = F.softmax(sim_map + (1e4 * lang_mask - 1e4), dim=-1)
    out = torch.matmul(sim_map, value.permute(0, 1, 3, 2))
    out = out.permute(0, 2, 1, 3).contiguous().reshape(B, HW, m.value_channels).permute(0, 2, 1)
    return m.W(out).permute(0, 2, 1)  # Conv1d then InstanceNorm1d


def pwam(m: nn.Module, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
    """Official ``PWAM.forward``: x [B, HW, C], lang [B, C_l, N], lang_mask [B, N, 1] -> [B, HW, C]."""
    vis = m.vis_project(x.permute(0, 2, 1))  # [B, C, HW]
    lang_att = image_language_attention(m.image_lang_att, x, lang, lang_mask).permute(0, 2, 1)
    return m.project_mm(vis * lang_att).permute(0, 2, 1)


def stage(
    layer: nn.Module, x: torch.Tensor, H: int, W: int, lang: torch.Tensor, lang_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Official ``MMBasicLayer.forward``: blocks, PWAM, gate, patch merging -> (PWAM out, next x, next H, next W)."""
    for blk in layer.blocks:
        x = swin_block(blk, x, H, W)
    x_residual = pwam(layer.fusion, x, lang, lang_mask)
    x = x + layer.res_gate(x_residual) * x_residual
    if layer.downsample is None:
        return x_residual, x, H, W
    return x_residual, patch_merging(layer.downsample, x, H, W), (H + 1) // 2, (W + 1) // 2


def backbone(swin: nn.Module, image: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> list[torch.Tensor]:
    """Official ``MultiModalSwinTransformer.forward`` (patch stem): image [B, 3, H, W] -> [[B, C_i, H_i, W_i]] x 4."""
    p = swin.patch_embed.patch_size
    _, _, H, W = image.size()
    if W % p:
        image = F.pad(image, (0, p - W % p))
    if H % p:
        image = F.pad(image, (0, 0, 0, p - H % p))
    x = swin.patch_embed.proj(image)
    Wh, Ww = x.size(2), x.size(3)
    x = swin.patch_embed.norm(x.flatten(2).transpose(1, 2))
    outs = []
    for i, layer in enumerate(swin.layers):
        x_out, x, Wh_next, Ww_next = stage(layer, x, Wh, Ww, lang, lang_mask)
        x_out = getattr(swin, f"norm{i}")(x_out)
        outs.append(x_out.view(-1, Wh, Ww, x_out.shape[-1]).permute(0, 3, 1, 2).contiguous())
        Wh, Ww = Wh_next, Ww_next
    return outs

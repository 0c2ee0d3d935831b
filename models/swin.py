"""The multi-modal Swin Transformer: LAVT's image encoder with language fused into every stage.

Written to the official LAVT backbone's behaviour, which differs from Swin code written for classification
(timm's included) in three ways that change the numbers:

- a stage's map is padded on the bottom/right to a multiple of the window right after ``norm1`` and before the
  cyclic shift; the shift mask is built on the padded grid and padded tokens are not masked otherwise;
- odd-numbered blocks always shift by ``window // 2``, even where the map is no larger than the window;
- patch merging sits at the END of stages 0-2 and pads odd sizes by one on the bottom/right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from .patch_embed import build_stem
from .pwam import PWAM, LanguageGate, attention


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """x: [B, H, W, C] with H, W multiples of ``window`` -> [B * nW, window * window, C]."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    # [B, nH, nW, window, window, C]: windows row-major, as the mask and the official code order them
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """windows: [B * nW, window * window, C] -> [B, H, W, C]; inverse of ``window_partition``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the ``(2 * window - 1)^2`` relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2], from 0
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(Hp: int, Wp: int, window: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """Shifted-window mask on the padded grid: [nW, N, N], 0 within a region and -100 across regions."""
    img = torch.zeros(1, Hp, Wp, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for h in cuts:
        for w in cuts:
            img[:, h, w, :] = region
            region += 1
    labels = window_partition(img, window).squeeze(-1)  # [nW, N]
    diff = labels[:, None, :] - labels[:, :, None]
    return diff.ne(0).float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a relative-position bias.

    Args:
        dim: channels.
        window: window side.
        num_heads: attention heads.
        fused: use ``scaled_dot_product_attention`` (same result to float round-off).
    """

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads, self.fused = dim, window, num_heads, fused
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Derivable from the window: not saved, and ignored when a file carries it.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._bias_cache: dict[tuple, tuple] = {}

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] with N = window^2."""
        N = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # [N * N, heads]
        return bias.view(N, N, -1).permute(2, 0, 1)

    def attn_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The fused path's additive mask: [1, h, N, N] (no mask) or [1, nW * h, N, N] (bias + shift mask).

        Built once per mask, dtype and weights when no gradient is needed (evaluation); rebuilt every forward
        when the bias table is trained. 4-D, as the fused CPU kernel requires.
        """
        table = self.relative_position_bias_table
        if torch.is_grad_enabled() and table.requires_grad or torch.compiler.is_compiling():
            return self._build_attn_bias(mask, dtype)
        key = (None if mask is None else tuple(mask.shape), dtype, table.device)
        stamp = (table._version, table.data_ptr())
        hit = self._bias_cache.get(key)
        # the entry holds its mask, so identity (not a reusable address) says it is the same mask
        if hit is None or hit[0] is not mask or hit[1] != stamp:
            hit = (mask, stamp, self._build_attn_bias(mask, dtype))
            self._bias_cache[key] = hit
        return hit[2]

    def _build_attn_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        bias = self.position_bias()  # [h, N, N]
        if mask is not None:
            bias = mask.unsqueeze(1) + bias  # [nW, h, N, N]: windows outer, heads inner, as the merged head dim
        return bias.reshape(1, -1, *bias.shape[-2:]).to(dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * nW, N, C] (windows in the batch) or, fused with a shift mask, [B, N, nW, C] (windows as heads).

        mask: [nW, N, N] or None. Returns x's shape.
        """
        if self.fused and x.dim() == 4:
            return self._forward_window_heads(x, mask)
        Bw, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(Bw, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # [3, B * nW, h, N, d]
        q, k, v = qkv.unbind(0)
        if self.fused and mask is None:
            p = self.attn_drop.p if self.training else 0.0
            out = attention(q, k, v, self.attn_bias(None, q.dtype), self.scale, p)  # [B * nW, h, N, d]
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(Bw, N, C)))
        bias = self.position_bias()  # [h, N, N]
        if mask is not None:
            nW = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # [nW, h, N, N]
            # [B, nW, h, N, d]: the batch and window dims split so the mask broadcasts per window
            q, k, v = (t.view(Bw // nW, nW, h, N, -1) for t in (q, k, v))
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
        out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.reshape(Bw, h, N, -1).transpose(1, 2).reshape(Bw, N, C)  # heads back into channels
        return self.proj_drop(self.proj(out))

    def _forward_window_heads(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, N, nW, C] -> [B, N, nW, C]: every (window, head) pair is one attention head, so that the
        per-window shift mask is a per-head mask and the fused kernel applies (a 5-D query would not take it)."""
        B, N, nW, C = x.shape
        h = self.num_heads
        w, b = self.qkv.weight.chunk(3), (self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3)
        # q, k and v projected separately: each [B, N, nW, C] merges (nW, h) into one head dim as a view
        q, k, v = (F.linear(x, w[i], b[i]).view(B, N, nW * h, -1).transpose(1, 2) for i in range(3))
        p = self.attn_drop.p if self.training else 0.0
        out = attention(q, k, v, self.attn_bias(mask, q.dtype), self.scale, p)  # [B, nW * h, N, d]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, nW, C)))


class SwinBlock(nn.Module):
    """One Swin block; ``shift`` > 0 for the shifted-window blocks (odd indices)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window={window}), got {shift}")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, fused=fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, H * W, C]; mask: the stage's shift mask [nW, N, N] (used when shifting) -> [B, H * W, C]."""
        if self.attn.fused:
            return self._forward_fused(x, H, W, mask)
        B, L, C = x.shape
        ws = self.window
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # [B, Hp, Wp, C], zeros after norm1 as the official code
        Hp, Wp = H + pad_b, W + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, ws), mask if self.shift else None), ws, Hp, Wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :H, :W, :]
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_fused(self, x: torch.Tensor, H: int, W: int, mask: torch.Tensor | None) -> torch.Tensor:
        """``forward`` with the shifted windows laid out as heads ([B, N, nW, C]) and the crop added as a view."""
        B, L, C = x.shape
        ws, s = self.window, self.shift
        y = self.norm1(x).view(B, H, W, C)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))  # [B, Hp, Wp, C], zeros after norm1 as the official code
        Hp, Wp = H + pad_b, W + pad_r
        nH, nW = Hp // ws, Wp // ws
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2)).view(B, nH, ws, nW, ws, C)
            y = y.permute(0, 2, 4, 1, 3, 5).reshape(B, ws * ws, nH * nW, C)  # [B, N, windows, C]
            y = self.attn(y, mask).view(B, ws, ws, nH, nW, C).permute(0, 3, 1, 4, 2, 5).reshape(B, Hp, Wp, C)
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        else:
            y = window_reverse(self.attn(window_partition(y, ws)), ws, Hp, Wp)
        # the padded border is dropped by viewing, not copying, the [B, H, W, C] corner
        x = (x.view(B, H, W, C) + self.drop_path(y[:, :H, :W])).view(B, L, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated and projected: [B, H * W, C] -> [B, ceil(H/2) * ceil(W/2), 2C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # order x0, x1, x2, x3 = (even, even), (odd, even), (even, odd), (odd, odd) as the checkpoints expect
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class MultiModalStage(nn.Module):
    """Swin blocks, then PWAM, then the language gate, then (stages 0-2) patch merging.

    Returns the PWAM output (the stage's output to the decoder, before ``norm{i}``) and the gated sum
    ``x + gate(F) * F`` merged for the next stage.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        lang_dim: int,
        fusion_heads: int = 1,
        fusion_drop: float = 0.0,
        mlp_ratio: float = 4.0,
        drop_path: list[float] | None = None,
        downsample: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i], fused)
            for i in range(depth)
        )
        self.fusion = PWAM(dim, dim, lang_dim, dim, dim, num_heads=fusion_heads, dropout=fusion_drop, fused=fused)
        self.res_gate = LanguageGate(dim)
        self.downsample = PatchMerging(dim) if downsample else None
        if not downsample:
            # Kept for the official checkpoint layout, but the last gate's output is never used: frozen, so that
            # DDP needs no find_unused_parameters and the optimiser skips it.
            self.res_gate.requires_grad_(False)
        self._masks: dict[tuple, torch.Tensor] = {}
        self.grad_checkpoint = False  # set by MultiModalSwin

    def mask(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """The shift mask for an H x W map, built once per padded size and device."""
        ws = self.window
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        key = (Hp, Wp, device)
        if key not in self._masks:
            self._masks[key] = shift_mask(Hp, Wp, ws, self.shift, device)
        return self._masks[key]

    def forward(
        self, x: torch.Tensor, H: int, W: int, lang: torch.Tensor, lang_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, H * W, C]; lang: [B, C_l, N]; lang_mask: [B, N, 1] -> (PWAM out [B, H * W, C], next [B, L', C'])."""
        mask = self.mask(H, W, x.device) if len(self.blocks) > 1 else None
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            # per block, not per stage: the backward then holds one block's activations at a time (a stage of
            # 18 blocks recomputed at once would hold all of them); the compute is the same, one extra forward
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, mask, use_reentrant=False)
            return torch.utils.checkpoint.checkpoint(self._fuse, x, H, W, lang, lang_mask, use_reentrant=False)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        return self._fuse(x, H, W, lang, lang_mask)

    def _fuse(
        self, x: torch.Tensor, H: int, W: int, lang: torch.Tensor, lang_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PWAM, the gate and patch merging: x [B, H * W, C] -> (PWAM out [B, H * W, C], next [B, L', C'])."""
        fused = self.fusion(x, lang, lang_mask)
        if self.downsample is None:
            return fused, x  # the last stage's gated sum feeds nothing: skip it
        x = x + self.res_gate(fused) * fused
        return fused, self.downsample(x, H, W)


class MultiModalSwin(nn.Module):
    """LAVT's image encoder. images [B, 3, H, W] + language -> four maps [B, C_i, H_i, W_i], C_i = embed_dim * 2^i.

    Args:
        embed_dim: channels of stage 0.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window: window side (7 or 12).
        lang_dim: width of the language features.
        fusion_heads: PWAM heads per stage (the official ``--mha``).
        grad_checkpoint: recompute activations in the backward pass (per Swin block) to save memory.
        stem: ``patch`` (official: one strided convolution) or ``conv`` (``models.patch_embed.ConvStem``).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window: int = 7,
        lang_dim: int = 768,
        fusion_heads: tuple[int, ...] = (1, 1, 1, 1),
        fusion_drop: float = 0.0,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        fused: bool = True,
        grad_checkpoint: bool = False,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if not len(depths) == len(num_heads) == len(fusion_heads):
            raise ValueError(
                f"depths {list(depths)}, num_heads {list(num_heads)} and fusion heads {list(fusion_heads)} "
                "must have one entry per stage"
            )
        self.num_stages = len(depths)
        self.num_features = [embed_dim * 2**i for i in range(self.num_stages)]
        for i, (c, h) in enumerate(zip(self.num_features, num_heads)):
            if c % h:
                raise ValueError(f"stage {i}: {c} channels do not divide into {h} heads")
        self.patch_embed = build_stem(stem, patch_size, 3, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth, linearly spread
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                MultiModalStage(
                    self.num_features[i], depth, num_heads[i], window, lang_dim, fusion_heads[i], fusion_drop,
                    mlp_ratio, dpr[sum(depths[:i]): sum(depths[: i + 1])], downsample=i < self.num_stages - 1,
                    fused=fused,
                )
            )
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.apply(_init_weights)
        self.grad_checkpoint = grad_checkpoint

    @property
    def grad_checkpoint(self) -> bool:
        """Recompute activations in the backward pass (training only), block by block, to save memory."""
        return all(stage.grad_checkpoint for stage in self.layers)

    @grad_checkpoint.setter
    def grad_checkpoint(self, value: bool) -> None:
        for stage in self.layers:
            stage.grad_checkpoint = value

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, 3, H, W]; lang: [B, C_l, N]; lang_mask: [B, N, 1] -> [[B, C_i, H_i, W_i] for each stage]."""
        stride = self.patch_embed.patch_size * 2 ** (self.num_stages - 1)
        if -(-x.shape[-2] // stride) * -(-x.shape[-1] // stride) < 2:
            # PWAM's InstanceNorm needs more than one pixel in the last stage
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small: the last stage's map would be 1x1; "
                             f"give at least {stride + 1} pixels on one side")
        x, H, W = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            fused, x = stage(x, H, W, lang, lang_mask)
            out = getattr(self, f"norm{i}")(fused)
            outs.append(out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2))  # [B, C_i, H, W]
            H, W = (H + 1) // 2, (W + 1) // 2
        return outs


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_backbone(
    embed_dim: int,
    depths: list[int],
    num_heads: list[int],
    window: int,
    lang_dim: int,
    fusion_heads: list[int],
    fusion_drop: float = 0.0,
    patch_size: int = 4,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.3,
    fused: bool = True,
    grad_checkpoint: bool = False,
    stem: str = "patch",
) -> MultiModalSwin:
    return MultiModalSwin(
        embed_dim, tuple(depths), tuple(num_heads), window, lang_dim, tuple(fusion_heads), fusion_drop, patch_size,
        mlp_ratio, drop_path_rate, fused, grad_checkpoint, stem,
    )

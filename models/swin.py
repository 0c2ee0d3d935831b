"""The multi-modal Swin Transformer: LAVT's image encoder with language fused into every stage.

Written to the official LAVT backbone's behaviour, which differs from Swin code written for classification
(timm's included) in three ways that change the numbers:

- a stage's map is padded on the bottom/right to a multiple of the window right after ``norm1`` and before the
  cyclic shift; the shift mask is built on the padded grid and padded tokens are not masked otherwise;
- odd-numbered blocks always shift by ``window // 2``, even where the map is no larger than the window;
- patch merging sits at the END of stages 0-2 and pads odd sizes by one on the bottom/right.

``fit_window`` (``MODEL.SWIN.FIT_WINDOW``, not in LAVT) changes the first two for maps smaller than the window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .layers import DropPath, Mlp, recomputes, trunc_normal_
from .patch_embed import build_stem
from .pwam import PWAM, LanguageGate, attention
from .windows import kind_masks, padded, relative_position_index, window_kinds, window_partition, window_reverse


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a relative-position bias and (shifted windows) a shift mask.

    Masked windows come as attention heads: x [B, N, nW, C] gives q, k, v [B, nW * h, N, d] as views, so that the
    per-window mask is a per-head additive bias [1, nW * h, N, N] (4-D, as the fused CPU kernel requires; a 5-D
    query would not take it) and the batch needs no copy of it. Unmasked windows, which share one bias, come in
    the batch ([B * nW, N, 1, C]) and their bias [1, h, N, N] broadcasts over it. The bias is built at every call
    (one pass over [nW, h, N, N]): the module keeps nothing that could go stale.

    Args:
        dim: channels.
        window: window side.
        num_heads: attention heads.
        fused_attn: use ``scaled_dot_product_attention`` (same result to float round-off).
    """

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads, self.fused_attn = dim, window, num_heads, fused_attn
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Derivable from the window: not saved, and ignored when a file carries it.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[heads, N, N] with N = window^2, or for a window of ``size`` (rows, cols) no larger: N = rows * cols."""
        index = self.relative_position_index  # [window^2, window^2]
        if size is not None:  # the window's top-left rows x cols tokens: their offsets are the same
            rows, cols = size
            keep = (torch.arange(rows, device=index.device)[:, None] * self.window
                    + torch.arange(cols, device=index.device)).flatten()  # fmt: skip
            index = index[keep][:, keep]
        N = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)]  # [N * N, heads]
        return bias.view(N, N, -1).permute(2, 0, 1)

    def attn_bias(
        self, mask: torch.Tensor | None, mask_index: torch.Tensor | None, dtype: torch.dtype,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The additive bias of both kernels, in ``dtype``: [1, h, N, N] without ``mask``, else [1, nW * h, N, N]
        (windows outer, heads inner, as the merged head dim): the position bias (of a window of ``size``, see
        ``position_bias``) plus window w's mask, ``mask[mask_index[w]]`` (``mask``: [M, N, N]; ``mask_index``: [nW],
        or None for M = nW)."""
        bias = self.position_bias(size).contiguous()  # [h, N, N]; contiguous, so that the sum below is too
        if mask is None:
            return bias.unsqueeze(0).to(dtype)
        bias = (mask.unsqueeze(1) + bias).to(dtype)  # [M, h, N, N]
        if mask_index is not None:
            # [nW, h, N, N]: the few distinct masks summed once, then copied (index_select, not bias[i]:
            # docs/performance.md)
            bias = bias.index_select(0, mask_index)
        return bias.reshape(1, -1, *bias.shape[-2:])  # a view

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_index: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x: [B, N, nW, C] with ``mask`` (windows as heads), or [B * nW, N, 1, C] without -> x's shape.

        mask: [M, N, N] additive masks; window w takes ``mask[mask_index[w]]`` (``mask_index`` [nW], or None: M = nW).
        size: (rows, cols) of windows smaller than ``window`` (N = rows * cols; no ``mask``).
        """
        B, N, nW, C = x.shape
        h = self.num_heads
        if nW == 1:  # one window per batch row: one GEMM, and q, k, v [B, h, N, d] as views of its output
            q, k, v = self.qkv(x).view(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
        else:  # q, k and v projected apart: each [B, N, nW, C] then merges (nW, h) into one head dim as a view
            w, b = self.qkv.weight.chunk(3), (self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3)
            q, k, v = (F.linear(x, w[i], b[i]).view(B, N, nW * h, -1).transpose(1, 2) for i in range(3))
        p = self.attn_drop.p if self.training else 0.0
        bias = self.attn_bias(mask, mask_index, q.dtype, size)
        out = attention(q, k, v, bias, self.scale, p, self.fused_attn)  # [B, nW * h, N, d]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, nW, C)))


class SwinBlock(nn.Module):
    """One Swin block; ``shift`` > 0 for the shifted blocks (odd indices); ``fused_attn``: see WindowAttention.

    ``fit_window``: a map smaller than the window (both sides at most ``window``, not both equal to it) is attended
    as one window of its own size, neither padded nor shifted. Officially it is padded to the window, and the zero
    tokens take part in the unshifted blocks' attention: the demo's 3x3 stage-4 map at 96 px becomes 36 tokens, of
    which 27 are padding (its 2x2 map at 48 px: 36 of which 32).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
        fit_window: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window={window}), got {shift}")
        self.window, self.shift, self.fit_window = window, shift, fit_window
        # a constant of the window and shift (like the relative-position index): not saved
        self.register_buffer("shift_masks", kind_masks(window, shift) if shift else None, persistent=False)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: [B, H * W, C] -> [B, H * W, C]."""
        B, L, C = x.shape
        ws = self.window
        y = self.norm1(x).view(B, H, W, C)
        if self.fit_window and H <= ws and W <= ws and H * W < ws * ws:
            y = self.attn(y.view(B, L, 1, C), size=(H, W)).view(B, H, W, C)
        else:
            y = self._windows(y, H, W)
        # the padded border is dropped by viewing, not copying, the [B, H, W, C] corner
        x = (x.view(B, H, W, C) + self.drop_path(y[:, :H, :W])).view(B, L, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _windows(self, y: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Window attention as the official code: y [B, H, W, C] -> [B, Hp, Wp, C] (padded to the windows)."""
        ws, s = self.window, self.shift
        Hp, Wp = padded(H, ws), padded(W, ws)
        if Hp > H or Wp > W:
            y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))  # [B, Hp, Wp, C], zeros after norm1 as the official code
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            windows = window_partition(y, ws, as_heads=True)
            kinds = window_kinds(Hp // ws, Wp // ws, y.device)
            y = window_reverse(self.attn(windows, self.shift_masks, kinds), ws, Hp, Wp, as_heads=True)
            return torch.roll(y, shifts=(s, s), dims=(1, 2))
        return window_reverse(self.attn(window_partition(y, ws, as_heads=False)), ws, Hp, Wp, as_heads=False)


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
        fused_attn: bool = True,
        fit_window: bool = False,
    ) -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i], fused_attn,
                      fit_window)
            for i in range(depth)
        )
        self.fusion = PWAM(dim, dim, lang_dim, dim, dim, num_heads=fusion_heads, dropout=fusion_drop,
                           fused_attn=fused_attn)
        self.res_gate = LanguageGate(dim)
        self.downsample = PatchMerging(dim) if downsample else None
        if not downsample:
            # Kept for the official checkpoint layout, but the last gate's output is never used: frozen, so that
            # DDP needs no find_unused_parameters and the optimiser skips it.
            self.res_gate.requires_grad_(False)
        self.grad_checkpoint = False  # set by MultiModalSwin

    def forward(
        self, x: torch.Tensor, H: int, W: int, lang: torch.Tensor, lang_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, H * W, C]; lang: [B, C_l, N]; lang_mask: [B, N, 1] -> (PWAM out [B, H * W, C], next [B, L', C'])."""
        if recomputes(self):
            # per block, not per stage: the backward then holds one block's activations at a time (a stage of
            # 18 blocks recomputed at once would hold all of them); the compute is the same, one extra forward
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, use_reentrant=False)
            return torch.utils.checkpoint.checkpoint(self._fuse, x, H, W, lang, lang_mask, use_reentrant=False)
        for blk in self.blocks:
            x = blk(x, H, W)
        return self._fuse(x, H, W, lang, lang_mask)

    def _fuse(
        self, x: torch.Tensor, H: int, W: int, lang: torch.Tensor, lang_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PWAM, the gate and patch merging: x [B, H * W, C] -> (PWAM out [B, H * W, C], next [B, L', C'])."""
        mm = self.fusion(x, lang, lang_mask)
        if self.downsample is None:
            return mm, x  # the last stage's gated sum feeds nothing: skip it
        x = x + self.res_gate(mm) * mm
        return mm, self.downsample(x, H, W)


class MultiModalSwin(nn.Module):
    """LAVT's image encoder. images [B, 3, H, W] + language -> four maps [B, C_i, H_i, W_i], C_i = embed_dim * 2^i.

    Args:
        embed_dim: channels of stage 0.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window: window side (7 or 12).
        lang_dim: width of the language features.
        fusion_heads: PWAM heads per stage (the official ``--mha``).
        fused_attn: use ``scaled_dot_product_attention`` in window and pixel-word attention (same result to float
            round-off); False computes the attention matrices explicitly, as the official code.
        grad_checkpoint: recompute activations in the backward pass (per Swin block) to save memory.
        stem: ``patch`` (official: one strided convolution) or ``conv`` (``models.patch_embed.ConvStem``).
        fit_window: attend maps smaller than the window unpadded and unshifted (``SwinBlock``; not in LAVT).
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
        fused_attn: bool = True,
        grad_checkpoint: bool = False,
        stem: str = "patch",
        fit_window: bool = False,
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
                    fused_attn=fused_attn, fit_window=fit_window,
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
            mm, x = stage(x, H, W, lang, lang_mask)
            out = getattr(self, f"norm{i}")(mm)
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
    fused_attn: bool = True,
    grad_checkpoint: bool = False,
    stem: str = "patch",
    fit_window: bool = False,
) -> MultiModalSwin:
    return MultiModalSwin(
        embed_dim, tuple(depths), tuple(num_heads), window, lang_dim, tuple(fusion_heads), fusion_drop, patch_size,
        mlp_ratio, drop_path_rate, fused_attn, grad_checkpoint, stem, fit_window,
    )

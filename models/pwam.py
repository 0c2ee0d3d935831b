"""Pixel-word attention (PWAM) and the language gate: how LAVT fuses language into each Swin stage."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialImageLanguageAttention(nn.Module):
    """For every pixel, a language feature gathered from the words by attention (queries from pixels).

    Args:
        v_in_channels: pixel channels.
        l_in_channels: word channels.
        key_channels: query/key channels (split over heads; scaled by ``key_channels ** -0.5`` as the official code).
        value_channels: value channels.
        out_channels: output channels (defaults to ``value_channels``).
        num_heads: heads (0 or 1 = single head).
        fused: use ``scaled_dot_product_attention`` (same result to float round-off).
    """

    def __init__(
        self,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        out_channels: int | None = None,
        num_heads: int = 1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or value_channels
        self.num_heads = max(num_heads, 1)
        if key_channels % self.num_heads or value_channels % self.num_heads:
            raise ValueError(
                f"key ({key_channels}) and value ({value_channels}) channels must divide by {num_heads} heads"
            )
        self.key_channels, self.value_channels, self.fused = key_channels, value_channels, fused
        # Sequentials keep the official key names (f_query.0, W.0, ...); InstanceNorms carry no parameters.
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in_channels, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, 1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, 1), nn.InstanceNorm1d(out_channels))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, HW, C_v]; lang: [B, C_l, N]; lang_mask: [B, N, 1] (1 = word, 0 = padding) -> [B, HW, C_out]."""
        if self.fused:
            return self._forward_tokens(x, lang, lang_mask)
        B, HW = x.shape[:2]
        h = self.num_heads
        mask = lang_mask.transpose(1, 2).to(lang.dtype)  # [B, 1, N]
        query = self.f_query(x.transpose(1, 2))  # [B, C_k, HW]
        key = self.f_key(lang) * mask  # [B, C_k, N]
        value = self.f_value(lang) * mask  # [B, C_v, N]
        query = query.transpose(1, 2).reshape(B, HW, h, -1).transpose(1, 2)  # [B, h, HW, d_k]
        key = key.view(B, h, -1, key.shape[-1])  # [B, h, d_k, N]
        value = value.view(B, h, -1, value.shape[-1])  # [B, h, d_v, N]
        # padding words get -1e4 before the softmax (not -inf: kept as the official code for identical numbers)
        bias = (1e4 * mask - 1e4).unsqueeze(1).to(query.dtype)  # [B, 1, 1, N]
        attn = (self.key_channels**-0.5 * (query @ key) + bias).softmax(dim=-1)  # [B, h, HW, N]
        out = attn @ value.transpose(-2, -1)
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)  # [B, HW, C_v], heads back into channels
        return self.W(out.transpose(1, 2)).transpose(1, 2)

    def _forward_tokens(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """The same computation in token layout: 1x1 convolutions as ``F.linear`` on [B, L, C], no transposed
        copies, and key/value laid out so that ``scaled_dot_product_attention`` takes its fused kernel."""
        B, HW = x.shape[:2]
        h = self.num_heads
        words = lang.transpose(1, 2)  # [B, N, C_l]
        query = instance_norm_tokens(conv1x1(self.f_query[0], x), self.f_query[1].eps)  # [B, HW, C_k]
        key = conv1x1(self.f_key[0], words)  # [B, N, C_k]
        mask = lang_mask.to(key.dtype)  # [B, N, 1], in the compute dtype (bf16 under autocast)
        key = key * mask
        value = conv1x1(self.f_value[0], words) * mask  # [B, N, C_v]
        N = key.shape[1]
        # [B, h, L, d] views whose last dim is contiguous: what the fused kernel needs
        query, key, value = (t.view(B, t.shape[1], h, -1).transpose(1, 2) for t in (query, key, value))
        bias = (1e4 * mask - 1e4).view(B, 1, 1, N).to(query.dtype)  # the official -1e4 on padding words
        out = attention(query, key, value, bias, self.key_channels**-0.5)
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)  # [B, HW, C_v]
        return instance_norm_tokens(conv1x1(self.W[0], out), self.W[1].eps)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q: [B, h, L, d], k, v: [B, h, S, d], bias broadcastable to [B, h, L, S].

    ``scaled_dot_product_attention`` (a fused kernel: no [L, S] matrix in memory) unless a gradient is needed on
    CPU: there that kernel's backward is about 1.5x slower than the matmuls' on a Swin block (measured), so two
    matmuls and a softmax are used. (Its bf16 forward is no faster than its float32 one on CPU, but the matmul
    route, with the [L, S] matrices through memory, measured slower still inside the model.)
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and grad:
        attn = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # [B, h, L, S]
        return F.dropout(attn, dropout_p, training=True) @ v if dropout_p else attn @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def conv1x1(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-size-1 ``Conv1d`` applied to tokens: x [B, L, C_in] -> [B, L, C_out] (its weights, token layout)."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def instance_norm_tokens(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``InstanceNorm1d`` (no affine) of tokens: x [B, L, C] normalised over L per sample and channel.

    Statistics in float32 whatever the input dtype (under bf16/fp16 autocast), result in the input dtype.
    """
    xf = x.float()
    # mean, then the variance of the centred values: two reductions along L that are 1.5-2x faster (forward and
    # backward) than var_mean's strided one on [B, L, C] tokens
    centred = xf - xf.mean(1, keepdim=True)  # [B, L, C]
    var = centred.square().mean(1, keepdim=True)  # [B, 1, C]
    return (centred * torch.rsqrt(var + eps)).to(x.dtype)


class PWAM(nn.Module):
    """Pixel-word attention module: visual projection * image-language attention, then a projection.

    Args:
        dim: pixel channels of the stage.
        v_in_channels, l_in_channels, key_channels, value_channels: as ``SpatialImageLanguageAttention``.
        num_heads: attention heads.
        dropout: dropout after both projections.
    """

    def __init__(
        self,
        dim: int,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = 1,
        dropout: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels, l_in_channels, key_channels, value_channels, value_channels, num_heads, fused
        )
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, HW, C]; lang: [B, C_l, N]; lang_mask: [B, N, 1] -> multi-modal features [B, HW, C]."""
        if self.image_lang_att.fused:  # token layout throughout: no transposed copies
            _, act, drop = self.vis_project
            vis = drop(act(conv1x1(self.vis_project[0], x)))  # [B, HW, C]
            mm = vis * self.image_lang_att(x, lang, lang_mask)
            _, act, drop = self.project_mm
            return drop(act(conv1x1(self.project_mm[0], mm)))
        vis = self.vis_project(x.transpose(1, 2))  # [B, C, HW]
        lang_feat = self.image_lang_att(x, lang, lang_mask).transpose(1, 2)  # [B, C, HW]
        return self.project_mm(vis * lang_feat).transpose(1, 2)


class LanguageGate(nn.Sequential):
    """The language pathway's gate ``tanh(W2 ReLU(W1 F))`` (no biases); the stage goes on as ``x + gate(F) * F``.

    A Sequential so that its parameters keep the official names ``res_gate.0`` and ``res_gate.2``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh())

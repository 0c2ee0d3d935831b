"""Pixel-word attention (PWAM) and the language gate: how LAVT fuses language into each Swin stage."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q: [B, h, L, d], k, v: [B, h, S, d], bias broadcastable to [B, h, L, S].

    ``fused``: ``scaled_dot_product_attention`` (a fused kernel: no [L, S] matrix in memory); otherwise two matmuls
    and a softmax, as the official code computes it. Where a gradient is needed on CPU the matmuls are used either
    way: the fused kernel's backward there is about 1.5x slower than theirs on a Swin block (measured).
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if fused and not (q.device.type == "cpu" and grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # [B, h, L, S]
    return F.dropout(attn, dropout_p, training=True) @ v if dropout_p else attn @ v


def conv1x1(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-size-1 ``Conv1d`` applied to tokens: x [B, L, C_in] -> [B, L, C_out] (its weights, token layout)."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def instance_norm_tokens(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``InstanceNorm1d`` (no affine) of tokens: x [B, L, C] normalised over L per sample and channel.

    Statistics in float32 whatever the input dtype (under bf16/fp16 autocast), result in the input dtype.
    """
    xf = x.float()
    # mean, then the variance of the centred values: two reductions along L, faster (forward and backward) than
    # var_mean's strided one on [B, L, C] tokens (docs/performance.md)
    centred = xf - xf.mean(1, keepdim=True)  # [B, L, C]
    var = centred.square().mean(1, keepdim=True)  # [B, 1, C]
    return (centred * torch.rsqrt(var + eps)).to(x.dtype)


class SpatialImageLanguageAttention(nn.Module):
    """For every pixel, a language feature gathered from the words by attention (queries from pixels).

    The official module works channels first ([B, C, L], 1x1 ``Conv1d``); this one keeps tokens [B, L, C] and applies
    the same weights as ``F.linear``: no transposed copies, and key/value laid out for the fused attention kernel.

    Args:
        v_in_channels: pixel channels.
        l_in_channels: word channels.
        key_channels: query/key channels (split over heads; scaled by ``key_channels ** -0.5`` as the official code).
        value_channels: value channels.
        out_channels: output channels (defaults to ``value_channels``).
        num_heads: heads (0 or 1 = single head).
        fused_attn: use ``scaled_dot_product_attention`` (same result to float round-off).
    """

    def __init__(
        self,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        out_channels: int | None = None,
        num_heads: int = 1,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or value_channels
        self.num_heads = max(num_heads, 1)
        if key_channels % self.num_heads or value_channels % self.num_heads:
            raise ValueError(
                f"key ({key_channels}) and value ({value_channels}) channels must divide by {num_heads} heads"
            )
        self.key_channels, self.value_channels, self.fused_attn = key_channels, value_channels, fused_attn
        # Sequentials keep the official key names (f_query.0, W.0, ...); InstanceNorms carry no parameters.
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in_channels, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, 1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, 1), nn.InstanceNorm1d(out_channels))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, HW, C_v]; lang: [B, C_l, N]; lang_mask: [B, N, 1] (1 = word, 0 = padding) -> [B, HW, C_out]."""
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
        # padding words get -1e4 before the softmax (not -inf: as the official code, for identical numbers)
        bias = (1e4 * mask - 1e4).view(B, 1, 1, N).to(query.dtype)
        out = attention(query, key, value, bias, self.key_channels**-0.5, fused=self.fused_attn)  # [B, h, HW, d_v]
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)  # [B, HW, C_v], heads back into channels
        return instance_norm_tokens(conv1x1(self.W[0], out), self.W[1].eps)


class PWAM(nn.Module):
    """Pixel-word attention module: visual projection * image-language attention, then a projection.

    Token layout throughout ([B, HW, C]; the official module's 1x1 convolutions applied as ``F.linear``).

    Args:
        dim: pixel channels of the stage.
        v_in_channels, l_in_channels, key_channels, value_channels: as ``SpatialImageLanguageAttention``.
        num_heads: attention heads.
        dropout: dropout after both projections.
        fused_attn: use ``scaled_dot_product_attention`` (same result to float round-off).
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
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels, l_in_channels, key_channels, value_channels, value_channels, num_heads, fused_attn
        )
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, HW, C]; lang: [B, C_l, N]; lang_mask: [B, N, 1] -> multi-modal features [B, HW, C]."""
        conv, act, drop = self.vis_project
        vis = drop(act(conv1x1(conv, x)))  # [B, HW, C]
        mm = vis * self.image_lang_att(x, lang, lang_mask)
        conv, act, drop = self.project_mm
        return drop(act(conv1x1(conv, mm)))


class LanguageGate(nn.Sequential):
    """The language pathway's gate ``tanh(W2 ReLU(W1 F))`` (no biases); the stage goes on as ``x + gate(F) * F``.

    A Sequential so that its parameters keep the official names ``res_gate.0`` and ``res_gate.2``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh())

"""``FewRowsLinear``: ``nn.Linear`` that, for a few rows in float32 on CPU without autograd, multiplies W by x^T.

A linear layer on M rows computes x [M, K] @ W^T [K, N]. For few rows (BERT's 20 tokens of one expression, Swin's
last stage at batch 1) MKL then packs the large operand, the weight, at every call, and the packing costs as much as
the products: BERT-base's twelve layers on 20 rows ran at ~53 GFLOP/s against ~150 on large products. Computed as
W [N, K] @ x^T [K, M] (then transposed back, a copy of the small [M, N] result), MKL packs x instead, and the same
layers ran 1.28x as fast (2-core AMD EPYC without AVX-512, float32; docs/performance.md); each output is the same
dot product summed in the same order (bit-identical there). Training (autograd on), autocast and other dtypes and
devices keep ``nn.Linear``'s path: its backward and the low-precision kernels were not measured to gain.
"""

from __future__ import annotations

import torch
from torch import nn

#: most rows (x's entries over its last dimension) computed as W x^T (docs/performance.md)
FEW_ROWS = 64


class FewRowsLinear(nn.Linear):
    """``nn.Linear`` with the same parameters; x [..., K] -> [..., N]. See the module's docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not few_rows(x, self.weight):
            return super().forward(x)
        rows = x.numel() // self.in_features
        xt = x.reshape(rows, self.in_features).t()  # [K, M]
        y = self.weight @ xt if self.bias is None else torch.addmm(self.bias.unsqueeze(1), self.weight, xt)
        return y.t().contiguous().view(*x.shape[:-1], self.out_features)


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``FewRowsLinear`` takes the W x^T path for input x: float32 on CPU, autograd and autocast off, at most
    ``FEW_ROWS`` rows."""
    return (
        not torch.is_grad_enabled()  # first: in training every call stops here
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and 0 < x.numel() <= FEW_ROWS * x.shape[-1]
        and not torch.is_autocast_enabled("cpu")
    )


def few_rows_linear_(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` in ``module`` (the text encoder's included) a ``FewRowsLinear`` in place: the
    class changes, the parameters, names and state dict stay. Returns how many were changed."""
    changed = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = FewRowsLinear
            changed += 1
    return changed

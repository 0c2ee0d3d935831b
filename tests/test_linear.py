"""models/linear.py: FewRowsLinear against nn.Linear, which path each call takes (seen in the matrix product's
operands), and the conversion of a model's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model, linear
from models.linear import FEW_ROWS, FewRowsLinear, few_rows_linear_

from .helpers_model import tiny_cfg
from .helpers_train import make_tiny_text_encoder


class FirstOperands(TorchDispatchMode):
    """The shape of the first matrix of every mm / addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(args[0 if func is torch.ops.aten.mm.default else 1].shape))
        return func(*args, **(kwargs or {}))


def _pair(bias: bool, k: int = 12, n: int = 7) -> tuple[nn.Linear, FewRowsLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(k, n, bias=bias)
    few = FewRowsLinear(k, n, bias=bias)
    few.load_state_dict(plain.state_dict())
    return plain, few


def _first_operand(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    with FirstOperands() as seen:
        y = layer(x)
    assert len(seen.shapes) == 1
    return y, seen.shapes[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (1, FEW_ROWS, 12)])
def test_few_rows_take_the_weight_first_and_match_linear(bias, shape):
    plain, few = _pair(bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        y, first = _first_operand(few, x)
        ref = plain(x)
    assert first == (7, 12)  # W [N, K] @ x^T
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    expected = torch.from_numpy(x.double().numpy() @ plain.weight.detach().double().numpy().T)
    if bias:
        expected += plain.bias.detach().double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_other_calls_keep_the_linear_path():
    plain, few = _pair(True)
    few_rows = torch.randn(4, 12)
    _, first = _first_operand(few, few_rows)  # autograd on (training): x first
    assert first == (4, 12)
    with torch.no_grad():
        assert _first_operand(few, torch.randn(FEW_ROWS + 1, 12))[1] == (FEW_ROWS + 1, 12)  # too many rows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _first_operand(few, few_rows)[1] == (4, 12)
        double = FewRowsLinear(12, 7).double()
        assert _first_operand(double, few_rows.double())[1] == (4, 12)
        assert few(torch.randn(0, 12)).shape == (0, 7)
    y = few(few_rows)
    y.sum().backward()  # the training path's gradients are nn.Linear's
    assert few.weight.grad is not None and y.shape == (4, 7)


def test_conversion_keeps_the_parameters():
    mha = nn.MultiheadAttention(8, 2)  # its out_proj is a subclass of nn.Linear: left alone
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)), mha)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert few_rows_linear_(model) == 2
    assert [type(m) for m in (model[0], model[2][0])] == [FewRowsLinear, FewRowsLinear]
    assert type(mha.out_proj) is not FewRowsLinear
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert few_rows_linear_(model) == 0


def test_built_model_evaluates_the_same(monkeypatch, tmp_path):
    """The model's layers (Swin, PWAM, the text encoder) are converted; its evaluation logits with the W x^T path
    equal those without it (rounding aside)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(make_tiny_text_encoder(tmp_path / "bert")))).eval()
    assert sum(type(m) is FewRowsLinear for m in model.text_encoder.modules()) > 0
    assert sum(type(m) is FewRowsLinear for m in model.backbone.modules()) > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    images, ids = torch.randn(1, 3, 64, 64), torch.randint(1, 100, (1, 9))
    mask = torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad(), FirstOperands() as seen:
        out = model(images, ids, mask)
    monkeypatch.setattr(linear, "FEW_ROWS", 0)
    with torch.no_grad(), FirstOperands() as plain_seen:
        ref = model(images, ids, mask)
    assert seen.shapes != plain_seen.shapes  # some layers did take the other path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

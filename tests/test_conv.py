"""models/conv.py: the 3x3 convolution whose weight gradient is nine matrix products, against the gradient written
out by hand and against nn.Conv2d's, and where it is (and is not) used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.conv import Conv3x3, matmul_grad_pays, weight_grad_3x3
from models.decoder import SimpleDecoder

from .helpers_model import tiny_cfg

SHAPES = [(1, 3, 4, 5, 7), (3, 5, 2, 6, 4), (2, 4, 3, 1, 1), (2, 6, 8, 2, 9), (4, 2, 3, 5, 5)]  # B, C, O, H, W


@pytest.mark.parametrize("b,c,o,h,w", SHAPES)
def test_weight_grad_is_the_sum_over_offsets(b, c, o, h, w):
    """dL/dW[o, c, i, j] = sum over b, y, x of g[b, o, y, x] * x_pad[b, c, y + i, x + j], written as loops over
    the offsets in float64 (no convolution involved)."""
    torch.manual_seed(b * 100 + h * 10 + w)
    x, g = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, o, h, w, dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))
    expected = torch.zeros(o, c, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            expected[:, :, i, j] = torch.einsum("boyx,bcyx->oc", g, xp[:, :, i : i + h, j : j + w])
    out = weight_grad_3x3(x, g)
    assert out.shape == (o, c, 3, 3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("b,c,o,h,w", [(1, 256, 260, 4, 5), (3, 300, 256, 2, 6), (2, 256, 256, 1, 1)])
def test_conv3x3_trains_as_conv2d(b, c, o, h, w, channels_last):
    torch.manual_seed(3)
    conv = Conv3x3(c, o, matmul_grad=True)
    plain = torch.nn.Conv2d(c, o, 3, padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(b, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(b, o, h, w)
    out = conv(x1)
    assert type(out.grad_fn).__name__.startswith("_Conv3x3MatmulGrad")  # the matrix-product backward ran
    out.backward(g)
    ref = plain(x2)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    assert conv.weight.grad.is_contiguous()


def test_conv3x3_input_gradient_alone():
    """A frozen weight: only the input's gradient is asked for (and the plain kernel is used)."""
    conv = Conv3x3(256, 256, matmul_grad=True)
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 256, 3, 3, requires_grad=True)
    conv(x).sum().backward()
    expected = torch.ops.aten.convolution_backward(
        torch.ones(2, 256, 3, 3), x.detach(), conv.weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, False, False],
    )[0]
    torch.testing.assert_close(x.grad, expected)


def test_conv3x3_leaves_the_other_cases_to_conv2d():
    conv = Conv3x3(256, 256, matmul_grad=True)
    x = torch.randn(1, 256, 3, 3)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(conv.double()(x.double()).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(Conv3x3(256, 256)(x).grad_fn).__name__ == "ConvolutionBackward0"
    narrow = Conv3x3(255, 256, matmul_grad=True)  # below the width where it pays
    assert not narrow.matmul_grad and type(narrow(x[:, :255]).grad_fn).__name__ == "ConvolutionBackward0"
    # another device (a GPU has cuDNN): "meta" stands for it on a CPU-only machine
    on_meta = Conv3x3(256, 256, matmul_grad=True).to("meta")
    assert type(on_meta(x.to("meta")).grad_fn).__name__ == "ConvolutionBackward0"


def _backward_names(out: torch.Tensor) -> list[str]:
    """The class names of every node of ``out``'s backward graph."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return [type(n).__name__ for n in seen]


def test_decoder_keys_and_gradients_do_not_depend_on_the_switch():
    torch.manual_seed(5)
    plain, fast = SimpleDecoder(512).train(), SimpleDecoder(512, matmul_grad=True).train()  # hidden 256
    assert list(plain.state_dict()) == list(fast.state_dict())  # official checkpoint keys either way
    fast.load_state_dict(plain.state_dict())
    feats = [torch.randn(2, 512 // 2**k, 2 * 2**k, 1 + 2**k) for k in range(4)]
    outs = [model(*feats) for model in (plain, fast)]
    assert _backward_names(outs[1]).count("_Conv3x3MatmulGradBackward") == 6
    assert "_Conv3x3MatmulGradBackward" not in _backward_names(outs[0])
    for out in outs:
        out.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_wide_convolutions_take_the_matmul_gradient():
    assert matmul_grad_pays(256, 256) and matmul_grad_pays(1152, 384)
    assert not matmul_grad_pays(96, 64) and not matmul_grad_pays(255, 384) and not matmul_grad_pays(384, 128)


@pytest.mark.parametrize("on", [True, False])
def test_config_reaches_every_wide_decoder_convolution(on):
    """Embed dim 64: the decoder's convolutions are 256 wide or more (official width c3 = 256)."""
    model = build_model(tiny_cfg(MODEL__CONV_GRAD_MATMUL=on, MODEL__SWIN__EMBED_DIM=64))
    convs = [m for m in model.classifier.modules() if isinstance(m, Conv3x3)]
    assert len(convs) == 6 and all(m.matmul_grad is on for m in convs)
    demo_like = build_model(tiny_cfg(MODEL__CONV_GRAD_MATMUL=on, MODEL__DECODER_HIDDEN=64))
    assert not any(m.matmul_grad for m in demo_like.classifier.modules() if isinstance(m, Conv3x3))

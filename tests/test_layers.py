"""models/layers.py against timm's layers (the official LAVT code's), seed for seed, and against the formulas; its
BatchNorm2d against nn.BatchNorm2d."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import BatchNorm2d, DropPath, Mlp, grad_in_layout, trunc_normal_

from .helpers_model import KernelLayouts


@pytest.mark.parametrize(("shape", "std", "a", "b"), [((7, 9), 0.02, -2.0, 2.0), ((4000,), 1.0, -0.5, 1.5)])
def test_trunc_normal_draws_timms_numbers(shape: tuple[int, ...], std: float, a: float, b: float) -> None:
    torch.manual_seed(3)
    ours = trunc_normal_(torch.empty(shape), std=std, a=a, b=b)
    torch.manual_seed(3)
    theirs = timm.layers.trunc_normal_(torch.empty(shape), std=std, a=a, b=b)
    assert torch.equal(ours, theirs)
    assert ours.min() >= a and ours.max() <= b


def test_trunc_normal_bounds_are_absolute_and_the_spread_is_std() -> None:
    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(200_000), std=1.0, a=-0.5, b=0.5)
    assert x.min() >= -0.5 and x.max() <= 0.5 and x.min() < -0.49 and x.max() > 0.49
    y = trunc_normal_(torch.empty(200_000), std=0.02)  # bounds +-2 are 100 std away: a plain normal
    assert abs(y.std().item() - 0.02) < 2e-4 and abs(y.mean().item()) < 2e-4


def test_drop_path_matches_timm_and_keeps_whole_samples() -> None:
    x = torch.randn(64, 5, 3)
    layer = DropPath(0.25).train()
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)
    theirs = timm.layers.DropPath(0.25).train()(x)
    assert torch.equal(ours, theirs)
    kept = (ours != 0).flatten(1).all(1)
    assert torch.equal(kept, (ours != 0).flatten(1).any(1))  # each sample dropped or kept whole
    assert 0 < kept.sum() < 64
    assert torch.allclose(ours[kept], x[kept] / 0.75)


def test_drop_path_is_the_identity_in_eval_and_refuses_p_1() -> None:
    x = torch.randn(4, 3)
    assert DropPath(0.5).eval()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_mlp_is_fc2_gelu_fc1_with_the_official_keys() -> None:
    torch.manual_seed(0)
    mlp = Mlp(6, 10)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    x = torch.randn(2, 3, 6)
    w1, b1, w2, b2 = (p.detach() for p in mlp.parameters())
    hidden = x @ w1.T + b1
    expected = (0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))) @ w2.T + b2  # exact GELU, by hand
    assert torch.allclose(mlp(x), expected, atol=1e-6)
    theirs = timm.layers.Mlp(6, 10)
    theirs.load_state_dict(mlp.state_dict())
    assert torch.equal(mlp(x), theirs(x))
    assert not torch.allclose(mlp(x), F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("channels", "narrow"), [(8, True), (16, False)])
def test_batch_norm_trains_narrow_channels_last_maps_in_the_contiguous_layout(
    dtype: torch.dtype, channels: int, narrow: bool
) -> None:
    """A channels-last map of fewer than 16 channels reaches the CPU kernels contiguous, forward (input) and backward
    (input and output gradient), and comes back channels-last; results, gradients and running statistics are
    nn.BatchNorm2d's. At 16 channels the kernels get the channels-last map itself."""
    torch.manual_seed(0)
    ours, ref = BatchNorm2d(channels), nn.BatchNorm2d(channels)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, channels))
            m.bias.copy_(torch.linspace(-1, 1, channels))
    x0 = (3 * torch.randn(4, channels, 10, 12) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x0.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)  # as from a conv
    outs, grads, layouts = [], [], []
    for m in (ours, ref):
        x = x0.detach().requires_grad_()
        with KernelLayouts("batch_norm") as mode:
            y = m(x)
            y.backward(grad)
        outs.append(y)
        grads.append((x.grad, m.weight.grad, m.bias.grad))
        layouts.append(mode.seen)
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    assert layouts[1] == {"native_batch_norm": [["cl"]], "native_batch_norm_backward": [["cl", "cl"]]}
    assert layouts[0] == ({"native_batch_norm": [["nchw"]], "native_batch_norm_backward": [["nchw", "nchw"]]} if narrow
                          else layouts[1])  # fmt: skip
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, **tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-5, rtol=1e-5)


def test_batch_norm_evaluates_channels_last_maps_as_they_are() -> None:
    """In evaluation the narrow path is not taken (channels-last is the faster layout there): the kernel gets the
    channels-last map, and the output is nn.BatchNorm2d's to the bit."""
    ours, ref = BatchNorm2d(8).eval(), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.copy_(torch.linspace(-1, 1, 8))
            m.running_var.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), KernelLayouts("batch_norm") as mode:
        out = ours(x)
    assert list(mode.seen.values()) == [[["cl"]]]
    assert torch.equal(out, ref(x)) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_grad_in_layout_hands_the_gradient_on_contiguous_in_the_tensors_layout(layout: str) -> None:
    """Forward: x itself. Backward: the gradient that reaches x's maker (here a strided channel slice of a
    concatenation's gradient) arrives contiguous in x's layout, its values unchanged."""
    x = torch.randn(2, 3, 4, 5)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_()
    seen = []
    y = leaf * 1.0  # the maker: its backward records the gradient it gets
    y.register_hook(lambda g: seen.append(KernelLayouts.layout(g)))
    z = grad_in_layout(y)
    assert z is y or torch.equal(z, y)
    grad = torch.randn(2, 7, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.cat([z, torch.zeros(2, 4, 4, 5)], 1).backward(grad)
    assert seen == [layout]
    assert torch.equal(leaf.grad, grad[:, :3])

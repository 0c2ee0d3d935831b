"""models/winograd.py: the F(2x2, 3x3) convolution against F.conv2d in float64 (forward and both gradients), each
transform against its adjoint and against the tile arithmetic written out with numpy, its error in float32 and bf16
beside oneDNN's, and where Conv3x3 takes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model, winograd
from models.conv import Conv3x3
from models.winograd import (
    input_transform,
    input_transform_adjoint,
    output_tiles,
    output_transform,
    output_transform_adjoint,
    weight_transform,
    weight_transform_adjoint,
    winograd_conv3x3,
    winograd_pays,
)

from .helpers_model import tiny_cfg

SHAPES = [(1, 3, 4, 5, 7), (3, 5, 2, 6, 4), (2, 4, 3, 1, 1), (2, 6, 8, 2, 9), (1, 2, 3, 8, 8)]  # B, C, O, H, W

# F(2x2, 3x3) as published (Lavin and Gray 2016), for the numpy computations below
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)


@pytest.mark.parametrize("chunk", [1024, 1, 5, 13])  # one chunk; a tile row each; rows of an image; whole images
@pytest.mark.parametrize("b,c,o,h,w", SHAPES)
def test_convolution_and_its_gradients_equal_conv2d(b, c, o, h, w, chunk, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_TILES", chunk)
    torch.manual_seed(b * 100 + h * 10 + w)
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, o, h, w, dtype=torch.float64)
    out = winograd_conv3x3(x, weight)
    expected = F.conv2d(x, weight, padding=1)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    got, want = torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)
    for name, g, e in zip(("input", "weight"), got, want, strict=True):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("b,th,tw,chunk", [(3, 3, 2, 1024), (3, 3, 2, 13), (2, 5, 4, 9), (2, 5, 4, 3), (1, 2, 2, 1)])
def test_chunks_cover_each_tile_once_within_the_budget(b, th, tw, chunk, monkeypatch):
    """Whole images while they fit in CHUNK_TILES, else runs of tile rows: never more tiles than it allows unless a
    single tile row is larger."""
    monkeypatch.setattr(winograd, "CHUNK_TILES", chunk)
    seen = torch.zeros(b, th, tw, dtype=torch.int64)
    for images, rows in winograd._chunks(b, th, tw):
        seen[images, rows] += 1
        size = len(range(b)[images]) * len(range(th)[rows]) * tw
        assert size <= max(chunk, tw)
    assert torch.equal(seen, torch.ones_like(seen))


def test_transforms_are_the_published_tile_arithmetic():
    """B^T d B of each 4x4 tile at stride 2 of the zero-padded input, G g G^T, and A^T M A, tile by tile in numpy."""
    rng = np.random.default_rng(0)
    b, h, w, c, o = 2, 5, 6, 3, 2
    th, tw = 3, 3
    x = rng.standard_normal((b, h, w, c))
    padded = np.zeros((b, 2 * th + 2, 2 * tw + 2, c))
    padded[:, 1 : h + 1, 1 : w + 1] = x
    want_v = np.empty((4, 4, b, th, tw, c))
    for n, i, j, k in np.ndindex(b, th, tw, c):
        want_v[:, :, n, i, j, k] = BT @ padded[n, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4, k] @ BT.T
    v = input_transform(winograd._pad(torch.from_numpy(x), th, tw))
    np.testing.assert_allclose(v.numpy(), want_v.reshape(16, b * th * tw, c), rtol=0, atol=1e-12)

    weight = rng.standard_normal((o, c, 3, 3))
    want_u = np.stack([[G @ weight[p, q] @ G.T for p in range(o)] for q in range(c)])  # [C, O, 4, 4]
    u = weight_transform(torch.from_numpy(weight))
    np.testing.assert_allclose(u.numpy(), want_u.transpose(2, 3, 0, 1).reshape(16, c, o), rtol=0, atol=1e-12)

    m = rng.standard_normal((4, 4, b, th, tw, o))
    want_y = np.empty((b, 2 * th, 2 * tw, o))
    for n, i, j, k in np.ndindex(b, th, tw, o):
        want_y[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, k] = AT @ m[:, :, n, i, j, k] @ AT.T
    y = output_transform(torch.from_numpy(m).reshape(16, -1, o), torch.empty(b, th, 2, tw, 2, o, dtype=torch.float64))
    np.testing.assert_allclose(y.reshape(b, 2 * th, 2 * tw, o).numpy(), want_y, rtol=0, atol=1e-12)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a * b).sum().item()


@pytest.mark.parametrize("h,w", [(6, 4), (5, 7), (1, 1)])
def test_adjoints_satisfy_the_dot_product_identity(h, w):
    """<T a, b> = <a, T* b> for each transform T and the adjoint the backward uses."""
    gen = torch.Generator().manual_seed(h * 10 + w)
    b, c, o = 2, 3, 4
    th, tw = (h + 1) // 2, (w + 1) // 2

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    padded, dv = rand(b, 2 * th + 2, 2 * tw + 2, c), rand(16, b * th * tw, c)
    before = rand(*padded.shape)
    added = input_transform_adjoint(dv, out=before.clone()) - before  # it adds to what its output holds
    assert _dot(input_transform(padded), dv) == pytest.approx(_dot(padded, added))
    m, dy = rand(16, b * th * tw, o), rand(b, th, 2, tw, 2, o)
    y = output_transform(m, out=torch.empty_like(dy))
    assert _dot(y, dy) == pytest.approx(_dot(m, output_transform_adjoint(dy)))
    weight, du = rand(o, c, 3, 3), rand(16, c, o)
    assert _dot(weight_transform(weight), du) == pytest.approx(_dot(weight, weight_transform_adjoint(du)))


def _error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("autocast", [False, True])
def test_error_beside_onednn(autocast):
    """Relative L2 error against a float64 convolution: in float32 at most oneDNN's x 2, under bf16 autocast at most
    oneDNN's bf16 x 3 (the transformed input and products rounded to bf16 on the way; docs/performance.md)."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(48, 64, 3, 3) / 24
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, onednn = winograd_conv3x3(x, weight), F.conv2d(x, weight, padding=1)
    assert out.dtype == onednn.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _error(out, exact) <= (3 if autocast else 2) * _error(onednn, exact)
    assert _error(out, exact) < (0.01 if autocast else 1e-6)


def test_bf16_training_keeps_float32_weight_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    weight = torch.randn(5, 8, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = winograd_conv3x3(x, weight)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == weight.grad.dtype == torch.float32
    x.grad = weight.grad = None
    F.conv2d(x, weight, padding=1).square().sum().backward()
    ref = weight.grad.clone()
    assert (weight.grad - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.fixture(autouse=True)
def no_amx(monkeypatch):
    """The rule as on the CPUs it was measured on (without AMX), whatever this one has."""
    monkeypatch.setattr(winograd, "has_amx", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pays_only_for_wide_convolutions_over_many_tiles(dtype):
    wide = winograd.MIN_CHANNELS
    tiles = winograd.MIN_TILES_FLOAT32 if dtype == torch.float32 else winograd.MIN_TILES_LOW_PRECISION
    assert winograd_pays(wide, wide, tiles, dtype) and winograd_pays(1152, 384, 10 * tiles, dtype)
    assert not winograd_pays(wide - 1, wide, tiles, dtype) and not winograd_pays(wide, wide - 1, tiles, dtype)
    assert not winograd_pays(wide, wide, tiles - 1, dtype)
    assert winograd.MIN_TILES_FLOAT32 < winograd.MIN_TILES_LOW_PRECISION  # bf16's products gain less


def test_which_decoder_convolutions_take_it():
    """Swin-T at 224 px (docs/performance.md): at batch 2 the 28x28 (392 tiles) and 56x56 (1568) levels, not the
    14x14 (98), in either precision; at batch 1 not the 28x28 level (196 tiles); the demo's 64-wide decoder never."""
    f32, bf16 = torch.float32, torch.bfloat16
    assert [winograd_pays(c, 384, t, f32) for c, t in ((1152, 98), (576, 392), (480, 1568))] == [False, True, True]
    assert [winograd_pays(c, 384, t, bf16) for c, t in ((1152, 98), (576, 392), (480, 1568))] == [False, True, True]
    assert [winograd_pays(576, 384, 196, dtype) for dtype in (f32, bf16)] == [False, False]
    assert not winograd_pays(64 + 32, 64, 100_000, f32) and not winograd_pays(64, 64, 100_000, bf16)


def test_bf16_stays_with_onednn_on_amx(monkeypatch):
    monkeypatch.setattr(winograd, "has_amx", lambda: True)
    many = 10 * winograd.MIN_TILES_LOW_PRECISION
    assert winograd_pays(384, 384, many, torch.float32)
    assert not winograd_pays(384, 384, many, torch.bfloat16) and not winograd_pays(384, 384, many, torch.float16)


def test_output_tiles_count_half_tiles():
    assert output_tiles(torch.empty(3, 1, 5, 8)) == 3 * 3 * 4 and output_tiles(torch.empty(1, 1, 1, 1)) == 1


def _winograd_ran(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "_WinogradConv3x3Backward"


def test_conv3x3_takes_it_where_it_pays(monkeypatch):
    torch.manual_seed(2)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 4)
    monkeypatch.setattr(winograd, "MIN_TILES_FLOAT32", 6)
    monkeypatch.setattr(winograd, "MIN_TILES_LOW_PRECISION", 12)
    conv = Conv3x3(4, 4, winograd=True)
    plain = Conv3x3(4, 4)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 6, 4, requires_grad=True)  # 3 x 2 tiles
    out = conv(x)
    assert _winograd_ran(out)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)
    assert not _winograd_ran(conv(x[:, :, :4]))  # 2 x 2 tiles: too few
    assert not _winograd_ran(plain(x))  # switched off
    assert not _winograd_ran(Conv3x3(3, 4, winograd=True)(x[:, :3]))  # too narrow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _winograd_ran(conv(x))  # 6 tiles: enough in float32, too few for bf16
        assert _winograd_ran(conv(torch.cat([x, x])))


def test_config_switch_reaches_every_decoder_convolution():
    for on in (False, True):
        model = build_model(tiny_cfg(MODEL__CONV_WINOGRAD=on))
        convs = [m for m in model.classifier.modules() if isinstance(m, Conv3x3)]
        assert len(convs) == 6 and all(m.winograd is on for m in convs)


def test_compiled_it_is_one_eager_call_with_the_same_values():
    """Under ``torch.compile`` each Winograd convolution is one call out of the graph (traced, its chunk loops and
    strided ``out=`` writes split it many times over), and the compiled function gives eager's values and gradients."""
    import torch._dynamo

    def block(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return winograd_conv3x3(x.relu(), weight).sigmoid()

    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    weight = torch.randn(8, 8, 3, 3, requires_grad=True)
    explained = torch._dynamo.explain(block)(x, weight)
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=False)
    out, out_eager = compiled(x, weight), block(x, weight)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), (x, weight))
    for g, g_eager in zip(grads, torch.autograd.grad(out_eager.sum(), (x, weight)), strict=True):
        torch.testing.assert_close(g, g_eager, rtol=0, atol=0)

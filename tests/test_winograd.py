"""models/winograd.py: the F(2x2, 3x3) and F(4x4, 3x3) convolutions against F.conv2d in float64 (forward and both
gradients), each transform against its adjoint and against the tile arithmetic written out with numpy (with the
published matrices, themselves checked to compute a correlation), the error in float32 and bf16 beside oneDNN's, which
tiling each precision takes, and where Conv3x3 takes it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model, winograd
from models.conv import Conv3x3
from models.winograd import (
    F2,
    F4,
    input_transform,
    input_transform_adjoint,
    output_tiles,
    output_transform,
    output_transform_adjoint,
    tiling_for,
    weight_transform,
    weight_transform_adjoint,
    winograd_conv3x3,
    winograd_pays,
)

from .helpers_model import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]

# B, C, O, H, W; the last three divide into 4x4 tiles (float32 and float64 take F(4x4, 3x3) there)
SHAPES = [(1, 3, 4, 5, 7), (3, 5, 2, 6, 4), (2, 4, 3, 1, 1), (2, 6, 8, 2, 9), (1, 2, 3, 8, 8), (2, 3, 5, 4, 12),
          (3, 4, 2, 12, 8)]

# As published (Lavin and Gray 2016), for the numpy computations below: tile side -> (B^T, A^T, G)
PUBLISHED = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 dtype=np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
    ),
}
TILINGS = [F2, F4]


@pytest.fixture(params=[2, 4], ids=["F2", "F4"])
def float_tile(request, monkeypatch) -> int:
    """float32 and float64 convolutions run by this tile side (F(4x4, 3x3) whatever the tile count)."""
    monkeypatch.setattr(winograd, "MIN_TILES_F4", 1 if request.param == 4 else math.inf)
    return request.param


@pytest.mark.parametrize("m", [2, 4])
def test_published_matrices_compute_a_correlation(m):
    """A^T [(G g) * (B^T d)] = the correlation of d [m + 2] with g [3], for random d and g: the numbers the tests
    below take as the reference are right."""
    bt, at, g = PUBLISHED[m]
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, mode="valid"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1024, 1, 5, 13])  # one chunk; a tile row each; rows of an image; whole images
@pytest.mark.parametrize("b,c,o,h,w", SHAPES)
def test_convolution_and_its_gradients_equal_conv2d(b, c, o, h, w, chunk, float_tile, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_PIXELS", {m: chunk * m * m for m in (2, 4)})  # ``chunk`` tiles either way
    torch.manual_seed(b * 100 + h * 10 + w)
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, o, h, w, dtype=torch.float64)
    out = winograd_conv3x3(x, weight)
    expected = F.conv2d(x, weight, padding=1)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)  # also where the tiles overhang the map and are cropped
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    got, want = torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)
    for name, g, e in zip(("input", "weight"), got, want, strict=True):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("b,th,tw,chunk", [(3, 3, 2, 1024), (3, 3, 2, 13), (2, 5, 4, 9), (2, 5, 4, 3), (1, 2, 2, 1)])
def test_chunks_cover_each_tile_once_within_the_budget(b, th, tw, chunk):
    """Whole images while they fit in the budget, else runs of tile rows: never more tiles than it allows unless a
    single tile row is larger."""
    seen = torch.zeros(b, th, tw, dtype=torch.int64)
    for images, rows in winograd._chunks(b, th, tw, chunk):
        seen[images, rows] += 1
        size = len(range(b)[images]) * len(range(th)[rows]) * tw
        assert size <= max(chunk, tw)
    assert torch.equal(seen, torch.ones_like(seen))


def test_chunk_budget_is_in_output_pixels():
    """CHUNK_PIXELS: 4096 output pixels are 1024 tiles of 2x2 and 256 of 4x4."""
    one_image_of = {m: len(winograd._chunks_for(1, 64, 64, m)) for m in (2, 4)}  # 64 x 64 tiles
    budget = {m: winograd.CHUNK_PIXELS[m] // (m * m) for m in (2, 4)}
    assert one_image_of == {m: -(-64 // (budget[m] // 64)) for m in (2, 4)}


@pytest.mark.parametrize("t", TILINGS, ids=["F2", "F4"])
def test_transforms_are_the_published_tile_arithmetic(t):
    """B^T d B of each (m + 2)-square tile at stride m of the zero-padded input, G g G^T, and A^T M A, tile by tile
    in numpy."""
    bt, at, g_mat = PUBLISHED[t.m]
    m, n = t.m, t.m + 2
    rng = np.random.default_rng(t.m)
    b, h, w, c, o = 2, 2 * m + 1, 3 * m, 3, 2
    th, tw = 3, 3
    x = rng.standard_normal((b, h, w, c))
    padded = np.zeros((b, m * th + 2, m * tw + 2, c))
    padded[:, 1 : h + 1, 1 : w + 1] = x
    want_v = np.empty((n, n, b, th, tw, c))
    for i0, i, j, k in np.ndindex(b, th, tw, c):
        want_v[:, :, i0, i, j, k] = bt @ padded[i0, m * i : m * i + n, m * j : m * j + n, k] @ bt.T
    v = input_transform(winograd._pad(torch.from_numpy(x), th, tw, m), t)
    np.testing.assert_allclose(v.numpy(), want_v.reshape(n * n, b * th * tw, c), rtol=0, atol=1e-12)

    weight = rng.standard_normal((o, c, 3, 3))
    want_u = np.stack([[g_mat @ weight[p, q] @ g_mat.T for p in range(o)] for q in range(c)])  # [C, O, n, n]
    u = weight_transform(torch.from_numpy(weight), t)
    np.testing.assert_allclose(u.numpy(), want_u.transpose(2, 3, 0, 1).reshape(n * n, c, o), rtol=0, atol=1e-12)

    mm = rng.standard_normal((n, n, b, th, tw, o))
    want_y = np.empty((b, m * th, m * tw, o))
    for i0, i, j, k in np.ndindex(b, th, tw, o):
        want_y[i0, m * i : m * i + m, m * j : m * j + m, k] = at @ mm[:, :, i0, i, j, k] @ at.T
    out = torch.empty(b, th, m, tw, m, o, dtype=torch.float64)
    y = output_transform(torch.from_numpy(mm).reshape(n * n, -1, o), out, t)
    np.testing.assert_allclose(y.reshape(b, m * th, m * tw, o).numpy(), want_y, rtol=0, atol=1e-12)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a * b).sum().item()


@pytest.mark.parametrize("t", TILINGS, ids=["F2", "F4"])
@pytest.mark.parametrize("h,w", [(6, 4), (5, 7), (1, 1)])
def test_adjoints_satisfy_the_dot_product_identity(h, w, t):
    """<T a, b> = <a, T* b> for each transform T and the adjoint the backward uses."""
    gen = torch.Generator().manual_seed(h * 10 + w)
    b, c, o, m, nn = 2, 3, 4, t.m, t.n * t.n
    th, tw = -(-h // m), -(-w // m)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    padded, dv = rand(b, m * th + 2, m * tw + 2, c), rand(nn, b * th * tw, c)
    before = rand(*padded.shape)
    added = input_transform_adjoint(dv, before.clone(), t) - before  # it adds to what its output holds
    assert _dot(input_transform(padded, t), dv) == pytest.approx(_dot(padded, added))
    mm, dy = rand(nn, b * th * tw, o), rand(b, th, m, tw, m, o)
    y = output_transform(mm, torch.empty_like(dy), t)
    assert _dot(y, dy) == pytest.approx(_dot(mm, output_transform_adjoint(dy, t)))
    weight, du = rand(o, c, 3, 3), rand(nn, c, o)
    assert _dot(weight_transform(weight, t), du) == pytest.approx(_dot(weight, weight_transform_adjoint(du, t)))


def _error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("autocast", [False, True])
def test_error_beside_onednn(autocast, float_tile):
    """Relative L2 error against a float64 convolution: in float32 at most oneDNN's x 2 by F(2x2, 3x3) and x 5 by
    F(4x4, 3x3) (its transforms scale by up to 8: 3.8-4.2x here, 2.3x at 480 -> 384 channels; docs/performance.md),
    under bf16 autocast (always F(2x2, 3x3)) at most oneDNN's bf16 x 3 (the transformed input and products rounded
    to bf16 on the way)."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(48, 64, 3, 3) / 24
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, onednn = winograd_conv3x3(x, weight), F.conv2d(x, weight, padding=1)
    assert out.dtype == onednn.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    factor = 3 if autocast else {2: 2, 4: 5}[float_tile]
    assert _error(out, exact) <= factor * _error(onednn, exact)
    assert _error(out, exact) < (0.01 if autocast else {2: 1e-6, 4: 3e-6}[float_tile])


def test_each_precision_and_map_takes_its_tiling(monkeypatch):
    """float32 and float64 by F(4x4, 3x3) where the maps divide into 4x4 tiles and make at least MIN_TILES_F4 2x2
    output tiles, else by F(2x2, 3x3); bf16 (autocast or not) and fp16 always by F(2x2, 3x3): seen in what the
    convolution transforms."""
    floats, low = (torch.float32, torch.float64), (torch.bfloat16, torch.float16)
    assert winograd.MIN_TILES_F4 == 392  # Swin-T's 28x28 level at batch 2 (docs/performance.md)
    assert [tiling_for(d, 17, 8, 12).m for d in floats + low] == [4, 4, 2, 2]  # 17 x 24 = 408 tiles
    assert [tiling_for(torch.float32, 2, h, w).m for h, w in ((56, 56), (14, 14), (28, 30), (30, 28), (28, 28))] == [
        4, 2, 2, 2, 4
    ]
    assert [tiling_for(torch.float32, 1, 28, 28).m, tiling_for(torch.float32, 1, 56, 56).m] == [2, 4]  # 196, 784
    assert [tiling_for(torch.float32, b, 4, 4).m for b in (97, 98)] == [2, 4]  # 4 tiles an image
    monkeypatch.setattr(winograd, "MIN_TILES_F4", 1)
    seen = []
    original = winograd.input_transform
    monkeypatch.setattr(winograd, "input_transform", lambda padded, t: seen.append(t.m) or original(padded, t))
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    winograd_conv3x3(x, weight)
    winograd_conv3x3(x[:, :, :6], weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        winograd_conv3x3(x, weight)
    winograd_conv3x3(x.bfloat16(), weight.bfloat16())
    assert seen == [4, 2, 2, 2]
    monkeypatch.setattr(winograd, "MIN_TILES_F4", 32)  # the convolution counts its whole batch's tiles
    seen.clear()
    winograd_conv3x3(torch.cat([x, x]), weight)  # 2 x 16
    winograd_conv3x3(x, weight)
    assert seen == [4, 2]


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
    """The rule as on the CPU most of it was measured on (AVX-512, without AMX), whatever this one has."""
    monkeypatch.setattr(winograd, "has_amx", lambda: False)
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "AVX512")


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


def test_float32_pays_from_fewer_tiles_on_avx2(monkeypatch):
    """On an AVX2-only CPU Swin-T's 14x14 level at batch 2 (98 tiles) and its 28x28 level at batch 1 (196) take it in
    float32 (docs/performance.md), not the 14x14 level at batch 1 (49); bf16 keeps its threshold."""
    f32, bf16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "AVX2")
    assert [winograd_pays(1152, 384, t, f32) for t in (49, 97, 98, 196)] == [False, False, True, True]
    assert not winograd_pays(255, 384, 10_000, f32)
    assert [winograd_pays(1152, 384, t, bf16) for t in (98, 391, 392)] == [False, False, True]
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "DEFAULT")  # not measured: the AVX-512 threshold
    assert [winograd_pays(1152, 384, t, f32) for t in (98, 224, 225)] == [False, False, True]


@pytest.mark.parametrize("capped,expected", [("avx2", "AVX2 True"), ("default", "DEFAULT False")])
def test_the_capability_is_atens(capped, expected):
    """The real rule in a fresh process whose ATen is capped (``ATEN_CPU_CAPABILITY``): 98 tiles in float32 take
    Winograd under AVX2 only."""
    code = "import torch; from models import winograd as w; "
    code += "print(w.cpu_capability(), w.winograd_pays(1152, 384, 98, torch.float32))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capped}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == expected


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
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)  # F(4x4, 3x3)'s float32 round-off
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

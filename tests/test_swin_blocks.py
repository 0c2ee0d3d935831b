"""The backbone's layers against the literal reading of the official code (tests/oracle.py): Swin blocks (forward
and gradients, shifted or not, windows that fit small maps), patch merging, window attention with windows as heads,
PWAM, whole padded backbones, window partition and the shift masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.pwam import PWAM, attention
from models.swin import PatchMerging, SwinBlock
from models.windows import kind_masks, window_kinds, window_partition, window_reverse

from . import oracle
from .helpers_model import NOT_CPU, assert_close, tiny_cfg


def _random_bias(blk: SwinBlock) -> SwinBlock:
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # far from its init, so that a misplaced entry shows
    return blk


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize(
    "window,shift,H,W",
    [(6, 3, 15, 10), (6, 3, 5, 5), (6, 3, 12, 18), (6, 0, 15, 10), (12, 6, 30, 30), (12, 6, 15, 15), (12, 0, 15, 15)],
)
def test_block_matches_official_reading(fused_attn, window, shift, H, W):
    """Padded maps (15 and 30 with window 12, as 480 px gives): pad bottom/right after norm1 and before the shift,
    mask on the padded grid, crop after the reverse shift."""
    torch.manual_seed(0)
    blk = _random_bias(SwinBlock(dim=8, num_heads=2, window=window, shift=shift, fused_attn=fused_attn).eval())
    x = torch.randn(2, H * W, 8)
    with torch.no_grad():
        assert_close(blk(x, H, W), oracle.swin_block(blk, x, H, W))


def test_block_gradients_match_official_reading():
    torch.manual_seed(1)
    blk = _random_bias(SwinBlock(dim=8, num_heads=2, window=6, shift=3).eval())
    x = torch.randn(2, 15 * 10, 8)
    weights = torch.randn(2, 15 * 10, 8)
    grads = []
    for fn in (lambda t: blk(t, 15, 10), lambda t: oracle.swin_block(blk, t, 15, 10)):
        t = x.clone().requires_grad_()
        blk.zero_grad()
        (fn(t) * weights).sum().backward()
        grads.append([t.grad, *(p.grad.clone() for p in blk.parameters())])
    for a, b in zip(*grads, strict=True):
        assert_close(a, b)


def _fitted_block_by_hand(blk: SwinBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """MODEL.SWIN.FIT_WINDOW's reading of a block on an H x W map within one window: every token attends to every
    token (no padding, no shift, no mask) with the bias of their offset (dy, dx) from the window's table, row
    (dy + window - 1) * (2 * window - 1) + dx + window - 1; then the residual and the MLP."""
    B, L, C = x.shape
    ws, h = blk.window, blk.attn.num_heads
    cells = [(r, c) for r in range(H) for c in range(W)]
    rows = [[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + a[1] - b[1] + ws - 1 for b in cells] for a in cells]
    bias = blk.attn.relative_position_bias_table[torch.tensor(rows)].permute(2, 0, 1)  # [h, L, L]
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, L, 3, h, C // h).permute(2, 0, 3, 1, 4)
    scores = (q * (C // h) ** -0.5) @ k.transpose(-2, -1) + bias
    x = x + blk.attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C))
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize(
    "shift,H,W,official", [(0, 3, 3, False), (3, 3, 3, True), (3, 2, 2, False), (0, 6, 4, False), (3, 5, 6, False),
                           (3, 1, 6, False)],
)
def test_fit_window_attends_a_small_map_as_one_window(fused_attn, shift, H, W, official):
    """With fit_window a map smaller than the window (6) is attended unpadded and unshifted, as written out by hand.
    The official reading pads it to 6 x 6 and differs, but for a 3 x 3 map shifted by 3: its shift mask happens to
    keep the 9 tokens together and the padding apart."""
    torch.manual_seed(2)
    blk = _random_bias(SwinBlock(8, 2, window=6, shift=shift, fused_attn=fused_attn, fit_window=True).eval())
    x = torch.randn(2, H * W, 8)
    with torch.no_grad():
        out = blk(x, H, W)
        assert_close(out, _fitted_block_by_hand(blk, x, H, W))
        assert ((out - oracle.swin_block(blk, x, H, W)).abs().max() < 1e-5) == official


@pytest.mark.parametrize("shift,H,W", [(3, 6, 6), (0, 6, 6), (3, 15, 10), (0, 7, 5)])
def test_fit_window_leaves_other_maps_official(shift, H, W):
    """A map of the window's size or larger (on one side) is attended as the official code does, fit_window or not."""
    torch.manual_seed(3)
    blk = _random_bias(SwinBlock(8, 2, window=6, shift=shift, fit_window=True).eval())
    x = torch.randn(2, H * W, 8)
    with torch.no_grad():
        assert_close(blk(x, H, W), oracle.swin_block(blk, x, H, W))


def test_fit_window_reaches_every_block_and_batches():
    """MODEL.SWIN.FIT_WINDOW builds every Swin block fitting (the default: none); the same weights then give the same
    stage 1 and 2 maps at 40 px (10x10, 5x5: larger than the window, 4) and other stage 3 and 4 maps (3x3, 2x2), one
    sample as in a batch."""
    torch.manual_seed(4)
    official = build_model(tiny_cfg(), pretrained=False).eval()
    assert not any(getattr(m, "fit_window", False) for m in official.modules())
    cfg = tiny_cfg(MODEL__SWIN__FIT_WINDOW=True)
    model = build_model(cfg, pretrained=False).eval()
    model.load_state_dict(official.state_dict())
    blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
    assert blocks and all(b.fit_window for b in blocks)
    image, lang, mask = torch.randn(3, 3, 40, 40), torch.randn(3, cfg.MODEL.TEXT.DIM, 5), torch.ones(3, 5, 1)
    with torch.no_grad():
        fitted, padded = model.backbone(image, lang, mask), official.backbone(image, lang, mask)
        assert [tuple(f.shape[-2:]) for f in fitted] == [(10, 10), (5, 5), (3, 3), (2, 2)]
        for stage, (a, b) in enumerate(zip(fitted, padded)):
            assert ((a - b).abs().max() > 1e-2) == (stage >= 2), stage
        batched = model.segment(image, lang, mask)
        for i in range(3):
            assert_close(model.segment(image[i : i + 1], lang[i : i + 1], mask[i : i + 1]), batched[i : i + 1])


@pytest.mark.parametrize("H,W", [(15, 15), (15, 8), (7, 10), (4, 6)])
def test_patch_merging_pads_bottom_right_like_official(H, W):
    torch.manual_seed(2)
    pm = PatchMerging(8).eval()
    x = torch.randn(2, H * W, 8)
    with torch.no_grad():
        out = pm(x, H, W)
        assert out.shape == (2, ((H + 1) // 2) * ((W + 1) // 2), 16)
        assert_close(out, oracle.patch_merging(pm, x, H, W))


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("fused_attn", [False, True])
def test_window_attention_windows_as_heads_matches_official(qkv_bias, fused_attn):
    """Several windows per row (each [M, N, N] mask picked by index), with and without a qkv bias, against the
    official per-window reading."""
    from models.swin import WindowAttention

    torch.manual_seed(10)
    attn = WindowAttention(8, 3, 2, qkv_bias=qkv_bias, fused_attn=fused_attn).eval()
    assert (attn.qkv.bias is not None) == qkv_bias
    _random_bias(type("Blk", (), {"attn": attn})())
    B, nW, N = 2, 4, 9
    x, masks = torch.randn(B, N, nW, 8), torch.randn(2, N, N)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = attn(x, masks, index)  # [B, N, nW, C]
        ref = oracle.window_attention(attn, x.permute(0, 2, 1, 3).reshape(B * nW, N, 8), masks[index])
    assert_close(out.permute(0, 2, 1, 3).reshape(B * nW, N, 8), ref)


@pytest.mark.parametrize("H,W", [(3, 5), (4, 3), (5, 5)])
def test_patch_merging_odd_sides_by_hand(H, W):
    """Every output token written out: the 2x2 neighbours (row 2i / 2i + 1, column 2j / 2j + 1) in the checkpoints'
    order, a neighbour past the bottom or right edge zero (official: pad bottom/right, never top/left)."""
    torch.manual_seed(9)
    pm = PatchMerging(4).eval()
    x = torch.randn(2, H * W, 4)
    grid = x.view(2, H, W, 4)

    def at(r: int, c: int) -> torch.Tensor:
        return grid[:, r, c] if r < H and c < W else torch.zeros(2, 4)

    tokens = [torch.cat([at(2 * i, 2 * j), at(2 * i + 1, 2 * j), at(2 * i, 2 * j + 1), at(2 * i + 1, 2 * j + 1)], -1)
              for i in range((H + 1) // 2) for j in range((W + 1) // 2)]  # row-major over the merged grid
    with torch.no_grad():
        expected = pm.reduction(F.layer_norm(torch.stack(tokens, 1), (16,), pm.norm.weight, pm.norm.bias))
        assert_close(pm(x, H, W), expected)


def test_every_attention_takes_the_fused_kernel_unless_told_not_to():
    """Built by hand with their defaults, as a reader of one module would: the fused kernel (same values, faster)."""
    from models.pwam import SpatialImageLanguageAttention
    from models.swin import MultiModalStage, MultiModalSwin, WindowAttention

    stage = MultiModalStage(8, 1, 2, window=3, lang_dim=12)
    swin = MultiModalSwin(8, (1, 1, 1, 1), (1, 1, 1, 1), window=3, lang_dim=12)
    for top in (SwinBlock(8, 2, window=3), WindowAttention(8, 3, 2), PWAM(8, 8, 12, 8, 8),
                SpatialImageLanguageAttention(8, 12, 8, 8), stage, swin):  # fmt: skip
        layers = [m for m in top.modules() if hasattr(m, "fused_attn")]  # its window attentions and PWAMs' attention
        assert layers and all(m.fused_attn is True for m in layers), type(top).__name__
    assert sum(hasattr(m, "fused_attn") for m in swin.modules()) == 8  # 4 blocks, 4 PWAMs


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_pwam_matches_official_reading(fused_attn, heads):
    torch.manual_seed(3)
    pwam = PWAM(8, 8, 12, 8, 8, num_heads=heads, fused_attn=fused_attn).eval()
    x, lang, mask = torch.randn(2, 20, 8), torch.randn(2, 12, 6), torch.ones(2, 6, 1)
    mask[1, 4:] = 0
    with torch.no_grad():
        assert_close(pwam(x, lang, mask), oracle.pwam(pwam, x, lang, mask))


@pytest.fixture(scope="module", params=[(480, 480, 12), (70, 46, 4)], ids=["480px_window12", "70x46_window4"])
def padded_backbone_case(request):
    """A tiny backbone whose stages need padding, and the official reading's outputs. 480 px with window 12 (the
    paper's setting): stages 120, 60, 30, 15, of which 30 and 15 pad to 36 and 24 (every merge there sees even
    sides). 70 x 46 with window 4: stages 18x12, 9x6, 5x3, 3x2; every stage pads, and the merges of
    9x6 and 5x3 pad an odd side by one (what a bottom/right vs top/left padding tells apart)."""
    H, W, window = request.param
    torch.manual_seed(4)
    model = build_model(tiny_cfg(MODEL__SWIN__WINDOW_SIZE=window, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4])).eval()
    for stage in model.backbone.layers:
        for blk in stage.blocks:
            _random_bias(blk)
    img, lang, mask = torch.randn(2, 3, H, W), torch.randn(2, 12, 7), torch.ones(2, 7, 1)
    mask[1, 4:] = 0
    with torch.no_grad():
        ref = oracle.backbone(model.backbone, img, lang, mask)
    return model.state_dict(), (img, lang, mask), ref, window


@pytest.mark.parametrize("fused_attn", [False, True])
def test_padded_backbone_matches_official_reading(padded_backbone_case, fused_attn):
    state, args, ref, window = padded_backbone_case
    model = build_model(tiny_cfg(MODEL__SWIN__WINDOW_SIZE=window, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4],
                                 MODEL__FUSED_ATTENTION=fused_attn)).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        feats = model.backbone(*args)
    for out, r in zip(feats, ref, strict=True):
        assert_close(out, r)


@pytest.mark.parametrize("as_heads", [False, True])
def test_window_partition_round_trip(as_heads):
    x = torch.randn(2, 12, 18, 5)
    w = window_partition(x, 6, as_heads)
    assert w.shape == ((2, 36, 6, 5) if as_heads else (2 * 6, 36, 1, 5))
    assert torch.equal(window_reverse(w, 6, 12, 18, as_heads), x)
    second = w[0, :, 1] if as_heads else w[1, :, 0]
    assert torch.equal(second.view(6, 6, 5), x[0, :6, 6:12])  # windows row-major


def _shift_mask(Hp: int, Wp: int, window: int) -> torch.Tensor:
    """The model's shift mask of every window: [nW, N, N]."""
    return kind_masks(window, window // 2)[window_kinds(Hp // window, Wp // window)]


def test_window_kinds_by_hand_and_on_the_asked_device():
    """3 x 4 windows, row-major: the last column 1, the last row 2, its last window 3; made on the device asked."""
    assert window_kinds(3, 4).tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 2, 2, 2, 3]
    for rows, cols in ((3, 4), (1, 1)):
        assert window_kinds(rows, cols, NOT_CPU).device == NOT_CPU


def test_shift_mask_regions():
    m = _shift_mask(12, 12, 6)
    assert m.shape == (4, 36, 36)
    assert m[0].abs().sum() == 0  # the top-left window holds one region only
    assert set(m.unique().tolist()) == {0.0, -100.0}
    assert (m[3] == 0).sum() == 4 * 9 * 9  # bottom-right window: 4 regions of 3x3 tokens
    for Hp, Wp, window in ((12, 18, 6), (36, 24, 12), (8, 4, 4), (7, 7, 7), (12, 6, 6)):
        assert torch.equal(_shift_mask(Hp, Wp, window), oracle.shift_mask(Hp, Wp, window, window // 2))


def test_attention_dropout_drops_attention_weights_in_training():
    """Attention dropout (Swin's ``attn_drop``; 0 in LAVT's recipe) zeroes entries of the softmax weights and scales
    the rest by 1 / (1 - p) before they take the values, on the path that trains on CPU; without it, the plain
    attention. Written out here: the same random draws, as a mask of kept weights."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    bias, scale, p = torch.randn(5, 5), 0.5, 0.4
    weights = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    torch.manual_seed(1)
    kept = torch.empty_like(weights).bernoulli_(1 - p)  # the draws dropout makes for a tensor of this shape
    torch.manual_seed(1)
    out = attention(q, k, v, bias, scale, p, fused=True)  # with a gradient on CPU: the matmul path either way
    assert (kept == 0).any() and (kept == 1).any()
    assert_close(out, (weights * kept / (1 - p)) @ v)
    assert_close(attention(q, k, v, bias, scale, 0.0, fused=False), weights @ v)


def test_stochastic_depth_rises_linearly_over_the_blocks():
    """MODEL.SWIN.DROP_PATH_RATE: block i of n drops its residual branches with probability rate * i / (n - 1), as
    the official Swin (numpy's linspace here, independent of the model's torch.linspace); the first block, at 0,
    has none."""
    import numpy as np

    from models.layers import DropPath

    cfg = tiny_cfg(MODEL__SWIN__DROP_PATH_RATE=0.3, MODEL__SWIN__DEPTHS=[1, 2, 1, 2])
    blocks = [block for layer in build_model(cfg).backbone.layers for block in layer.blocks]
    expected = np.linspace(0, 0.3, len(blocks))
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    assert [b.drop_path.p for b in blocks[1:]] == pytest.approx(expected[1:].tolist())


def test_backbone_starts_from_the_official_init():
    """As the official Swin backbone initialises itself: every linear weight and relative position bias table drawn
    from a normal of std 0.02 cut at +-2 (so never near the cut), linear biases zero, LayerNorms the identity."""
    torch.manual_seed(0)
    backbone = build_model(tiny_cfg(), pretrained=False).backbone
    tables = [m.relative_position_bias_table for m in backbone.modules() if hasattr(m, "relative_position_bias_table")]
    linears = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert tables and linears and norms
    drawn_tables = torch.cat([t.detach().flatten() for t in tables])
    drawn_weights = torch.cat([m.weight.detach().flatten() for m in linears])
    for drawn in (drawn_tables, drawn_weights):  # (800 values or more: their std within 4 sampling errors of 0.02)
        assert drawn.numel() >= 800 and 0.018 < drawn.std().item() < 0.022 and drawn.abs().max().item() < 0.15
    assert all(not m.bias.any() for m in linears if m.bias is not None)
    assert all(bool((m.weight == 1).all() and not m.bias.any()) for m in norms)

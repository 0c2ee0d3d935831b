"""The LAVT network: fidelity to the official outputs, shapes, gradients, language use, fast paths."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from configs import get_config
from models import build_model, build_param_groups
from models.pwam import PWAM, instance_norm_tokens
from models.swin import SwinBlock, shift_mask, window_partition, window_reverse

from .helpers_model import FIXTURE, fixture_cfg, save_tiny_bert, tiny_cfg


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("fused", [False, True])
def test_reproduces_official_fixture(reference, fused):
    model = build_model(fixture_cfg(reference, MODEL__FUSED_ATTENTION=fused)).eval()
    model.load_state_dict({k: v for k, v in reference["checkpoint"]["model"].items()
                           if not k.endswith("relative_position_index")})
    with torch.no_grad():
        feats = model.backbone(reference["image"], reference["lang_feats"], reference["lang_mask"])
        logits = model.segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    for out, ref in zip(feats, reference["stage_features"], strict=True):
        _close(out, ref)
    _close(logits, reference["logits"])


def _reference_block(blk: SwinBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """A literal, loop-per-window reading of the official block: pad after norm1 and before the shift, mask on
    the padded grid (regions split at -window and -shift, -100 across), crop after the reverse shift."""
    B, _, C = x.shape
    ws, s, heads = blk.window, blk.shift, blk.attn.num_heads
    y = blk.norm1(x).view(B, H, W, C)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))

    def region(v: int, size: int) -> int:
        return 0 if v < size - ws else (1 if v < size - s else 2)

    table = blk.attn.relative_position_bias_table
    pos = [(a, b) for a in range(ws) for b in range(ws)]
    bias = torch.stack([torch.stack([table[(p[0] - q[0] + ws - 1) * (2 * ws - 1) + p[1] - q[1] + ws - 1]
                                     for q in pos]) for p in pos]).permute(2, 0, 1)  # [heads, N, N]
    out = torch.empty_like(y)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            tok = y[:, i:i + ws, j:j + ws].reshape(B, ws * ws, C)
            q, k, v = blk.attn.qkv(tok).view(B, ws * ws, 3, heads, -1).permute(2, 0, 3, 1, 4)
            attn = (q * blk.attn.scale) @ k.transpose(-1, -2) + bias
            if s:
                lab = torch.tensor([3 * region(i + a, Hp) + region(j + b, Wp) for a, b in pos])
                attn = attn + (lab[None, :] != lab[:, None]).float() * -100.0
            o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, ws * ws, C)
            out[:, i:i + ws, j:j + ws] = blk.attn.proj(o).view(B, ws, ws, C)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    x = x + out[:, :H, :W].reshape(B, H * W, C)
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("H,W", [(15, 10), (5, 5), (12, 18)])
def test_block_pads_before_shift_like_official(fused, H, W):
    torch.manual_seed(0)
    blk = SwinBlock(dim=8, num_heads=2, window=6, shift=3, fused=fused).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, H * W, 8)
        Hp, Wp = -(-H // 6) * 6, -(-W // 6) * 6
        out = blk(x, H, W, shift_mask(Hp, Wp, 6, 3))
        _close(out, _reference_block(blk, x, H, W))


def test_window_partition_round_trip():
    x = torch.randn(2, 12, 18, 5)
    w = window_partition(x, 6)
    assert w.shape == (2 * 2 * 3, 36, 5)
    assert torch.equal(window_reverse(w, 6, 12, 18), x)
    assert torch.equal(w[1].view(6, 6, 5), x[0, :6, 6:12])  # windows row-major


def test_shift_mask_regions():
    m = shift_mask(12, 12, 6, 3)
    assert m.shape == (4, 36, 36)
    assert m[0].abs().sum() == 0  # the top-left window holds one region only
    assert set(m.unique().tolist()) == {0.0, -100.0}
    assert (m[3] == 0).sum() == 4 * 9 * 9  # bottom-right window: 4 regions of 3x3 tokens


@pytest.mark.parametrize("cfg_file", ["swin_tiny", "swin_small", "swin_base", "swin_large"])
def test_variant_shapes(cfg_file):
    cfg = get_config(f"configs/{cfg_file}_refcoco.yaml",
                     ["MODEL.TEXT.ENCODER", "", "MODEL.PRETRAINED_SWIN", "", "MODEL.TEXT.DIM", 16])
    model = build_model(cfg).eval()
    dim = cfg.MODEL.SWIN.EMBED_DIM
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 48), torch.randn(1, 16, 5), torch.ones(1, 5, 1))
        logits = model.segment(torch.randn(1, 3, 64, 48), torch.randn(1, 16, 5), torch.ones(1, 5, 1))
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2)]  # ceil halving
    assert [tuple(f.shape) for f in feats] == [(1, dim * 2**i, h, w) for i, (h, w) in enumerate(sizes)]
    assert logits.shape == (1, 2, 64, 48) and logits.dtype == torch.float32
    assert sum(len(s.blocks) for s in model.backbone.layers) == sum(cfg.MODEL.SWIN.DEPTHS)


@pytest.mark.parametrize("hidden", [0, 6, 40])
def test_decoder_hidden_width(hidden):
    model = build_model(tiny_cfg(MODEL__DECODER_HIDDEN=hidden)).eval()
    width = hidden or 4 * 8  # official: half the stage-4 channels (8 * embed_dim)
    dec = model.classifier
    assert [getattr(dec, f"conv2_{lvl}").out_channels for lvl in "432"] == [width] * 3
    assert [getattr(dec, f"conv1_{lvl}").in_channels for lvl in "432"] == [64 + 32, width + 16, width + 8]
    with torch.no_grad():
        logits = model.segment(torch.randn(2, 3, 40, 36), torch.randn(2, 12, 5), torch.ones(2, 5, 1))
    assert logits.shape == (2, 2, 40, 36) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="hidden width must be positive"):
        build_model(tiny_cfg(MODEL__DECODER_HIDDEN=-1))


@pytest.mark.parametrize("size", [(37, 53), (61, 30), (29, 45)])
def test_odd_input_sizes(size):
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        logits = model.segment(torch.randn(2, 3, *size), torch.randn(2, 12, 6), torch.ones(2, 6, 1))
    assert logits.shape == (2, 2, *size)
    assert torch.isfinite(logits).all()


def test_fused_equals_straightforward_with_padding():
    torch.manual_seed(1)
    a = build_model(tiny_cfg(MODEL__FUSED_ATTENTION=False, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4])).eval()
    b = build_model(tiny_cfg(MODEL__FUSED_ATTENTION=True, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4])).eval()
    b.load_state_dict(a.state_dict())
    img, lang, mask = torch.randn(2, 3, 70, 46), torch.randn(2, 12, 7), torch.ones(2, 7, 1)
    mask[1, 4:] = 0
    with torch.no_grad():
        _close(b.segment(img, lang, mask), a.segment(img, lang, mask))


def test_batched_equals_per_sample():
    torch.manual_seed(2)
    model = build_model(tiny_cfg()).eval()
    img, lang, mask = torch.randn(3, 3, 40, 40), torch.randn(3, 12, 6), torch.ones(3, 6, 1)
    mask[0, 3:] = 0
    with torch.no_grad():
        batched = model.segment(img, lang, mask)
        single = torch.cat([model.segment(img[i:i + 1], lang[i:i + 1], mask[i:i + 1]) for i in range(3)])
    _close(batched, single)


def test_padding_words_are_ignored():
    torch.manual_seed(3)
    pwam = PWAM(8, 8, 12, 8, 8, num_heads=2).eval()
    x, lang, mask = torch.randn(1, 20, 8), torch.randn(1, 12, 6), torch.ones(1, 6, 1)
    mask[0, 4:] = 0
    lang2 = lang.clone()
    lang2[..., 4:] = 100.0  # padding positions hold anything
    with torch.no_grad():
        _close(pwam(x, lang2, mask), pwam(x, lang, mask))


def test_sentence_changes_output_and_forward_matches_segment(tiny_bert):
    torch.manual_seed(4)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert))).eval()
    img = torch.randn(1, 3, 40, 40).expand(2, -1, -1, -1)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]])
    att = (ids > 0).long()
    with torch.no_grad():
        out = model(img, ids, att)
        assert (out[0] - out[1]).abs().max() > 1e-4  # same image, other sentence
        _close(out, model.segment(img, *model.encode_text(ids, att)))


def test_gradients_reach_every_trainable_parameter(tiny_bert):
    torch.manual_seed(5)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert), MODEL__SWIN__DROP_PATH_RATE=0.3)).train()
    build_param_groups(model, 0.01, text_train_layers=1)
    ids = torch.tensor([[2, 10, 11, 3], [2, 20, 3, 0]])
    out = model(torch.randn(2, 3, 40, 40), ids, (ids > 0).long())
    F.cross_entropy(out, torch.randint(0, 2, (2, 40, 40))).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    dead_gate = {"backbone.layers.3.res_gate.0.weight", "backbone.layers.3.res_gate.2.weight"}
    assert dead_gate <= frozen  # the last stage's gate feeds nothing (as in the official model)
    assert all(n.startswith("text_encoder.") and ".layer.0." not in n for n in frozen - dead_gate)
    assert any(n.startswith("text_encoder.") for n in frozen)


def test_grad_checkpoint_same_gradients():
    torch.manual_seed(6)
    a = build_model(tiny_cfg()).train()
    b = build_model(tiny_cfg(MODEL__GRAD_CHECKPOINT=True)).train()
    b.load_state_dict(a.state_dict())
    img, lang, mask = torch.randn(2, 3, 40, 40), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    for m in (a, b):
        m.segment(img, lang, mask).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4), n


def test_param_groups_follow_official_recipe(tiny_bert):
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert)))
    groups = {g["name"]: g for g in build_param_groups(model, 0.01, text_train_layers=1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["backbone_no_decay"]["params"]]
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all("norm" in n or "relative_position_bias_table" in n for n in no_decay)
    assert not any("norm" in names[id(p)] for p in groups["backbone"]["params"])
    text = {names[id(p)] for p in groups["text_encoder"]["params"]}
    assert text and all(n.startswith("text_encoder.encoder.layer.0.") for n in text)
    n_all = sum(len(g["params"]) for g in groups.values())
    assert n_all == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="TRAIN_LAYERS=5, but the encoder has 2 layers"):
        build_param_groups(model, 0.01, text_train_layers=5)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="4 stages"):
        build_model(tiny_cfg(MODEL__SWIN__DEPTHS=[2, 2, 2], MODEL__SWIN__NUM_HEADS=[1, 2, 2],
                             MODEL__FUSION__NUM_HEADS=[1, 1, 1]))
    with pytest.raises(ValueError, match="do not divide into 3 heads"):
        build_model(tiny_cfg(MODEL__SWIN__NUM_HEADS=[3, 2, 2, 4]))
    model = build_model(tiny_cfg())
    with pytest.raises(RuntimeError, match="no text encoder"):
        model(torch.randn(1, 3, 32, 32), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lang_mask \[B, N, 1\]"):
        model.segment(torch.randn(1, 3, 32, 32), torch.randn(1, 12, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="29x29 is too small"):
        model.segment(torch.randn(1, 3, 29, 29), torch.randn(1, 12, 4), torch.ones(1, 4, 1))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model(tiny_cfg(MODEL__TEXT__ENCODER="/nonexistent/bert"))


def test_padding_columns_are_dropped_without_changing_outputs(tiny_bert):
    """encode_text keeps the columns up to the batch's longest expression; the logits equal those computed
    with every padding column kept (BERT and PWAM mask them)."""
    torch.manual_seed(11)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert))).eval()
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, :4], ids[1, :6] = torch.tensor([2, 10, 11, 3]), torch.tensor([2, 20, 21, 22, 23, 3])
    att = (ids > 0).long()
    img = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        feats, mask = model.encode_text(ids, att)
        assert feats.shape[-1] == 6 and mask.shape == (2, 6, 1)
        full = model.text_encoder(input_ids=ids, attention_mask=att)[0].transpose(1, 2)  # [B, C, 12]
        padded = model.segment(img, full, att.unsqueeze(-1).float())
        _close(model(img, ids, att), padded)
        _close(model(img[:1], ids[:1], att[:1]), padded[:1])  # alone: trimmed to its own 4 tokens


def test_frozen_text_encoder_stays_in_eval_mode(tiny_bert):
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert)))
    build_param_groups(model, 0.01, text_train_layers=0)
    model.train()
    assert model.backbone.training and not model.text_encoder.training  # no dropout on a fixed extractor
    build_param_groups(model, 0.01, text_train_layers=1)
    assert model.train().text_encoder.training


def test_text_feature_cache_equals_the_encoder(tiny_bert):
    """MODEL.TEXT.CACHE: the logits equal the uncached model's; each distinct expression is encoded once (a hit
    runs no encoder); a weight load drops the stale features; a trainable encoder is refused."""
    torch.manual_seed(12)
    plain = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert)))
    cached = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert), MODEL__TEXT__CACHE=True,
                                  MODEL__TEXT__TRAIN_LAYERS=0))
    cached.load_state_dict(plain.state_dict())
    build_param_groups(cached, 0.01, text_train_layers=0)
    plain.eval(), cached.train()  # train mode: the frozen encoder still runs without dropout
    ids = torch.zeros(3, 10, dtype=torch.long)
    ids[0, :4], ids[1, :6], ids[2, :3] = torch.tensor([2, 10, 11, 3]), torch.tensor([2, 20, 21, 22, 23, 3]), \
        torch.tensor([2, 30, 3])
    att = (ids > 0).long()
    calls = []
    hook = cached.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    cached.text_cache.prime(cached.text_encoder, ids[:2], att[:2])
    assert len(cached.text_cache) == 2 and len(calls) == 1
    with torch.no_grad():
        feats, mask = cached.encode_text(ids, att)  # two hits, one miss
        assert len(calls) == 2 and len(cached.text_cache) == 3
        ref_feats, ref_mask = plain.encode_text(ids, att)
        assert feats.shape == ref_feats.shape == (3, 32, 6) and torch.equal(mask, ref_mask)
        _close(feats * mask.transpose(1, 2), ref_feats * ref_mask.transpose(1, 2))
        assert not feats[2, :, 3:].any()  # padding positions are zeros
        cached.eval()
        img = torch.randn(3, 3, 40, 40)
        _close(cached(img, ids, att), plain(img, ids, att))
        assert len(calls) == 2  # all hits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached.text_cache.prime(cached.text_encoder, ids, att)  # another compute dtype: features of its own
        assert len(cached.text_cache) == 6 and len(calls) == 3
        cached.encode_text(ids, att)  # primed under the same autocast: no encoder run
    assert len(calls) == 3
    cached.load_state_dict(plain.state_dict())
    assert len(cached.text_cache) == 0
    cached.encode_text(ids, att)
    cached.text_encoder.load_state_dict(plain.text_encoder.state_dict())  # through the encoder itself
    assert len(cached.text_cache) == 0
    cached.encode_text(ids, att)
    cached.to(torch.float64)  # entries would keep the old dtype (or device)
    assert len(cached.text_cache) == 0
    hook.remove()
    torch.save(cached, io.BytesIO())  # the whole module still pickles (no lambda among its hooks)
    fresh = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert), MODEL__TEXT__CACHE=True,
                                 MODEL__TEXT__TRAIN_LAYERS=0))
    assert not any(p.requires_grad for p in fresh.text_encoder.parameters())  # frozen when built
    fresh(img, ids, att).sum().backward()  # with gradients on, before any param groups
    build_param_groups(cached, 0.01, text_train_layers=1)
    with pytest.raises(RuntimeError, match="needs a frozen text encoder"):
        cached(img, ids, att)
    with pytest.raises(ValueError, match=r"MODEL.TEXT.CACHE .*TRAIN_LAYERS 0 \(got .*TRAIN_LAYERS 10\)"):
        build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert), MODEL__TEXT__CACHE=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_tokens_equals_instance_norm(dtype):
    """PWAM's InstanceNorm1d on tokens [B, L, C]: the same values and gradients as F.instance_norm on [B, C, L],
    also far from zero mean (statistics in float32 whatever the dtype)."""
    torch.manual_seed(12)
    x = (torch.randn(3, 50, 8) * 3 + 100).to(dtype)
    a, b = x.clone().requires_grad_(), x.float().clone().requires_grad_()
    out = instance_norm_tokens(a, 1e-5)
    ref = F.instance_norm(b.transpose(1, 2), eps=1e-5).transpose(1, 2)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), ref, atol=tol)
    weights = torch.randn(3, 50, 8)
    (out.float() * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(a.grad.float(), b.grad, atol=tol * 10, rtol=tol)

"""Speed-ups that must not change results: float32 fast paths against the official fixture, bf16 within a stated
tolerance, a model that keeps no state between calls (the benchmark that times them: tests/test_benchmark.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model, conv, load_weights, winograd
from models.decoder import SimpleDecoder
from models.refine import EdgeRefine

from . import oracle
from .helpers_model import KernelLayouts, assert_close, fixture_cfg, tiny_cfg

#: bf16 autocast against float32 on the fixture: relative L2 error of the logits and of every stage's features,
#: the largest logit error relative to the largest logit, and pixels whose argmax may flip (near-ties).
BF16_REL_L2 = 0.03
BF16_REL_MAX = 0.05
BF16_ARGMAX_AGREE = 0.99


@pytest.fixture(scope="module")
def fixture_file(reference, tmp_path_factory):
    """The fixture's weights as an official 'lavt' file, read back through models.load_weights."""
    path = tmp_path_factory.mktemp("weights") / "lavt_small_w7_224.pth"
    torch.save(reference["checkpoint"], path)
    return path


def _fixture_model(reference, fixture_file, **over):
    model = build_model(fixture_cfg(reference, **over))
    load_weights(model, fixture_file)
    return model


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32
    assert_close(out, ref)


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture
def winograd_calls(monkeypatch) -> list[int]:
    """Every decoder convolution of MODEL.CONV_WINOGRAD taken by Winograd (the tiny models are below where it pays),
    each call counted."""
    calls = []

    def counted(x, weight):
        calls.append(1)
        return winograd.winograd_conv3x3(x, weight)

    monkeypatch.setattr(winograd, "has_amx", lambda: False)
    monkeypatch.setattr(winograd, "MIN_TILES_FLOAT32", 1)
    monkeypatch.setattr(winograd, "MIN_TILES_FLOAT32_AVX2", 1)
    monkeypatch.setattr(winograd, "MIN_TILES_F4", 1)  # float32 by the larger tile, as on large maps
    monkeypatch.setattr(winograd, "MIN_TILES_LOW_PRECISION", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "winograd_conv3x3", counted)
    return calls


@pytest.mark.parametrize("fused_attn,winograd", [(True, False), (False, False), (True, True)])
def test_float32_fast_paths_reproduce_fixture(reference, fixture_file, fused_attn, winograd, winograd_calls):
    model = _fixture_model(
        reference, fixture_file, MODEL__FUSED_ATTENTION=fused_attn, MODEL__CHANNELS_LAST=True,
        MODEL__CONV_WINOGRAD=winograd,
    )
    with torch.no_grad():
        logits = model.eval().segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    _close(logits, reference["logits"])
    assert len(winograd_calls) == (6 if winograd else 0)


def test_training_mode_paths_reproduce_fixture(reference, fixture_file):
    """With gradients on (the attention kernel chosen for a backward) and checkpointing running each block under
    torch.utils.checkpoint: still the fixture's logits. (BatchNorm in eval mode: batch statistics differ.)"""
    model = _fixture_model(
        reference, fixture_file, MODEL__FUSED_ATTENTION=True, MODEL__GRAD_CHECKPOINT=True, MODEL__CHANNELS_LAST=True
    ).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    out = model.segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    assert out.requires_grad
    _close(out.detach(), reference["logits"])


def test_fast_training_paths_give_the_same_gradients(winograd_calls):
    torch.manual_seed(7)
    plain = build_model(tiny_cfg(MODEL__FUSED_ATTENTION=False, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4])).train()
    fast = build_model(
        tiny_cfg(
            MODEL__FUSED_ATTENTION=True,
            MODEL__GRAD_CHECKPOINT=True,
            MODEL__CHANNELS_LAST=True,
            MODEL__CONV_WINOGRAD=True,
            MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4],
        )
    ).train()
    fast.load_state_dict(plain.state_dict())
    img, lang, mask = torch.randn(2, 3, 70, 46), torch.randn(2, 12, 7), torch.ones(2, 7, 1)
    mask[1, 4:] = 0
    for model in (plain, fast):
        model.segment(img, lang, mask).square().mean().backward()
    # against the largest gradient: biases before an InstanceNorm (or a softmax) have a true gradient of 0, so
    # theirs are round-off only and a per-tensor relative test would compare noise with noise
    scale = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).abs().max().item() < 2e-5 * scale, name
    assert len(winograd_calls) >= 6  # (checkpointing runs each decoder level again in the backward)


@pytest.mark.parametrize("fused,winograd", [(True, False), (False, False), (True, True)])
def test_bf16_autocast_within_tolerance(reference, fixture_file, fused, winograd, winograd_calls):
    model = _fixture_model(reference, fixture_file, MODEL__FUSED_ATTENTION=fused, MODEL__CONV_WINOGRAD=winograd).eval()
    args = reference["image"], reference["lang_feats"], reference["lang_mask"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(*args)
        logits = model.segment(*args)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    ref = reference["logits"]
    assert _rel_l2(logits, ref) < BF16_REL_L2
    assert (logits.float() - ref).abs().max() < BF16_REL_MAX * ref.abs().max()
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() > BF16_ARGMAX_AGREE
    for i, (f, r) in enumerate(zip(feats, reference["stage_features"], strict=True)):
        assert _rel_l2(f, r) < BF16_REL_L2, f"stage {i + 1}"
    assert len(winograd_calls) == (6 if winograd else 0)


def test_checkpointed_decoder_updates_batchnorm_once():
    """Checkpointing recomputes each decoder level (BatchNorm in training mode) in the backward pass: same
    gradients, and the running statistics must move once per step, not twice."""
    torch.manual_seed(8)
    plain, ckpt = SimpleDecoder(64).train(), SimpleDecoder(64, grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    feats = [torch.randn(2, 8 * 2**i, 16 // 2**i, 12 // 2**i) for i in range(4)]
    for model in (plain, ckpt):
        model(feats[3], feats[2], feats[1], feats[0]).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name  # running_mean, running_var, num_batches_tracked
    assert plain.bn1_2.num_batches_tracked.item() == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_upsampling_gets_its_gradient_in_its_layout(monkeypatch, channels_last):
    """On CPU the upsampled map's gradient, a channel slice of the concatenation's, reaches the upsampling's backward
    contiguous in the upsampled map's layout (strided it takes 3-4x longer); the gradients are those without it,
    bit for bit."""
    torch.manual_seed(3)
    decoder = SimpleDecoder(64, channels_last=channels_last).train()
    feats = [torch.randn(2, 8 * 2**i, 16 // 2**i, 12 // 2**i) for i in range(4)]
    feats = [f.contiguous(memory_format=torch.channels_last).requires_grad_() for f in feats]  # as Swin's outputs
    grads = []
    for barrier in (True, False):
        if not barrier:
            monkeypatch.setattr("models.decoder.grad_in_layout", lambda x: x)
        decoder.zero_grad()
        with KernelLayouts("upsample") as mode:
            decoder(feats[3], feats[2], feats[1], feats[0]).square().mean().backward()
        grads.append([p.grad.clone() for p in decoder.parameters()])
        # three levels upsampled; without the barrier the gradient arrives strided
        assert mode.seen["upsample_bilinear2d_backward"] == [["cl" if barrier else "strided"]] * 3
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_checkpointed_refinement_same_step_less_kept():
    """MODEL.GRAD_CHECKPOINT covers the edge refinement: the same gradients and running statistics (moved once), and
    the full-resolution hidden maps no longer kept for the backward pass."""
    torch.manual_seed(9)
    plain, ckpt = EdgeRefine(6).train(), EdgeRefine(6, grad_checkpoint=True).train()
    torch.nn.init.normal_(plain.proj.weight)  # not the identity: gradients reach the hidden layers
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 20, 24)
    kept = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        logits = torch.randn(2, 2, 20, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=sizes: s.append(t.numel()) or t, lambda t: t):
            out = model(logits, images)
        out.square().mean().backward()
        kept[name] = (sum(sizes), logits.grad)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(kept["ckpt"][1], kept["plain"][1], rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name
    assert plain.bn2.num_batches_tracked.item() == 1
    assert kept["ckpt"][0] < kept["plain"][0] / 4  # only the inputs, not ~6 maps of [2, 6, 20, 24]
    assert build_model(tiny_cfg(MODEL__REFINE=4, MODEL__GRAD_CHECKPOINT=True)).refine.grad_checkpoint


def test_bf16_training_step_keeps_float32_state():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MODEL__GRAD_CHECKPOINT=True)).train()
    img, lang, mask = torch.randn(2, 3, 48, 48), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    mask[1, 3:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.segment(img, lang, mask)
        loss = F.cross_entropy(logits.float(), torch.randint(0, 2, (2, 48, 48)))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _held_tensors(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_held_tensors(v) for v in value.values())
    return isinstance(value, (list, tuple, set)) and any(_held_tensors(v) for v in value)


def test_model_keeps_no_state_between_calls():
    """No module holds tensors beside its parameters and buffers after forwards (no bias, mask or feature cache to
    go stale after a weight change or a move), and a changed relative-position table acts on the next call."""
    torch.manual_seed(1)
    model = build_model(tiny_cfg()).eval()
    args = torch.randn(2, 3, 40, 40), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    with torch.no_grad():
        before = model.segment(*args)
        model.segment(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.segment(*args).float().sum().backward()
    for name, module in model.named_modules():
        held = [k for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules") and
                _held_tensors(v)]
        assert not held, f"{name or 'model'} holds {held}"
    blk = model.backbone.layers[0].blocks[1]
    x = torch.randn(2, 13 * 18, 8)
    with torch.no_grad():
        first = blk(x, 13, 18)
        blk.attn.relative_position_bias_table.add_(1.0 + torch.randn_like(blk.attn.relative_position_bias_table))
        _close(blk(x, 13, 18), oracle.swin_block(blk, x, 13, 18))
        assert (blk(x, 13, 18) - first).abs().max() > 1e-3
        _close(model.segment(*args), model.segment(*args))
        assert (model.segment(*args) - before).abs().max() > 0

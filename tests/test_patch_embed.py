"""The Swin's stems: the official patch embedding and the convolutional stem give the same token grid."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from configs import get_config
from models import CheckpointError, build_model, build_param_groups, load_pretrained_swin, load_weights
from models.patch_embed import ConvStem, PatchEmbed, build_stem
from models.swin import build_backbone

from .helpers_model import tiny_cfg


@pytest.mark.parametrize("size", [(96, 96), (37, 53), (30, 61)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_gives_the_patch_grid(size, patch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    tokens_p, *grid_p = PatchEmbed(patch, 3, 16)(x)
    tokens_c, *grid_c = ConvStem(patch, 3, 16)(x)
    expect = [-(-size[0] // patch), -(-size[1] // patch)]
    assert grid_p == grid_c == expect
    assert tokens_c.shape == tokens_p.shape == (2, expect[0] * expect[1], 16)
    # the LayerNorm (at its init) normalises each token over channels
    assert torch.allclose(tokens_c.std(-1, correction=0), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize(("patch", "extra", "widths"), [(2, 0, [16]), (4, 1, [8, 16, 16]), (8, 2, [4, 8, 16, 16, 16])])
def test_conv_stem_layers(patch, extra, widths):
    stem = ConvStem(patch, 3, 16, extra_layers=extra)
    convs = [m for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    down = len(widths) - extra
    assert [c.stride for c in convs] == [(2, 2)] * down + [(1, 1)] * extra
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 16


def test_conv_stem_bad_arguments():
    for patch in (1, 3, 6):
        with pytest.raises(ValueError, match="power of two"):
            ConvStem(patch, 3, 16)
    with pytest.raises(ValueError, match="halves embed_dim 18 2 times"):
        ConvStem(8, 3, 18)
    with pytest.raises(ValueError, match="extra_layers must be >= 0"):
        ConvStem(4, 3, 16, extra_layers=-1)
    with pytest.raises(ValueError, match=r"unknown stem 'cnn' \(MODEL.SWIN.STEM\)"):
        build_stem("cnn", 4, 3, 16)
    with pytest.raises(ValueError, match="unknown stem"):
        build_model(tiny_cfg(MODEL__SWIN__STEM="cnn"))


def test_lavt_with_conv_stem_trains_every_parameter():
    torch.manual_seed(1)
    model = build_model(tiny_cfg(MODEL__SWIN__STEM="conv")).train()
    assert isinstance(model.backbone.patch_embed, ConvStem)
    img, lang, mask = torch.randn(2, 3, 40, 36), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    logits = model.segment(img, lang, mask)
    assert logits.shape == (2, 2, 40, 36)
    F.cross_entropy(logits, torch.randint(0, 2, (2, 40, 36))).backward()
    dead_gate = ("backbone.layers.3.res_gate",)  # the last stage's gate feeds nothing (as the official model)
    no_grad = [n for n, p in model.named_parameters()
               if not n.startswith(dead_gate) and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not no_grad, no_grad
    # the stem's BatchNorms are norms: no weight decay, like the backbone's LayerNorms
    groups = {g["name"]: g for g in build_param_groups(model, 0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert {"backbone.patch_embed.stem.norm0.weight", "backbone.patch_embed.stem.norm1.bias"} <= no_decay
    assert "backbone.patch_embed.stem.conv0.weight" not in no_decay


def test_conv_stem_batched_equals_per_sample_in_eval():
    torch.manual_seed(2)
    model = build_model(tiny_cfg(MODEL__SWIN__STEM="conv"))
    model.train()
    model.segment(torch.randn(4, 3, 40, 40), torch.randn(4, 12, 5), torch.ones(4, 5, 1))
    assert model.backbone.patch_embed.stem.norm0.running_mean.abs().sum() > 0  # eval uses moved statistics
    model.eval()
    img, lang, mask = torch.randn(3, 3, 40, 40), torch.randn(3, 12, 5), torch.ones(3, 5, 1)
    with torch.no_grad():
        batched = model.segment(img, lang, mask)
        single = torch.cat([model.segment(img[i : i + 1], lang[i : i + 1], mask[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_imagenet_swin_into_a_conv_stem_skips_the_patch_projection(tmp_path):
    torch.manual_seed(3)
    src = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], 7, 12, [1, 1, 1, 1])
    state = {k: v.normal_() for k, v in src.state_dict().items() if ".fusion." not in k and ".res_gate." not in k}
    torch.save({"model": state}, tmp_path / "swin.pth")
    backbone = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], 7, 12, [1, 1, 1, 1], stem="conv")
    before = [p.clone() for p in backbone.patch_embed.parameters()]
    skipped = load_pretrained_swin(backbone, tmp_path / "swin.pth")
    assert {f"patch_embed.{k} (the conv stem has no ImageNet counterpart)"
            for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")} <= set(skipped)
    own = backbone.state_dict()
    assert torch.equal(own["layers.1.blocks.0.attn.qkv.weight"], state["layers.1.blocks.0.attn.qkv.weight"])
    after = list(backbone.patch_embed.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # no ImageNet counterpart: left at init


def test_checkpoint_of_the_other_stem_is_refused_with_the_reason(tmp_path):
    conv = build_model(tiny_cfg(MODEL__SWIN__STEM="conv"))
    patch = build_model(tiny_cfg())
    for source, target, file_stem, here in ((conv, patch, "conv", "patch"), (patch, conv, "patch", "conv")):
        torch.save({"model": source.state_dict()}, tmp_path / f"{file_stem}.pth")
        with pytest.raises(CheckpointError, match=f"MODEL.SWIN.STEM is {file_stem} in the file, {here} here") as err:
            load_weights(target, tmp_path / f"{file_stem}.pth")
        assert "EMBED_DIM" not in str(err.value)  # same width: no hint about it


def test_demo_config_trains_with_the_conv_stem():
    cfg = get_config("configs/demo.yaml", ["MODEL.TEXT.ENCODER", "", "MODEL.TEXT.CACHE", False, "MODEL.TEXT.DIM", 8])
    model = build_model(cfg).train()
    assert isinstance(model.backbone.patch_embed, ConvStem)
    size = cfg.DATA.SIZE
    logits = model.segment(torch.randn(2, 3, size, size), torch.randn(2, 8, 4), torch.ones(2, 4, 1))
    assert logits.shape == (2, 2, size, size)
    logits.mean().backward()
    assert model.backbone.patch_embed.stem.conv0.weight.grad.abs().sum() > 0

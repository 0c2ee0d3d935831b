"""The LAVT network: fidelity to the official outputs, shapes, gradients, language use, fast paths."""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import models.lavt as lavt_module
from configs import get_config
from models import build_model, build_param_groups
from models.pwam import PWAM, instance_norm_tokens
from models.text import attended_lengths, text_features, used_columns

from . import oracle
from .helpers_model import NOT_CPU, KernelLayouts, assert_close, fixture_cfg, save_tiny_bert, tiny_cfg


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def _fixture_state(reference: dict) -> dict:
    return {k: v for k, v in reference["checkpoint"]["model"].items() if not k.endswith("relative_position_index")}


@pytest.mark.parametrize("fused_attn", [False, True])
def test_reproduces_official_fixture(reference, fused_attn, monkeypatch):
    """Both attention paths give the official numbers; the fused kernel is taken by every window attention and
    PWAM exactly when asked for (without gradients), never otherwise: the unfused path is the official computation."""
    cfg = fixture_cfg(reference, MODEL__FUSED_ATTENTION=fused_attn)
    model = build_model(cfg).eval()
    model.load_state_dict(_fixture_state(reference))
    fused_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))  # fmt: skip
    with torch.no_grad():
        feats = model.backbone(reference["image"], reference["lang_feats"], reference["lang_mask"])
        logits = model.segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    for out, ref in zip(feats, reference["stage_features"], strict=True):
        assert_close(out, ref)
    assert_close(logits, reference["logits"])
    per_forward = sum(cfg.MODEL.SWIN.DEPTHS) + 4  # every Swin block's window attention, each stage's PWAM
    assert len(fused_calls) == (2 * per_forward if fused_attn else 0)


def test_oracle_reproduces_official_fixture(reference):
    """The literal reading of the official backbone (tests/oracle.py) that the tests below hold the model to gives
    the recorded official numbers itself."""
    model = build_model(fixture_cfg(reference)).eval()
    model.load_state_dict(_fixture_state(reference))
    with torch.no_grad():
        feats = oracle.backbone(model.backbone, reference["image"], reference["lang_feats"], reference["lang_mask"])
    for out, ref in zip(feats, reference["stage_features"], strict=True):
        assert_close(out, ref)


def test_the_backbone_class_alone_is_lavts_swin_t():
    """``MultiModalSwin()`` with no argument: Swin-T (96 channels, depths 2-2-6-2, heads 3-6-12-24, window 7, 4x4
    patches, MLP 4x) with one-head PWAMs on BERT-base's 768-wide words, stochastic depth to 0.3, fused attention."""
    from models.swin import MultiModalSwin

    m = MultiModalSwin()
    proj = m.patch_embed.proj
    assert proj.kernel_size == proj.stride == (4, 4) and proj.out_channels == 96
    assert [len(stage.blocks) for stage in m.layers] == [2, 2, 6, 2]
    assert [stage.blocks[0].attn.num_heads for stage in m.layers] == [3, 6, 12, 24]
    assert all(b.attn.window == 7 and b.attn.fused_attn and not b.fit_window for st in m.layers for b in st.blocks)
    assert [stage.blocks[0].mlp.fc1.out_features for stage in m.layers] == [384, 768, 1536, 3072]
    assert m.layers[0].fusion.image_lang_att.f_key[0].in_channels == 768
    assert m.layers[-1].blocks[-1].drop_path.p == pytest.approx(0.3)
    assert not any(stage.grad_checkpoint for stage in m.layers)
    uneven = r"^depths \[2, 2\], num_heads \[3, 6, 12, 24\] and fusion heads \[1, 1, 1, 1\] must have one entry per "
    with pytest.raises(ValueError, match=uneven):
        MultiModalSwin(depths=(2, 2))


def test_backbone_builder_defaults_are_the_config_defaults():
    """``build_backbone`` called without its optional arguments (the tests and scripts that build a bare Swin) builds
    the paper's backbone: each default is the config's (configs/defaults.py), and the MLP is 4x wide."""
    from models.swin import build_backbone

    m = get_config(None, []).MODEL
    expected = {"fusion_drop": m.FUSION.DROPOUT, "patch_size": m.SWIN.PATCH_SIZE, "mlp_ratio": m.SWIN.MLP_RATIO,
                "drop_path_rate": m.SWIN.DROP_PATH_RATE, "fused_attn": m.FUSED_ATTENTION,
                "grad_checkpoint": m.GRAD_CHECKPOINT, "stem": m.SWIN.STEM, "fit_window": m.SWIN.FIT_WINDOW}  # fmt: skip
    defaults = {k: p.default for k, p in inspect.signature(build_backbone).parameters.items() if k in expected}
    assert defaults == expected
    backbone = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], 7, 12, [1, 1, 1, 1])
    assert [stage.blocks[0].mlp.fc1.out_features for stage in backbone.layers] == [32, 64, 128, 256]


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


def test_batched_equals_per_sample():
    torch.manual_seed(2)
    model = build_model(tiny_cfg()).eval()
    img, lang, mask = torch.randn(3, 3, 40, 40), torch.randn(3, 12, 6), torch.ones(3, 6, 1)
    mask[0, 3:] = 0
    with torch.no_grad():
        batched = model.segment(img, lang, mask)
        single = torch.cat([model.segment(img[i:i + 1], lang[i:i + 1], mask[i:i + 1]) for i in range(3)])
    assert_close(batched, single)


def test_padding_words_are_ignored():
    torch.manual_seed(3)
    pwam = PWAM(8, 8, 12, 8, 8, num_heads=2).eval()
    x, lang, mask = torch.randn(1, 20, 8), torch.randn(1, 12, 6), torch.ones(1, 6, 1)
    mask[0, 4:] = 0
    lang2 = lang.clone()
    lang2[..., 4:] = 100.0  # padding positions hold anything
    with torch.no_grad():
        assert_close(pwam(x, lang2, mask), pwam(x, lang, mask))


def test_sentence_changes_output_and_forward_matches_segment(tiny_bert):
    torch.manual_seed(4)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert))).eval()
    img = torch.randn(1, 3, 40, 40).expand(2, -1, -1, -1)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]])
    att = (ids > 0).long()
    with torch.no_grad():
        out = model(img, ids, att)
        assert (out[0] - out[1]).abs().max() > 1e-4  # same image, other sentence
        assert_close(out, model.segment(img, *model.encode_text(ids, att)))
        assert torch.equal(model(img, text=model.encode_text(ids, att)), out)  # precomputed: no tokens needed


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
    # the relative position bias tables are not decayed either (the official recipe, as Swin's)
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 8 and tables <= set(no_decay)
    text = {names[id(p)] for p in groups["text_encoder"]["params"]}
    assert text and all(n.startswith("text_encoder.encoder.layer.0.") for n in text)
    decoder = [names[id(p)] for p in groups["decoder"]["params"]]  # decayed as the backbone's weights
    assert decoder == [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    assert groups["decoder"]["weight_decay"] == groups["backbone"]["weight_decay"] == 0.01
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
    no_text = "^LAVT.forward needs input_ids and attention_mask, or precomputed text features$"
    with pytest.raises(ValueError, match=no_text):
        model(torch.randn(1, 3, 32, 32))
    bad = [
        (torch.randn(1, 3, 32, 32), torch.randn(1, 12, 4), torch.ones(1, 4)),  # each input of the wrong rank alone
        (torch.randn(3, 32, 32), torch.randn(1, 12, 4), torch.ones(1, 4, 1)),
        (torch.randn(1, 3, 32, 32), torch.randn(12, 4), torch.ones(1, 4, 1)),
    ]
    for images, lang_feats, lang_mask in bad:
        with pytest.raises(ValueError, match=r"^expected images \[B, 3, H, W\], lang_feats \[B, C, N\], lang_mask"):
            model.segment(images, lang_feats, lang_mask)
    with pytest.raises(ValueError, match="29x29 is too small: .*; give at least 33 pixels on one side$"):
        model.segment(torch.randn(1, 3, 29, 29), torch.randn(1, 12, 4), torch.ones(1, 4, 1))
    assert model.segment(torch.randn(1, 3, 33, 29), torch.randn(1, 12, 4), torch.ones(1, 4, 1)).shape[-2:] == (33, 29)
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
        assert_close(model(img, ids, att), padded)
        assert_close(model(img[:1], ids[:1], att[:1]), padded[:1])  # alone: trimmed to its own 4 tokens


def test_attended_lengths_by_hand_and_on_the_masks_device():
    """Each row's last attended column + 1, gaps included, 0 for a row attending nothing; on the mask's device."""
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert attended_lengths(mask).tolist() == [2, 4, 0, 5]
    assert used_columns(mask) == 5 and used_columns(mask[2:3]) == 1
    assert attended_lengths(torch.empty(3, 5, dtype=torch.int64, device=NOT_CPU)).device == NOT_CPU


def test_text_features_layout_dtype_and_device():
    """[B, n, C] features and a longer [B, N] mask on the CPU -> [B, C, n] features and the mask's first n columns
    as [B, n, 1] in the features' dtype, on their device."""
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    feats, lang_mask = text_features(hidden, mask)
    assert torch.equal(feats, hidden.permute(0, 2, 1))
    assert lang_mask.dtype == torch.float64 and lang_mask.tolist() == [[[1], [1], [0]], [[1], [1], [1]]]
    elsewhere = text_features(torch.empty(2, 3, 4, dtype=torch.bfloat16, device=NOT_CPU), mask)
    assert [(t.device, t.dtype) for t in elsewhere] == [(NOT_CPU, torch.bfloat16)] * 2


@pytest.mark.parametrize(
    "name,setting,dropout",
    [("lavt", "auto", False), ("lavt_one", "auto", True), ("lavt", "enabled", True), ("lavt_one", "disabled", False)],
)
def test_text_dropout_follows_the_packaging(tiny_bert, name, setting, dropout):
    """Official ``lavt``: BERT is built apart and never put in train mode, so its dropout is off while its layers train;
    official ``lavt_one``: model.train() reaches BERT, dropout on. MODEL.TEXT.DROPOUT forces either."""
    torch.manual_seed(13)
    model = build_model(tiny_cfg(MODEL__NAME=name, MODEL__TEXT__DROPOUT=setting, MODEL__TEXT__ENCODER=str(tiny_bert)))
    assert model.text_encoder.config.hidden_dropout_prob > 0  # a real dropout to switch
    build_param_groups(model, 0.01, text_train_layers=1)  # its first layer trains, as layers 0-9 officially
    model.train()
    assert model.backbone.training and model.text_encoder.training == dropout
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]])
    att = (ids > 0).long()
    first, second = model.encode_text(ids, att)[0], model.encode_text(ids, att)[0]
    assert first.requires_grad
    assert torch.equal(first, second) != dropout
    model.eval()
    assert not model.text_encoder.training
    with pytest.raises(ValueError, match="MODEL.TEXT.DROPOUT must be one of"):
        build_model(tiny_cfg(MODEL__TEXT__DROPOUT="on"))


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
    # a few times the largest error measured over 10 seeds: values 7.8e-6 / 7.8e-3, gradients (of max ~1.3)
    # 9.5e-7 / 6.3e-3, for float32 / bfloat16
    value_tol, grad_tol = (2e-5, 3e-6) if dtype == torch.float32 else (3e-2, 2e-2)
    assert (out.float() - ref).abs().max() < value_tol
    weights = torch.randn(3, 50, 8)
    (out.float() * weights).sum().backward()
    (ref * weights).sum().backward()
    assert (a.grad.float() - b.grad).abs().max() < grad_tol


def test_compile_only_when_asked(monkeypatch):
    """MODEL.COMPILE: ``torch.compile`` runs for True only (compiling costs minutes on a CPU)."""
    from models import build as build_module

    compiled = []
    monkeypatch.setattr(build_module, "compile_model", lambda model: compiled.append(model) or model)
    plain = build_model(tiny_cfg())
    assert compiled == []
    asked = build_model(tiny_cfg(MODEL__COMPILE=True))
    assert compiled == [asked] and plain is not asked


def test_compile_model_covers_the_image_parts():
    """The backbone, the decoder and the refinement are compiled (lazily: nothing runs here); the text encoder not."""
    from models.build import compile_model

    model = compile_model(build_model(tiny_cfg(MODEL__REFINE=4)))
    assert all(part._compiled_call_impl is not None for part in (model.backbone, model.classifier, model.refine))
    assert model.text_encoder is None or model.text_encoder._compiled_call_impl is None
    assert compile_model(build_model(tiny_cfg())).refine is None  # without a refinement: nothing more to compile


def test_text_encoder_trains_with_the_math_attention_kernel_on_cpu(tiny_bert, monkeypatch):
    """On CPU under bf16 autocast the text encoder's attention runs the math kernel where its layers train (the fused
    kernel's backward is the slower one there) and the fused kernel otherwise: under no_grad, with every text parameter
    frozen, in float32. Features and gradients equal the fused kernel's to bf16 round-off."""
    torch.manual_seed(17)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert)))
    build_param_groups(model, 0.01, text_train_layers=1)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]])
    att = (ids > 0).long()
    trained = model.text_encoder.encoder.layer[0].attention.self.query.weight

    def attention_kernels(amp: bool = True) -> tuple[set[str], torch.Tensor, torch.Tensor | None]:
        trained.grad = None
        with KernelLayouts("scaled_dot_product") as seen, torch.autocast("cpu", torch.bfloat16, enabled=amp):
            feats = model.encode_text(ids, att)[0]
        if feats.requires_grad:
            (feats.float() * torch.linspace(-1, 1, feats.numel()).view_as(feats)).sum().backward()
        return set(seen.seen), feats.detach().float(), trained.grad
    flash = {"_scaled_dot_product_flash_attention_for_cpu"}

    kernels, feats, grad = attention_kernels()
    assert kernels == set() and grad is not None  # the math kernel is composite: its matmuls reach the dispatcher
    assert attention_kernels(amp=False)[0] == flash
    with torch.no_grad():
        assert attention_kernels()[0] == flash
    frozen = [p for p in model.text_encoder.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    assert attention_kernels()[0] == flash
    for p in frozen:
        p.requires_grad_(True)
    monkeypatch.setattr(lavt_module, "attention_kernels", lambda encoder, device: contextlib.nullcontext())
    kernels, fused_feats, fused_grad = attention_kernels()
    assert kernels == flash
    torch.testing.assert_close(feats, fused_feats, atol=0.03, rtol=0.02)
    torch.testing.assert_close(grad, fused_grad, atol=0.03 * grad.abs().max().item(), rtol=0.02)

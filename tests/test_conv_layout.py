"""models/conv.py and models/decoder.py: the 3x3 weights stored in the order their training path reads them. The
layout must change no value (outputs, gradients and optimizer steps bit for bit) and must spare the copies it is for:
the weight's copy in Winograd's forward and the gradient's copy back into the weight's layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models.winograd as winograd
from models import build_model
from models.conv import WEIGHT_LAYOUTS, Conv3x3, laid_out, training_layout
from models.decoder import SimpleDecoder, build_decoder, decoder_layouts

from .helpers_model import tiny_cfg

BF16, F32 = torch.bfloat16, torch.float32
CL = torch.channels_last


@pytest.fixture
def no_amx(monkeypatch):
    """Winograd's thresholds as on AVX-512 CPUs without AMX (on AMX, bf16 convolutions stay with oneDNN; on AVX2 float32
    takes it from fewer tiles)."""
    monkeypatch.setattr(winograd, "has_amx", lambda: False)
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "AVX512")


class WeightCopies(TorchDispatchMode):
    """Counts the copies (clone, copy_, contiguous) of float32 tensors with ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        first = args[1] if name == "copy_" else args[0]
        if name in ("clone", "copy_") and first.dtype == F32 and first.numel() == self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_laid_out_keeps_the_values_in_the_named_order():
    w = torch.randn(4, 5, 3, 3)
    strides = {"oihw": (45, 9, 3, 1), "ohwi": (45, 1, 15, 5), "hwio": (1, 4, 60, 20)}  # [O, C, 3, 3] = [4, 5, 3, 3]
    assert set(strides) == set(WEIGHT_LAYOUTS)
    for layout, stride in strides.items():
        v = laid_out(w, layout)
        assert torch.equal(v, w) and v.stride() == stride
    with pytest.raises(ValueError, match="weight layout must be one of"):
        laid_out(w, "iohw")


def test_training_layout_follows_the_path(no_amx, monkeypatch):
    # Winograd (both widths >= 256, enough tiles: 392 in bf16, 225 in float32): [3, 3, C, O]
    assert training_layout(480, 384, 392, BF16, "cpu", True, True) == "hwio"
    assert training_layout(480, 384, 225, F32, "cpu", True, True) == "hwio"
    assert training_layout(480, 384, 224, F32, "cpu", False, True) == "ohwi"
    # too few tiles: oneDNN in bf16 ([O, 3, 3, C] for the channels-last maps), the matrix-product gradient in float32
    assert training_layout(1152, 384, 98, BF16, "cpu", True, True) == "ohwi"
    assert training_layout(1152, 384, 98, F32, "cpu", True, True) == "oihw"
    # narrow (the demo's decoder): oneDNN in either precision
    assert training_layout(96, 64, 4608, F32, "cpu", True, True) == "ohwi"
    assert training_layout(480, 384, 392, BF16, "cpu", True, False) == "ohwi"  # Winograd off
    assert training_layout(480, 384, 392, BF16, "cuda", True, True) == "oihw"  # cuDNN chooses its own
    monkeypatch.setattr(winograd, "has_amx", lambda: True)
    assert training_layout(480, 384, 392, BF16, "cpu", True, True) == "ohwi"


def test_decoder_layouts_from_the_training_shape(no_amx):
    # Swin-T at 224 px, batch 2: levels 4 / 3 / 2 at 14x14 / 28x28 / 56x56 maps, 98 / 392 / 1568 tiles
    def per_level(*layouts):
        return tuple((layout, layout) for layout in layouts)  # the official widths: both convolutions of a level alike

    assert decoder_layouts(96, 384, 2, 224, BF16, "cpu", True, True) == per_level("ohwi", "hwio", "hwio")
    assert decoder_layouts(96, 384, 2, 224, F32, "cpu", True, True) == per_level("oihw", "hwio", "hwio")
    # 100 px: maps 7x7 / 13x13 / 25x25 (rounded up), 32 / 98 / 338 tiles: Winograd at level 2 in float32 only
    assert decoder_layouts(96, 384, 2, 100, BF16, "cpu", True, True) == per_level("ohwi", "ohwi", "ohwi")
    assert decoder_layouts(96, 384, 2, 100, F32, "cpu", True, True) == per_level("oihw", "oihw", "hwio")
    # Swin-T at 480 px: level 4 at 30x30, 450 tiles: Winograd there too (stage 3's map, not stage 4's 15x15)
    assert decoder_layouts(96, 384, 2, 480, BF16, "cpu", True, True)[0] == ("hwio", "hwio")
    # a decoder wider than level 4's input (12 x embed dim: 96 and 240 channels, below 256): its first convolution
    # narrow, its second wide
    assert decoder_layouts(8, 256, 2, 128, F32, "cpu", True, True)[0] == ("ohwi", "oihw")
    assert decoder_layouts(20, 256, 2, 128, F32, "cpu", True, True)[0] == ("ohwi", "oihw")


def test_build_model_lays_the_decoder_out_for_its_config(no_amx):
    def layouts(size, dtype, device="cpu"):
        cfg = tiny_cfg(MODEL__DECODER_HIDDEN=256, DATA__SIZE=size, TRAIN__BATCH_SIZE=2)
        model = build_model(cfg, pretrained=False, device=device, dtype=dtype)
        return [model.classifier.get_submodule(f"conv{i}_{level}").layout for level in "432" for i in (1, 2)]

    # embed dim 8 (conv1_4 reads 96 channels: oneDNN); 128 px, batch 2: levels 4 / 3 / 2 at 32 / 128 / 512 tiles
    assert layouts(128, BF16) == ["ohwi"] * 4 + ["hwio"] * 2
    assert layouts(128, F32) == ["ohwi", "oihw", "oihw", "oihw", "hwio", "hwio"]
    assert layouts(64, BF16) == ["ohwi"] * 6
    assert layouts(128, BF16, "meta") == ["oihw"] * 6  # not a CPU: the usual order
    plain = build_decoder(8)  # built alone, without a training shape: the usual order too
    assert [plain.get_submodule(f"conv{i}_{level}").layout for level in "432" for i in (1, 2)] == ["oihw"] * 6


PATHS = {  # map side, batch 2: 1568, 512, 98 and 50 tiles
    "winograd bf16": (BF16, 56, True), "winograd float32": (F32, 32, True), "onednn bf16": (BF16, 14, True),
    "onednn bf16 nchw": (BF16, 10, False), "matmul gradient": (F32, 14, True), "matmul gradient nchw": (F32, 14, False),
}


@pytest.mark.parametrize("path", PATHS)
def test_layouts_give_the_same_outputs_and_gradients(no_amx, path):
    dtype, side, channels_last = PATHS[path]
    torch.manual_seed(0)
    x = torch.randn(2, 256, side, side)
    x = x.contiguous(memory_format=CL) if channels_last else x
    gy = torch.randn(2, 256, side, side)
    ref = Conv3x3(256, 256, matmul_grad=True, winograd=True)
    results = []
    for layout in WEIGHT_LAYOUTS:
        conv = Conv3x3(256, 256, matmul_grad=True, winograd=True, layout=layout)
        with torch.no_grad():
            conv.weight.copy_(ref.weight)
        xi = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", BF16, enabled=dtype == BF16):
            y = conv(xi)
        y.float().backward(gy)
        results.append((y, xi.grad, conv.weight.grad))
    for y, gx, gw in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(gx, results[0][1]) and torch.equal(gw, results[0][2])


@pytest.mark.parametrize("dtype,side", [(BF16, 56), (F32, 32)])
def test_winograd_reads_and_returns_the_hwio_weight_without_copies(no_amx, dtype, side):
    """The forward's kernel transform reads the weight in place and the backward's gradient arrives in its layout (a
    tensor hook sees the gradient before it is accumulated); in [O, C, 3, 3] both take a copy."""
    x = torch.randn(2, 256, side, side).contiguous(memory_format=CL)
    for layout, copies in (("hwio", 0), ("oihw", 1)):
        conv = Conv3x3(256, 288, winograd=True, layout=layout)
        arrived: list[torch.Tensor] = []
        conv.weight.register_hook(arrived.append)
        mode = WeightCopies(conv.weight.numel())
        with mode, torch.autocast("cpu", BF16, enabled=dtype == BF16):
            y = conv(x)
        assert type(y.grad_fn).__name__ == "_WinogradConv3x3Backward"
        assert mode.count == copies, layout
        y.float().sum().backward()
        assert (arrived[0].stride() == conv.weight.stride()) == (layout == "hwio"), layout


def test_onednn_bf16_gradient_arrives_in_the_channels_last_layout(no_amx):
    conv = Conv3x3(256, 256, winograd=True, layout="ohwi")
    arrived: list[torch.Tensor] = []
    conv.weight.register_hook(arrived.append)
    x = torch.randn(2, 256, 14, 14).contiguous(memory_format=CL)  # 98 tiles: oneDNN
    with torch.autocast("cpu", BF16):
        y = conv(x)
    y.float().sum().backward()
    assert arrived[0].stride() == conv.weight.stride() == (2304, 1, 768, 256)


def test_decoder_trains_the_same_in_any_layout(no_amx):
    """Two bf16 training steps with the fused AdamW (its moments take the weights' layout): bit-identical weights;
    and a state dict moves between layouts unchanged."""
    layouts = decoder_layouts(32, 256, 2, 112, BF16, "cpu", True, True)
    assert layouts == (("ohwi",) * 2, ("ohwi",) * 2, ("hwio",) * 2)  # 7x7 / 14x14 / 28x28: Winograd at level 2 only
    torch.manual_seed(0)
    maps = [torch.randn(2, c, s, s).contiguous(memory_format=CL) for c, s in ((256, 4), (128, 7), (64, 14), (32, 28))]
    target = torch.randint(0, 2, (2, 28, 28))
    decoders = []
    for lay in ((("oihw",) * 2,) * 3, layouts):
        torch.manual_seed(1)
        decoders.append(SimpleDecoder(256, channels_last=True, hidden=256, matmul_grad=True, winograd=True,
                                      weight_layouts=lay))
    for dec in decoders:
        opt = torch.optim.AdamW(dec.parameters(), lr=1e-2, fused=True)
        for _ in range(2):
            with torch.autocast("cpu", BF16):
                loss = torch.nn.functional.cross_entropy(dec(*maps).float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    plain, laid = decoders
    assert laid.conv1_2.weight.stride() != plain.conv1_2.weight.stride()  # still laid out after the steps
    for (name, a), b in zip(plain.state_dict().items(), laid.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = SimpleDecoder(256, channels_last=True, hidden=256, winograd=True, weight_layouts=layouts)
    fresh.load_state_dict(plain.state_dict())
    assert fresh.conv1_2.weight.stride() == laid.conv1_2.weight.stride()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))


def test_state_dicts_hold_the_usual_layout(tmp_path):
    """Checkpoints hold [O, C, 3, 3] contiguous weights (``.view`` works on them); loading one copies the values
    into the module's own layout."""
    torch.manual_seed(0)
    laid = SimpleDecoder(256, hidden=256, winograd=True, weight_layouts=(("ohwi", "hwio"),) * 3)
    state = laid.state_dict()
    assert all(state[f"conv{i}_{lv}.weight"].is_contiguous() for lv in "432" for i in (1, 2))
    assert torch.equal(state["conv2_2.weight"], laid.conv2_2.weight) and not laid.conv2_2.weight.is_contiguous()
    assert laid.state_dict(keep_vars=True)["conv2_2.weight"] is laid.conv2_2.weight
    torch.save(state, tmp_path / "decoder.pth")
    other = SimpleDecoder(256, hidden=256, winograd=True, weight_layouts=(("hwio", "oihw"),) * 3)
    other.load_state_dict(torch.load(tmp_path / "decoder.pth", weights_only=True))
    assert other.conv1_2.weight.stride() == laid_out(other.conv1_2.weight, "hwio").stride()
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))



def test_a_layout_pair_for_each_level():
    """One pair for each of levels 4, 3 and 2: two pairs would leave level 2 unbuilt, and the decoder failing first
    in its forward pass."""
    with pytest.raises(ValueError, match="zip"):
        SimpleDecoder(256, hidden=256, weight_layouts=(("oihw", "oihw"),) * 2)

def test_optimizer_state_takes_the_layout_of_its_parameter():
    """Moments saved beside a weight in one layout, resumed beside the same weight in another (a checkpoint of older
    code, or of a run at another batch): the fused AdamW continues exactly as the uninterrupted run. Loaded as they
    were saved, they would be paired with the wrong elements."""
    from engine.optim import load_optimizer_state

    torch.manual_seed(0)
    w, grads = torch.randn(8, 16, 3, 3), [torch.randn(8, 16, 3, 3) for _ in range(3)]
    saved = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([saved], lr=0.1, fused=True)
    saved.grad = grads[0]
    opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    results = {}
    for loader in ("load_optimizer_state", "load_state_dict"):
        resumed = torch.nn.Parameter(laid_out(saved.detach(), "hwio"))
        opt2 = torch.optim.AdamW([resumed], lr=0.1, fused=True)
        if loader == "load_optimizer_state":
            load_optimizer_state(opt2, copy.deepcopy(checkpoint))
        else:
            opt2.load_state_dict(copy.deepcopy(checkpoint))
        for g in grads[1:]:
            resumed.grad = laid_out(g, "hwio")
            opt2.step()
        results[loader] = resumed.detach()
    for g in grads[1:]:  # the uninterrupted run
        saved.grad = g
        opt.step()
    assert torch.equal(results["load_optimizer_state"], saved.detach())
    assert not torch.allclose(results["load_state_dict"], saved.detach())  # what the layout fix is for

"""load_pretrained_swin: a Swin ImageNet file that does not fit the backbone is refused, naming the keys, and
nothing is loaded (a partial load would train from a half-initialised backbone without a word)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models import CheckpointError, load_pretrained_swin
from models.swin import build_backbone


def _backbone(embed_dim: int = 8, depths: tuple[int, ...] = (2, 2, 2, 2), heads=(1, 2, 2, 4)) -> torch.nn.Module:
    return build_backbone(embed_dim, list(depths), list(heads), 4, 12, [1, 1, 1, 1])


def _imagenet_file(folder: Path, backbone: torch.nn.Module, layout: str = "model") -> Path:
    """``backbone``'s Swin weights as a Swin classification checkpoint (no PWAM, gates or stage norms; a final
    norm and a head)."""
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in backbone.state_dict().items()
        if ".fusion." not in k and ".res_gate." not in k and not k.startswith("norm")
    }
    width = backbone.layers[-1].blocks[0].norm1.weight.shape[0]
    state.update(
        {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width), "head.weight": torch.zeros(5, width)}
    )
    if layout == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state if layout in ("plain", "ddp") else {layout: state}, folder / "swin.pth")
    return folder / "swin.pth"


@pytest.mark.parametrize("layout", ["model", "state_dict", "plain", "ddp"])
def test_a_fitting_file_loads_and_reports_what_it_skips(tmp_path, caplog, layout):
    """Weights under 'model' (the Swin releases), 'state_dict', at the top, or with DDP's 'module.' prefix."""
    torch.manual_seed(0)
    path = _imagenet_file(tmp_path, _backbone(), layout)
    target = _backbone()
    with caplog.at_level(logging.INFO, logger="models.weights"):
        skipped = load_pretrained_swin(target, path)
    assert sorted(skipped) == ["head.weight", "norm.bias", "norm.weight"]
    file_state = torch.load(path, weights_only=True)
    file_state = file_state.get(layout, file_state)
    key = "layers.1.blocks.1.mlp.fc1.weight"
    assert torch.equal(target.state_dict()[key], file_state[f"module.{key}" if layout == "ddp" else key])
    assert "skipped from the file: norm.weight, norm.bias, head.weight" in caplog.text


def test_a_file_of_the_backbone_alone_skips_nothing(tmp_path, caplog):
    """The log line counts what loaded and what kept its init, and says when the file held nothing else."""
    torch.manual_seed(0)
    path = _imagenet_file(tmp_path, _backbone(), "plain")
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if k not in ("norm.weight", "norm.bias",
                                                                                        "head.weight")}  # fmt: skip
    torch.save(state, path)
    target = _backbone()
    with caplog.at_level(logging.INFO, logger="models.weights"):
        assert load_pretrained_swin(target, path) == []
    own = len(target.state_dict())
    assert caplog.messages[-1] == (
        f"Swin init from {path}: {len(state)} tensors loaded; skipped from the file: nothing; left at their init: "
        f"{own - len(state)} tensors (PWAM, gates, stage norms)"
    )


@pytest.mark.parametrize(
    "source,message",
    [
        (
            dict(embed_dim=16),
            r"\d+ weights of another shape: patch_embed.proj.weight \(file \[16, 3, 4, 4\] vs model \[8",
        ),
        (
            dict(heads=(2, 2, 2, 4)),
            r"2 weights of another shape: layers.0.blocks.0.attn.relative_position_bias_table "
            r"\(file \[49, 2\] vs model \[49, 1\]\), layers.0.blocks.1[^;]*$",
        ),
        (dict(depths=(2, 2, 3, 2)), r"13 weights the backbone lacks: layers.2.blocks.2.norm1.weight, .* and 5 more$"),
        (dict(depths=(2, 2, 1, 2)), r"backbone weights missing from the file: layers.2.blocks.1."),
    ],
    ids=["embed_dim", "heads", "deeper", "shallower"],
)
def test_a_file_that_does_not_fit_is_refused_and_nothing_loads(tmp_path, source, message):
    torch.manual_seed(1)
    path = _imagenet_file(tmp_path, _backbone(**source))
    target = _backbone()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"swin.pth does not fit the Swin backbone .*nothing loaded: .*" + message
    ):
        load_pretrained_swin(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_file_without_the_patch_embedding_is_refused(tmp_path):
    """The patch embedding is expected from the file unless the backbone has the convolutional stem (which has no
    ImageNet counterpart): a file without it does not fit the usual backbone."""
    torch.manual_seed(1)
    path = _imagenet_file(tmp_path, _backbone())
    state = torch.load(path, weights_only=True)
    torch.save({"model": {k: v for k, v in state["model"].items() if not k.startswith("patch_embed.")}}, path)
    with pytest.raises(CheckpointError, match=r"backbone weights missing from the file: patch_embed\.norm\.bias"):
        load_pretrained_swin(_backbone(), path)

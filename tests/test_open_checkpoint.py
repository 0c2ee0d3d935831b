"""open_checkpoint on tiny official-format files (no config stored): the architecture read from the weights and args
equals the config the model was built from; ambiguous and contradictory cases end in one line; overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import get_config
from models import CheckpointError, build_model, checkpoint_format, to_official
from tools.cli import run_cli
from tools.open_checkpoint import open_checkpoint

from .conftest import load_official_file
from .helpers_model import save_tiny_bert
from .helpers_train import make_tiny_text_encoder

#: the settings that shape the network, compared between the built and the opened model
SHAPE_KEYS = (
    "MODEL.SWIN.EMBED_DIM", "MODEL.SWIN.DEPTHS", "MODEL.SWIN.NUM_HEADS", "MODEL.SWIN.WINDOW_SIZE",
    "MODEL.SWIN.PATCH_SIZE", "MODEL.SWIN.MLP_RATIO", "MODEL.SWIN.STEM", "MODEL.DECODER_HIDDEN",
    "MODEL.FUSION.NUM_HEADS", "MODEL.NAME",
)  # fmt: skip
VARIANTS = {
    # the official shape in small: one-head PWAMs, window 4, patch stem, official decoder width
    "lavt": {"MODEL.SWIN.DEPTHS": [1, 1, 1, 1], "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1], "MODEL.SWIN.WINDOW_SIZE": 4},
    # everything off the defaults: depths, heads, window 5, PWAM heads, conv stem, decoder width, MLP ratio
    "lavt_one": {
        "MODEL.SWIN.DEPTHS": [1, 3, 1, 2], "MODEL.SWIN.NUM_HEADS": [1, 2, 2, 4], "MODEL.SWIN.WINDOW_SIZE": 5,
        "MODEL.FUSION.NUM_HEADS": [2, 1, 2, 4], "MODEL.SWIN.STEM": "conv", "MODEL.DECODER_HIDDEN": 12,
        "MODEL.SWIN.MLP_RATIO": 2.0,
    },
}  # fmt: skip


def get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_tiny_text_encoder(tmp_path_factory.getbasetemp() / "tiny_env" / "text_encoder")


def built(encoder: Path, packaging: str):
    opts = {
        "MODEL.NAME": packaging,
        "MODEL.SWIN.EMBED_DIM": 8,
        "MODEL.SWIN.DROP_PATH_RATE": 0.0,
        "MODEL.TEXT.ENCODER": str(encoder),
        "MODEL.PRETRAINED_SWIN": "",
        "DATA.SIZE": 40,
        **VARIANTS[packaging],
    }
    cfg = get_config(None, [x for kv in opts.items() for x in kv])
    torch.manual_seed(0)
    return cfg, build_model(cfg, pretrained=False).eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def official(request, encoder, tmp_path_factory):
    """(config, model, path) of a model saved as the authors' train.py saves it (args, relative_position_index
    buffers; lavt_one also from a DDP-wrapped model, keys prefixed by 'module.')."""
    cfg, model = built(encoder, request.param)
    packed = to_official(model, request.param, img_size=40, dataset="refcocog", splitBy="umd")
    if request.param == "lavt_one":
        packed["model"] = {f"module.{k}": v for k, v in packed["model"].items()}
    path = tmp_path_factory.mktemp("official") / f"{request.param}.pth"
    torch.save({**packed, "epoch": 39, "optimizer": {"state": {}, "param_groups": []}}, path)
    return cfg, model, path


def test_architecture_read_from_the_weights(official, encoder):
    cfg, model, path = official
    opened_cfg, opened = open_checkpoint(path, overrides=["MODEL.TEXT.ENCODER", str(encoder)])
    assert {k: get(opened_cfg, k) for k in SHAPE_KEYS} == {k: get(cfg, k) for k in SHAPE_KEYS}
    assert (opened_cfg.DATA.SIZE, opened_cfg.DATA.DATASET, opened_cfg.DATA.SPLIT_BY) == (40, "refcocog", "umd")
    own, other = model.state_dict(), opened.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
    ids = torch.tensor([[101, 1996, 2417, 102, 0]])
    with torch.no_grad():
        x = torch.randn(1, 3, 40, 40)
        assert torch.equal(model(x, ids, (ids > 0).long()), opened(x, ids, (ids > 0).long()))


def test_official_layout(official):
    """What the authors' strict load_state_dict expects: their Swin's relative_position_index buffers (their formula,
    written out here), BERT without pooler and beside the model for lavt, args naming the packaging and the heads."""
    cfg, model, path = official
    content = load_official_file(path)
    window = cfg.MODEL.SWIN.WINDOW_SIZE
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    index = torch.from_numpy(rel[..., 0] * (2 * window - 1) + rel[..., 1])
    keys = [k for k in content["model"] if k.endswith("relative_position_index")]
    assert len(keys) == sum(cfg.MODEL.SWIN.DEPTHS) and all(torch.equal(content["model"][k], index) for k in keys)
    text_inside = any(".text_encoder." in f".{k}" for k in content["model"])
    assert text_inside == (cfg.MODEL.NAME == "lavt_one") and ("bert_model" in content) == (cfg.MODEL.NAME == "lavt")
    assert not any("pooler" in k for k in [*content["model"], *content.get("bert_model", {})])
    heads = list(cfg.MODEL.FUSION.NUM_HEADS)
    assert content["args"].model == cfg.MODEL.NAME
    assert content["args"].mha == ("" if heads == [1, 1, 1, 1] else "-".join(map(str, heads)))


def test_ambiguous_heads_need_a_config(encoder, tmp_path, capsys):
    """Without args no shape says the PWAM heads: one line asks for a config; a config file or --opts settles it."""
    cfg, model = built(encoder, "lavt_one")
    bare = tmp_path / "bare.pth"
    torch.save({"model": model.state_dict()}, bare)
    argv = ["--checkpoint", str(bare), "--image", "x.png", "--text", "a", "--opts", "MODEL.TEXT.ENCODER", str(encoder)]
    from tools import demo

    assert run_cli("python -m tools.demo", demo.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m tools.demo: error: ValueError: checkpoint ")
    assert "MODEL.FUSION.NUM_HEADS is ambiguous" in err and "--cfg_file" in err
    opts = ["MODEL.TEXT.ENCODER", str(encoder), "MODEL.FUSION.NUM_HEADS", "[2, 1, 2, 4]"]
    assert open_checkpoint(bare, overrides=opts)[0].MODEL.FUSION.NUM_HEADS == [2, 1, 2, 4]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.dump())
    opened_cfg, _ = open_checkpoint(bare, cfg_file)
    assert {k: get(opened_cfg, k) for k in SHAPE_KEYS} == {k: get(cfg, k) for k in SHAPE_KEYS}


def test_config_file_that_contradicts_the_weights(official, tmp_path):
    cfg, _, path = official
    cfg_file = tmp_path / "wrong.yaml"
    cfg_file.write_text("MODEL:\n  SWIN:\n    WINDOW_SIZE: 7\nDATA:\n  SIZE: 56\n")
    window = cfg.MODEL.SWIN.WINDOW_SIZE
    message = rf"wrong.yaml sets MODEL.SWIN.WINDOW_SIZE 7, but the weights of .* say {window}"
    with pytest.raises(ValueError, match=message):
        open_checkpoint(path, cfg_file)
    cfg_file.write_text("DATA:\n  SIZE: 56\n  ROOT: /data/refer\n")  # settings outside the weights: the file's
    opened_cfg, _ = open_checkpoint(path, cfg_file, ["MODEL.TEXT.ENCODER", cfg.MODEL.TEXT.ENCODER])
    assert opened_cfg.DATA.SIZE == 56 and opened_cfg.DATA.ROOT == "/data/refer"


def test_args_that_name_the_other_packaging_are_refused(official, encoder, tmp_path):
    """The args' ``model`` says where BERT's weights are; a file whose keys say otherwise is refused in one line."""
    cfg, _, path = official
    content = load_official_file(path)
    other = "lavt" if cfg.MODEL.NAME == "lavt_one" else "lavt_one"
    content["args"].model = other
    torch.save(content, tmp_path / "renamed.pth")
    message = f"renamed.pth: its args say model '{other}', but its key layout is '{cfg.MODEL.NAME}'"
    with pytest.raises(CheckpointError, match=re.escape(message) + "$"):
        open_checkpoint(tmp_path / "renamed.pth", overrides=["MODEL.TEXT.ENCODER", str(encoder)])


def test_text_encoder_and_data_root_overrides(official, encoder, tmp_path):
    cfg, _, path = official
    opts = ["MODEL.TEXT.ENCODER", str(encoder), "DATA.ROOT", str(tmp_path / "refer")]
    opened_cfg, _ = open_checkpoint(path, overrides=opts)
    assert opened_cfg.MODEL.TEXT.ENCODER == str(encoder) and opened_cfg.DATA.ROOT == str(tmp_path / "refer")
    wider = save_tiny_bert(tmp_path / "bert32", hidden=32, layers=2)
    with pytest.raises(ValueError, match=r"bert32\) is not the text encoder of .*: hidden 32 there, 16 in the"):
        open_checkpoint(path, overrides=["MODEL.TEXT.ENCODER", str(wider)])
    advice = r"the weights of .* need its config.json and vocabulary .*, given with --opts MODEL.TEXT.ENCODER <folder>"
    with pytest.raises(FileNotFoundError, match=rf"^text encoder folder .*nowhere.* not found.*: {advice}\. Nothi"):
        open_checkpoint(path, overrides=["MODEL.TEXT.ENCODER", str(tmp_path / "nowhere")])


def test_files_that_are_no_lavt(tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: no backbone.patch_embed.norm.weight \(not a LAVT"):
        open_checkpoint(tmp_path / "other.pth")
    torch.save({"model": {}, "args": argparse.Namespace(mha="4-4")}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="empty.pth: no backbone"):
        open_checkpoint(tmp_path / "empty.pth")


def test_the_format_is_read_from_the_first_bytes(tmp_path):
    """``checkpoint_format``: a torch.save zip archive and its legacy pickle format are "torch", a safetensors file
    "safetensors", whatever the file names say."""
    from safetensors.torch import save_file

    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.safetensors")
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    save_file({"a": torch.zeros(2)}, tmp_path / "tensors.pth")
    assert (tmp_path / "legacy.bin").read_bytes()[:1] == b"\x80"  # (a pickle, not a zip archive)
    found = {name: checkpoint_format(tmp_path / name) for name in ("zip.safetensors", "legacy.bin", "tensors.pth")}
    assert found == {"zip.safetensors": "torch", "legacy.bin": "torch", "tensors.pth": "safetensors"}


@pytest.mark.parametrize("cut", ["a gap in stage 1's blocks", "no stage 3"])
def test_swin_blocks_that_are_not_four_stages_of_numbered_blocks_are_refused(encoder, tmp_path, cut):
    """Either fault alone (the official layout of the tiny model): one line naming the file and the blocks found."""
    from models import infer_architecture

    state = to_official(built(encoder, "lavt")[1], "lavt", img_size=40, dataset="refcocog", splitBy="umd")["model"]
    if cut == "no stage 3":
        state = {k: v for k, v in state.items() if not k.startswith("backbone.layers.3.blocks.")}
    else:
        last = max(int(k.split(".")[4]) for k in state if k.startswith("backbone.layers.1.blocks."))
        prefix = f"backbone.layers.1.blocks.{last}."
        state = {k.replace(prefix, f"backbone.layers.1.blocks.{last + 1}."): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"^f\.pth: Swin blocks \{.*\} are not 4 stages of blocks 0\.\.n-1$"):
        infer_architecture({"model": state}, where="f.pth")


@pytest.mark.parametrize(
    "key",
    [
        "backbone.patch_embed.proj.weight", "backbone.layers.2.blocks.0.attn.relative_position_bias_table",
        "backbone.layers.0.blocks.0.mlp.fc1.weight", "classifier.conv1_1.weight",
        "backbone.layers.0.fusion.image_lang_att.f_key.0.weight",
    ],
)  # fmt: skip
def test_a_lavt_file_missing_a_tensor_names_the_file_and_the_tensor(encoder, tmp_path, key):
    """Each tensor the architecture is read from, missing from an otherwise complete LAVT checkpoint (the
    official layout of the tiny model): one line that names the file and the tensor."""
    packed = to_official(built(encoder, "lavt")[1], "lavt", img_size=40, dataset="refcocog", splitBy="umd")
    assert key in packed["model"]
    del packed["model"][key]
    torch.save(packed, tmp_path / "cut.pth")
    message = f"checkpoint {tmp_path / 'cut.pth'}: no {key} (not a LAVT checkpoint?)"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        open_checkpoint(tmp_path / "cut.pth")


def test_the_official_codes_own_state_dict():
    """The recorded fixture holds a state dict made by the authors' model (tests/fixtures): its architecture read from
    the weights is the one it was recorded with, and to_official writes exactly its keys, shapes and dtypes (what
    their strict load_state_dict checks)."""
    from models import infer_architecture

    from .helpers_model import FIXTURE, fixture_cfg

    reference = torch.load(FIXTURE, weights_only=True)
    official_state, recorded = reference["checkpoint"]["model"], reference["config"]
    args = argparse.Namespace(model="lavt", mha="", swin_type="base", window12=False, img_size=224)
    arch = infer_architecture({"model": official_state, "args": args})
    assert arch.facts == {
        "MODEL.SWIN.EMBED_DIM": recorded["embed_dim"], "MODEL.SWIN.DEPTHS": recorded["depths"],
        "MODEL.SWIN.NUM_HEADS": recorded["num_heads"], "MODEL.SWIN.WINDOW_SIZE": recorded["window_size"],
        "MODEL.SWIN.PATCH_SIZE": recorded["patch_size"], "MODEL.SWIN.MLP_RATIO": recorded["mlp_ratio"],
        "MODEL.SWIN.STEM": "patch", "MODEL.DECODER_HIDDEN": 0, "MODEL.REFINE": 0,
        "MODEL.TEXT.DIM": recorded["lang_dim"],
        "MODEL.FUSION.NUM_HEADS": recorded["num_heads_fusion"],
    }  # fmt: skip
    assert arch.hints == {"MODEL.TEXT.ENCODER": "", "MODEL.NAME": "lavt", "DATA.SIZE": 224} and arch.text is None
    model = build_model(fixture_cfg(reference), pretrained=False)
    model.load_state_dict({k: v for k, v in official_state.items() if not k.endswith("relative_position_index")})
    packed = to_official(model, "lavt")["model"]
    assert packed.keys() == official_state.keys()
    for key, value in official_state.items():
        assert packed[key].shape == value.shape and packed[key].dtype == value.dtype, key
        assert torch.equal(packed[key], value), key

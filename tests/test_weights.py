"""Loading weights: official 'lavt' / 'lavt_one' files, this project's checkpoints, Swin ImageNet init, bad files."""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import CheckpointError, build_model, load_pretrained_swin, load_weights, read_checkpoint, to_official
from models.swin import build_backbone

from .helpers_model import FIXTURE, fixture_cfg, save_tiny_bert, tiny_cfg


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def bert768(tmp_path_factory):
    """A random 768-wide BERT folder: the width the released checkpoints (and the fixture) use."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert768"), hidden=768, layers=1)


def _official_extras() -> dict:
    return {"args": argparse.Namespace(swin_type="base", window12=True, lr=5e-5), "epoch": 39,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
            "lr_scheduler": {"last_epoch": 10, "base_lrs": [5e-5]}}


def _check_logits(model, reference) -> None:
    with torch.no_grad():
        logits = model.eval().segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    assert (logits - reference["logits"]).abs().max() < 1e-5


def test_official_lavt_file_without_text_encoder(reference, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({**reference["checkpoint"], **_official_extras()}, path)
    model = build_model(fixture_cfg(reference))
    content = load_weights(model, path)
    assert content["epoch"] == 39 and content["args"].swin_type == "base"
    _check_logits(model, reference)


def _bert_state(folder) -> dict:
    from transformers import BertModel

    return BertModel.from_pretrained(folder, local_files_only=True).state_dict()  # with pooler, like a raw BERT


@pytest.mark.parametrize("packaging", ["lavt", "lavt_one"])
def test_official_files_with_text_encoder(reference, bert768, tmp_path, packaging):
    bert = _bert_state(bert768)
    model_sd = dict(reference["checkpoint"]["model"])
    if packaging == "lavt":
        content = {"model": model_sd, "bert_model": {k: v for k, v in bert.items() if not k.startswith("pooler")}}
    else:  # lavt_one, saved from a DDP-wrapped model by an older transformers (position_ids kept)
        model_sd.update({f"text_encoder.{k}": v for k, v in bert.items()})
        content = {"model": {f"module.{k}": v for k, v in model_sd.items()}}
    path = tmp_path / f"{packaging}.pth"
    torch.save({**content, **_official_extras()}, path)
    model = build_model(fixture_cfg(reference, MODEL__TEXT__ENCODER=str(bert768)), pretrained=False)
    load_weights(model, path)
    _check_logits(model, reference)
    own = model.text_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in bert.items() if k in own)
    ids = torch.tensor([[2, 5, 7, 3, 0]])
    with torch.no_grad():  # the text encoder drives the same network
        out = model(reference["image"][:1], ids, (ids > 0).long())
    assert out.shape == (1, 2, 224, 224)


def test_project_checkpoint_round_trip(tmp_path, bert768):
    torch.manual_seed(0)
    cfg = tiny_cfg(MODEL__TEXT__ENCODER=str(bert768))
    model = build_model(cfg, pretrained=False)
    path = tmp_path / "own.pth"
    torch.save({"model": model.state_dict(), "config": cfg.dump(), "epoch": 3}, path)
    torch.manual_seed(1)
    other = build_model(cfg, pretrained=False)
    assert load_weights(other, path)["epoch"] == 3
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("packaging", ["lavt", "lavt_one"])
def test_to_official_round_trip(tmp_path, bert768, packaging):
    cfg = tiny_cfg(MODEL__TEXT__ENCODER=str(bert768))
    model = build_model(cfg, pretrained=False)
    packed = to_official(model, packaging)
    assert ("bert_model" in packed) == (packaging == "lavt")
    torch.save(packed, tmp_path / "x.pth")
    other = build_model(cfg, pretrained=False)
    load_weights(other, tmp_path / "x.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_a_file_saved_on_a_gpu_is_read_on_a_cpu(tmp_path, monkeypatch):
    """The released weights were saved on GPUs: their storages are tagged ``cuda:0``, which ``torch.load`` alone
    refuses on a machine without CUDA. Written here by tagging a CPU save as a GPU's."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"model": {"w": torch.arange(4.0)}}, tmp_path / "gpu.pth")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="on a CUDA device"):  # the file is what a GPU writes
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    w = read_checkpoint(tmp_path / "gpu.pth")["model"]["w"]
    assert w.device.type == "cpu" and w.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_an_unforeseen_load_error_is_one_short_line(tmp_path, monkeypatch):
    """A ``torch.load`` failure of no known kind: its type and the first 300 characters of its text, on one line."""
    path = tmp_path / "x.pth"
    torch.save({}, path)

    def fail(*args, **kwargs):
        raise RuntimeError("word\n" * 100)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value) == f"cannot read checkpoint {path}: RuntimeError: " + " ".join(["word"] * 100)[:300]


def test_unreadable_and_mismatched_files(tmp_path, reference, bert768):
    model = build_model(tiny_cfg())
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_weights(model, tmp_path / "nope.pth")
    run = tmp_path / "run"  # a run folder given where its checkpoint was meant
    (run / "tensorboard").mkdir(parents=True)
    folder = r"^checkpoint .*run is a folder, not a file: give one of its checkpoints "
    with pytest.raises(CheckpointError, match=folder + r"\(with no .pth or .safetensors file in it\)$"):
        load_weights(model, run)
    for name in ("last.pth", "best.pth", "m.safetensors", "notes.txt"):
        (run / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=folder + r"\(it holds best.pth, last.pth, m.safetensors\)$"):
        load_weights(model, run)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pth: neither a PyTorch"):
        load_weights(model, tmp_path / "garbage.pth")
    (tmp_path / "pickle_like.pth").write_bytes(b"\x80\x02garbage after a pickle protocol byte")
    damaged = r"^cannot read checkpoint .*pickle_like.pth: damaged or not a checkpoint \(Unsupported operand \d+\)$"
    with pytest.raises(CheckpointError, match=damaged):
        load_weights(model, tmp_path / "pickle_like.pth")
    full = tmp_path / "full.pth"
    torch.save({"model": model.state_dict()}, full)
    (tmp_path / "cut.pth").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    cut = r"^cannot read checkpoint .*cut.pth: the file is cut short or damaged \(PytorchStreamReader failed "
    with pytest.raises(CheckpointError, match=cut + r"reading zip archive: failed finding central directory\)"):
        load_weights(model, tmp_path / "cut.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:40])  # torch: EOFError
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*legacy_cut.pth: the file is cut short$"):
        load_weights(model, tmp_path / "legacy_cut.pth")
    torch.save({"model": model.state_dict(), "evil": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    # torch's several paragraphs of advice come down to one line naming the class it refused
    one_line = r"^cannot read checkpoint .*pickled_module.pth: it holds objects other than tensors and plain values, " \
        r"which are never loaded \(Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed " \
        r"global by default\.\)$"
    with pytest.raises(CheckpointError, match=one_line):
        load_weights(model, tmp_path / "pickled_module.pth")
    with zipfile.ZipFile(tmp_path / "notes.pth", "w") as archive:  # a zip, not one torch.save wrote
        archive.writestr("notes/read_me.txt", "weights elsewhere")
    with pytest.raises(CheckpointError, match=r"notes.pth: a zip archive without PyTorch's records: not a torch.save"):
        load_weights(model, tmp_path / "notes.pth")
    (tmp_path / "magic.pth").write_bytes(b"\x80\x02K\x05.")  # a pickle of 5: no torch file's magic number
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*magic.pth: RuntimeError: Invalid magic "):
        load_weights(model, tmp_path / "magic.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_weights(model, tmp_path / "list.pth")
    torch.save(reference["checkpoint"], tmp_path / "other_config.pth")  # embed dim 16 vs 8
    msg = r"(?s)other_config.pth does not fit.*shape mismatches: backbone.*EMBED_DIM is 16 in the file, 8 here"
    with pytest.raises(CheckpointError, match=msg):
        load_weights(model, tmp_path / "other_config.pth")
    lacking = {k: v for k, v in model.state_dict().items() if k != "backbone.patch_embed.norm.weight"}
    torch.save({"model": lacking}, tmp_path / "no_width.pth")  # no token width in the file: none is claimed for it
    with pytest.raises(CheckpointError, match="backbone.patch_embed.norm.weight") as e:
        load_weights(model, tmp_path / "no_width.pth")
    assert "EMBED_DIM" not in str(e.value)
    with_text = build_model(fixture_cfg(reference, MODEL__TEXT__ENCODER=str(bert768)), pretrained=False)
    with pytest.raises(CheckpointError, match="needs its 'bert_model'"):
        load_weights(with_text, tmp_path / "other_config.pth")
    torch.save(to_official(with_text, "lavt"), tmp_path / "has_text.pth")
    hint = r"\n  the file has a text encoder: set MODEL.TEXT.ENCODER \(--ck_bert\) to a folder of that BERT\.(\n|$)"
    with pytest.raises(CheckpointError, match=hint):
        load_weights(build_model(fixture_cfg(reference)), tmp_path / "has_text.pth")
    fresh = build_model(tiny_cfg())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_weights(fresh, tmp_path / "other_config.pth")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half-loaded


def test_a_file_of_another_window_names_the_window_and_lists_at_most_eight_keys(tmp_path):
    # tiny Swin of 8 blocks: window 4 -> 6 changes every block's relative-position table ([49, h] -> [121, h])
    torch.save({"model": build_model(tiny_cfg(MODEL__SWIN__WINDOW_SIZE=6)).state_dict()}, tmp_path / "w6.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model(tiny_cfg()), tmp_path / "w6.pth")
    lines = str(e.value).splitlines()
    assert lines[1].startswith("  8 shape mismatches: backbone.layers.0.blocks.0.attn.relative_position_bias_table: ")
    assert lines[1].count("relative_position_bias_table") == 8 and "more" not in lines[1]  # eight: all of them
    assert lines[-1] == "  relative-position tables differ: check MODEL.SWIN.WINDOW_SIZE (the released files use 12)."
    # two stages deeper: 10 tables, 8 listed
    deeper = tiny_cfg(MODEL__SWIN__WINDOW_SIZE=6, MODEL__SWIN__DEPTHS=[2, 2, 3, 3])
    torch.save({"model": build_model(deeper).state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model(tiny_cfg(MODEL__SWIN__DEPTHS=[2, 2, 3, 3])), tmp_path / "deeper.pth")
    wrong = str(e.value).splitlines()[1]
    assert wrong.startswith("  10 shape mismatches: ") and wrong.endswith(" and 2 more")
    assert wrong.count("relative_position_bias_table") == 8


def _swin_imagenet_state(window: int) -> dict:
    """A checkpoint in the original Swin classification layout (no PWAM/gates, a final norm, a head)."""
    torch.manual_seed(7)
    src = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], window, 12, [1, 1, 1, 1])
    state = {k: v.normal_() if v.is_floating_point() else v for k, v in src.state_dict().items()
             if ".fusion." not in k and ".res_gate." not in k and not k.startswith("norm")}
    state.update({"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64), "head.weight": torch.randn(10, 64),
                  "head.bias": torch.zeros(10)})
    # buffers the original files carry, first here: among the weights, as in those files, not after them
    derived = {"layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49),
               "layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long)}
    return {**derived, **state}


def test_build_model_initialises_swin_from_pretrained_swin_only_when_pretrained(tmp_path):
    """``MODEL.PRETRAINED_SWIN`` reaches the backbone through ``build_model`` (pretrained=True), and is not read
    with pretrained=False (the architecture alone, before a full checkpoint)."""
    torch.manual_seed(5)
    source = build_model(tiny_cfg()).backbone.state_dict()
    state = {k: v.normal_() for k, v in source.items() if ".fusion." not in k and ".res_gate." not in k
             and v.is_floating_point()}  # fmt: skip
    torch.save({"model": state}, tmp_path / "swin.pth")
    cfg = tiny_cfg(MODEL__PRETRAINED_SWIN=str(tmp_path / "swin.pth"))
    own = build_model(cfg).backbone.state_dict()
    weights = [k for k in state if "relative_position_index" not in k and "attn_mask" not in k]
    assert len(weights) > 20 and all(torch.equal(own[k], state[k]) for k in weights)
    bare = build_model(cfg, pretrained=False).backbone.state_dict()
    assert not torch.equal(bare["patch_embed.proj.weight"], state["patch_embed.proj.weight"])


def test_swin_imagenet_init_resizes_tables(tmp_path):
    state = _swin_imagenet_state(window=7)
    torch.save({"model": state}, tmp_path / "swin.pth")
    backbone = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], 12, 12, [1, 1, 1, 1])
    fusion_before = backbone.layers[0].fusion.vis_project[0].weight.clone()
    skipped = load_pretrained_swin(backbone, tmp_path / "swin.pth")
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(skipped)
    own = backbone.state_dict()
    assert torch.equal(own["layers.2.blocks.1.attn.qkv.weight"], state["layers.2.blocks.1.attn.qkv.weight"])
    assert torch.equal(own["layers.1.downsample.reduction.weight"], state["layers.1.downsample.reduction.weight"])
    assert torch.equal(own["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    loaded = [k for k in state if k in own and "relative_position_bias_table" not in k]
    assert len(loaded) > 50 and all(torch.equal(own[k], state[k]) for k in loaded)  # every weight of the file
    table = state["layers.3.blocks.0.attn.relative_position_bias_table"]  # [13 * 13, 4]
    expect = F.interpolate(table.T.reshape(1, 4, 13, 13), size=(23, 23), mode="bicubic").reshape(4, 529).T
    assert own["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (529, 4)
    assert torch.allclose(own["layers.3.blocks.0.attn.relative_position_bias_table"], expect)
    assert torch.equal(backbone.layers[0].fusion.vis_project[0].weight, fusion_before)  # not in the file


def test_swin_init_rejects_other_files(tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, tmp_path / "not_swin.pth")
    backbone = build_backbone(8, [2, 2, 2, 2], [1, 2, 2, 4], 7, 12, [1, 1, 1, 1])
    with pytest.raises(CheckpointError, match="not_swin.pth shares no weight with the Swin backbone"):
        load_pretrained_swin(backbone, tmp_path / "not_swin.pth")


def test_safetensors_recognised_by_their_first_bytes_within_safetensors_limits(tmp_path):
    """An 8-byte little-endian header length, then '{': a safetensors file whatever its name, for a length from 2
    (``{}``) to safetensors' own limit of 100,000,000 bytes (MAX_HEADER_SIZE); anything else is not one."""
    from models.weights import is_safetensors

    def head(length: int, first: bytes = b"{") -> Path:
        path = tmp_path / f"{length}_{first.hex()}.bin"
        path.write_bytes(length.to_bytes(8, "little") + first)
        return path

    assert [is_safetensors(head(n)) for n in (2, 100_000_000)] == [True, True]
    assert [is_safetensors(head(n)) for n in (0, 1, 100_000_001)] == [False, False, False]
    assert not is_safetensors(head(100, b"[")) and not is_safetensors(head(100, b""))

"""tools.export: this project's checkpoint to the authors' layout and to safetensors, and back, exactly."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open

from configs import get_config
from configs.defaults import architecture_keys
from models import CheckpointError, build_model, load_weights, read_checkpoint
from tools.export import export, official_gaps
from tools.open_checkpoint import open_checkpoint
from utils.checkpoint import save_checkpoint

from .conftest import load_official_file
from .helpers_model import tiny_cfg
from .helpers_train import make_tiny_text_encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint as main.py writes it (weights, epoch, config), of a non-default tiny network with BERT."""
    encoder = make_tiny_text_encoder(tmp_path_factory.getbasetemp() / "tiny_env" / "text_encoder")
    opts = [
        "MODEL.SWIN.EMBED_DIM",
        8,
        "MODEL.SWIN.DEPTHS",
        [1, 2, 1, 1],
        "MODEL.SWIN.NUM_HEADS",
        [1, 2, 2, 4],
        "MODEL.SWIN.WINDOW_SIZE",
        4,
        "MODEL.FUSION.NUM_HEADS",
        [1, 2, 1, 2],
        "MODEL.TEXT.ENCODER",
        str(encoder),
        "MODEL.PRETRAINED_SWIN",
        "",
        "DATA.SIZE",
        32,
        "DATA.DATASET",
        "refcoco+",
        "MODEL.SWIN.DROP_PATH_RATE",
        0.0,
    ]
    cfg = get_config(None, opts)
    torch.manual_seed(3)
    model = build_model(cfg, pretrained=False)
    with torch.no_grad():  # BatchNorm statistics are state too: make them differ from their init
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("export") / "best.pth"
    save_checkpoint({"model": model.state_dict(), "epoch": 3, "config": cfg.dump()}, path)
    return cfg, model, path


def assert_same_tensors(model: torch.nn.Module, other: torch.nn.Module) -> None:
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("packaging", ["lavt", "lavt_one"])
def test_official_round_trip(trained, tmp_path, packaging, caplog):
    cfg, model, path = trained
    with caplog.at_level("INFO", logger="tools.export"):
        out = export(path, "official", tmp_path / f"{packaging}.pth", packaging=packaging)
    assert caplog.records[-1].getMessage() == f"{path} -> {out} (official, {packaging})"  # what was done
    # the tiny network is none the authors' code builds: said, and written all the same
    assert (
        "the authors' code cannot build this network (embed dim 8, depths [1, 2, 1, 1], heads [1, 2, 2, 4] are no "
        f"official swin_type; window 4 (official: 7 or 12)); {out} reads back here only"
    ) in [r.getMessage() for r in caplog.records]
    content = load_official_file(out)
    assert "config" not in content and ("bert_model" in content) == (packaging == "lavt")
    args = vars(content["args"])  # the names the official test.py reads its data settings by
    assert (args["img_size"], args["dataset"], args["splitBy"]) == (cfg.DATA.SIZE, cfg.DATA.DATASET, cfg.DATA.SPLIT_BY)
    other = build_model(cfg, pretrained=False)
    load_weights(other, out)
    assert_same_tensors(model, other)
    opened_cfg, opened = open_checkpoint(out, overrides=["MODEL.TEXT.ENCODER", cfg.MODEL.TEXT.ENCODER])
    assert_same_tensors(model, opened)
    for key in [k for k in architecture_keys() if k != "MODEL.NAME"] + ["DATA.SIZE", "DATA.DATASET", "DATA.SPLIT_BY"]:
        assert _get(opened_cfg, key) == _get(cfg, key), key
    assert opened_cfg.MODEL.NAME == packaging


def test_a_refined_or_fitted_network_is_no_official_one():
    cfg = tiny_cfg(MODEL__REFINE=6, MODEL__SWIN__FIT_WINDOW=True)
    gaps = official_gaps(build_model(cfg, pretrained=False), cfg)
    assert "edge refinement of width 6" in gaps and any("MODEL.SWIN.FIT_WINDOW" in gap for gap in gaps)
    plain = tiny_cfg()
    plain_gaps = official_gaps(build_model(plain, pretrained=False), plain)
    assert not any("refinement" in gap or "FIT" in gap for gap in plain_gaps)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def test_exports_get_the_permissions_open_gives(trained, tmp_path):
    """Shared weights stay readable as the umask allows: safetensors' writer makes its file 0600, mkstemp too."""
    _, _, path = trained
    old = os.umask(0o027)
    try:
        outs = [export(path, "safetensors", tmp_path / "m.safetensors"), export(path, "official", tmp_path / "m.pth")]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in outs] == [0o640, 0o640]


def test_safetensors_round_trip(trained, tmp_path):
    cfg, model, path = trained
    out = export(path, "safetensors", tmp_path / "model.safetensors")
    with open(out, "rb") as f:  # the safetensors header, read by hand: the config is in the metadata
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert header["__metadata__"]["config"] == cfg.dump()
    other = build_model(cfg, pretrained=False)
    load_weights(other, out)
    assert_same_tensors(model, other)
    opened_cfg, opened = open_checkpoint(out)
    assert opened_cfg.dump() == cfg.dump()
    assert_same_tensors(model, opened)
    renamed = tmp_path / "no_suffix.bin"  # recognised by its content, not its name
    renamed.write_bytes(out.read_bytes())
    assert read_checkpoint(renamed)["config"] == cfg.dump()
    cut = tmp_path / "cut.safetensors"  # the header intact, the tensors cut short
    cut.write_bytes(out.read_bytes()[: out.stat().st_size - 100])
    with pytest.raises(SafetensorError) as reason, safe_open(cut, "pt"):  # what safetensors itself says of it
        pass
    with pytest.raises(CheckpointError, match=r"^cannot read safetensors checkpoint .*cut\.safetensors: ") as err:
        read_checkpoint(cut)
    assert str(err.value).endswith(f"cut.safetensors: {reason.value}")
    # and back: safetensors -> official, the same tensors
    back = export(out, "official", tmp_path / "back.pth", packaging="lavt")
    assert_same_tensors(model, open_checkpoint(back, overrides=["MODEL.TEXT.ENCODER", cfg.MODEL.TEXT.ENCODER])[1])
    # the official file names no text encoder: a config file can, as --cfg_file does on the command line
    settings = tmp_path / "encoder.yaml"
    settings.write_text(f"MODEL:\n  TEXT:\n    ENCODER: {json.dumps(cfg.MODEL.TEXT.ENCODER)}\n")
    again = export(back, "safetensors", tmp_path / "again.safetensors", cfg_file=str(settings))
    again_cfg, again_model = open_checkpoint(again)
    assert again_cfg.MODEL.TEXT.ENCODER == cfg.MODEL.TEXT.ENCODER
    assert_same_tensors(model, again_model)


def test_refusals_change_nothing(trained, tmp_path):
    _, _, path = trained
    taken = tmp_path / "taken.pth"
    taken.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="taken.pth exists: choose another --out, or --force"):
        export(path, "official", taken)
    with pytest.raises(ValueError, match="--packaging takes lavt or lavt_one, with --to official only"):
        export(path, "safetensors", tmp_path / "x.safetensors", packaging="lavt")
    assert taken.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.pth"]
    source = path.read_bytes()
    for same in (path, path.parent / ".." / path.parent.name / path.name):  # even with --force
        with pytest.raises(ValueError, match=r"^--out .* is the checkpoint being exported: it would be replaced; "):
            export(path, "official", same, force=True)
    assert path.read_bytes() == source
    export(path, "official", taken, force=True)
    assert "args" in load_official_file(taken)


@pytest.mark.parametrize("force", [False, True])
def test_a_file_written_at_out_meanwhile_is_kept_without_force(trained, tmp_path, monkeypatch, force):
    """Another process writes ``out`` while this export writes its temporary file: without --force it stays and the
    export is refused in one sentence, leaving no file of its own; with --force the export replaces it."""
    from tools import export as export_module

    out, real = tmp_path / "m.pth", torch.save

    def save(obj, f):
        out.write_bytes(b"theirs")
        real(obj, f)

    monkeypatch.setattr(export_module.torch, "save", save)
    if force:
        export(trained[2], "official", out, force=True)
        assert "args" in load_official_file(out)
        return
    with pytest.raises(FileExistsError) as caught:
        export(trained[2], "official", out)
    assert str(caught.value) == f"{out} appeared while exporting: choose another --out, or --force to replace it"
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["m.pth"]


def test_command_line(trained, tmp_path, capsys):
    from tools.cli import run_cli
    from tools.export import main

    _, _, path = trained
    argv = [str(path), "--to", "safetensors", "--out", str(tmp_path / "m.st")]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()  # as in a fresh process, where the command sets up its logging (pytest's handlers aside)
    try:
        assert run_cli("python -m tools.export", main, argv) == 0
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    said = capsys.readouterr().err.splitlines()  # what was loaded, then what was written: "LEVEL message" lines
    assert said[-2].startswith("INFO loaded ") and said[-2].endswith(f" tensors from {path}")
    assert said[-1] == f"INFO {path} -> {tmp_path / 'm.st'} (safetensors)"
    assert read_checkpoint(tmp_path / "m.st")["config"] == read_checkpoint(path)["config"]
    assert run_cli("python -m tools.export", main, argv) == 2  # the same --out again: refused, one line
    err = capsys.readouterr().err
    assert (
        err == f"python -m tools.export: error: FileExistsError: {tmp_path / 'm.st'} exists: choose another "
        "--out, or --force to replace it\n"
    )
    (tmp_path / "folder").mkdir()  # --force, but no file can replace a folder
    argv = [str(path), "--to", "safetensors", "--out", str(tmp_path / "folder"), "--force"]
    assert run_cli("python -m tools.export", main, argv) == 2
    refusal = f"{tmp_path / 'folder'} is a folder: a file cannot be written in its place (give a file name)"
    assert capsys.readouterr().err == f"python -m tools.export: error: IsADirectoryError: {refusal}\n"
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_no_file(trained, tmp_path, capsys, monkeypatch):
    from tools.cli import run_cli
    from tools.export import main

    def full(obj, f):
        with open(f, "wb") as w:  # (a path: the temporary file staged hands out)
            w.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "m.pth"
    assert run_cli("python -m tools.export", main, [str(trained[2]), "--to", "official", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m tools.export: error: StorageError: cannot write {out}: No space "
                                       "left on device; the file there, if any, is as it was\n")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_leaves_nothing_and_says_so(trained, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of the write: one line, status 130 as a shell reports it, no file and no temporary left;
    ``--debug`` shows the traceback instead."""
    from tools import export as export_module
    from tools.cli import run_cli

    def interrupted(obj, f):
        with open(f, "wb") as half:
            half.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.torch, "save", interrupted)
    argv = [str(trained[2]), "--to", "official", "--out", str(tmp_path / "m.pth")]
    assert run_cli("python -m tools.export", export_module.main, argv) == 130
    assert capsys.readouterr().err == "python -m tools.export: interrupted (Ctrl-C)\n"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        run_cli("python -m tools.export", export_module.main, [*argv, "--debug"])

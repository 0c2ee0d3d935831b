import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from configs import get_config
from engine.checkpoint_config import check_config, checkpoint_config
from engine.checkpointing import Progress
from engine.preemption import request_checkpoint, stop_signals_handled
from engine.resume import saved_world_size
from engine.trainer import _at_boundary
from models import read_checkpoint
from utils import checkpoint as ck


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / 10) ** 0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    g = torch.Generator().manual_seed(5)
    cfg = get_config(opts=["TRAIN.EPOCHS", 3])
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "epoch": 1,
        "best": {"oIoU": 12.5, "epoch": 0},
        "config": cfg.dump(),
        "rng": ck.get_rng_state(g),
    }


def test_round_trip_weights_only(tmp_path):
    state = _state()
    path = tmp_path / "last.pth"
    ck.save_checkpoint(state, path)
    back = read_checkpoint(path)
    assert back["epoch"] == 1 and back["best"] == {"oIoU": 12.5, "epoch": 0}
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["lr_scheduler"]["last_epoch"] == 1
    assert checkpoint_config(back, path).TRAIN.EPOCHS == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ck.save_checkpoint({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path) == {"epoch": 1}  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_save_into_missing_folder(tmp_path):
    """One line naming what was being saved, where, and the missing folder; nothing written."""
    folder = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        ck.save_checkpoint({}, folder / "last.pth")
    assert str(e.value) == f"cannot save checkpoint {folder / 'last.pth'}: folder {folder} does not exist"
    with pytest.raises(FileNotFoundError) as e:
        ck.write_text_atomic(folder / "metrics.jsonl", "{}")
    assert str(e.value) == f"cannot save file {folder / 'metrics.jsonl'}: folder {folder} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_rng_round_trip():
    g = torch.Generator().manual_seed(1)
    state = ck.get_rng_state(g)
    keys = state["numpy"]["keys"]  # numpy's 624 uint32 words, stored as int64 (a tensor: weights_only loads it)
    assert keys.dtype == torch.int64 and keys.shape == (624,)
    assert np.array_equal(keys.numpy(), np.random.get_state()[1].astype(np.int64))

    def draw():
        return (
            random.random(),
            float(np.random.rand()),
            np.random.randn(),
            torch.rand(2).tolist(),
            torch.rand(1, generator=g).item(),
        )

    first = draw()
    ck.set_rng_state(state, g)
    assert draw() == first
    without = {k: v for k, v in state.items() if k != "generator"}  # saved with no data-loader generator
    with pytest.raises(KeyError, match="^'checkpoint RNG state holds no data-loader generator state'$"):
        ck.set_rng_state(without, g)


def test_rng_state_carries_every_cuda_device(monkeypatch):
    """A GPU run's checkpoint holds each device's CUDA generator state, and resuming on CUDA restores them all; a
    CPU run's (none) leaves a GPU's generators alone. CUDA stood in for by its four calls."""
    devices = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([s.tolist() for s in states]))
    state = ck.get_rng_state()
    ck.set_rng_state(state)
    assert restored == [[[1, 2], [3, 4]]]
    ck.set_rng_state({**state, "cuda": []})  # saved where there was no CUDA
    assert len(restored) == 1


def test_check_config():
    cfg = get_config()
    ckpt = {"config": cfg.dump()}
    check_config(ckpt, cfg, "x.pth")  # same config: fine
    other = get_config(opts=["MODEL.SWIN.EMBED_DIM", 96, "TRAIN.EPOCHS", 2])
    with pytest.raises(
        ValueError, match=r"x.pth is of another configuration.*MODEL.SWIN.EMBED_DIM: checkpoint 128, now 96"
    ):
        check_config(ckpt, other, "x.pth")
    check_config(ckpt, get_config(opts=["TRAIN.EPOCHS", 2]), "x.pth")  # another schedule is fine for loading weights
    check_config({"model": {}}, cfg, "official.pth")  # official files carry no config
    # a stored config that is no YAML mapping of keys (another project's file, an edited one): one line, no traceback
    for text, message in [
        ("runs/x.yaml", "the config stored in checkpoint x.pth must map config keys to values (e.g. TRAIN: "
         "{LR: 5e-05}), got 'runs/x.yaml'"),
        ("TRAIN: [", "the config stored in checkpoint x.pth is not valid YAML at line 1, column 9: expected the node "
         "content, but found '<stream end>'"),
        (b"TRAIN: {}", "checkpoint x.pth: 'config' must be YAML text, got bytes"),
    ]:  # fmt: skip
        with pytest.raises(ValueError) as e:
            check_config({"config": text}, cfg, "x.pth")
        assert str(e.value) == message


@pytest.mark.parametrize(("key", "value"), [("MODEL.SWIN.STEM", "conv"), ("MODEL.DECODER_HIDDEN", 64)])
def test_check_config_names_every_architecture_key(key, value):
    """The architecture keys come from the config (all MODEL keys but a short list), so newer ones such as the stem
    and the decoder width are compared too."""
    ckpt = {"config": get_config().dump()}
    default = get_config()[key.split(".")[0]]
    for part in key.split(".")[1:]:
        default = default[part]
    with pytest.raises(ValueError, match=rf"x.pth is of another configuration than this run: {key}: checkpoint "
                                         rf"{default!r}, now {value!r}\."):  # fmt: skip
        check_config(ckpt, get_config(opts=[key, value]), "x.pth")
    check_config(ckpt, get_config(opts=["MODEL.SWIN.DROP_PATH_RATE", 0.0, "MODEL.TEXT.CACHE", True]), "x.pth")


def test_stale_temporaries_removed_others_kept(tmp_path):
    """What a write killed between writing its temporary file and replacing the target leaves is removed; the
    target, and files that only look alike, stay."""
    ck.save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    stale = [tmp_path / ".last.pth.abc123.tmp", tmp_path / ".metrics.jsonl.x_9.tmp"]
    kept = [tmp_path / "last.pth", tmp_path / "last.pth.tmp", tmp_path / ".best.pth.tmp", tmp_path / ".other.1.tmp"]
    for p in stale + kept[1:]:
        p.write_bytes(b"partial")
    removed = ck.remove_stale_temporaries(tmp_path, ["last.pth", "best.pth", "metrics.jsonl"])
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert read_checkpoint(tmp_path / "last.pth") == {"epoch": 1}


def test_a_temporary_gone_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Another process cleaning the same folder (a second job resuming it) may remove a temporary between the listing
    and its removal: it is gone either way, not an error."""
    gone = tmp_path / ".last.pth.gone.tmp"
    listed = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [*listed(self, pattern), gone])
    (tmp_path / ".last.pth.x.tmp").write_bytes(b"partial")
    assert sorted(ck.remove_stale_temporaries(tmp_path, ["last.pth"])) == [gone, tmp_path / ".last.pth.x.tmp"]
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    ck.write_text_atomic(path, "a\n")
    ck.write_text_atomic(path, "a\nb\n")
    assert path.read_text() == "a\nb\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    monkeypatch.setattr(ck.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        ck.write_text_atomic(path, "a\nb\nc\n")
    assert path.read_text() == "a\nb\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_step_checkpoints_every_n_iterations_but_not_at_an_epochs_end():
    """TRAIN.CHECKPOINT_EVERY counts iterations across epochs; an epoch's last iteration writes none (the epoch's end
    writes its own after validation: the same checkpoint twice would cost a write of every weight and moment)."""
    saves: list[tuple[int, int]] = []
    cfg = get_config(opts=["TRAIN.CHECKPOINT_EVERY", 2])
    checkpointer = SimpleNamespace(cfg=cfg, iters_per_epoch=3, info=SimpleNamespace(device=torch.device("cpu")),
                                   save=lambda at, generator: saves.append((at.epoch, at.iteration)))  # fmt: skip
    request_checkpoint()  # left over (as by another test in this process): the training loop's block drops it
    with stop_signals_handled():
        for epoch in range(2):
            for done in range(1, 4):  # global iterations 1-3, then 4-6
                _at_boundary(checkpointer, Progress(), epoch, torch.Generator().get_state(), done, {})
    assert saves == [(0, 2), (1, 1)]  # global 2 and 4; global 6 is epoch 1's end


def test_the_saved_world_size_is_the_checkpoints_own_else_its_random_states():
    assert saved_world_size({"world_size": 4, "rng": [{}]}) == 4  # the key wins over the count of states
    assert saved_world_size({"rng": [{}, {}]}) == 2  # older checkpoints: one random state per process

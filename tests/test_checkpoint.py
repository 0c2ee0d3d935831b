import random

import numpy as np
import pytest
import torch

from configs import get_config
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
    assert ck.checkpoint_config(back, path).TRAIN.EPOCHS == 3
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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.save_checkpoint({}, tmp_path / "nope" / "last.pth")


def test_rng_round_trip():
    g = torch.Generator().manual_seed(1)
    state = ck.get_rng_state(g)

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


def test_check_config():
    cfg = get_config()
    ckpt = {"config": cfg.dump()}
    ck.check_config(ckpt, cfg, "x.pth", resume=True)  # same config: fine
    other = get_config(opts=["MODEL.SWIN.EMBED_DIM", 96, "TRAIN.EPOCHS", 2])
    with pytest.raises(
        ValueError, match=r"x.pth is of another configuration.*MODEL.SWIN.EMBED_DIM: checkpoint 128, now 96"
    ):
        ck.check_config(ckpt, other, "x.pth")
    epochs_only = get_config(opts=["TRAIN.EPOCHS", 2])
    ck.check_config(ckpt, epochs_only, "x.pth")  # another schedule is fine for loading weights
    with pytest.raises(ValueError, match="TRAIN.EPOCHS: checkpoint 40, now 2"):
        ck.check_config(ckpt, epochs_only, "x.pth", resume=True)
    ck.check_config({"model": {}}, cfg, "official.pth")  # official files carry no config
    with pytest.raises(ValueError, match="cannot resume from official.pth"):
        ck.check_config({"model": {}}, cfg, "official.pth", resume=True)

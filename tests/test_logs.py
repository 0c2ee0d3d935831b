"""Logs people use: TensorBoard scalars equal to metrics.jsonl's (and none with --no_tensorboard), the whole run's
ETA, peak GPU memory and the global batch in the run log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utils.logger import MetricLogger, RunProgress, peak_memory_note, run_eta_seconds, setup_logging
from utils.tensorboard import TENSORBOARD_DIR, TensorBoardWriter

from .helpers_train import tiny_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``log_dir`` -> [(step, value), ...], as TensorBoard reads them."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_eta_by_hand():
    # 30 iterations left in this epoch, 2 more epochs of 100 at 0.5 s, 40 s of validation after each of the 3
    run = RunProgress(iters_per_epoch=100, epochs_after=2, epoch_extra_s=40.0)
    assert run_eta_seconds(0.5, 30, run) == 0.5 * 230 + 3 * 40.0
    assert run_eta_seconds(2.0, 7, RunProgress(iters_per_epoch=50)) == 14.0  # the last epoch, nothing measured yet


class Recorder:
    """Stands in for a TensorBoardWriter: records (step, prefix + name, value)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, str, float]] = []

    def scalars(self, step, values, prefix=""):
        self.points += [(step, prefix + k, v) for k, v in values.items()]


def test_log_every_writes_interval_means_and_the_run_eta(tmp_path):
    setup_logging(tmp_path / "log.txt")
    tb = Recorder()
    run = RunProgress(first_step=100, iters_per_epoch=5, epochs_after=1, epoch_extra_s=3600.0, tensorboard=tb)
    logger = MetricLogger()
    logger.update(loss=99.0)  # before the loop: not part of its first interval
    losses = [1.0, 2.0, 3.0, 4.0, 6.0]
    for x in logger.log_every(losses, 2, "Epoch [3]", run_progress=run):
        logger.update(loss=x, lr=x / 10)
    got = {(step, tag): v for step, tag, v in tb.points if tag != "train/time_per_iter"}
    assert got == pytest.approx({
        (102, "train/loss"): 1.5, (102, "train/lr"): 0.15,
        (104, "train/loss"): 3.5, (104, "train/lr"): 0.35,
        (105, "train/loss"): 6.0, (105, "train/lr"): 0.6,
    })  # fmt: skip
    assert [step for step, tag, _ in tb.points if tag == "train/time_per_iter"] == [102, 104, 105]
    log = (tmp_path / "log.txt").read_text()
    # the iterations take microseconds: the run's ETA is the validation of this epoch and the next, 2 h
    assert "Epoch [3] [2/5] eta: 0:00:00 (run: 2:00:00)" in log and "max mem" not in log


def test_peak_memory_shown_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1536 * 2**20)
    assert peak_memory_note() == "max mem: 1536 MB"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # CUDA present, this run on CPU
    assert peak_memory_note() == ""


def test_tensorboard_writer_disabled_writes_nothing(tmp_path):
    off = TensorBoardWriter(tmp_path, enabled=False)
    off.scalars(1, {"loss": 1.0})
    off.epoch_record(1, {"epoch": 0, "val_mIoU": 50.0})
    off.close()
    assert not off.enabled and list(tmp_path.iterdir()) == []
    on = TensorBoardWriter(tmp_path)
    on.scalars(3, {"loss": 0.25, "bad": float("nan"), "flag": True}, "train/")
    on.epoch_record(8, {"epoch": 1, "val_mIoU": 50.5, "train_loss": 0.5})
    on.close()
    assert scalars(tmp_path / TENSORBOARD_DIR) == {
        "train/loss": [(3, 0.25)], "val/mIoU": [(8, 50.5)], "epoch/train_loss": [(8, 0.5)],
    }  # fmt: skip

"""Logs people use: TensorBoard scalars equal to metrics.jsonl's (and none with --no_tensorboard), the whole run's
ETA, peak GPU memory and the global batch in the run log."""

from __future__ import annotations

import errno
import json
import logging
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as main_module
import utils.tensorboard as tensorboard_module
from data import build_dataset
from engine import trainer as trainer_module
from utils.logger import (
    LOGGER_NAME,
    PACKAGE_LOGGERS,
    MetricLogger,
    RunProgress,
    peak_memory_note,
    run_eta_seconds,
    setup_logging,
)
from utils.tensorboard import TENSORBOARD_DIR, TensorBoardWriter

from .helpers_train import tiny_cfg, tiny_env, tiny_main_argv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``log_dir`` -> [(step, value), ...], as TensorBoard reads them."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def next_second() -> None:
    """Wait for the clock's next second: event files are read in the order of their names, which start with the
    second they were created in (runs of one process within one second would be read out of order)."""
    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.05)


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


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(env, tmp_path, tmp_path_factory, monkeypatch):
    """Epoch 0, stopped, then epoch 1 by --resume: the event files read as one uninterrupted run whose values are
    metrics.jsonl's; the run log gives the global batch and the whole run's ETA, each epoch told the steps before it
    and the epochs the run (the invocation: --stop_after ends it) still trains after it."""
    run_dir = tmp_path / "tiny"
    per_epoch = len(build_dataset(tiny_cfg(tmp_path_factory), "train", eval_mode=False)) // 8  # batch 8, drop_last
    told, real = [], trainer_module.train_one_epoch

    def train_one_epoch(*args, run_progress, **kwargs):
        told.append((run_progress.first_step, run_progress.iters_per_epoch, run_progress.epochs_after))
        return real(*args, run_progress=run_progress, **kwargs)

    monkeypatch.setattr(trainer_module, "train_one_epoch", train_one_epoch)
    main_module.main(tiny_main_argv(env, tmp_path, "--stop_after", "1", "--print_freq", "1"))
    next_second()
    with TensorBoardWriter(run_dir) as died:  # what a run that died after its checkpoint had logged past it
        died.scalars(per_epoch + 1, {"loss": 999.0, "lr": 999.0, "grad_norm": 999.0}, "train/")
    next_second()
    main_module.main(tiny_main_argv(env, tmp_path, "--resume", "--print_freq", "1"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    got = scalars(run_dir / TENSORBOARD_DIR)
    approx = partial(pytest.approx, rel=1e-6)  # event files store float32
    ends = [per_epoch, 2 * per_epoch]  # each epoch's record at the optimisation steps done by its end
    assert got["val/mIoU"] == [(s, approx(r["val_mIoU"])) for s, r in zip(ends, records)]
    assert got["val/oIoU"] == [(s, approx(r["val_oIoU"])) for s, r in zip(ends, records)]
    assert got["epoch/train_loss"] == [(s, approx(r["train_loss"])) for s, r in zip(ends, records)]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/time_per_iter"):
        assert [s for s, _ in got[tag]] == list(range(1, 2 * per_epoch + 1)), tag  # --print_freq 1: every step
    for e, r in enumerate(records):  # the epoch's averages from its iterations' points, its last learning rate
        steps = slice(e * per_epoch, (e + 1) * per_epoch)
        assert sum(v for _, v in got["train/loss"][steps]) / per_epoch == approx(r["train_loss"])
        assert sum(v for _, v in got["train/grad_norm"][steps]) / per_epoch == approx(r["train_grad_norm"])
        assert got["train/lr"][steps][-1][1] == approx(r["train_lr"])
    log = (run_dir / "log.txt").read_text()
    assert "global batch 8 = 8 per process x 1 process(es) (the paper: 32 = 8 per GPU x 4 GPUs)" in log
    assert f"Epoch [0] [1/{per_epoch}] eta: " in log and " (run: " in log
    assert told == [(0, per_epoch, 0), (per_epoch, per_epoch, 0)]  # 2 epochs: the first run stopped after 1


def test_no_tensorboard_writes_no_event_files(env, tmp_path):
    main_module.main(tiny_main_argv(env, tmp_path, "--no_tensorboard", TRAIN__EPOCHS=1))
    assert (tmp_path / "tiny" / "metrics.jsonl").is_file() and not (tmp_path / "tiny" / TENSORBOARD_DIR).exists()


def test_a_full_disk_leaves_the_log_file_with_one_line_on_stderr(tmp_path, capsys):
    """No room for a line of log.txt: one line on stderr says so, the file is left alone from then on (no traceback
    for each record), the console keeps every line. Another error in the file keeps logging's own report."""
    names = (LOGGER_NAME, *PACKAGE_LOGGERS)
    before = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    log = setup_logging(tmp_path / "log.txt")
    try:
        log.info("first")
        handler = [h for h in log.handlers if getattr(h, "baseFilename", None)][0]

        def full(text):
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.stream.write = full
        for k in range(3):
            log.info("line %d", k)
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"logging: cannot write to the log file {tmp_path / 'log.txt'}: No space left on "
                                    "device; its lines from here on reach the console only"]  # fmt: skip
        assert [line.split(" ", 2)[2] for line in out.splitlines()] == ["first", "line 0", "line 1", "line 2"]
        handler.setLevel(logging.NOTSET)
        handler.stream.write = lambda text: 1 / 0  # a bug, not the disk: reported as logging reports it
        log.info("again")
        assert "--- Logging error ---" in capsys.readouterr().err
    finally:  # this test's handlers closed, the loggers as they were
        for h in log.handlers:
            h.close()
        for n, (handlers, propagate) in before.items():
            logging.getLogger(n).handlers[:], logging.getLogger(n).propagate = handlers, propagate
    assert (tmp_path / "log.txt").read_text().splitlines()[0].endswith(" INFO first")


def test_tensorboard_on_a_full_disk_turns_itself_off(tmp_path, monkeypatch, capsys, caplog):
    """TensorBoard's writing thread finds no room: one WARNING, no thread traceback, nothing more written, and the
    run goes on; another error of that thread still ends the run with it."""
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    writer = TensorBoardWriter(tmp_path)
    with caplog.at_level(logging.WARNING, logger="utils.tensorboard"):
        for step in range(200):  # the thread fails at its first record; a later call meets its error
            writer.scalars(step, {"loss": 0.5})
            if not writer.enabled:
                break
        writer.epoch_record(200, {"epoch": 0, "val_mIoU": 1.0})
        writer.close()
    assert not writer.enabled
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write TensorBoard's events in {tmp_path / TENSORBOARD_DIR}: No space left on device; TensorBoard "
        "logging is off from here; training goes on (its checkpoints need room too)"
    ]
    assert "Exception in thread" not in capsys.readouterr().err
    seen = []  # any other thread's error, or another error of TensorBoard's thread, goes to the hook in place
    monkeypatch.setattr(tensorboard_module, "_next_hook", [seen.append])
    thread = type("_AsyncWriterThread", (), {})()
    for args in (SimpleNamespace(thread=thread, exc_value=ZeroDivisionError()),
                 SimpleNamespace(thread=object(), exc_value=OSError(errno.ENOSPC, "No space left on device")),
                 SimpleNamespace(thread=thread, exc_value=OSError(errno.ENOSPC, "No space left on device"))):
        tensorboard_module._quiet_full_disk(args)
    assert [type(a.exc_value) for a in seen] == [ZeroDivisionError, OSError] and seen[1].thread is not thread

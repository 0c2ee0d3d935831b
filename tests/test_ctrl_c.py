"""Ctrl-C as a terminal sends it, to every process of the foreground group: ``python main.py`` with a DataLoader
worker stopped for real, and the train loader's workers leaving it to the training process. In-process stops (one
line, status 130, the same command continuing exactly) are in tests/test_resume.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import main as main_module
from engine import trainer as trainer_module
from models import read_checkpoint
from utils.distributed import DistInfo

from .helpers_process import terminal_job
from .helpers_train import tiny_cfg, tiny_env, tiny_opts

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_in_a_terminal_stops_with_a_checkpoint(tmp_path_factory, tmp_path):
    """The training process stops at the next iteration boundary with last.pth, status 130, one line and no
    traceback, its worker still serving batches until then."""
    data_root, text = tiny_env(tmp_path_factory)
    over = {"TRAIN__BATCH_SIZE": 4, "TRAIN__EPOCHS": 50, "TRAIN__CHECKPOINT_EVERY": 2, "DATA__WORKERS": 1,
            "EVAL__AFTER_TRAIN": False}  # fmt: skip (far more epochs than the test waits for)
    argv = [sys.executable, "main.py", "--cfg_file", "", "--device", "cpu", "--opts",
            *tiny_opts(data_root, text, tmp_path, **over)]  # fmt: skip
    run_dir = tmp_path / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with terminal_job(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 180
        while not (run_dir / "last.pth").is_file() or read_checkpoint(run_dir / "last.pth")["iteration"] == 0:
            assert proc.poll() is None and time.time() < deadline, "no mid-epoch checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == main_module.EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("main.py: ")]
    assert len(lines) == 1 and lines[0].startswith(
        f"main.py: interrupted: Ctrl-C (SIGINT) received: checkpoint {run_dir / 'last.pth'} written at epoch "
    ), err
    stopped = read_checkpoint(run_dir / "last.pth")
    assert stopped["iteration"] > 0 and not (run_dir / "train.lock").exists()


class _SigintInWorker(torch.utils.data.Dataset):
    """Each item: whether the process reading it ignores SIGINT."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return int(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)


def test_the_train_loaders_workers_leave_ctrl_c_to_the_training_process(tmp_path_factory, ctrl_c_default):
    """The DataLoader workers ignore Ctrl-C (``engine.preemption.ignore_ctrl_c``: a worker ending on it would leave
    the training process waiting for its batches); the training process keeps taking it."""
    cfg = tiny_cfg(tmp_path_factory, DATA__WORKERS=1, TRAIN__BATCH_SIZE=2)
    loader, _, _ = trainer_module._train_loader(cfg, _SigintInWorker(), DistInfo(0, 1, 0, False, torch.device("cpu")))
    assert [batch.tolist() for batch in loader] == [[1, 1], [1, 1]]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""The one line of an error (``utils.errors``), also for one raised in a DataLoader worker, whose message PyTorch
makes the worker's whole traceback."""

from __future__ import annotations

import errno
import os
import re
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

import main as main_module
from refer import ReferFileNotFoundError
from utils.errors import error_line, error_message, is_out_of_memory, is_worker_death

from .helpers_train import tiny_env, tiny_main_argv


class Failing(Dataset):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            raise self.error
        return torch.zeros(1)


def raised_in_a_worker(error: BaseException) -> BaseException:
    with pytest.raises(type(error)) as caught:
        list(DataLoader(Failing(error), batch_size=1, num_workers=1))
    return caught.value


def chained() -> BaseException:
    try:
        try:
            raise OSError("disk")
        except OSError as e:
            raise ValueError("bad image: x.jpg") from e
    except ValueError as e:
        return e


@pytest.mark.parametrize(
    "error, message",
    [
        (ReferFileNotFoundError("image not found: /d/x.jpg"), "image not found: /d/x.jpg"),
        (KeyError("ref_id"), "'ref_id'"),
        (chained(), "bad image: x.jpg"),  # the last of a chain: the error raised
        (ValueError(""), ""),
    ],
)
def test_an_error_of_a_worker_keeps_its_message_and_says_where(error, message):
    caught = raised_in_a_worker(error)
    assert "Original Traceback" in str(caught)  # what PyTorch gives
    assert error_message(caught) == f"{message} (in DataLoader worker process 0)"
    assert error_line("p", caught) == f"p: error: {type(error).__name__}: {message} (in DataLoader worker process 0)"


def test_other_errors_are_their_message_on_one_line():
    assert error_line("main.py", ValueError("a\nb")) == "main.py: error: ValueError: a b"
    assert error_message(KeyError("k")) == "'k'"
    looks_wrapped = "Caught nothing in here.\nOriginal Traceback (most recent call last):\nno colon here"
    assert error_message(RuntimeError(looks_wrapped)) == "no colon here (in here)"  # a last line kept whole


def test_main_says_a_workers_error_in_one_line(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """An image that disappears during training (checked before it started): main.py's one line names it and the
    worker, without the worker's traceback."""
    import data.dataset as dataset_module

    env = tiny_env(tmp_path_factory)
    capsys.readouterr()  # (making the tiny text encoder shows a progress bar)

    def gone(path, *args, **kwargs):
        raise ReferFileNotFoundError(f"image not found: {path}")

    monkeypatch.setattr(dataset_module, "open_rgb", gone)  # the workers are forked: they see it too
    assert main_module.cli(tiny_main_argv(env, tmp_path, DATA__WORKERS=1)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("main.py: error: ReferFileNotFoundError: image not found: ")
    assert line.endswith(".jpg (in DataLoader worker process 0)") and "Traceback" not in line


def test_a_killed_worker_is_one_line_with_what_to_do(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """A DataLoader worker killed (SIGKILL, as the out-of-memory killer sends it): one line naming it and what to do,
    status 1, the run folder's lock released."""
    import data.dataset as dataset_module

    env = tiny_env(tmp_path_factory)
    capsys.readouterr()
    real = dataset_module.open_rgb

    def killed_in_a_worker(path, *args, **kwargs):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "open_rgb", killed_in_a_worker)
    assert main_module.cli(tiny_main_argv(env, tmp_path, DATA__WORKERS=1)) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"main\.py: error: RuntimeError: DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: Killed|exited "
        r"unexpectedly)\. A data loader "  # (PyTorch says either, as the worker's death is noticed)
        r"process died: most often the out-of-memory killer \(fewer DATA\.WORKERS or a smaller batch need less "
        r"memory\); a training continues from its last checkpoint with --resume auto",
        line,
    ), line
    assert not (tmp_path / "tiny" / "train.lock").exists()
    assert not is_worker_death(RuntimeError("CUDA out of memory")) and not is_worker_death(ValueError("DataLoader"))


def test_memory_run_out_is_one_line_with_what_to_do(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """Out of memory at the second step, as CUDA reports it and as the CPU allocator does (a real failed
    allocation): one line each, status 1."""
    from engine import trainer as trainer_module

    env = tiny_env(tmp_path_factory)
    capsys.readouterr()
    real = trainer_module.build_criterion
    cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB, 1 GiB free."
    advice = ("Out of memory: a smaller batch (--batch_size, or --eval_batch_size), --grad_checkpoint or --amp bf16 "
              "need less; a training continues from its last checkpoint with --resume auto")  # fmt: skip
    for run, (fail, said) in enumerate([
        (lambda: (_ for _ in ()).throw(torch.OutOfMemoryError(cuda)), f"OutOfMemoryError: {cuda}"),
        (lambda: torch.empty(2**60, dtype=torch.uint8), "RuntimeError: DefaultCPUAllocator: can't allocate memory: "
         f"you tried to allocate {2**60} bytes. Error code 12 (Cannot allocate memory)."),
    ]):  # fmt: skip

        def build(name, weights, fail=fail):
            criterion, calls = real(name, weights), []

            def loss(logits, target):
                calls.append(1)
                if len(calls) == 2:
                    fail()
                return criterion(logits, target)

            return loss

        monkeypatch.setattr(trainer_module, "build_criterion", build)
        assert main_module.cli(tiny_main_argv(env, tmp_path / str(run))) == 1
        assert capsys.readouterr().err.splitlines() == [f"main.py: error: {said} {advice}"]
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_full_disk_at_the_start_leaves_no_lock_and_no_half_file(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """No room for the lock file: one line, no lock left to hold the folder. Room for the lock but not for
    config.yaml: one line naming it, the lock released, no config.yaml (or part of one)."""
    env = tiny_env(tmp_path_factory)
    capsys.readouterr()
    real, calls = os.fsync, []

    def fsync(fd, fail_from):
        calls.append(fd)
        if len(calls) >= fail_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    run_dir = tmp_path / "tiny"
    for fail_from, what, after in [(1, f"the lock file {run_dir / 'train.lock'}", "no lock is left behind"),
                                   (2, f"file {run_dir / 'config.yaml'}", "the file there, if any, is as it was")]:
        calls.clear()
        monkeypatch.setattr(os, "fsync", lambda fd, n=fail_from: fsync(fd, n))
        assert main_module.cli(tiny_main_argv(env, tmp_path)) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"main.py: error: StorageError: cannot write {what}: No space left on device; {after}; a training "
            "continues from its last checkpoint with --resume auto"
        ]
        # the log begins once the folder is locked, and stays
        assert sorted(p.name for p in run_dir.iterdir()) == ([] if fail_from == 1 else ["log.txt"])

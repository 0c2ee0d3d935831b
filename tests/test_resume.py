"""Exact resume in one process: stop requests, interrupted writes, crashes between the checkpoint and the metrics,
--resume auto, and every resume refusal or deliberate change (main.py end to end on the tiny synthetic set)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from yacs.config import CfgNode

import main as main_module
from data import build_dataset
from engine import Preempted, request_checkpoint
from engine import checkpointing as checkpointing_module
from engine import loops as loops_module
from engine import trainer as trainer_module
from models import read_checkpoint
from utils import checkpoint as checkpoint_io

from .helpers_train import assert_same_weights_and_optimizer, tiny_cfg, tiny_env, tiny_opts

BATCH, LR = 8, 1e-3  # TRAIN.BATCH_SIZE of these runs; TRAIN.LR of tiny_opts


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


@pytest.fixture(scope="module")
def train_objects(tmp_path_factory) -> int:
    return len(build_dataset(tiny_cfg(tmp_path_factory), "train", eval_mode=False))


def argv(env, out: Path, *flags: str, **over) -> list[str]:
    data_root, text = env
    over.setdefault("TRAIN__BATCH_SIZE", BATCH)
    over.setdefault("EVAL__AFTER_TRAIN", False)
    over.setdefault("DATA__AUGMENT", True)  # the random augmentation must continue exactly too
    over.setdefault("TRAIN__CHECKPOINT_EVERY", 4)
    return ["--cfg_file", "", "--device", "cpu", *flags, "--opts", *tiny_opts(data_root, text, out, **over)]


def run(env, out: Path, *flags: str, **over) -> dict:
    return main_module.main(argv(env, out, *flags, **over))


def stop_at_step(monkeypatch, step: int, how=request_checkpoint) -> None:
    """Make the loss of training step ``step`` (1-based, counted in this process) call ``how`` first."""
    real = trainer_module.build_criterion

    def build(name, weights):
        criterion, calls = real(name, weights), []

        def loss(logits, target):
            calls.append(1)
            if len(calls) == step:
                how()
            return criterion(logits, target)

        return loss

    monkeypatch.setattr(trainer_module, "build_criterion", build)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_time_s"} for x in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders ended with bit-identical weights and optimizer states, and the same metrics lines."""
    x, y = read_checkpoint(a / "last.pth"), read_checkpoint(b / "last.pth")
    assert (x["epoch"], x["iteration"], x["best"]) == (y["epoch"], y["iteration"], y["best"])
    assert_same_weights_and_optimizer(x, y)
    assert records(a) == records(b) and len(records(a)) == x["epoch"] + 1


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory) -> Path:
    """The uninterrupted run: 2 epochs."""
    out = tmp_path_factory.mktemp("straight")
    run(env, out, "--resume", "auto")  # no last.pth yet: a fresh start
    return out / "tiny"


@pytest.fixture(scope="module")
def stopped(env, tmp_path_factory) -> Path:
    """A run stopped by request after its 3rd iteration (a mid-epoch last.pth), never touched by the tests."""
    out = tmp_path_factory.mktemp("stopped")
    patch = pytest.MonkeyPatch()
    stop_at_step(patch, 3)
    try:
        said = "engine.request_checkpoint.. received: checkpoint .*last.pth written at epoch 0, iteration 3; run the"
        with pytest.raises(Preempted, match=said + " same command with --resume auto"):
            run(env, out)
    finally:
        patch.undo()
    return out / "tiny"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a run folder to resume (OUTPUT is a setting a resume may change)."""
    shutil.copytree(run_dir, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_interrupted_in_every_way_then_resumed_equals_straight_run(env, straight, tmp_path, monkeypatch, capsys):
    """One run stopped by SIGTERM, then killed while writing a checkpoint, then left with a stale temporary file
    and killed between last.pth and metrics.jsonl, each time continued with the same command: it ends as the
    uninterrupted run, bit for bit, with the same metrics lines (none lost, none twice)."""
    run_dir = tmp_path / "tiny"
    command = argv(env, tmp_path, "--resume", "auto")
    # 1. SIGTERM during iteration 5: checkpoint at the next boundary, exit status 75 and one line
    stop_at_step(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    assert main_module.cli(command) == main_module.EXIT_PREEMPTED == 75
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("main.py:")]
    assert lines == [f"main.py: preempted: SIGTERM received: checkpoint {run_dir / 'last.pth'} written at epoch 0, "
                     "iteration 5; run the same command with --resume auto to continue exactly"]  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is handler  # the stop handler lasts as long as training
    last = read_checkpoint(run_dir / "last.pth")
    assert (last["epoch"], last["iteration"], last["lr_scheduler"]["last_epoch"]) == (-1, 5, 5)
    assert not (run_dir / "metrics.jsonl").read_text()  # no epoch finished

    # 2. killed while writing the step checkpoint after iteration 8 (CHECKPOINT_EVERY 4): the previous one stays
    monkeypatch.undo()
    real_save = torch.save

    def killed_while_saving(obj, f):
        if obj.get("iteration") == 8:
            f.write(b"partial")
            raise KeyboardInterrupt("killed while saving")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_io.torch, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        main_module.main(command)
    monkeypatch.undo()
    assert read_checkpoint(run_dir / "last.pth")["iteration"] == 5

    # 3. a temporary file a SIGKILL left behind, and a crash right after the epoch's last.pth, before its metrics
    stale = run_dir / ".last.pth.k1ll3d.tmp"
    stale.write_bytes(b"partial")
    real_write = checkpointing_module.write_metrics

    def crash_after_epoch_checkpoint(folder, history):
        if history:
            raise KeyboardInterrupt("killed after last.pth")
        real_write(folder, history)

    monkeypatch.setattr(checkpointing_module, "write_metrics", crash_after_epoch_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        main_module.main(command)
    monkeypatch.undo()
    assert not stale.exists()
    assert read_checkpoint(run_dir / "last.pth")["epoch"] == 0 and not (run_dir / "metrics.jsonl").read_text()

    # 4. the same command once more finishes the run: metrics.jsonl mended from the checkpoint, nothing twice
    assert main_module.cli(command) == 0
    assert_same_run(straight, run_dir)
    log = (run_dir / "log.txt").read_text()
    last = run_dir / "last.pth"
    assert f"resumed from {last} at epoch 0, iteration 5 of 11 (no epoch validated)" in log
    after_epoch_0 = rf"resumed from {re.escape(str(last))} at epoch 1, iteration 0 of 11 \(best oIoU [\d.]+, epoch 0\)"
    assert re.search(after_epoch_0, log) and f"removed {stale}" in log


def test_a_stop_asked_during_validation_stops_after_the_epochs_checkpoint(env, straight, tmp_path, monkeypatch):
    """Asked while epoch 0 is validated (after its last iteration, so no iteration boundary sees it): epoch 0's
    checkpoint and metrics, then the stop naming the next epoch's start; the same command then ends as the
    uninterrupted run."""
    real = trainer_module.evaluate

    def evaluate(*args, **kwargs):
        request_checkpoint()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    said = r"checkpoint .*last\.pth written at epoch 1, iteration 0; run the same command with --resume auto"
    with pytest.raises(Preempted, match=said):
        run(env, tmp_path, "--resume", "auto")
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "tiny" / "last.pth")["epoch"] == 0 and len(records(tmp_path / "tiny")) == 1
    run(env, tmp_path, "--resume", "auto")
    assert_same_run(straight, tmp_path / "tiny")


def test_ctrl_c_stops_with_a_checkpoint_and_the_same_command_continues(
    env, straight, tmp_path, monkeypatch, capsys, ctrl_c_default
):
    """Ctrl-C during iteration 6: last.pth at the next boundary, exit status 130 and one line, Python's own Ctrl-C
    back after training; the same command then ends as the uninterrupted run."""
    run_dir = tmp_path / "tiny"
    command = argv(env, tmp_path, "--resume", "auto")
    stop_at_step(monkeypatch, 6, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main_module.cli(command) == main_module.EXIT_INTERRUPTED == 130
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("main.py:")]
    assert lines == [f"main.py: interrupted: Ctrl-C (SIGINT) received: checkpoint {run_dir / 'last.pth'} written at "
                     "epoch 0, iteration 6; run the same command with --resume auto to continue exactly"]  # fmt: skip
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert read_checkpoint(run_dir / "last.pth")["iteration"] == 6
    monkeypatch.undo()
    assert main_module.cli(command) == 0
    assert_same_run(straight, run_dir)


def test_a_second_ctrl_c_stops_at_once(env, tmp_path, monkeypatch, capsys, ctrl_c_default):
    """Ctrl-C twice in iteration 6: no checkpoint waited for; the one of iteration 4 (TRAIN.CHECKPOINT_EVERY) is
    kept, the run folder released, and one line says how to continue."""
    run_dir = tmp_path / "tiny"
    stop_at_step(monkeypatch, 6, lambda: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)])
    assert main_module.cli(argv(env, tmp_path, "--resume", "auto")) == 130
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("main.py:")]
    assert lines == ["main.py: interrupted (Ctrl-C); a training continues from its last checkpoint with --resume auto"]
    assert read_checkpoint(run_dir / "last.pth")["iteration"] == 4
    assert sorted(p.name for p in run_dir.glob("*.lock")) == []


def test_the_first_stop_request_names_the_stop(env, tmp_path, monkeypatch, capsys, ctrl_c_default):
    """Ctrl-C, then the SIGTERM that torchrun adds to it: still stopped by Ctrl-C (status 130, not 75)."""
    stop_at_step(monkeypatch, 2, lambda: [os.kill(os.getpid(), s) for s in (signal.SIGINT, signal.SIGTERM)])
    assert main_module.cli(argv(env, tmp_path, TRAIN__EPOCHS=1)) == 130
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("main.py:")]
    assert len(lines) == 1 and lines[0].startswith("main.py: interrupted: Ctrl-C (SIGINT) received: checkpoint "), lines


def test_ctrl_c_ignored_by_the_process_stays_ignored(env, tmp_path, monkeypatch):
    """A run started with SIGINT ignored (a job put in the background by a shell) does not start to take Ctrl-C."""
    seen = []
    stop_at_step(monkeypatch, 2, lambda: seen.append(signal.getsignal(signal.SIGINT)))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run(env, tmp_path, TRAIN__EPOCHS=1)
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_full_disk_ends_in_one_line_and_the_same_command_continues(env, straight, tmp_path, monkeypatch, capsys):
    """The disk fills while the second checkpoint is written (mid-epoch, iteration 8): one line naming the file,
    status 2, the first checkpoint (iteration 4) kept whole; once there is room, --resume auto ends as the straight
    run."""
    real_save, saved = torch.save, []

    def save_until_full(obj, f):
        if len(saved) == 1:
            f.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(obj["iteration"])
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_until_full)
    assert main_module.cli(argv(env, tmp_path, "--resume", "auto")) == 2
    run_dir = tmp_path / "tiny"
    assert capsys.readouterr().err.splitlines() == [
        f"main.py: error: StorageError: cannot write checkpoint {run_dir / 'last.pth'}: No space left on device; the "
        "file there, if any, is as it was; a training continues from its last checkpoint with --resume auto"
    ]
    assert saved == [4] and read_checkpoint(run_dir / "last.pth")["iteration"] == 4
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    run(env, tmp_path, "--resume", "auto")
    assert_same_run(run_dir, straight)


def test_resume_auto_starts_fresh_then_continues(env, straight, tmp_path):
    log = (straight / "log.txt").read_text()
    assert f"--resume auto: no {straight / 'last.pth'} yet, starting fresh" in log
    run_dir = copy_run(straight, tmp_path)
    before = read_checkpoint(run_dir / "last.pth")
    run(env, tmp_path, "--resume", "auto")  # a finished run: nothing left to train, nothing changed
    after = read_checkpoint(run_dir / "last.pth")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert "nothing left to train" in (run_dir / "log.txt").read_text()
    assert records(run_dir) == records(straight)


def test_mid_epoch_resume_with_other_workers_equals_straight_run(env, straight, stopped, tmp_path):
    """Items are seeded by (seed, epoch, index): DataLoader workers may change on resume, the run stays exact."""
    run_dir = copy_run(stopped, tmp_path)
    run(env, tmp_path, "--resume", "auto", DATA__WORKERS=1)
    assert_same_run(straight, run_dir)


def test_speed_switches_change_freely_and_an_older_run_without_one_resumes(env, straight, stopped, tmp_path):
    """A last.pth saved before MODEL.CONV_GRAD_MATMUL existed, resumed with activation checkpointing on: no
    --allow_change needed, both named in the log, and the run ends as the straight one (the same arithmetic)."""
    run_dir = copy_run(stopped, tmp_path)
    ckpt = read_checkpoint(run_dir / "last.pth")
    saved = CfgNode.load_cfg(ckpt["config"])
    del saved.MODEL["CONV_GRAD_MATMUL"]
    ckpt["config"] = saved.dump()
    checkpoint_io.save_checkpoint(ckpt, run_dir / "last.pth")
    run(env, tmp_path, "--resume", "auto", MODEL__GRAD_CHECKPOINT=True)
    log = (run_dir / "log.txt").read_text()
    said = re.search(r" INFO resume: (.*) \(settings that leave the results alone\)\n", log)
    assert said and "MODEL.GRAD_CHECKPOINT: checkpoint False, now True; OUTPUT: " in said[1]
    assert said[1].endswith("; MODEL.CONV_GRAD_MATMUL: checkpoint '<missing>', now True")
    assert_same_run(straight, run_dir)


def test_moments_saved_in_another_layout_resume_as_the_straight_run(env, straight, stopped, tmp_path):
    """A last.pth whose optimizer moments for the decoder's 3x3 weights are [O, C, 3, 3] contiguous (older code, or a
    run at another batch), resumed where those weights are laid out otherwise (models.conv.training_layout): the
    moments are put in their weights' layout (engine.optim.load_optimizer_state) and the run ends as the straight one
    (the fused AdamW would otherwise pair them with the wrong elements)."""
    run_dir = copy_run(stopped, tmp_path)
    ckpt = read_checkpoint(run_dir / "last.pth")
    moved = 0
    for state in ckpt["optimizer"]["state"].values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == 4 and not value.is_contiguous():
                state[key] = value.contiguous()
                moved += 1
    assert moved >= 12  # both moments of the six 3x3 weights
    checkpoint_io.save_checkpoint(ckpt, run_dir / "last.pth")
    run(env, tmp_path, "--resume", "auto")
    assert_same_run(straight, run_dir)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())  # tensorboard/ included
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _world_size_2(run_dir: Path) -> None:
    """Make last.pth look written by 2 processes (the check reads only these entries)."""
    ckpt = read_checkpoint(run_dir / "last.pth")
    ckpt.update(world_size=2, rng=ckpt["rng"] * 2, meters=ckpt["meters"] * 2)
    checkpoint_io.save_checkpoint(ckpt, run_dir / "last.pth")


@pytest.mark.parametrize(
    ("flags", "over", "message"),
    [
        ([], {"TRAIN__EPOCHS": 3}, "TRAIN.EPOCHS: checkpoint 2, now 3. .*--allow_change TRAIN.EPOCHS$"),
        ([], {"TRAIN__LR": 2e-3}, "TRAIN.LR: checkpoint 0.001, now 0.002. .*--allow_change TRAIN.LR$"),
        ([], {"TRAIN__BATCH_SIZE": 4}, "TRAIN.BATCH_SIZE: checkpoint 8, now 4. .*--allow_change TRAIN.BATCH_SIZE$"),
        ([], {}, "WORLD_SIZE: checkpoint 2, now 1. .*--allow_change WORLD_SIZE$"),
        (
            ["--allow_change", "TRAIN.SEED"],
            {"TRAIN__EPOCHS": 3, "TRAIN__SEED": 1},
            "TRAIN.EPOCHS: checkpoint 2, now 3. .*--allow_change TRAIN.EPOCHS$",
        ),  # fmt: skip
        (
            ["--allow_change", "MODEL.SWIN.STEM"],
            {"MODEL__SWIN__STEM": "conv"},
            "MODEL.SWIN.STEM: checkpoint 'patch', now 'conv'. The weights depend on these keys",
        ),  # fmt: skip
        (["--allow_change", "TRAIN.NOPE"], {}, "--allow_change: TRAIN.NOPE is not a config key"),
    ],
    ids=["epochs", "lr", "batch", "world_size", "one_of_two", "architecture", "unknown_key"],
)
def test_refused_resume_one_line_nothing_changed(env, stopped, tmp_path, capsys, flags, over, message):
    run_dir = copy_run(stopped, tmp_path)
    if "WORLD_SIZE" in message:
        _world_size_2(run_dir)
    before = _snapshot(run_dir)
    assert main_module.cli(argv(env, tmp_path, "--resume", "auto", *flags, **over)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("main.py: error: ")
    assert re.search(message, err[0]), err[0]
    if "not a config key" not in message:
        assert f"checkpoint {run_dir / 'last.pth'} is of another configuration than this run: " in err[0]
    assert _snapshot(run_dir) == before  # config.yaml, log.txt, metrics.jsonl, last.pth: not even touched


def test_resume_needs_a_checkpoint_with_training_state(env, stopped, tmp_path, capsys):
    assert main_module.cli(argv(env, tmp_path, "--resume")) == 2
    assert capsys.readouterr().err.strip() == (
        f"main.py: error: FileNotFoundError: --resume: no checkpoint to continue, {tmp_path / 'tiny' / 'last.pth'} "
        "does not exist (to start fresh when there is none, use --resume auto)"
    )
    assert not (tmp_path / "tiny").exists()
    weights_only = tmp_path / "best.pth"
    ckpt = read_checkpoint(stopped / "last.pth")
    checkpoint_io.save_checkpoint({k: ckpt[k] for k in ("model", "epoch", "best", "config")}, weights_only)
    assert main_module.cli(argv(env, tmp_path, "--resume", str(weights_only))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"main.py: error: CheckpointError: cannot resume from {weights_only}: it holds no optimizer, "
                   "lr_scheduler, scaler, rng (a best.pth or a released model holds weights only: start from it with "
                   "--pretrain instead)"]  # fmt: skip


def test_allowed_changes_recompute_the_schedule(env, stopped, tmp_path, train_objects):
    """--epochs 3 --lr 2e-3 applied on purpose to a run stopped after 3 iterations of 2 epochs: the poly schedule
    is the one of 3 epochs at 2e-3 from there on."""
    run_dir = copy_run(stopped, tmp_path)
    flags = ("--resume", "auto", "--allow_change", "TRAIN.EPOCHS", "TRAIN.LR")
    run(env, tmp_path, *flags, "--stop_after", "1", TRAIN__EPOCHS=3, TRAIN__LR=2e-3)
    per_epoch = train_objects // BATCH
    last = read_checkpoint(run_dir / "last.pth")
    assert last["lr_scheduler"]["last_epoch"] == per_epoch
    expected = 2e-3 * (1 - per_epoch / (3 * per_epoch)) ** 0.9
    assert all(g["lr"] == pytest.approx(expected, rel=1e-12) for g in last["optimizer"]["param_groups"])
    assert all(g["initial_lr"] == 2e-3 for g in last["optimizer"]["param_groups"])
    said = (run_dir / "log.txt").read_text()
    assert "resume applies on purpose TRAIN.EPOCHS: checkpoint 2, now 3; TRAIN.LR: checkpoint 0.001, now 0.002" in said
    assert f"from iteration 3 (of {3 * per_epoch})" in said and "not the one an uninterrupted run" in said
    # the stored configuration is the new one: the same command continues without refusal
    run(env, tmp_path, *flags, "--stop_after", "1", TRAIN__EPOCHS=3, TRAIN__LR=2e-3)
    assert "--allow_change TRAIN.EPOCHS TRAIN.LR: no difference from" in (run_dir / "log.txt").read_text()


def test_a_precision_change_starts_the_loss_scaler_afresh(env, stopped, tmp_path):
    """TRAIN.AMP changed on purpose (float32 -> bf16): the checkpoint's scaler state is not the new precision's; the
    run continues with a fresh one and says so."""
    run_dir = copy_run(stopped, tmp_path)
    run(env, tmp_path, "--resume", "auto", "--allow_change", "TRAIN.AMP", "--stop_after", "1", TRAIN__AMP="bf16")
    log = (run_dir / "log.txt").read_text()
    assert "TRAIN.AMP changed on purpose: the loss scaler starts afresh" in log
    assert read_checkpoint(run_dir / "last.pth")["epoch"] == 0


@pytest.mark.parametrize("batch", [4, 16])
def test_allowed_batch_change_converts_the_position(env, stopped, tmp_path, train_objects, monkeypatch, batch):
    """3 iterations of 8 done = 24 samples: with batch 4 that is iteration 6; with 16 iteration 1 (8 samples seen
    again). One more step, then a stop: the LR there is the 2-epoch poly schedule of the new batch size."""
    run_dir = copy_run(stopped, tmp_path)
    stop_at_step(monkeypatch, 1)
    with pytest.raises(Preempted):
        run(env, tmp_path, "--resume", "auto", "--allow_change", "TRAIN.BATCH_SIZE", TRAIN__BATCH_SIZE=batch)
    per_epoch = train_objects // batch
    done = 3 * BATCH // batch + 1
    last = read_checkpoint(run_dir / "last.pth")
    assert (last["iteration"], last["iters_per_epoch"], last["lr_scheduler"]["last_epoch"]) == (done, per_epoch, done)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(LR * (1 - done / (2 * per_epoch)) ** 0.9)


def test_allowed_world_size_change(env, stopped, tmp_path, monkeypatch):
    run_dir = copy_run(stopped, tmp_path)
    _world_size_2(run_dir)
    stop_at_step(monkeypatch, 1)
    with pytest.raises(Preempted):
        run(env, tmp_path, "--resume", "auto", "--allow_change", "WORLD_SIZE")
    last = read_checkpoint(run_dir / "last.pth")
    # 3 iterations of 2 x 8 samples are 6 of 1 x 8; then one step
    assert (last["iteration"], last["world_size"], len(last["rng"])) == (3 * 2 * BATCH // BATCH + 1, 1, 1)
    assert f"random states of the 2 processes that wrote {run_dir / 'last.pth'} are not restored" in (
        run_dir / "log.txt"
    ).read_text()


def test_seeded_items_do_not_depend_on_order_or_workers(tmp_path_factory):
    """With a seed, an item's random choices (expression, augmentation) depend on (seed, epoch, index) only."""
    ds = build_dataset(tiny_cfg(tmp_path_factory, DATA__AUGMENT=True), "train", eval_mode=False)
    fresh = ds[5]["image"]  # a new dataset is at epoch 0, as a run's first epoch
    indices = [5, 0, 17, 5]

    def items(epoch: int, workers: int) -> list[dict]:
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=None, num_workers=workers)
        return list(loader)

    first = items(0, 0)
    assert torch.equal(first[0]["image"], first[3]["image"]) and torch.equal(first[0]["image"], fresh)
    for a, b in zip(first, items(0, 2)):  # in 2 worker processes
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(first[0]["image"], items(1, 0)[0]["image"])  # another epoch, another augmentation


def test_checkpoint_of_before_mid_epoch_resume_still_resumes(env, straight, tmp_path):
    """A last.pth written before checkpoints held the metrics history and the position: its metrics.jsonl lines up to
    its epoch are kept (the last of an epoch written twice)."""
    run_dir = copy_run(straight, tmp_path)
    ckpt = read_checkpoint(run_dir / "last.pth")
    for key in ("iteration", "iters_per_epoch", "world_size", "meters", "history"):
        del ckpt[key]
    checkpoint_io.save_checkpoint(ckpt, run_dir / "last.pth")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], '{"epoch": 1, "stale": true}', *lines[1:]]) + "\n")
    run(env, tmp_path, "--resume", "auto")
    assert records(run_dir) == records(straight)


def test_mid_epoch_checkpoint_without_the_epochs_averages(env, straight, stopped, tmp_path):
    """A mid-epoch last.pth without the training meters (as written before they were kept) resumes exactly; the log
    says that the epoch's training averages then cover only the iterations after the resume."""
    run_dir = copy_run(stopped, tmp_path)
    ckpt = read_checkpoint(run_dir / "last.pth")
    del ckpt["meters"]
    checkpoint_io.save_checkpoint(ckpt, run_dir / "last.pth")
    run(env, tmp_path, "--resume", "auto")
    log = (run_dir / "log.txt").read_text()
    assert " INFO epoch 0's training averages cover the iterations after the resume only\n" in log
    x, y = read_checkpoint(straight / "last.pth"), read_checkpoint(run_dir / "last.pth")
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    first = [records(d)[0] for d in (straight, run_dir)]
    assert first[0]["train_loss"] != first[1]["train_loss"] and first[0]["val_oIoU"] == first[1]["val_oIoU"]


def test_resumed_epoch_keeps_its_low_res_iterations(env, tmp_path, train_objects, monkeypatch):
    """TRAIN.LOW_RES_EPOCHS covering epoch 0 and 3 iterations of epoch 1, the run stopped after epoch 1's first
    iteration: the resumed epoch trains its iterations 2 and 3 at TRAIN.LOW_RES_SIZE and the rest at DATA.SIZE
    (the iterations count from the epoch's start, not from the resume)."""
    per_epoch = train_objects // BATCH
    over = dict(TRAIN__LOW_RES_SIZE=40, TRAIN__LOW_RES_EPOCHS=(per_epoch + 3) / per_epoch)
    stop_at_step(monkeypatch, per_epoch + 1)
    with pytest.raises(Preempted):
        run(env, tmp_path, **over)
    monkeypatch.undo()
    sides, real_step = [], loops_module.train_step

    def step(model, criterion, *args, **kw):
        def recording(logits, target):
            sides.append(target.shape[-1])
            return criterion(logits, target)

        return real_step(model, recording, *args, **kw)

    monkeypatch.setattr(loops_module, "train_step", step)
    run(env, tmp_path, "--resume", "auto", **over)
    assert sides == [40, 40] + [48] * (per_epoch - 3)
    [log] = list(tmp_path.rglob("log.txt"))  # each run of the folder says how its epochs train
    said = [x.split(" INFO ", 1)[1] for x in log.read_text().splitlines() if "(TRAIN.LOW_RES_SIZE)" in x]
    expected = [f"epoch {e} trains {n} of its {per_epoch} iterations at 40x40 (TRAIN.LOW_RES_SIZE)"
                for e, n in ((0, per_epoch), (1, 3), (1, 3))]  # fmt: skip
    assert said == expected


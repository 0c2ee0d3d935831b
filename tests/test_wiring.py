"""main.main's wiring on tiny runs, every expectation computed apart from the code under test: the default class
weights reach the loss, the LR follows the poly formula to exactly 0 at the last iteration, best.pth holds the
best-oIoU epoch and is what the final evaluation scores, --pretrain fine-tunes from a checkpoint, bf16 training."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import main as main_module
from configs import get_config
from data import build_dataset
from engine import evaluation as evaluation_module
from engine import loops as loops_module
from engine import trainer as trainer_module
from models import read_checkpoint
from utils.distributed import DistInfo

from .helpers_train import tiny_cfg, tiny_opts

# the per-epoch validation scores the run is told: epoch 1 only ties epoch 0, which stays the best (as the official
# train.py, a later epoch must score strictly higher)
VAL_OIOU = [60.0, 60.0]


class Recorder:
    """Wraps ``engine.loops.train_step``: per step, the learning rate it ran with, the loss it returned, and for the
    first step the logits, target, model weights, precision and text cache it saw."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.first: dict[str, Any] = {}
        self.real = loops_module.train_step

    def __call__(self, model, criterion, optimizer, scaler, batch, device, params, **kw):
        if not self.first:
            inner = model.module if hasattr(model, "module") else model
            self.first["state"] = {k: v.detach().clone() for k, v in inner.state_dict().items()}
            self.first["amp"], self.first["text_cache"] = kw.get("amp", ""), kw.get("text_cache")

        def recording(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if "logits" not in self.first:
                self.first.update(logits=logits.detach().float().clone(), target=target.clone())
            return criterion(logits, target)

        self.lrs.append(optimizer.param_groups[0]["lr"])
        loss, norm = self.real(model, recording, optimizer, scaler, batch, device, params, **kw)
        self.losses.append(loss)
        return loss, norm


def _run(env: tuple[Path, Path], out: Path, *flags: str, **over: Any) -> dict[str, Any]:
    data_root, text = env
    over.setdefault("TRAIN__BATCH_SIZE", 8)
    over.setdefault("EVAL__AFTER_TRAIN", False)
    argv = ["--cfg_file", "", "--device", "cpu", *flags, "--opts", *tiny_opts(data_root, text, out, **over)]
    return main_module.main(argv)


@pytest.fixture(scope="module")
def recorded_run(tiny_run_env, tmp_path_factory) -> Iterator[tuple[Path, dict[str, Any], Recorder]]:
    """Two epochs (validation told ``VAL_OIOU``), then the final evaluation of best.pth on val."""
    out = tmp_path_factory.mktemp("wiring")
    recorder = Recorder()
    real_evaluate, calls = trainer_module.evaluate, []

    def told_val(*args, **kwargs):
        metrics, records = real_evaluate(*args, **kwargs)
        calls.append(1)
        return {**metrics, "oIoU": VAL_OIOU[len(calls) - 1]}, records

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loops_module, "train_step", recorder)
        mp.setattr(trainer_module, "evaluate", told_val)
        result = _run(tiny_run_env, out, EVAL__AFTER_TRAIN=True)
    assert len(calls) == 2
    yield out / "tiny", result, recorder


def test_default_class_weights_reach_the_loss(recorded_run):
    """The paper's [0.9, 1.1] (background, object), left at the default, weigh the loss of the first step: a weighted
    mean of the pixels' negative log-likelihoods, written out in numpy."""
    assert get_config(None).TRAIN.CE_WEIGHTS == [0.9, 1.1]  # the recipe, as the paper states it
    _, _, rec = recorded_run
    logits = rec.first["logits"].double().numpy()  # [B, 2, S, S]
    target = rec.first["target"].numpy()  # [B, S, S]
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -np.where(target == 1, log_p[:, 1], log_p[:, 0])
    weight = np.where(target == 1, 1.1, 0.9)
    assert 0 < target.mean() < 1  # both classes present: swapped weights would change the loss
    assert rec.losses[0] == pytest.approx((weight * nll).sum() / weight.sum(), rel=1e-5)
    assert rec.losses[0] != pytest.approx(nll.mean(), rel=1e-4)  # the weights matter here


def test_lr_follows_poly_to_zero_at_the_last_iteration(recorded_run):
    run_dir, _, rec = recorded_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total = len(rec.lrs)
    assert [x["epoch"] for x in lines] == [0, 1] and total % 2 == 0 and total >= 4  # two epochs of equal length
    lr0 = 1e-3  # TRAIN.LR of the tiny run
    mid = total // 2 + 1
    assert rec.lrs[0] == lr0 and rec.lrs[mid] == pytest.approx(lr0 * (1 - mid / total) ** 0.9, rel=1e-9)
    assert rec.lrs[-1] == pytest.approx(lr0 * (1 / total) ** 0.9, rel=1e-9) and rec.lrs[-1] > 0
    assert lines[-1]["train_lr"] == 0.0  # after the last step: exactly zero
    assert read_checkpoint(run_dir / "last.pth")["lr_scheduler"]["last_epoch"] == total


def test_best_checkpoint_is_the_best_epoch_and_the_final_evaluation_scores_it(recorded_run, tiny_run_env, tmp_path):
    run_dir, result, _ = recorded_run
    best, last = read_checkpoint(run_dir / "best.pth"), read_checkpoint(run_dir / "last.pth")
    assert best["epoch"] == 0 and last["epoch"] == 1
    assert best["best"] == last["best"] == {**best["best"], "oIoU": VAL_OIOU[0], "epoch": 0}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["best_oIoU"] for x in lines] == [VAL_OIOU[0], VAL_OIOU[0]]
    line = re.compile(r" INFO epoch (\d): loss [\d.]+, val \(one random expression per object\) mIoU [\d.]+ "
                      r"oIoU ([\d.]+)( \(best\))?, \d+s$")  # fmt: skip
    epochs = [m.groups() for m in map(line.search, (run_dir / "log.txt").read_text().splitlines()) if m]
    assert epochs == [("0", f"{VAL_OIOU[0]:.2f}", " (best)"), ("1", f"{VAL_OIOU[1]:.2f}", None)]
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])

    def scores(summaries: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k not in ("checkpoint", "config")} for s in summaries]

    final = scores(result["summaries"])
    assert result["summaries"][0]["checkpoint"].endswith("best.pth")
    of_best = _run(tiny_run_env, tmp_path / "a", "--eval", "--pretrain", str(run_dir / "best.pth"))
    of_last = _run(
        tiny_run_env, tmp_path / "b", "--eval", "--pretrain", str(run_dir / "last.pth"), EVAL__SHUFFLED_CONTROL=True
    )
    assert final == scores(of_best["summaries"])
    assert final != scores(of_last["summaries"][:1])  # the two epochs score apart, so the check above tells them apart
    annotated, shuffled = of_last["summaries"]
    assert annotated["expressions"] == "as annotated" and shuffled["split"] == "val (expressions shuffled)"
    assert shuffled["expressions"].startswith("shuffled among each image's objects (")


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_pretrain_fine_tunes_from_the_checkpoint(recorded_run, tiny_run_env, tmp_path, resume):
    """--pretrain without --resume, or with --resume auto and no last.pth yet (a job's first launch): the first step
    starts from the file's weights, at epoch 0, with a fresh optimizer and schedule."""
    run_dir, _, _ = recorded_run
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loops_module, "train_step", recorder)
        _run(tiny_run_env, tmp_path, *resume, "--pretrain", str(run_dir / "best.pth"), TRAIN__EPOCHS=1)
    best = read_checkpoint(run_dir / "best.pth")["model"]
    start = recorder.first["state"]
    assert start.keys() == best.keys() and all(torch.equal(start[k], best[k]) for k in best)
    assert recorder.lrs[0] == 1e-3  # a new schedule, not the finished one of the file
    ckpt = read_checkpoint(tmp_path / "tiny" / "last.pth")
    assert ckpt["epoch"] == 0 and ckpt["lr_scheduler"]["last_epoch"] == len(recorder.lrs)
    assert "initialised from" in (tmp_path / "tiny" / "log.txt").read_text()


def test_bf16_training_through_main(tiny_run_env, tmp_path):
    """TRAIN.AMP bf16: the steps run under autocast (bfloat16 logits), the weights and the optimizer stay float32
    and finite, the checkpoint records the precision. One epoch of a few steps (bf16 is slow on a CPU without it)."""
    recorder, dtypes = Recorder(), []
    real_criterion = trainer_module.build_criterion

    def build(*args, **kwargs):
        criterion = real_criterion(*args, **kwargs)
        return lambda logits, target: dtypes.append(logits.dtype) or criterion(logits, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loops_module, "train_step", recorder)
        mp.setattr(trainer_module, "build_criterion", build)
        # with the demo's frozen, cached text encoder: its features are primed under autocast too
        out = _run(tiny_run_env, tmp_path, "--amp", "bf16", TRAIN__EPOCHS=1, TRAIN__BATCH_SIZE=16,
                   MODEL__TEXT__CACHE=True, MODEL__TEXT__TRAIN_LAYERS=0)  # fmt: skip
    laps = [(lap["name"], lap["group"]) for lap in out["timing"]["laps"]]
    assert laps[laps.index(("loading", "")) + 1] == ("datasets and text features", "training")  # the priming's time
    assert recorder.first["amp"] == "bf16" and set(dtypes) == {torch.bfloat16} and len(dtypes) >= 1
    assert len(recorder.first["text_cache"]) > 0  # the steps read the primed features instead of encoding
    assert all(math.isfinite(x) for x in recorder.losses)
    ckpt = read_checkpoint(tmp_path / "tiny" / "last.pth")
    assert ckpt["scaler"]["amp"] == "bf16" and "AMP: bf16" in ckpt["config"]
    floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    start = recorder.first["state"]
    assert any(not torch.equal(start[k], v) for k, v in ckpt["model"].items() if v.is_floating_point())


def test_resume_from_best_is_refused_in_one_line(recorded_run, tiny_run_env, tmp_path, capsys):
    """best.pth holds weights only: --resume from it stops with one line naming the file and what is missing,
    exit status 2, and the run folder is left as it was."""
    run_dir, _, _ = recorded_run
    data_root, text = tiny_run_env
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    argv = ["--cfg_file", "", "--device", "cpu", "--resume", "--pretrain", str(run_dir / "best.pth"), "--opts",
            *tiny_opts(data_root, text, run_dir.parent, TRAIN__BATCH_SIZE=8, EVAL__AFTER_TRAIN=False)]  # fmt: skip
    with pytest.raises(main_module.USER_ERRORS, match=r"best\.pth: it holds no optimizer, .*start from it with"):
        main_module.main(argv)
    assert main_module.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("main.py: error: ") and "best.pth" in err[-1] and "Traceback" not in "\n".join(err)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # log.txt and config.yaml too


@pytest.mark.parametrize("epochs_at_40", ["1", "1 + 3 iterations", "2 iterations"])
def test_low_res_epochs_train_smaller(tiny_run_env, tmp_path, tmp_path_factory, epochs_at_40):
    """TRAIN.LOW_RES_SIZE 40 for the first epoch of two, or a fraction of epochs (epoch 0 and 3 iterations of epoch
    1; 2 iterations of epoch 0): those steps see 40-px logits and masks, the others the 48-px DATA.SIZE; every
    per-epoch validation stays at 48 px."""
    per_epoch = len(build_dataset(tiny_cfg(tmp_path_factory), "train", eval_mode=False)) // 8  # batch 8, drop_last
    low = {"1": per_epoch, "1 + 3 iterations": per_epoch + 3, "2 iterations": 2}[epochs_at_40]
    sizes, evaluated = [], []
    real_step, real_evaluate = loops_module.train_step, trainer_module.evaluate

    def step(model, criterion, *args, **kw):
        def recording(logits, target):
            sizes.append((logits.shape[-1], target.shape[-1]))
            return criterion(logits, target)

        return real_step(model, recording, *args, **kw)

    def evaluate(model, loader, *args, **kw):
        evaluated.extend(batch["image"].shape[-1] for batch in loader)
        return real_evaluate(model, loader, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loops_module, "train_step", step)
        mp.setattr(trainer_module, "evaluate", evaluate)
        _run(tiny_run_env, tmp_path, TRAIN__EPOCHS=2, TRAIN__LOW_RES_SIZE=40, TRAIN__LOW_RES_EPOCHS=low / per_epoch)
    assert per_epoch > 3 and len(sizes) == 2 * per_epoch
    assert sizes == [(40, 40)] * low + [(48, 48)] * (2 * per_epoch - low)
    assert evaluated and set(evaluated) == {48}


def test_the_train_loader_draws_each_epoch_in_the_seeded_shuffled_order(tmp_path_factory):
    """Each rank reads its share of a permutation drawn from ``TRAIN.SEED + epoch`` (DistributedSampler's rule,
    written out here: every rank's stride through one ``randperm``), in full batches only."""
    cfg = tiny_cfg(tmp_path_factory, TRAIN__SEED=5, TRAIN__BATCH_SIZE=4)
    items = list(range(11))  # stands in for a dataset: each item its index
    for epoch in (0, 3):
        order = torch.randperm(11, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        order += order[:1]  # padded to a multiple of the two ranks: 6 each
        for rank in (0, 1):
            info = DistInfo(rank, 2, rank, True, torch.device("cpu"))
            loader, sampler, _ = trainer_module._train_loader(cfg, items, info)
            sampler.set_epoch(epoch)
            assert [i for batch in loader for i in batch.tolist()] == order[rank::2][:4]  # 6 make one batch of 4
            assert len(loader) == 1


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_the_loaders_pin_batches_in_memory_for_a_gpu_only(tmp_path_factory, device, pinned):
    """Page-locked batches copy to a GPU asynchronously; on CPU pinning is only a copy (and needs an accelerator).
    The loaders are built, not iterated, so a machine without CUDA can ask for a CUDA device's."""
    cfg = tiny_cfg(tmp_path_factory, TRAIN__BATCH_SIZE=2)
    info = DistInfo(0, 1, 0, False, torch.device(device))
    train_loader, _, _ = trainer_module._train_loader(cfg, list(range(4)), info)
    assert train_loader.pin_memory is pinned
    assert evaluation_module.eval_loader(cfg, list(range(4)), info, batch_size=2).pin_memory is pinned

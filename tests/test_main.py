"""main.py end to end on a tiny synthetic set: exact resume and the clear errors (2 processes: test_distributed_run)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

import main as main_module
from data import build_dataset
from engine import NonFiniteLossError
from engine import trainer as trainer_module
from models import read_checkpoint
from refer import ReferFileNotFoundError

from .helpers_train import assert_same_weights_and_optimizer, tiny_cfg, tiny_env, tiny_opts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


def run(env, out: Path, *flags: str, **over) -> dict:
    data_root, text = env
    over.setdefault("TRAIN__BATCH_SIZE", 8)
    over.setdefault("EVAL__AFTER_TRAIN", False)
    argv = ["--cfg_file", "", "--device", "cpu", *flags, "--opts", *tiny_opts(data_root, text, out, **over)]
    return main_module.main(argv)


@pytest.mark.parametrize("cache", [False, True], ids=["encoder", "cached_text"])
def test_resumed_run_equals_uninterrupted_run(env, tmp_path, tmp_path_factory, cache):
    over = {"MODEL__TEXT__CACHE": True, "MODEL__TEXT__TRAIN_LAYERS": 0} if cache else {}
    run(env, tmp_path / "straight", **over)
    run(env, tmp_path / "stopped", "--stop_after", "1", **over)
    first = read_checkpoint(tmp_path / "stopped" / "tiny" / "last.pth")
    assert first["epoch"] == 0
    run(env, tmp_path / "stopped", "--resume", **over)
    a = read_checkpoint(tmp_path / "straight" / "tiny" / "last.pth")
    b = read_checkpoint(tmp_path / "stopped" / "tiny" / "last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["best"] == b["best"]
    assert_same_weights_and_optimizer(a, b)
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]
    assert any(not torch.equal(x, y) for x, y in zip(first["model"].values(), a["model"].values()))  # it trained
    lines = (tmp_path / "stopped" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    if cache:  # every train and val expression, each distinct token sequence once
        cfg = tiny_cfg(tmp_path_factory)
        distinct = set()
        for split, eval_mode in (("train", False), ("val", True)):
            ds = build_dataset(cfg, split, eval_mode=eval_mode)
            distinct |= {tuple(i[m.bool()].tolist()) for i, m in zip(ds.input_ids, ds.attention_masks)}
        said = re.search(r" text features of (\d+) distinct expressions cached in [\d.]+s\n",
                         (tmp_path / "straight" / "tiny" / "log.txt").read_text())  # fmt: skip
        assert said and int(said[1]) == len(distinct)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """One epoch of training, then the final evaluation of best.pth on val and testA."""
    out_dir = tmp_path_factory.mktemp("trained")
    out = run(env, out_dir, TRAIN__EPOCHS=1, EVAL__AFTER_TRAIN=True, EVAL__SPLITS=["val", "testA"])
    return out_dir, out


def test_train_then_evaluate_writes_results(env, trained):
    tmp_path, out = trained
    run_dir = tmp_path / "tiny"
    names = {p.name for p in run_dir.iterdir()}
    results = "results_synthetic_unc_val+testA_each_network48.json"
    expected = {"best.pth", "last.pth", "log.txt", "metrics.jsonl", "config.yaml", results}
    assert expected <= names
    per_expression = [f"per_expression_synthetic_unc_{split}_each_network48.jsonl" for split in ("val", "testA")]
    assert set(per_expression) <= names
    summaries = json.loads((run_dir / results).read_text())
    assert summaries == out["summaries"] and [s["split"] for s in summaries] == ["val", "testA"]
    for s in summaries:
        assert s["protocol"] == "each" and s["resolution"] == "network 48x48"
        assert s["checkpoint"].endswith("best.pth") and s["dataset"] == "synthetic (unc)"
        assert "mean of per-expression IoU" in s["definitions"]["mIoU"]
    rec = json.loads((run_dir / per_expression[0]).read_text().splitlines()[0])
    assert {"ref_id", "sent_id", "sentence", "IoU", "I", "U"} <= rec.keys()
    assert "optimizer" not in read_checkpoint(run_dir / "best.pth")  # best.pth: weights for evaluation only

    # evaluation of the checkpoint in another protocol, with the shuffled-expression control
    out = run(
        env, tmp_path, "--eval", "--pretrain", str(run_dir / "best.pth"), "--eval_mode", "avg", "--batch_size", "3",
        "--eval_resolution", "original", EVAL__SHUFFLED_CONTROL=True,
    )  # fmt: skip
    splits = [s["split"] for s in out["summaries"]]
    assert splits == ["val", "val (expressions shuffled)"]
    assert all(s["protocol"] == "avg" and s["resolution"] == "original" for s in out["summaries"])
    assert (run_dir / "results_synthetic_unc_val_avg_original_control.json").is_file()
    assert (run_dir / "config_eval.yaml").is_file()
    # a second evaluation in the same folder keeps the first's config: each results file names its own
    run(env, tmp_path, "--eval", "--pretrain", str(run_dir / "best.pth"), "--eval_mode", "cat", "--batch_size", "3")
    for results, config, mode in [("results_synthetic_unc_val_avg_original_control.json", "config_eval.yaml", "avg"),
                                  ("results_synthetic_unc_val_cat_network48.json", "config_eval-2.yaml", "cat"),
                                  ("results_synthetic_unc_val+testA_each_network48.json", "config.yaml", "each")]:
        assert {s["config"] for s in json.loads((run_dir / results).read_text())} == {config}
        assert f"  MODE: {mode}\n" in (run_dir / config).read_text()


def test_synthetic_eval_images_sets_the_held_out_splits(env, tmp_path):
    """DATA.SYNTHETIC_EVAL_IMAGES: main generates that many images for each of val, testA and testB."""
    root = tmp_path / "syn"
    out = run(env, tmp_path, "--stop_after", "0", DATA__ROOT=str(root), DATA__SYNTHETIC_IMAGES=18,
              DATA__SYNTHETIC_EVAL_IMAGES=4)
    assert "summaries" not in out  # nothing trained, nothing evaluated
    meta = json.loads((root / "synthetic" / "generator.json").read_text())
    assert meta["split_sizes"] == {"train": 6, "val": 4, "testA": 4, "testB": 4}


def test_missing_dataset(env, tmp_path):
    with pytest.raises(ReferFileNotFoundError, match="REFER annotation folder not found: .*refcoco"):
        run(env, tmp_path, DATA__DATASET="refcoco", DATA__ROOT=str(tmp_path / "nothing_here"))


def test_flags_without_a_config_file_point_to_the_demo(tmp_path):
    """``python main.py --opts TRAIN.SEED 1`` runs the paper's recipe, not the demo: the refusal of the missing RefCOCO
    says how to run the demo with flags; with a config file named, it does not."""
    missing = ["--opts", "DATA.ROOT", str(tmp_path / "nothing_here"), "OUTPUT", str(tmp_path / "runs")]
    with pytest.raises(ReferFileNotFoundError) as flags_only:
        main_module.main(missing)
    message = str(flags_only.value)
    assert message.startswith("REFER annotation folder not found: ") and "\n" not in message
    assert message.endswith(" (python main.py alone runs the built-in demo on synthetic data; to run it with flags, "
                            "name its config: --cfg_file configs/demo.yaml)")  # fmt: skip
    assert isinstance(flags_only.value.__cause__, ReferFileNotFoundError)
    with pytest.raises(ReferFileNotFoundError) as named:
        main_module.main(["--cfg_file", str(ROOT / "configs" / "swin_tiny_refcoco.yaml"), *missing])
    assert str(named.value).startswith("REFER annotation folder not found: ") and "demo" not in str(named.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nothing_here").exists()


def test_unwritable_output_folder(env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="output folder .*a_file/tiny cannot be created or written"):
        run(env, blocker)


def test_checkpoint_of_another_configuration(env, trained, tmp_path):
    ckpt = str(trained[0] / "tiny" / "last.pth")
    with pytest.raises(ValueError, match=r"another configuration.*MODEL.SWIN.EMBED_DIM: checkpoint 8, now 16"):
        run(env, tmp_path, "--eval", "--pretrain", ckpt, MODEL__SWIN__EMBED_DIM=16)
    with pytest.raises(ValueError, match=r"another configuration.*DATA.SIZE: checkpoint 48, now 64"):
        run(env, tmp_path, "--resume", "--pretrain", ckpt, DATA__SIZE=64)
    with pytest.raises(ValueError, match="--eval needs the weights to evaluate: --pretrain"):
        run(env, tmp_path, "--eval")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path, tmp_path_factory, monkeypatch):
    real = trainer_module.build_criterion
    iters_per_epoch = len(build_dataset(tiny_cfg(tmp_path_factory), "train", eval_mode=False)) // 8

    def build_nan_in_second_epoch(name, weights):
        criterion, calls = real(name, weights), []

        def nan_later(logits, target):
            calls.append(1)
            loss = criterion(logits, target)
            return loss * float("nan") if len(calls) > iters_per_epoch else loss

        return nan_later

    monkeypatch.setattr(trainer_module, "build_criterion", build_nan_in_second_epoch)
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, iteration 0.*last.pth"):
        run(env, tmp_path)
    last = read_checkpoint(tmp_path / "tiny" / "last.pth")
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("workers", [0, 1])
def test_data_cache_with_workers_warns(env, tmp_path, workers):
    out = run(env, tmp_path, "--stop_after", "0", DATA__CACHE=True, DATA__WORKERS=workers)
    for h in logging.getLogger("lavt").handlers:
        h.flush()
    log = (Path(out["run_dir"]) / "log.txt").read_text()
    warning = (
        "WARNING DATA.CACHE keeps images in the process that reads them: with DATA.WORKERS 1 the workers, and their "
        "caches, end with every epoch (not persistent: the datasets learn each epoch as it starts); set DATA.WORKERS "
        "0 to use the cache\n"
    )
    if workers:
        assert warning in log
    else:  # the cache's own setting: nothing to warn of
        assert "WARNING DATA.CACHE" not in log


def test_the_run_sets_malloc_and_says_so(env, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(main_module, "keep_freed_memory", lambda: calls.append(1) or "malloc: as a test set it")
    out = run(env, tmp_path, "--stop_after", "0")
    for h in logging.getLogger("lavt").handlers:
        h.flush()
    assert calls == [1] and " INFO malloc: as a test set it\n" in (Path(out["run_dir"]) / "log.txt").read_text()


def _git(*args: str) -> str | None:
    """git's output in the repository, or None where it is not a git checkout (a copied tree, as mutmut's)."""
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_the_run_says_where_its_wall_time_went(trained):
    """timing.jsonl: contiguous laps from the start to the final evaluation, the machine and the code's commit; the
    log's last line says the same."""
    tmp_path, out = trained
    run_dir = tmp_path / "tiny"
    record = json.loads((run_dir / "timing.jsonl").read_text().splitlines()[0])
    assert record == json.loads(json.dumps(out["timing"]))  # (JSON: the load average's tuple becomes a list)
    assert record["run"] == "training" and record["precision"] == "float32"
    laps = record["laps"]
    assert [(lap["name"], lap["group"]) for lap in laps] == [
        ("start-up", ""), ("synthetic data", ""), ("loading", ""), ("datasets", "training"), ("epoch 0", "training"),
        ("final evaluation", ""),
    ]  # fmt: skip
    assert all(lap["seconds"] >= 0 for lap in laps)
    assert sum(lap["seconds"] for lap in laps) == pytest.approx(record["wall_s"], abs=0.01)
    started, finished = (datetime.fromisoformat(record[k]) for k in ("started", "finished"))
    assert (finished - started).total_seconds() == pytest.approx(record["wall_s"], abs=0.01)
    epoch_s = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["epoch_time_s"]
    assert isinstance(epoch_s, float) and epoch_s == round(epoch_s, 2)  # to the hundredth (an int: whole seconds)
    assert epoch_s - 0.01 <= laps[4]["seconds"] < epoch_s + 5  # its training and validation, then its checkpoint
    head = _git("rev-parse", "HEAD")
    if head is None:
        assert record["code"] is None
    else:
        assert record["code"].removesuffix("+changes") == head[: len(record["code"].removesuffix("+changes"))]
        assert record["code"].endswith("+changes") == bool(_git("status", "--porcelain", "--untracked-files=no"))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
        numbers = [x.split(":", 1)[1].strip() for x in lines if x.split(":")[0].strip() in ("cpu family", "model")]
        family = f" (family {numbers[0]}, model {numbers[1]})" if len(numbers) >= 2 else ""  # x86 only
        assert record["machine"]["cpu"] == names[0] + family
    assert record["machine"]["cores"] == os.cpu_count() and record["processes"] == 1
    log = (run_dir / "log.txt").read_text()
    assert f" INFO machine: {record['machine']['cpu']}, {os.cpu_count()} cores, " in log  # at the start too
    wall = [x for x in log.splitlines() if " INFO wall time " in x]
    assert wall and wall[0].endswith(", float32") and f" {record['machine']['cpu']}, " in wall[0]
    assert ", training " in wall[0] and "(epoch 0 " not in wall[0] and ": datasets " in wall[0]


def test_python_main_py_counts_its_imports(env, trained, tmp_path):
    """`python main.py`: the wall time starts before the imports (which take seconds), not when main() begins; an
    evaluation appends its own record."""
    best = trained[0] / "tiny" / "best.pth"
    argv = _main_argv(env, tmp_path, ["--eval", "--pretrain", str(best)], [])
    launched = time.time()
    subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    [timing] = list((tmp_path / "runs").rglob("timing.jsonl"))
    [record] = [json.loads(x) for x in timing.read_text().splitlines()]
    assert record["run"] == "evaluation"
    assert [lap["name"] for lap in record["laps"]] == ["start-up", "synthetic data", "loading", "evaluation"]
    first_log = (timing.parent / "log.txt").read_text().splitlines()[0][:23]  # "2026-12-04 04:49:49,753"
    logged = datetime.strptime(first_log, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    started = datetime.fromisoformat(record["started"]).timestamp()
    assert launched - 0.01 <= started < launched + (logged - launched) / 2  # the imports lie between


def _main_argv(env, tmp_path: Path, flags: list[str], extra: list[str]) -> list[str]:
    """``python main.py`` on the tiny run, runs under tmp_path/runs, ``extra`` after the tiny opts (the last value of
    a key wins)."""
    data_root, text = env
    opts = tiny_opts(data_root, text, tmp_path / "runs") + extra
    return [sys.executable, "main.py", "--cfg_file", "", "--device", "cpu", *flags, "--opts", *opts]


@pytest.mark.parametrize(
    ("flags", "extra", "message"),
    [
        ([], ["TRAIN.LR", "nan"], "ConfigError: TRAIN.LR must be a finite number > 0, got nan"),
        ([], ["TRAIN.EPOCHS", "0"], "ConfigError: TRAIN.EPOCHS must be >= 1, got 0"),
        ([], ["EVAL.RESOLUTION", "full"], "EVAL.RESOLUTION must be one of"),
        ([], ["TRAIN.NOT_A_KEY", "1"], "ConfigError: unknown config key TRAIN.NOT_A_KEY in the overrides (TRAIN has"),
        ([], ["DATA.DATASET", "refcoco"], "ReferFileNotFoundError: REFER annotation folder not found: "),
        ([], ["DATA.ROOT", "docs"], f"SyntheticRootError: refusing to write the synthetic dataset into {ROOT}/docs:"),
        (["--eval"], [], "--eval needs the weights to evaluate: --pretrain <checkpoint>"),
        pytest.param(
            [], ["TRAIN.AMP", "fp16"], "ValueError: fp16 needs a GPU or a CPU with AMX-FP16: this CPU emulates",
            marks=pytest.mark.skipif(torch.cpu._is_amx_fp16_supported(), reason="this CPU computes fp16"),
        ),
    ],
)
def test_user_errors_are_one_line_exit_2_nothing_written(env, tmp_path, capsys, flags, extra, message):
    """A wrong value is refused before anything is built or written: one line on stderr, no traceback, status 2
    (``main.cli``, what ``python main.py`` runs: the command itself in the test below)."""
    data_root, _ = env
    argv = _main_argv(env, tmp_path, flags, extra)
    before = sorted(p.name for p in data_root.rglob("*"))
    assert main_module.cli(argv[2:]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("main.py: error: ") and message in lines[-1], err
    assert "Traceback" not in err
    assert sorted(p.name for p in data_root.rglob("*")) == before
    if extra:
        assert not (tmp_path / "runs").exists()  # refused before the run folder was made


def test_the_command_exits_2_on_a_user_error_and_shows_its_traceback_with_debug(env, tmp_path):
    """``python main.py`` itself: the one line and status 2; with --debug the traceback and status 1."""
    argv = _main_argv(env, tmp_path, [], ["TRAIN.LR", "nan"])
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.endswith(
        "main.py: error: ConfigError: TRAIN.LR must be a finite number > 0, got nan\n"
    ), out.stderr
    assert "Traceback" not in out.stderr
    debug = subprocess.run([*argv[:2], "--debug", *argv[2:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr

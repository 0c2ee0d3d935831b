"""main.py under torchrun, 2 processes on CPU (Gloo): train, stop, resume, the final evaluation sharded over both;
a test file of its own so that a parallel suite runs it beside test_main.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main as main_module
from models import read_checkpoint

from .helpers_train import free_port, tiny_env, tiny_opts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


def scores(summaries: list[dict]) -> list[dict]:
    """The summaries without the name of the config file each ran with."""
    return [{k: v for k, v in s.items() if k != "config"} for s in summaries]


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_eval(env, tmp_path):
    data_root, text = env
    opts = tiny_opts(data_root, text, tmp_path, TRAIN__BATCH_SIZE=4, EVAL__BATCH_SIZE=2, EVAL__SPLITS=["val", "testB"])
    envvars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def torchrun(*flags: str, opts: list[str] = opts) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "main.py", "--cfg_file", "", "--device", "cpu", *flags, "--opts", *opts]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=envvars, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun("--stop_after", "1")
    run_dir = tmp_path / "tiny"
    assert read_checkpoint(run_dir / "last.pth")["epoch"] == 0
    assert len(read_checkpoint(run_dir / "last.pth")["rng"]) == 2  # one random state per process
    torchrun("--resume")  # epoch 1, then the final evaluation of best.pth sharded over both processes
    last = read_checkpoint(run_dir / "last.pth")
    assert last["epoch"] == 1
    log = (run_dir / "log.txt").read_text()
    assert "2 process(es)" in log and "resumed from" in log
    sharded = json.loads((run_dir / "results_synthetic_unc_val+testB_each_network48.json").read_text())
    per_expr = (run_dir / "per_expression_synthetic_unc_val_each_network48.jsonl").read_text()

    # the same checkpoint evaluated by one process: identical numbers, identical per-expression records
    single = main_module.main(
        ["--cfg_file", "", "--device", "cpu", "--eval", "--pretrain", str(run_dir / "best.pth"), "--opts", *opts]
    )["summaries"]
    assert scores(single) == scores(sharded)
    # each names its config: the training's, and the evaluation's own (rank 0's name, shared with rank 1)
    assert [s["config"] for s in sharded + single] == ["config.yaml"] * 2 + ["config_eval.yaml"] * 2
    # the first evaluation's files are kept; this one's are numbered
    assert (run_dir / "per_expression_synthetic_unc_val_each_network48-2.jsonl").read_text() == per_expr
    assert json.loads((run_dir / "results_synthetic_unc_val+testB_each_network48-2.json").read_text()) == single

    # with the text feature cache the two processes share the encoding of each split's expressions (each encodes
    # every other batch, then they exchange): the sharded evaluation equals one process's with the cache
    cached = [*opts, "MODEL.TEXT.CACHE", "True", "MODEL.TEXT.TRAIN_LAYERS", "0"]  # an evaluation: nothing trains
    torchrun("--eval", "--save_masks", "--pretrain", str(run_dir / "best.pth"), opts=cached)
    sharded_cached = json.loads((run_dir / "results_synthetic_unc_val+testB_each_network48-3.json").read_text())
    for split in ("val", "testB"):  # both processes' masks in the one folder, and no unfinished folder left
        records = (run_dir / f"per_expression_synthetic_unc_{split}_each_network48-3.jsonl").read_text().splitlines()
        names = {f"{r['ref_id']}_{r['sent_id']}.png" for r in map(json.loads, records)}
        assert set(os.listdir(run_dir / f"masks_synthetic_unc_{split}_each_network48-3")) == names and len(names) > 2
    assert not list(run_dir.glob(".*partial"))
    single_cached = main_module.main(
        ["--cfg_file", "", "--device", "cpu", "--eval", "--pretrain", str(run_dir / "best.pth"), "--opts", *cached]
    )["summaries"]
    assert scores(single_cached) == scores(sharded_cached)
    configs = [s["config"] for s in sharded_cached + single_cached]
    assert configs == ["config_eval-2.yaml"] * 2 + ["config_eval-3.yaml"] * 2

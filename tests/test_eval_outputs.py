"""What an evaluation writes: names by dataset / split / protocol / resolution, numbered instead of replaced, all or
nothing; ``--save_masks`` PNGs that are the masks the evaluation scored; finding the results again."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.eval_masks as eval_masks
import engine.evaluation as evaluation
from args import config_from_args, parse_args
from data import ReferDataset
from engine.config_check import ConfigError, validate_config
from engine.eval_masks import remove_abandoned, staging_folder
from models import build_model
from models.text import load_tokenizer
from refer import REFER
from utils.atomic import StorageError
from utils.distributed import DistInfo
from utils.lock import STALE_AFTER_S

from .helpers_process import ended_process, own_start
from .helpers_train import tiny_cfg

CPU = DistInfo(0, 1, 0, False, torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config, an untrained model whose predictions cover part of each image, and its tokenizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path_factory, EVAL__SPLITS=["val", "testA"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    with torch.no_grad():  # a logit margin around zero: the masks hold both classes
        model.classifier.conv1_1.bias[1] = model.classifier.conv1_1.bias[0] + 0.02
    yield cfg, model, load_tokenizer(cfg.MODEL.TEXT.ENCODER)
    torch.set_num_threads(threads)


def with_eval(cfg, **values):
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in values.items():
        setattr(cfg.EVAL, key, value)
    cfg.freeze()
    return cfg


def test_names_numbered_never_replaced(setup, tmp_path):
    cfg, model, tokenizer = setup
    cfg = with_eval(cfg, SAVE_MASKS=True)
    first = evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    names = {p.name for p in tmp_path.iterdir()}
    base = "synthetic_unc_{}_each_network48"
    expected = {"results_synthetic_unc_val+testA_each_network48.json"} | {
        f"{kind}_{base.format(split)}{ext}"
        for split in ("val", "testA")
        for kind, ext in (("per_expression", ".jsonl"), ("masks", ""))
    }
    assert names == expected  # nothing else: no temporary file or staging folder left
    before = {name: (tmp_path / name).read_bytes() for name in names if name.endswith(("json", "jsonl"))}
    second = evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "b.pth")
    assert {p.name for p in tmp_path.iterdir()} == expected | {
        n.replace(".json", "-2.json") if "." in n else n + "-2" for n in expected
    }
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())  # the first kept as it was
    numbered = json.loads((tmp_path / "results_synthetic_unc_val+testA_each_network48-2.json").read_text())
    assert [s["checkpoint"] for s in numbered] == ["b.pth", "b.pth"] and [s["checkpoint"] for s in first] == [
        "a.pth"
    ] * 2
    assert [s["mIoU"] for s in numbered] == [s["mIoU"] for s in second] == [s["mIoU"] for s in first]
    assert [s["resolution"] for s in first] == ["network 48x48"] * 2  # the setting named in the results


def test_control_and_original_resolution_names(setup, tmp_path, caplog):
    cfg, model, tokenizer = setup
    cfg = with_eval(cfg, SPLITS=["val"], SHUFFLED_CONTROL=True, RESOLUTION="original")
    with caplog.at_level(logging.INFO, logger="lavt"):
        summaries = evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    assert [(s["split"], s["resolution"]) for s in summaries] == [
        ("val", "original"), ("val (expressions shuffled)", "original")
    ]
    progress = {m.split(" total time")[0] for m in caplog.messages if " total time: " in m}  # one line per scoring
    assert progress == {"Eval synthetic_unc_val_each_original", "Eval synthetic_unc_val_each_original_shuffled"}
    assert {p.name for p in tmp_path.iterdir()} == {
        "results_synthetic_unc_val_each_original_control.json",
        "per_expression_synthetic_unc_val_each_original.jsonl",
        "per_expression_synthetic_unc_val_each_original_shuffled.jsonl",
    }


def test_evaluation_tokenizes_with_the_tokenizer_it_is_given(setup, tmp_path, monkeypatch):
    """``main.py`` loads the tokenizer once: each split's dataset uses that one and loads none of its own."""
    cfg, model, tokenizer = setup

    def load_again(name):
        raise AssertionError(f"tokenizer {name} loaded again")

    monkeypatch.setattr("models.text.load_tokenizer", load_again)
    summaries = evaluation.run_evaluation(with_eval(cfg, SPLITS=["val", "testA"]), model, tokenizer, CPU, tmp_path, "a")
    assert [s["split"] for s in summaries] == ["val", "testA"]


@pytest.mark.parametrize("mode", ["cat", "avg"])
def test_joined_protocols_record_each_object_with_all_its_expressions(setup, tmp_path, mode):
    """In ``cat`` and ``avg`` an object is scored once: its record names the object, its image and every one of its
    expressions (ids and words, in the annotation's order), as the REFER annotations give them."""
    cfg, model, tokenizer = setup
    evaluation.run_evaluation(with_eval(cfg, SPLITS=["val"], MODE=mode), model, tokenizer, CPU, tmp_path, "a.pth")
    lines = (tmp_path / f"per_expression_synthetic_unc_val_{mode}_network48.jsonl").read_text().splitlines()
    records = {r["ref_id"]: r for r in map(json.loads, lines)}
    refer = REFER(cfg.DATA.ROOT, "synthetic", "unc")
    refs = refer.getRefIds(split="val")
    assert sorted(records) == sorted(refs) and len(lines) == len(refs)  # one record an object
    for ref_id, r in records.items():
        ref = refer.Refs[ref_id]
        assert (r["image_id"], r["file_name"]) == (ref["image_id"], refer.Imgs[ref["image_id"]]["file_name"])
        assert r["sent_ids"] == ref["sent_ids"] and r["sentences"] == [s["raw"] for s in ref["sentences"]]
        assert 0 <= r["I"] <= r["U"] and "sent_id" not in r


@pytest.mark.parametrize("resolution", ["network", "original"])
def test_saved_masks_are_the_scored_ones(setup, tmp_path, resolution):
    """Each PNG against the ground truth the evaluation used gives the I and U of its per-expression record."""
    cfg, model, tokenizer = setup
    cfg = with_eval(cfg, SPLITS=["val"], SAVE_MASKS=True, RESOLUTION=resolution)
    evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    tag = f"synthetic_unc_val_each_{'network48' if resolution == 'network' else 'original'}"
    records = [json.loads(line) for line in (tmp_path / f"per_expression_{tag}.jsonl").read_text().splitlines()]
    ds = ReferDataset(cfg.DATA.ROOT, "synthetic", "unc", "val", tokenizer, image_size=48, max_tokens=12, eval_mode=True)
    truth = {}
    for item in ds:
        truth[item["ref_id"]] = (item["target"] if resolution == "network" else item["target_orig"]).numpy() != 0
    pngs = sorted((tmp_path / f"masks_{tag}").iterdir())
    assert len(pngs) == len(records) > 3
    mixed = 0
    for r in records:
        mask = np.asarray(Image.open(tmp_path / f"masks_{tag}" / f"{r['ref_id']}_{r['sent_id']}.png"))
        assert set(np.unique(mask)) <= {0, 255}
        gt = truth[r["ref_id"]]
        assert mask.shape == gt.shape
        inter, union = int(np.sum((mask > 0) & gt)), int(np.sum((mask > 0) | gt))
        assert (inter, union) == (r["I"], r["U"]), r
        mixed += 0 < mask.mean() < 255
    assert mixed > len(records) // 2  # neither all background nor all object: the comparison means something


@pytest.mark.parametrize("save_masks", [False, True])
def test_all_or_nothing(setup, tmp_path, monkeypatch, save_masks):
    """A failure while writing (here: the summaries cannot be serialised) leaves no file, complete or not, and no
    unfinished masks."""
    cfg, model, tokenizer = setup
    real = json.dumps

    def failing(obj, *args, **kwargs):
        if isinstance(obj, list):  # the summaries, written after the per-expression records
            raise OSError("disk full")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(evaluation.json, "dumps", failing)
    cfg = with_eval(cfg, SPLITS=["val"], SAVE_MASKS=save_masks)
    with pytest.raises(OSError, match="disk full"):
        evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    assert list(tmp_path.iterdir()) == []


TAG = "synthetic_unc_val_each_network48"


def unfinished(pid: int, host: str, tag: str = TAG, start: int | None = None) -> str:
    """The name of an evaluation's unfinished mask folder, written out here as ``staging_folder`` documents it (an
    older evaluation's without the start time)."""
    return f".masks_{tag}.{pid}{'' if start is None else f'-{start}'}@{host}.partial"


@pytest.mark.parametrize("start", [4321, None])
def test_the_staging_folder_names_this_process(tmp_path, monkeypatch, start):
    """With the process's start time where the system gives one, with the pid alone where it does not."""
    monkeypatch.setattr(eval_masks, "process_start", lambda pid: start if pid == os.getpid() else -1)
    assert staging_folder(tmp_path, TAG) == tmp_path / unfinished(os.getpid(), socket.gethostname(), start=start)


def test_masks_on_a_full_disk(setup, tmp_path, monkeypatch, caplog):
    """The disk fills at the third mask: one StorageError naming it, no results file, the unfinished masks removed.
    The next evaluation writes everything, and removes the masks a killed evaluation left."""
    cfg, model, tokenizer = setup
    cfg = with_eval(cfg, SPLITS=["val"], SAVE_MASKS=True)
    real, saved = Image.Image.save, []

    def save(image, fp, *args, **kwargs):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(StorageError) as caught:
        evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    partial = tmp_path / unfinished(os.getpid(), socket.gethostname(), start=own_start())
    assert [Path(p).parent for p in saved] == [partial, partial] and os.listdir(tmp_path) == []
    name, reason = str(caught.value).removeprefix(f"cannot write mask {partial}{os.sep}").split(": ", 1)
    assert name.endswith(".png") and partial / name not in saved
    assert reason == "No space left on device; the evaluation's unfinished masks are removed"
    monkeypatch.setattr(Image.Image, "save", real)
    pid, start = ended_process()
    killed = tmp_path / unfinished(pid, socket.gethostname(), start=start)
    killed.mkdir()
    with caplog.at_level(logging.INFO, logger="lavt"):
        evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    assert f"removed {killed}: the masks of an evaluation that ended before writing its results" in caplog.messages
    assert sorted(os.listdir(tmp_path)) == [f"masks_{TAG}", f"per_expression_{TAG}.jsonl", f"results_{TAG}.json"]


def test_the_unfinished_masks_of_ended_evaluations_are_removed(tmp_path):
    """On this host: those whose process is not running, or whose pid a process started at another time now has
    (reused); of another host (whose processes cannot be seen): those untouched for the lock's stale time. Running
    evaluations' folders (named with or without their start time), and names of no evaluation, stay."""
    host = socket.gethostname()
    names = {
        "running": unfinished(os.getpid(), host, start=own_start()),
        "running, named without its start": unfinished(os.getpid(), host, "synthetic_unc_testB_each_network48"),
        "pid reused": unfinished(os.getpid(), host, "synthetic_unc_val_avg_network48", start=own_start() + 1),
        "ended": unfinished(ended_process()[0], host, "refcoco+_unc_testB_cat_original_shuffled"),
        "away, recent": unfinished(1, "node-7.cluster.example"),
        "away, untouched": unfinished(os.getpid(), "node-7.cluster.example", "synthetic_unc_testA_avg_network96"),
        "no owner": f".masks_{TAG}.partial",
        "not a mask folder": f".other_{TAG}.1@{host}.partial",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "1_2.png").write_bytes(b"png")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(tmp_path / names["away, untouched"], (old, old))
    removed = remove_abandoned(tmp_path)
    assert sorted(removed) == sorted(tmp_path / names[k] for k in ("ended", "pid reused", "away, untouched"))
    kept = ("running", "running, named without its start", "away, recent", "no owner", "not a mask folder")
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in kept)
    assert remove_abandoned(tmp_path, stale_after_s=1e-9) == [tmp_path / names["away, recent"]]


@pytest.mark.parametrize("taken", ["masks", "per_expression", "results"])
def test_a_name_taken_while_writing_moves_this_evaluation_to_the_next_number(setup, tmp_path, monkeypatch, taken):
    """Another evaluation into the same folder places one of the names this one chose (an empty mask folder: a
    rename would replace it): this one writes all of its files under the next number, and theirs stays."""
    cfg, model, tokenizer = setup
    cfg = with_eval(cfg, SPLITS=["val"], SAVE_MASKS=True)
    theirs = tmp_path / {"masks": f"masks_{TAG}", "per_expression": f"per_expression_{TAG}.jsonl"}.get(
        taken, f"results_{TAG}.json"
    )
    real = evaluation.EvalFiles.first_free

    def first_free(self):
        chosen = real(self)
        if not theirs.exists():  # placed by the other evaluation just after this one chose its number
            theirs.mkdir() if taken == "masks" else theirs.write_text("theirs")
        return chosen

    monkeypatch.setattr(evaluation.EvalFiles, "first_free", first_free)
    summaries = evaluation.run_evaluation(cfg, model, tokenizer, CPU, tmp_path, "a.pth")
    mine = [f"masks_{TAG}-2", f"per_expression_{TAG}-2.jsonl", f"results_{TAG}-2.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(mine + [theirs.name])
    assert os.listdir(theirs) == [] if taken == "masks" else theirs.read_text() == "theirs"
    assert json.loads((tmp_path / mine[2]).read_text()) == summaries
    records = (tmp_path / mine[1]).read_text().splitlines()
    assert len(records) == len(os.listdir(tmp_path / mine[0])) == summaries[0]["num_expressions"] > 3


def test_find_per_expression(setup, tmp_path):
    cfg = with_eval(setup[0], SPLITS=["val"])
    assert evaluation.find_per_expression(tmp_path, cfg, "val") is None
    nested = tmp_path / "eval" / "b"
    nested.mkdir(parents=True)
    old, new = (
        tmp_path / "per_expression_synthetic_unc_val_each_network48.jsonl",
        nested / ("per_expression_synthetic_unc_val_each_network48-3.jsonl"),
    )
    other = tmp_path / "per_expression_synthetic_unc_val_each_network96.jsonl"  # another resolution
    for stamp, path in enumerate((old, new, other)):  # written in this order
        path.write_text("{}\n")
        os.utime(path, (1_000_000 + stamp, 1_000_000 + stamp))
    assert evaluation.find_per_expression(tmp_path, cfg, "val") == new
    assert evaluation.find_per_expression(tmp_path, cfg, "testA") is None
    assert evaluation.find_per_expression(tmp_path, cfg, "val", shuffled=True) is None  # the control's are apart
    shuffled = tmp_path / "per_expression_synthetic_unc_val_each_network48_shuffled.jsonl"
    shuffled.write_text("{}\n")
    assert evaluation.find_per_expression(tmp_path, cfg, "val", shuffled=True) == shuffled
    assert evaluation.find_per_expression(tmp_path, cfg, "val") == new


def test_save_masks_flag_and_its_mode():
    args = parse_args(["--eval", "--save_masks", "--pretrain", "x.pth"])
    assert config_from_args(args).EVAL.SAVE_MASKS is True
    with pytest.raises(ConfigError) as caught:
        validate_config(config_from_args(parse_args(["--save_masks", "--eval_mode", "avg"])))
    assert str(caught.value) == "EVAL.SAVE_MASKS writes each expression's mask: it needs EVAL.MODE each, got 'avg'"


@pytest.mark.parametrize("mode", ["each", "cat"])
def test_text_cache_encodes_each_split_once(setup, tmp_path, mode):
    """With MODEL.TEXT.CACHE the text encoder runs once per 64 distinct expressions of a split, whose scoring as
    annotated and shuffled control both read the cache (in ``cat`` mode the joined expressions are encoded as the
    batches come, none twice); the records are those of the evaluation that encodes every batch."""
    cfg, _, tokenizer = setup
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.TEXT.TRAIN_LAYERS = 0
    cfg.EVAL.update(SPLITS=["val"], SHUFFLED_CONTROL=True, MODE=mode, BATCH_SIZE=2)
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    calls = []
    model.text_encoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    records = {}
    for cache in (False, True):
        calls.clear()
        c = cfg.clone()
        c.defrost()
        c.MODEL.TEXT.CACHE = cache
        c.freeze()
        out = tmp_path / str(cache)
        out.mkdir()
        evaluation.run_evaluation(c, model, tokenizer, CPU, out, "a.pth")
        records[cache] = sorted(out.glob("per_expression_*.jsonl"))
        encoded = sum(len(k["input_ids"]) for k in calls)
        if not cache:
            batches = len(calls)
        elif mode == "each":
            ds = ReferDataset(cfg.DATA.ROOT, "synthetic", "unc", "val", tokenizer, image_size=48, max_tokens=12,
                              eval_mode=True)  # fmt: skip
            distinct = {tuple(row[m.bool()].tolist()) for row, m in zip(ds.input_ids, ds.attention_masks)}
            assert encoded == len(distinct) and len(calls) == -(-len(distinct) // 64) < batches
        else:  # joined expressions (the shuffled pass joins others) encoded as batches need them, none twice
            rows = [tuple(r[m.bool()].tolist()) for k in calls for r, m in zip(k["input_ids"], k["attention_mask"])]
            assert len(set(rows)) == encoded and len(calls) <= batches
    assert len(records[True]) == len(records[False]) == 2
    for a, b in zip(records[False], records[True]):
        assert a.name == b.name and a.read_text() == b.read_text()


def test_a_broken_link_takes_its_name(setup, tmp_path):
    """A symbolic link to nothing under a name this evaluation would take (its target not there: ``exists()`` is
    False, but no file can be placed there): the next number, the link left as it is."""
    cfg, model, tokenizer = setup
    link = tmp_path / f"results_{TAG}.json"
    link.symlink_to(tmp_path / "gone.json")
    evaluation.run_evaluation(with_eval(cfg, SPLITS=["val"]), model, tokenizer, CPU, tmp_path, "a.pth")
    assert sorted(os.listdir(tmp_path)) == sorted([f"per_expression_{TAG}-2.jsonl", link.name, f"results_{TAG}-2.json"])
    assert os.readlink(link) == str(tmp_path / "gone.json")


def _evaluate_after_the_other_chose(cfg, run_dir, checkpoint, barrier) -> None:
    """In a process of its own: the setup's model evaluated into ``run_dir``, waiting after choosing its number
    until the other process has chosen too (so that both choose the same)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    real, calls = evaluation.EvalFiles.first_free, []

    def first_free(self):
        chosen = real(self)
        calls.append(chosen.number)
        if len(calls) == 1:
            barrier.wait(timeout=60)
        return chosen

    evaluation.EvalFiles.first_free = first_free
    evaluation.run_evaluation(cfg, model, load_tokenizer(cfg.MODEL.TEXT.ENCODER), CPU, run_dir, checkpoint)


def test_two_processes_that_chose_the_same_number_keep_both_evaluations(setup, tmp_path):
    """Real processes (os.link and mkdir as the file system does them): one writes under the number both chose,
    the other under the next; each set whole."""
    cfg = with_eval(setup[0], SPLITS=["val"], SAVE_MASKS=True)
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    procs = [
        spawn.Process(target=_evaluate_after_the_other_chose, args=(cfg, tmp_path, name, barrier))
        for name in ("a.pth", "b.pth")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    sets = [[f"masks_{TAG}{n}", f"per_expression_{TAG}{n}.jsonl", f"results_{TAG}{n}.json"] for n in ("", "-2")]
    assert sorted(os.listdir(tmp_path)) == sorted(sets[0] + sets[1])
    checkpoints = set()
    for masks, per_expression, results in sets:
        (summary,) = json.loads((tmp_path / results).read_text())
        checkpoints.add(summary["checkpoint"])
        records = (tmp_path / per_expression).read_text().splitlines()
        assert len(records) == len(os.listdir(tmp_path / masks)) == summary["num_expressions"] > 3
    assert checkpoints == {"a.pth", "b.pth"}

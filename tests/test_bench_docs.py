"""The scripts in docs/ that measure this code against the official one (``bench_official.py``, side by side;
``bench_floor.py``, the floor in float32 or bf16), the decoder's convolutions (``bench_winograd.py``) and the step
part by part (``bench_split.py``), and the predictions in float32 and bf16 (``bench_predict.py``): their timing,
ratios and setup, without the official checkout."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F


def _docs_script(name: str):
    """docs/<name>.py, loaded as the script it is (docs/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_official():
    return _docs_script("bench_official")


def test_float32_floor_counts_the_work_and_divides_by_the_matmul_rate():
    """docs/bench_floor.py: each function's FLOPs (a 96^3 product: 2 x 96^3; a 3x3 convolution of 4 -> 8 channels
    on 10x10: 2 x 8 x 4 x 9 x 100), its floor at the median matmul rate of the timed rounds, time over floor."""
    bench = _docs_script("bench_floor")
    a, x, w = torch.randn(96, 96), torch.randn(1, 4, 10, 10), torch.randn(8, 4, 3, 3)
    out = bench.floor({"mm": lambda: a @ a, "conv": lambda: F.conv2d(x, w, padding=1)}, repeats=3, matmul_size=128)
    assert out["mm"]["gflop"] * 1e9 == 2 * 96**3 and out["conv"]["gflop"] * 1e9 == 2 * 8 * 4 * 9 * 100
    rounds = out["matmul_rounds"]
    assert len(rounds) == 3 and out["matmul_gflop_per_s"] == sorted(rounds)[1]  # the warm-up round left out
    for name in ("mm", "conv"):
        entry = out[name]
        assert entry["floor_ms"] == pytest.approx(entry["gflop"] / out["matmul_gflop_per_s"] * 1e3)
        assert entry["over_floor"] == pytest.approx(entry["median_ms"] / entry["floor_ms"]) and entry["median_ms"] > 0


def test_bf16_floor_divides_by_the_bf16_matmul_rate(monkeypatch):
    """docs/bench_floor.py --amp bf16: the rate is measured in bf16 in every round (a fixed rate here, so the floor is
    the FLOPs over it exactly)."""
    bench = _docs_script("bench_floor")
    asked = []

    def rate(dtype, device, size=None, runs=5):
        asked.append(dtype)
        return 4e9

    monkeypatch.setattr(bench, "matmul_flops_per_s", rate)
    a = torch.randn(64, 64)
    out = bench.floor({"mm": lambda: a @ a}, repeats=2, dtype=torch.bfloat16)
    assert asked == [torch.bfloat16] * 3  # the warm-up round and 2 timed ones
    assert out["matmul_gflop_per_s"] == 4 and out["mm"]["floor_ms"] == pytest.approx(2 * 64**3 / 4e9 * 1e3)


def test_winograd_bench_times_the_official_decoders_convolutions_both_ways(tmp_path, monkeypatch):
    """docs/bench_winograd.py: the six convolutions of the official decoder (Swin-T at 224: 1152 and 384 channels at
    14x14, 576 and 384 at 28x28, 480 and 384 at 56x56), oneDNN against Winograd, whose side runs Winograd."""
    bench = _docs_script("bench_winograd")
    assert bench.decoder_convolutions(96, 224) == [
        (1152, 384, 14), (384, 384, 14), (576, 384, 28), (384, 384, 28), (480, 384, 56), (384, 384, 56)
    ]
    assert bench.decoder_convolutions(128, 480)[4] == (640, 512, 120)  # Swin-B at the paper's size
    ran = []

    def counted(x, weight):
        ran.append(x.shape)
        return F.conv2d(x, weight, padding=1)

    monkeypatch.setattr(bench.conv_module, "winograd_conv3x3", counted)
    for name in ("CHUNK_PIXELS", "MIN_TILES_F4"):  # put back after the test
        monkeypatch.setattr(bench.winograd, name, getattr(bench.winograd, name))
    args = ["--sizes", "32", "--batches", "1", "--embed_dim", "4", "--repeats", "1", "--threads", "1"]
    rows = bench.main(args + ["--chunk_pixels", "7", "--float32_tile", "2", "--precisions", "float32",
                              "--json", str(tmp_path / "w.json")])
    assert bench.winograd.CHUNK_PIXELS == {2: 7, 4: 7} and bench.winograd.tiling_for(torch.float32, 99, 8, 8).m == 2
    assert len(rows) == 2 * 6 and rows == json.loads((tmp_path / "w.json").read_text())  # train, eval x 6 convs
    assert {r["precision"] for r in rows} == {"float32"} and {r["phase"] for r in rows} == {"train", "eval"}
    assert len(ran) == 2 * 6 * 2  # each row: the warm-up and one timed turn on the Winograd side
    assert {(r["in_chans"], r["side"]) for r in rows} == {(48, 2), (16, 2), (24, 4), (16, 4), (20, 8), (16, 8)}
    for r in rows:
        assert r["speedup"] == pytest.approx(r["onednn_ms"] / r["winograd_ms"]) and not r["rule_takes_it"]
    assert bench.conv_module.winograd_pays is bench.winograd.winograd_pays  # the rule put back


def test_official_comparison_takes_turns_and_refuses_a_wrong_checkout(tmp_path):
    bench = _bench_official()
    calls = []
    fns = {"official": lambda: calls.append("o"), "repo": lambda: calls.append("r")}
    times = bench.alternate(fns, warmup=1, repeats=4, inner=2)
    # one warm-up round, then each round's first alternates: o o r r | r r o o | o o r r | r r o o
    assert "".join(calls) == "or" + "oorr" + "rroo" + "oorr" + "rroo"
    assert {k: len(v) for k, v in times.items()} == {"official": 4, "repo": 4}
    assert bench.paired_ratio([2.0, 3.0, 9.0], [1.0, 1.0, 3.0]) == {"median": 3.0, "min": 2.0, "max": 3.0}
    with pytest.raises(FileNotFoundError, match=r"--official .*: no lib/segmentation.py; give a checkout"):
        bench.main(["--official", str(tmp_path), "--json", str(tmp_path / "out.json")])
    assert list(tmp_path.iterdir()) == []


def test_official_comparison_sets_mains_malloc_for_both_unless_told(tmp_path, monkeypatch):
    bench = _bench_official()
    kept = []
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: kept.append(1) or "")
    for flags, expected in (([], [1]), (["--malloc", "default"], [])):
        kept.clear()
        with pytest.raises(FileNotFoundError, match="no lib/segmentation.py"):  # set before the checkout is read
            bench.main(["--official", str(tmp_path), "--json", str(tmp_path / "out.json"), *flags])
        assert kept == expected, flags


def test_official_evaluation_as_its_test_loop_runs_it_one_expression_per_forward():
    bench = _bench_official()
    seen = []

    class Head(torch.nn.Module):  # stands for the official segmentation model: records each forward's batch
        def forward(self, image, embedding, l_mask):
            seen.append(len(image))
            return image.mean((1, 2, 3))[:, None] + (embedding * l_mask.transpose(1, 2)).sum((1, 2))[:, None]

    def bert(ids, attention_mask):
        return (ids[..., None].float().expand(-1, -1, 4),)

    off = SimpleNamespace(model=Head(), bert=bert)
    batch = {"image": torch.randn(3, 3, 8, 8), "input_ids": torch.randint(1, 50, (3, 5)),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])}  # fmt: skip
    out = bench.official_eval_rows_fn(off, batch, "")()
    assert seen == [1, 1, 1]
    expected = batch["image"].mean((1, 2, 3)) + 4 * (batch["input_ids"] * batch["attention_mask"]).sum(1).float()
    assert torch.allclose(out[:, 0], expected)


def test_official_comparison_goals_read_the_medians():
    bench = _bench_official()

    def entry(official: float, repo: float) -> dict:
        return {"impls": {"official": {"median_ms": official}, "repo": {"median_ms": repo}}}

    results = {"train/fp32": entry(200.0, 100.0), "train/bf16": entry(90.0, 80.0), "eval/fp32": entry(30.0, 40.0),
               "eval_batched/fp32": entry(30.0, 12.0)}  # fmt: skip
    assert bench.goals(results) == [
        "- train: repo fp32 vs official fp32: 2.00x (target >= 1.0x: met)",
        "- train: repo bf16 vs official bf16: 1.12x (target >= 1.3x: not met)",
        "- eval: repo fp32 vs official fp32: 0.75x (target >= 1.0x: not met)",
        "- train: repo fastest vs official fp32: 2.50x (target >= 2.0x: met)",  # bf16's 80 ms against fp32's 200
        "- eval_batched: repo fastest vs official fp32: 2.50x (target >= 2.0x: met)",
    ]


def test_official_comparison_goals_need_the_per_round_ratio_too():
    """Paired rounds (one precision) count only when the median of their ratios also reaches the target."""
    bench = _bench_official()
    official, repo = [130.0, 100.0, 140.0], [100.0, 90.0, 100.0]  # medians 130 / 100; per round 1.30, 1.11, 1.40

    def entry(ratio: dict) -> dict:
        impls = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)}
                 for name, t in (("official", official), ("repo", repo))}  # fmt: skip
        return {"impls": impls, "ratios": {"repo": ratio}}

    paired = bench.paired_ratio(official, repo)
    assert paired["median"] == pytest.approx(1.3) and paired["min"] == pytest.approx(100 / 90)
    assert bench.goals({"train/bf16": entry({"of_medians": 1.3, "paired": paired})}) == [
        "- train: repo bf16 vs official bf16: 1.30x, per repeat 1.30x (target >= 1.3x: met)"
    ]
    low = {**paired, "median": 1.25}
    assert bench.goals({"train/bf16": entry({"of_medians": 1.3, "paired": low})}) == [
        "- train: repo bf16 vs official bf16: 1.30x, per repeat 1.25x (target >= 1.3x: not met)"
    ]
    table = bench.format_table({"train/bf16": {"batch": 2, **entry({"of_medians": 1.3, "paired": low})}},
                               ["official", "repo"])  # fmt: skip
    assert "1.30x (per repeat 1.25, 1.11-1.40)" in table


@pytest.mark.parametrize(
    "fused,conv_grad,winograd", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]
)
def test_official_comparison_columns_differ_by_their_switch_alone(fused, conv_grad, winograd):
    """The repo columns beside the official one: the defaults, with only the named switch off."""
    bench = _bench_official()
    args = SimpleNamespace(window=7, size=224, batch_size=2, seed=0, amp="both")
    cfg = bench.repo_config(args, "some/bert", fused, conv_grad_matmul=conv_grad, winograd=winograd)
    switches = cfg.MODEL.FUSED_ATTENTION, cfg.MODEL.CONV_GRAD_MATMUL, cfg.MODEL.CONV_WINOGRAD
    assert switches == (fused, conv_grad, winograd)
    assert cfg.MODEL.TEXT.ENCODER == "some/bert" and cfg.DATA.SIZE == 224 and cfg.MODEL.SWIN.WINDOW_SIZE == 7
    assert cfg.TRAIN.FUSED_ADAMW and cfg.MODEL.TEXT.TRAIN_LAYERS == 10  # the defaults the table's setup names
    assert cfg.TRAIN.AMP == "bf16"  # built as bf16 training builds it (the decoder's weight layouts)
    args.amp = "fp32"
    assert bench.repo_config(args, "some/bert").TRAIN.AMP == ""


class _Slow(torch.autograd.Function):
    """Identity whose backward sleeps ``seconds``."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class _Part(torch.nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        time.sleep(self.forward_s)
        return _Slow.apply(self.lin(x), self.backward_s)


def test_split_gives_each_part_its_own_forward_and_backward():
    """docs/bench_split.py: a part that sleeps 60 ms in its forward and one that sleeps 60 ms in its backward (two of
    them, 30 ms each, counted as one part) are told apart; a part never called has no time; the step's total
    includes both, the rest what is outside the parts; the hooks are removed afterwards."""
    bench = _docs_script("bench_split")
    first, second = _Part(0.06, 0.0), [_Part(0.0, 0.03), _Part(0.0, 0.03)]
    x = torch.randn(2, 4, requires_grad=True)

    def step():
        y = x
        for part in (first, *second):
            y = part(y)
        y.sum().backward()
        time.sleep(0.02)  # outside every part

    out = bench.split(step, {"first": [first], "second": second, "unused": [_Part(0, 0)]}, warmup=1, repeats=3)
    parts = out["parts"]
    assert parts["unused"] == {"forward": None, "backward": None}  # never called: not a time of 0
    assert parts["first"]["forward"] >= 60 and parts["second"]["backward"] >= 60
    assert parts["first"]["backward"] < 20 and parts["second"]["forward"] < 20
    assert out["step_ms"] >= 140 and out["rest_ms"] >= 20
    assert not first._forward_hooks and not first._forward_pre_hooks and not second[0]._backward_hooks


def test_split_names_the_lavt_parts():
    bench = _docs_script("bench_split")
    from models import build_model

    from .helpers_model import tiny_cfg

    model = build_model(tiny_cfg(), pretrained=False)
    parts = bench.model_parts(model)
    assert parts["decoder"] == [model.classifier] and "text encoder" not in parts  # the tiny model has none
    assert parts["stage 1 blocks"] == list(model.backbone.layers[0].blocks)
    assert parts["stage 4 PWAM"] == [model.backbone.layers[3].fusion] and "stage 4 merging" not in parts
    assert "stage 3 merging" in parts


def test_predict_bench_times_the_precisions_in_turns(monkeypatch):
    """docs/bench_predict.py: one warm-up call each, then rounds in turn; medians and per-round ratios from the
    clock (a fake one here: float32 calls take 3, 5, 4 s, bf16 ones 2 s)."""
    bench = _docs_script("bench_predict")
    now, calls = [0.0], []
    durations = {"float32": iter([9.0, 3.0, 5.0, 4.0]), "bf16": iter([9.0, 2.0, 2.0, 2.0])}

    class Fake:
        def __init__(self, name):
            self.name = name

        def predict(self, image, texts):
            calls.append((self.name, tuple(texts)))
            now[0] += next(durations[self.name])

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    out = bench.time_predictors({"float32": Fake("float32"), "bf16": Fake("bf16")}, None, ["a", "b"], rounds=3)
    assert [name for name, _ in calls] == ["float32", "bf16"] * 4 and {t for _, t in calls} == {("a", "b")}
    assert out["expressions"] == 2 and out["median_s"] == {"float32": 4.0, "bf16": 2.0}
    assert out["float32_over_bf16"] == {"per_round": [1.5, 2.5, 2.0], "median": 2.0}


def test_predict_bench_end_to_end(tmp_path):
    """docs/bench_predict.py on the demo's small model: both precisions' rows, the machine and the setup in the JSON."""
    bench = _docs_script("bench_predict")
    out = tmp_path / "p.json"
    rows = bench.main(["--cfg_file", "configs/demo.yaml", "--opts", "DATA.SIZE", "48", "--image_size", "30x40",
                       "--expressions", "2", "--rounds", "1", "--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and len(rows) == 1 and rows[0]["expressions"] == 2
    assert set(rows[0]["median_s"]) == {"float32", "bf16"} and len(rows[0]["float32_over_bf16"]["per_round"]) == 1
    assert saved["setup"]["input"] == 48 and saved["setup"]["image"] == [30, 40] and "cpu" in saved["setup"]["machine"]

"""Speed-ups that must not change results: float32 fast paths against the official fixture, bf16 within a stated
tolerance, a model that keeps no state between calls, and the benchmark's measurements (on a tiny config, in
seconds)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import build_model, conv, load_weights, winograd
from models.decoder import SimpleDecoder
from models.refine import EdgeRefine
from tools import bench_input, bench_workload, benchmark
from utils.profiling import PeakMemory, count_flops, time_interleaved

from . import oracle
from .conftest import tiny_opts
from .helpers_model import KernelLayouts, fixture_cfg, tiny_cfg

#: bf16 autocast against float32 on the fixture: relative L2 error of the logits and of every stage's features,
#: the largest logit error relative to the largest logit, and pixels whose argmax may flip (near-ties).
BF16_REL_L2 = 0.03
BF16_REL_MAX = 0.05
BF16_ARGMAX_AGREE = 0.99

TINY_OPTS = tiny_opts()


@pytest.fixture(scope="module")
def fixture_file(reference, tmp_path_factory):
    """The fixture's weights as an official 'lavt' file, read back through models.load_weights."""
    path = tmp_path_factory.mktemp("weights") / "lavt_small_w7_224.pth"
    torch.save(reference["checkpoint"], path)
    return path


def _fixture_model(reference, fixture_file, **over):
    model = build_model(fixture_cfg(reference, **over))
    load_weights(model, fixture_file)
    return model


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err < 1e-5 * max(ref.abs().max().item(), 1.0), f"max abs error {err:.3g}"


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture
def winograd_calls(monkeypatch) -> list[int]:
    """Every decoder convolution of MODEL.CONV_WINOGRAD taken by Winograd (the tiny models are below where it pays),
    each call counted."""
    calls = []

    def counted(x, weight):
        calls.append(1)
        return winograd.winograd_conv3x3(x, weight)

    monkeypatch.setattr(winograd, "has_amx", lambda: False)
    monkeypatch.setattr(winograd, "MIN_TILES_FLOAT32", 1)
    monkeypatch.setattr(winograd, "MIN_TILES_FLOAT32_AVX2", 1)
    monkeypatch.setattr(winograd, "MIN_TILES_F4", 1)  # float32 by the larger tile, as on large maps
    monkeypatch.setattr(winograd, "MIN_TILES_LOW_PRECISION", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "winograd_conv3x3", counted)
    return calls


@pytest.mark.parametrize("fused_attn,winograd", [(True, False), (False, False), (True, True)])
def test_float32_fast_paths_reproduce_fixture(reference, fixture_file, fused_attn, winograd, winograd_calls):
    model = _fixture_model(
        reference, fixture_file, MODEL__FUSED_ATTENTION=fused_attn, MODEL__CHANNELS_LAST=True,
        MODEL__CONV_WINOGRAD=winograd,
    )
    with torch.no_grad():
        logits = model.eval().segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    _close(logits, reference["logits"])
    assert len(winograd_calls) == (6 if winograd else 0)


def test_training_mode_paths_reproduce_fixture(reference, fixture_file):
    """With gradients on (the attention kernel chosen for a backward) and checkpointing running each block under
    torch.utils.checkpoint: still the fixture's logits. (BatchNorm in eval mode: batch statistics differ.)"""
    model = _fixture_model(
        reference, fixture_file, MODEL__FUSED_ATTENTION=True, MODEL__GRAD_CHECKPOINT=True, MODEL__CHANNELS_LAST=True
    ).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    out = model.segment(reference["image"], reference["lang_feats"], reference["lang_mask"])
    assert out.requires_grad
    _close(out.detach(), reference["logits"])


def test_fast_training_paths_give_the_same_gradients(winograd_calls):
    torch.manual_seed(7)
    plain = build_model(tiny_cfg(MODEL__FUSED_ATTENTION=False, MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4])).train()
    fast = build_model(
        tiny_cfg(
            MODEL__FUSED_ATTENTION=True,
            MODEL__GRAD_CHECKPOINT=True,
            MODEL__CHANNELS_LAST=True,
            MODEL__CONV_WINOGRAD=True,
            MODEL__FUSION__NUM_HEADS=[1, 2, 2, 4],
        )
    ).train()
    fast.load_state_dict(plain.state_dict())
    img, lang, mask = torch.randn(2, 3, 70, 46), torch.randn(2, 12, 7), torch.ones(2, 7, 1)
    mask[1, 4:] = 0
    for model in (plain, fast):
        model.segment(img, lang, mask).square().mean().backward()
    # against the largest gradient: biases before an InstanceNorm (or a softmax) have a true gradient of 0, so
    # theirs are round-off only and a per-tensor relative test would compare noise with noise
    scale = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).abs().max().item() < 2e-5 * scale, name
    assert len(winograd_calls) >= 6  # (checkpointing runs each decoder level again in the backward)


@pytest.mark.parametrize("fused,winograd", [(True, False), (False, False), (True, True)])
def test_bf16_autocast_within_tolerance(reference, fixture_file, fused, winograd, winograd_calls):
    model = _fixture_model(reference, fixture_file, MODEL__FUSED_ATTENTION=fused, MODEL__CONV_WINOGRAD=winograd).eval()
    args = reference["image"], reference["lang_feats"], reference["lang_mask"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(*args)
        logits = model.segment(*args)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    ref = reference["logits"]
    assert _rel_l2(logits, ref) < BF16_REL_L2
    assert (logits.float() - ref).abs().max() < BF16_REL_MAX * ref.abs().max()
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() > BF16_ARGMAX_AGREE
    for i, (f, r) in enumerate(zip(feats, reference["stage_features"], strict=True)):
        assert _rel_l2(f, r) < BF16_REL_L2, f"stage {i + 1}"
    assert len(winograd_calls) == (6 if winograd else 0)


def test_checkpointed_decoder_updates_batchnorm_once():
    """Checkpointing recomputes each decoder level (BatchNorm in training mode) in the backward pass: same
    gradients, and the running statistics must move once per step, not twice."""
    torch.manual_seed(8)
    plain, ckpt = SimpleDecoder(64).train(), SimpleDecoder(64, grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    feats = [torch.randn(2, 8 * 2**i, 16 // 2**i, 12 // 2**i) for i in range(4)]
    for model in (plain, ckpt):
        model(feats[3], feats[2], feats[1], feats[0]).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name  # running_mean, running_var, num_batches_tracked
    assert plain.bn1_2.num_batches_tracked.item() == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_upsampling_gets_its_gradient_in_its_layout(monkeypatch, channels_last):
    """On CPU the upsampled map's gradient, a channel slice of the concatenation's, reaches the upsampling's backward
    contiguous in the upsampled map's layout (strided it takes 3-4x longer); the gradients are those without it,
    bit for bit."""
    torch.manual_seed(3)
    decoder = SimpleDecoder(64, channels_last=channels_last).train()
    feats = [torch.randn(2, 8 * 2**i, 16 // 2**i, 12 // 2**i) for i in range(4)]
    feats = [f.contiguous(memory_format=torch.channels_last).requires_grad_() for f in feats]  # as Swin's outputs
    grads = []
    for barrier in (True, False):
        if not barrier:
            monkeypatch.setattr("models.decoder.grad_in_layout", lambda x: x)
        decoder.zero_grad()
        with KernelLayouts("upsample") as mode:
            decoder(feats[3], feats[2], feats[1], feats[0]).square().mean().backward()
        grads.append([p.grad.clone() for p in decoder.parameters()])
        # three levels upsampled; without the barrier the gradient arrives strided
        assert mode.seen["upsample_bilinear2d_backward"] == [["cl" if barrier else "strided"]] * 3
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_checkpointed_refinement_same_step_less_kept():
    """MODEL.GRAD_CHECKPOINT covers the edge refinement: the same gradients and running statistics (moved once), and
    the full-resolution hidden maps no longer kept for the backward pass."""
    torch.manual_seed(9)
    plain, ckpt = EdgeRefine(6).train(), EdgeRefine(6, grad_checkpoint=True).train()
    torch.nn.init.normal_(plain.proj.weight)  # not the identity: gradients reach the hidden layers
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 20, 24)
    kept = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        logits = torch.randn(2, 2, 20, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=sizes: s.append(t.numel()) or t, lambda t: t):
            out = model(logits, images)
        out.square().mean().backward()
        kept[name] = (sum(sizes), logits.grad)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(kept["ckpt"][1], kept["plain"][1], rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name
    assert plain.bn2.num_batches_tracked.item() == 1
    assert kept["ckpt"][0] < kept["plain"][0] / 4  # only the inputs, not ~6 maps of [2, 6, 20, 24]
    assert build_model(tiny_cfg(MODEL__REFINE=4, MODEL__GRAD_CHECKPOINT=True)).refine.grad_checkpoint


def test_bf16_training_step_keeps_float32_state():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MODEL__GRAD_CHECKPOINT=True)).train()
    img, lang, mask = torch.randn(2, 3, 48, 48), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    mask[1, 3:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.segment(img, lang, mask)
        loss = F.cross_entropy(logits.float(), torch.randint(0, 2, (2, 48, 48)))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _held_tensors(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_held_tensors(v) for v in value.values())
    return isinstance(value, (list, tuple, set)) and any(_held_tensors(v) for v in value)


def test_model_keeps_no_state_between_calls():
    """No module holds tensors beside its parameters and buffers after forwards (no bias, mask or feature cache to
    go stale after a weight change or a move), and a changed relative-position table acts on the next call."""
    torch.manual_seed(1)
    model = build_model(tiny_cfg()).eval()
    args = torch.randn(2, 3, 40, 40), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    with torch.no_grad():
        before = model.segment(*args)
        model.segment(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.segment(*args).float().sum().backward()
    for name, module in model.named_modules():
        held = [k for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules") and
                _held_tensors(v)]
        assert not held, f"{name or 'model'} holds {held}"
    blk = model.backbone.layers[0].blocks[1]
    x = torch.randn(2, 13 * 18, 8)
    with torch.no_grad():
        first = blk(x, 13, 18)
        blk.attn.relative_position_bias_table.add_(1.0 + torch.randn_like(blk.attn.relative_position_bias_table))
        _close(blk(x, 13, 18), oracle.swin_block(blk, x, 13, 18))
        assert (blk(x, 13, 18) - first).abs().max() > 1e-3
        _close(model.segment(*args), model.segment(*args))
        assert (model.segment(*args) - before).abs().max() > 0


def test_flop_count_includes_fused_attention():
    q, k, v = torch.randn(2, 3, 49, 16), torch.randn(2, 3, 49, 16), torch.randn(2, 3, 49, 16)
    bias = torch.randn(1, 3, 49, 49)
    fused, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    expected = 2 * (2 * 2 * 3 * 49 * 49 * 16)  # q @ k^T and attn @ v
    assert fused == expected
    lin = torch.nn.Linear(16, 8)
    assert count_flops(lambda: lin(torch.randn(5, 16)))[0] == 2 * 5 * 16 * 8


def test_peak_memory_sees_a_large_allocation():
    device = torch.device("cpu")
    with PeakMemory(device) as small:
        torch.zeros(1000).sum()
    with PeakMemory(device) as big:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    if not big.exact:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert big.peak_bytes - small.peak_bytes > 48 * 2**20


def test_variant_names():
    assert benchmark.parse_variant("fused+bf16") == ({"fused"}, "bf16")
    assert benchmark.parse_variant("base", "bf16") == (set(), "bf16")
    with pytest.raises(ValueError, match="unknown switch 'fast' in variant 'fused\\+fast'"):
        benchmark.parse_variant("fused+fast")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        benchmark.run_variant(benchmark.BenchSpec(variant="fp16", opts=TINY_OPTS, size=64, phases=[]))


def test_benchmark_inputs_have_the_pipelines_shapes_and_both_classes():
    """What the benchmark feeds the model: images [B, 3, S, S], targets [B, S, S] holding background and object
    (the loss of an all-object target is not the training's), MAX_TOKENS columns of which at least half attended."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    batch = bench_workload.make_batch(build_model(cfg), cfg, 4, 32, torch.device("cpu"))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["target"].shape == (4, 32, 32)
    assert set(batch["target"].unique().tolist()) == {0, 1} and batch["target"].dtype == torch.int64
    n = cfg.MODEL.TEXT.MAX_TOKENS
    assert batch["lang_feats"].shape == (4, cfg.MODEL.TEXT.DIM, n) and batch["lang_mask"].shape == (4, n, 1)
    attended = batch["lang_mask"][..., 0].sum(1)
    assert ((n // 2 <= attended) & (attended <= n)).all()


def test_compiled_variant_counts_flops_on_the_eager_model_and_skips_the_breakdown(monkeypatch):
    """With ``compile`` the FLOPs are counted before compiling (the same count as eager) and no per-part breakdown is
    taken (its hooks would break the graphs); compiling itself stood in for, it takes minutes."""
    compiled = []
    monkeypatch.setattr(benchmark, "compile_model", lambda model: compiled.append(model))
    monkeypatch.setattr(benchmark, "matmul_flops_per_s", lambda dtype, device, size: 1e9)
    eager, result = (
        benchmark.run_variant(
            benchmark.BenchSpec(variant=v, opts=TINY_OPTS, size=64, phases=["flops", "breakdown"], memory="skip")
        )
        for v in ("base", "compile")
    )
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert result["flops"] == eager["flops"] and result["flops"]["eval_per_image"] > 0
    assert "breakdown" in eager and "breakdown" not in result


def test_the_timed_step_is_the_loops_usual_one(monkeypatch):
    """The benchmark times the step the training loop runs at all but one iteration in --print_freq: without the
    gradient norm (engine.loops)."""
    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = benchmark.BenchSpec(opts=TINY_OPTS, size=64, phases=["train"], warmup=1, runs=1, memory="skip")
    result = benchmark.run_variant(spec)
    assert result["train"]["step_ms"] > 0 and not calls


def test_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.main(
        [
            "--matmul_size",
            "128",  # a CPU without native bf16 takes minutes over the default 2048
            "--opts",
            *TINY_OPTS,
            "--size",
            "64",
            "--batch_size",
            "2",
            "--eval_batch_size",
            "3",
            "--warmup",
            "1",
            "--runs",
            "2",
            "--compare",
            "fused+bf16+checkpoint",
            "--isolate",
            "no",
            "--threads",
            "1",
            "--output",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert (
        saved["settings"]["variants"] == ["base", "fused+bf16+checkpoint"] == [r["variant"] for r in report["results"]]
    )
    for r in saved["results"]:
        assert "error" not in r
        tr, ev, fl = r["train"], r["eval"], r["flops"]
        for key in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms", "peak_mb", "achieved_flops_per_s"):
            assert tr[key] > 0, key
        assert tr["first_call_s"] > 0 and ev["batch1"]["first_call_s"] > 0
        for bs in ("batch1", "batch3"):
            assert ev[bs]["expr_per_s"] > 0 and ev[bs]["achieved_flops_per_s"] > 0 and len(ev[bs]["times_ms"]) == 2
        assert fl["eval_per_image"] > 0 and fl["train_per_image"] > 2 * fl["eval_per_image"]
        assert all(v > 0 for v in r["matmul_flops_per_s"].values())
        parts = r["breakdown"]["eval_forward_batch1"]["parts_ms"]
        assert {"patch embed", "stage 1", "stage 4", "decoder"} <= set(parts) and all(v > 0 for v in parts.values())
        assert (
            sum(v for k, v in parts.items() if "PWAM" not in k)
            <= r["breakdown"]["eval_forward_batch1"]["total_ms"] * 1.05
        )
    assert saved["results"][1]["amp"] == "bf16" and saved["results"][1]["switches"] == ["checkpoint", "fused"]
    printed = capsys.readouterr().out
    assert "fused+bf16+checkpoint [bf16]" in printed and "stage 4" in printed
    assert any(line.startswith("total ") for line in printed.splitlines())  # the breakdown's sum of its parts
    table = next(block for block in printed.split("\n\n") if block.startswith("variant "))
    grid = [line.split(" | ") for line in table.splitlines() if " | " in line]
    head = [c.strip() for c in grid[0]]
    for r, cells in zip(saved["results"], grid[1:]):  # each cell under its column's name, from the saved figures
        tr, ev, fl = r["train"], r["eval"], r["flops"]
        row = dict(zip(head, (c.strip() for c in cells)))
        assert row["variant"] == f"{r['variant']} [{r['amp']}]"
        assert row["GFLOP/img eval/train"] == f"{fl['eval_per_image'] / 1e9:.3g}/{fl['train_per_image'] / 1e9:.3g}"
        assert row["fwd/bwd/opt ms"] == f"{tr['forward_ms']:.0f}/{tr['backward_ms']:.0f}/{tr['optimizer_ms']:.0f}"
        assert row["eval expr/s B=1"].startswith(f"{ev['batch1']['expr_per_s']:.2f}")
        assert row["eval peak MB (B=3)"] == f"{ev['batch3']['peak_mb']:.0f}"
        assert row["train step ms (B=2)"].startswith(f"{tr['step_ms']:.0f}")
    assert len(grid) == 3 and len(head) == 11


def test_benchmark_help_shows_the_defaults():
    """``--help`` says what a run measures when a flag is left out (the size, the batch, the variants)."""
    text = " ".join(benchmark.get_parser().format_help().split())  # wherever argparse wraps the lines
    assert "(default: 224)" in text and "(default: fused,bf16,fused+bf16)" in text


def test_input_benchmark_smoke(capsys):
    """``tools.bench_input``: one row per preprocessing and form, printed as JSON lines, then the machine line."""
    rows = bench_input.main(["--size", "48", "--items", "3", "--repeats", "1"])
    assert [(r["resize"], r["mask_parts"], r["form"], r["size"]) for r in rows] == [
        ("pil", "official", "train", 48), ("pil", "official", "eval", 48),
        ("cv2", "union", "train", 48), ("cv2", "union", "eval", 48),
    ]  # fmt: skip
    assert all(r["items_per_cpu_s"] > 0 for r in rows)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines[:-1]] == rows and lines[-1].startswith("# ")


def test_first_call_timed_apart_from_the_runs():
    """The first call (with torch.compile: the compiling) is reported alone; warm-up + runs calls in all."""
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.05 if len(calls) == 1 else 0.0)

    first, times = benchmark._first_and_timed(fn, torch.device("cpu"), benchmark.BenchSpec(warmup=3, runs=2))
    assert len(calls) == 5 and len(times) == 2 and first >= 0.05 and max(times) < 0.05
    calls.clear()
    first, times = benchmark._first_and_timed(fn, torch.device("cpu"), benchmark.BenchSpec(warmup=0, runs=2))
    assert first is None and len(calls) == 2 and len(times) == 2 and max(times) >= 0.05  # the first call is timed


@pytest.mark.slow
def test_benchmark_isolated_worker(tmp_path):
    """On CPU (``--isolate auto``) each variant is timed in a fresh process and its peak memory measured in another
    (its own peak RSS); the results come back as JSON and are merged."""
    out = tmp_path / "bench.json"
    report = benchmark.main(["--opts", *TINY_OPTS, "--size", "64", "--warmup", "0", "--runs", "1", "--phases", "train",
                             "--threads", "1", "--matmul_size", "64", "--no_base", "--compare", "fused",
                             "--output", str(out)])  # fmt: skip
    (result,) = report["results"]
    assert "error" not in result, result.get("error")
    assert result["variant"] == "fused" and result["train"]["step_ms"] > 0 and result["train"]["peak_mb"] > 0
    assert json.loads(out.read_text())["results"] == report["results"]


def test_interleaved_timing_rotates_turns():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "ABC"]
    times = time_interleaved(fns, torch.device("cpu"), warmup=1, runs=2)
    assert "".join(calls) == "ABC" + "BCA" + "CAB"  # warm-up round, then two timed rounds
    assert [len(t) for t in times] == [2, 2, 2]
    calls.clear()
    times = time_interleaved(fns, torch.device("cpu"), warmup=1, runs=1, inner=2, before=lambda: calls.append("|"))
    assert "".join(calls) == "|A|B|C" + "|BB|CC|AA"  # untimed hook before every turn; inner calls in timed turns only
    assert [len(t) for t in times] == [1, 1, 1]


def test_benchmark_interleaved_variants(tmp_path):
    """``--interleave``: the variants in one process, taking turns (``run_interleaved``), from the command line."""
    argv = ["--opts", *TINY_OPTS, "--size", "64", "--warmup", "0", "--runs", "1", "--phases", "train,eval",
            "--threads", "1", "--matmul_size", "64", "--compare", "fused+bf16,fused", "--interleave",
            "--output", str(tmp_path / "b.json")]  # fmt: skip
    results = benchmark.main(argv)["results"]
    assert [r["variant"] for r in results] == ["base", "fused+bf16", "fused"]
    for r in results:
        assert r["train"]["step_ms"] > 0 and "peak_mb" not in r["train"]
        assert r["eval"]["batch8"]["expr_per_s"] > 0
    with pytest.raises(ValueError, match="cast_once needs one autocast region"):
        benchmark.run_interleaved([benchmark.BenchSpec(variant="bf16+cast_once", opts=TINY_OPTS, phases=[])])


def test_benchmark_memory_in_its_own_process():
    """memory='only': no timing, the peak of a training step and of an evaluation forward, in a fresh process."""
    spec = benchmark.BenchSpec(
        opts=TINY_OPTS, size=64, eval_batch_size=3, phases=["train", "eval"], threads=1, memory="only"
    )
    result = benchmark.run_isolated(spec)
    assert "error" not in result, result.get("error")
    assert result["train"]["peak_mb"] > 0 and "step_ms" not in result["train"]
    assert result["eval"]["batch3"]["peak_mb"] > 0
    merged = benchmark._merge_memory({"train": {"step_ms": 1.0}, "eval": {"batch3": {"expr_per_s": 2.0}}}, result)
    assert merged["train"]["step_ms"] == 1.0 and merged["train"]["peak_mb"] == result["train"]["peak_mb"]
    assert merged["eval"]["batch3"] == {"expr_per_s": 2.0, **result["eval"]["batch3"]}
    with pytest.raises(ValueError, match="BenchSpec.memory must be one of"):
        benchmark.run_variant(benchmark.BenchSpec(opts=TINY_OPTS, memory="after"))


def test_benchmark_memory_returns_freed_memory_before_building_on_cpu(monkeypatch):
    """memory='only' on CPU hands freed memory back from before the model is built (what the model build and the
    first step leave in the allocator would count in the peak otherwise); a GPU's peak counts tensors only."""
    calls = []

    def prepare(spec):
        calls.append("prepare")
        raise InterruptedError  # stands for the rest: only the order matters here

    monkeypatch.setattr(benchmark, "return_freed_memory", lambda: calls.append("freed"))
    monkeypatch.setattr(benchmark, "_prepare", prepare)
    for device, expected in (("cpu", ["freed", "prepare"]), ("cuda", ["prepare"])):
        calls.clear()
        with pytest.raises(InterruptedError):
            benchmark.measure_memory(benchmark.BenchSpec(device=device, memory="only"))
        assert calls == expected


def test_benchmark_reports_peaks_in_mib(monkeypatch):
    class Fake:  # a PeakMemory whose every block peaked at 3 MiB + 512 KiB
        def __init__(self, device, base):
            self.peak_bytes, self.exact = 3 * 2**20 + 2**19, False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(benchmark, "PeakMemory", Fake)
    v = SimpleNamespace(device=torch.device("cpu"), base_rss=0, spec=SimpleNamespace(eval_batch_size=3),
                        result={"train": {}, "eval": {}})  # fmt: skip
    benchmark._peak_memory(v, lambda: None, lambda: None)
    assert v.result == {"train": {"peak_mb": 3.5, "peak_exact": False},
                        "eval": {"batch3": {"peak_mb": 3.5, "peak_exact": False}}}  # fmt: skip


def test_benchmark_times_with_mains_malloc_unless_told(monkeypatch):
    """--malloc keep (the default): the timings run with the allocator main.py sets; default: glibc's own; the
    memory-only process returns freed memory instead."""
    calls = []
    monkeypatch.setattr(benchmark, "keep_freed_memory", lambda: calls.append(1) or "")
    for malloc, memory, expected in (("keep", "skip", [1]), ("default", "skip", []), ("keep", "only", [])):
        calls.clear()
        benchmark._prepare(benchmark.BenchSpec(opts=TINY_OPTS, size=64, phases=[], malloc=malloc, memory=memory))
        assert calls == expected, (malloc, memory)
    with pytest.raises(ValueError, match="BenchSpec.malloc must be one of \\('keep', 'default'\\), got 'off'"):
        benchmark._prepare(benchmark.BenchSpec(opts=TINY_OPTS, malloc="off"))
    assert benchmark.get_parser().parse_args([]).malloc == "keep"

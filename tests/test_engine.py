"""The loops of engine/ on a tiny synthetic set: LR schedule, sharding, every evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import build_dataset, collate_eval
from data.controls import ShuffledExpressions
from data.transforms import resize_batch
from engine import NonFiniteLossError, build_lr_scheduler, evaluate, poly_lr_lambda, train_one_epoch
from engine.loops import train_step, unwrap
from models import build_model
from utils.amp import NativeScaler
from utils.distributed import ShardSampler
from utils.metrics import summarize_counts

from .helpers_train import tiny_cfg


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_cfg(tmp_path_factory)


@pytest.fixture(scope="module")
def val_set(cfg):
    return build_dataset(cfg, "val", eval_mode=True)


@pytest.fixture(scope="module")
def train_batch(cfg):
    """The first two training items, as a loader batches them (tests must not change it)."""
    return next(iter(DataLoader(build_dataset(cfg, "train", eval_mode=False), batch_size=2)))


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _loader(ds, batch_size, rank=0, world=1):
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world), collate_fn=collate_eval)


@pytest.mark.parametrize("seed", [7, 2**32 + 7])
def test_seed_everything_seeds_every_generator(seed):
    """Python's, NumPy's and torch's generators each from the seed; NumPy takes seeds below 2**32 only, so a larger
    one (TRAIN.SEED + rank may be) is taken modulo 2**32, as numpy's own seeding of 7 gives for 2**32 + 7."""
    import random

    from engine import seed_everything

    random.seed(seed)
    np.random.seed(7)
    torch.manual_seed(seed)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    seed_everything(0)  # (elsewhere first)
    seed_everything(seed)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_poly_lr_reaches_zero_at_the_end():
    assert poly_lr_lambda(10)(0) == 1.0 and poly_lr_lambda(10)(10) == 0.0 and poly_lr_lambda(10)(12) == 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_lr_scheduler(opt, total_iters=10, power=0.9)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.0 * (1 - i / 10) ** 0.9 for i in range(1, 11)])
    assert lrs[-1] == 0.0
    warm = poly_lr_lambda(10, 0.9, warmup_iters=4)
    assert [warm(i) for i in range(5)] == pytest.approx(
        [(i + 1) / 4 * (1 - i / 10) ** 0.9 for i in range(4)] + [0.6**0.9]  # warm from step 4 on
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    build_lr_scheduler(opt, 10, 0.9, 4)  # the scheduler takes the warm-up too: 1/4 of the rate at its first step
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / 4)
    with pytest.raises(ValueError, match="positive number of iterations, got 0"):
        poly_lr_lambda(0)


def test_shard_sampler_covers_each_item_once():
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))
    assert [len(ShardSampler(7, r, 3)) for r in range(3)] == [3, 2, 2]
    with pytest.raises(ValueError, match="rank 3 outside world size 3"):
        ShardSampler(7, 3, 3)


class AllForeground(torch.nn.Module):
    """Predicts every pixel as the object; counts text-encoder calls. On ``device``, it asserts that what it is
    given is there (meta, shapes only, stands in for a GPU: a CPU tensor there fails as it would beside CUDA)."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.text_calls, self.device = 0, torch.device(device)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert ids.device == mask.device == self.device
        self.text_calls += 1
        return torch.zeros(ids.shape[0], 4, ids.shape[1], device=self.device), mask.unsqueeze(-1).float()

    def segment(self, images: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] == feats.shape[0] and images.device == feats.device == self.device
        logits = torch.zeros(images.shape[0], 2, *images.shape[-2:], device=self.device)
        logits[:, 1] = 1.0
        return logits


@pytest.mark.parametrize("mode", ["each", "cat", "avg"])
@pytest.mark.parametrize("resolution", ["network", "original"])
def test_evaluate_against_hand_counts(val_set, mode, resolution):
    # all-foreground prediction: I = object pixels, U = all pixels, for every expression
    inter, union = [], []
    for item in (val_set[i] for i in range(len(val_set))):
        mask = item["target"] if resolution == "network" else item["target_orig"]
        n = 1 if mode != "each" else len(item["sentences"])
        inter += [int(mask.sum())] * n
        union += [mask.numel()] * n
    expected = summarize_counts(torch.tensor(inter), torch.tensor(union))
    fake = AllForeground()
    loader = _loader(val_set, 3)
    metrics, records = evaluate(fake, loader, torch.device("cpu"), mode=mode, resolution=resolution)
    assert metrics == expected
    assert fake.text_calls == len(loader)  # the text encoder runs once per batch
    assert len(records) == len(inter)
    # records come object by object (ref_id), each object's expressions in the dataset's order
    items = sorted((val_set[i] for i in range(len(val_set))), key=lambda item: item["ref_id"])
    if mode == "each":
        expected_order = [(it["ref_id"], s) for it in items for s in it["sent_ids"]]
        assert [(r["ref_id"], r["sent_id"]) for r in records] == expected_order
        assert any(len(it["sent_ids"]) > 1 for it in items)  # the order within an object is exercised
    else:
        assert [(r["ref_id"], r["sent_ids"]) for r in records] == [(it["ref_id"], it["sent_ids"]) for it in items]


class ColumnRamp(torch.nn.Module):
    """Object logit minus background logit = column - c, c = 0.3 + 0.25 * (tokens of the expression): varies across
    the image and between expressions, so upsampling, averaging and protocol mix-ups change the counts."""

    def encode_text(self, ids, mask):
        return mask.sum(1).float().view(-1, 1, 1), torch.ones(ids.shape[0], 1, 1)

    def segment(self, images, feats, mask):
        E, S = feats.shape[0], images.shape[-1]
        logits = torch.zeros(E, 2, *images.shape[-2:])
        logits[:, 1] = torch.arange(S, dtype=torch.float32) - (0.3 + 0.25 * feats[:, 0, 0]).view(E, 1, 1)
        return logits


def _ramp_counts(item: dict, mode: str, resolution: str) -> list[tuple[int, int]]:
    """(I, U) of each scored unit of ``item`` under ``ColumnRamp``, by hand: the prediction is column > c at the
    network's size; at the original size, bilinear with align_corners=False maps output column X to the source
    column max((X + 0.5) * S / W0 - 0.5, 0), where the ramp (linear) is exact."""
    S = item["target"].shape[-1]
    per_expr = [0.3 + 0.25 * float(m.sum()) for m in item["attention_mask"]]
    cuts = {
        "each": per_expr,
        "avg": [float(np.mean(per_expr))],
        "cat": [0.3 + 0.25 * float(item["cat_attention_mask"].sum())],
    }[mode]
    target = (item["target"] if resolution == "network" else item["target_orig"]).numpy().astype(bool)
    H, W = target.shape
    column = (
        np.arange(S, dtype=np.float64) if resolution == "network" else np.maximum((np.arange(W) + 0.5) * S / W - 0.5, 0)
    )
    out = []
    for c in cuts:
        assert np.abs(column - c).min() > 1e-4  # no pixel on the fence
        pred = np.broadcast_to(column > c, (H, W))
        out.append((int((pred & target).sum()), int((pred | target).sum())))
    return out


@pytest.mark.parametrize("mode", ["each", "cat", "avg"])
@pytest.mark.parametrize("resolution", ["network", "original"])
def test_evaluate_varying_logits_against_hand_counts(val_set, mode, resolution):
    expected, sizes = {}, set()
    for item in (val_set[i] for i in range(len(val_set))):
        counts = _ramp_counts(item, mode, resolution)
        units = item["sent_ids"] if mode == "each" else [None]
        expected.update({(item["ref_id"], s): c for s, c in zip(units, counts)})
        sizes.add(tuple(item["target_orig"].shape))
    assert len(sizes) > 1 and all(0 < i < u for i, u in expected.values())  # images of several sizes; partial hits
    metrics, records = evaluate(
        ColumnRamp(), _loader(val_set, 2), torch.device("cpu"), mode=mode, resolution=resolution
    )
    got = {(r["ref_id"], r.get("sent_id")): (r["I"], r["U"]) for r in records}
    assert got == expected
    inter, union = np.array(list(expected.values())).T
    assert metrics["oIoU"] == pytest.approx(100 * inter.sum() / union.sum())
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(inter / union))


def test_training_form_batches_score_one_expression_per_object(cfg, val_set):
    """The per-epoch validation's batches (one random expression per object, no collate_eval): one record per object,
    with I and U counted by hand for the all-foreground prediction."""
    train_form = build_dataset(cfg, "val", eval_mode=False)
    metrics, records = evaluate(AllForeground(), DataLoader(train_form, batch_size=4), torch.device("cpu"))
    targets = {item["ref_id"]: item["target"] for item in (train_form[i] for i in range(len(train_form)))}
    assert [r["ref_id"] for r in records] == sorted(targets)
    for r in records:
        assert (r["I"], r["U"]) == (int(targets[r["ref_id"]].sum()), targets[r["ref_id"]].numel())
    assert metrics["num_expressions"] == len(train_form)


def test_modes_batch_one_equals_batched(model, val_set):
    results = {}
    for mode in ("each", "cat", "avg"):
        for bs in (1, 4):
            results[mode, bs] = evaluate(model, _loader(val_set, bs), torch.device("cpu"), mode=mode)
        assert results[mode, 1][0] == results[mode, 4][0], mode
        assert results[mode, 1][1] == results[mode, 4][1], mode
    each = {r["sent_id"]: r for r in results["each", 1][1]}
    singles = [r for r in results["avg", 1][1] if len(r["sent_ids"]) == 1]
    assert singles, "the tiny set should hold objects with a single expression"
    for r in singles:  # the average of one expression's logits is that expression's
        assert (r["I"], r["U"]) == (each[r["sent_ids"][0]]["I"], each[r["sent_ids"][0]]["U"])
    assert results["each", 1][0]["num_expressions"] == sum(len(r["sent_ids"]) for r in results["cat", 1][1])


def test_shards_together_equal_one_process(model, val_set):
    # what each rank scores, merged, is what one process scores (the gather itself: tests/test_main.py)
    whole = evaluate(model, _loader(val_set, 2), torch.device("cpu"))[1]
    parts = [evaluate(model, _loader(val_set, 2, r, 3), torch.device("cpu"))[1] for r in range(3)]
    merged = sorted((r for p in parts for r in p), key=lambda r: (r["ref_id"], r["sent_id"]))
    assert merged == sorted(whole, key=lambda r: (r["ref_id"], r["sent_id"]))


def test_evaluate_bad_protocol(model, val_set):
    with pytest.raises(ValueError, match="EVAL.MODE must be one of"):
        evaluate(model, [], torch.device("cpu"), mode="mean")
    with pytest.raises(ValueError, match="EVAL.RESOLUTION must be one of"):
        evaluate(model, [], torch.device("cpu"), resolution="480")


def loud_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy times 100: gradient norms far above 1, so that clipping at 1 would show."""
    return 100 * torch.nn.functional.cross_entropy(logits, target)


def test_train_step_defaults_to_a_float32_step(cfg, train_batch):
    """Called with its defaults (no amp, no clipping), one step: float32 logits reach the criterion, the returned
    loss is the criterion's, the optimizer gets the gradients unclipped, every parameter with a (not round-off)
    gradient moves."""
    torch.manual_seed(0)
    net = build_model(cfg).train()
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    seen = []

    def criterion(logits, target):
        seen.append(logits.dtype)
        return loud_cross_entropy(logits, target)

    opt, marks = NormRecorder(params, lr=0.1), []
    cpu = torch.device("cpu")
    loss, norm = train_step(net, criterion, opt, NativeScaler(), train_batch, cpu, params, mark=marks.append)
    assert seen == [torch.float32] and math.isfinite(loss) and loss > 0
    assert float(norm) > 3 and opt.norms == pytest.approx([float(norm)], rel=1e-5)
    assert marks == ["forward", "backward", "optimizer"]  # the benchmark's timer reads these names
    moved = [not torch.equal(a, p) for a, p in zip(before, params) if p.grad is not None and p.grad.abs().max() > 1e-6]
    assert moved and all(moved)


def test_resize_batch_against_pil():
    """Images as PIL resizes each float channel bilinearly (filtering when it shrinks); masks as PIL's nearest, which
    samples the source at output pixel centres."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 48, 48, generator=g)
    target = (torch.rand(2, 48, 48, generator=g) > 0.6).long()
    for size in (32, 1):  # (1: the smallest size there is)
        small, labels = resize_batch(images, target, size)
        assert small.shape == (2, 3, size, size) and labels.shape == (2, size, size) and labels.dtype == torch.int64
        for b in range(2):
            for c in range(3):
                ref = np.asarray(Image.fromarray(images[b, c].numpy()).resize((size, size), Image.BILINEAR))
                np.testing.assert_allclose(small[b, c].numpy(), ref, atol=1e-4)
            mask = Image.fromarray(target[b].numpy().astype(np.uint8))
            np.testing.assert_array_equal(labels[b].numpy(), np.asarray(mask.resize((size, size), Image.NEAREST)))
    kept = resize_batch(images, target, 48)
    assert kept[0] is images and kept[1] is target
    with pytest.raises(ValueError, match="size must be positive, got 0"):
        resize_batch(images, target, 0)


def test_train_step_at_a_lower_resolution(cfg, train_batch):
    """size=40 on a 48-px batch: the network runs at 40 px and the loss sees the mask resized to 40 px."""
    torch.manual_seed(0)
    net = build_model(cfg).train()
    assert train_batch["image"].shape[-1] == 48
    params = [p for p in net.parameters() if p.requires_grad]
    seen = {}

    def criterion(logits, target):
        seen.update(logits=logits.shape, target=target)
        return torch.nn.functional.cross_entropy(logits, target)

    opt = torch.optim.SGD(params, lr=0.1)
    train_step(net, criterion, opt, NativeScaler(), train_batch, torch.device("cpu"), params, size=40)
    assert seen["logits"] == (2, 2, 40, 40)
    # resize_batch itself is checked against PIL above
    assert torch.equal(seen["target"], resize_batch(train_batch["image"], train_batch["target"], 40)[1])


def test_train_one_epoch_steps_and_nan_guard(cfg):
    torch.manual_seed(0)
    net = build_model(cfg)
    train = build_dataset(cfg, "train", eval_mode=False)
    loader = DataLoader(train, batch_size=8, shuffle=False, drop_last=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    sched = build_lr_scheduler(opt, len(loader))
    before = [p.detach().clone() for p in net.backbone.parameters()]
    stats = train_one_epoch(
        net, torch.nn.functional.cross_entropy, opt, sched, NativeScaler(), loader, torch.device("cpu"), 0
    )
    assert sched.last_epoch == len(loader) and stats["lr"] == 0.0
    assert stats["loss"] > 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))

    def nan_loss(logits, target):
        return logits.sum() * float("nan")

    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 3, iteration 0"):
        train_one_epoch(net, nan_loss, opt, sched, NativeScaler(), loader, torch.device("cpu"), 3)
    params = [p for p in net.parameters() if p.requires_grad]  # a step outside an epoch (the benchmark's) says so
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at a training step: training stopped; the checkpoints"):
        train_step(net, nan_loss, opt, NativeScaler(), next(iter(loader)), torch.device("cpu"), params)


class NormRecorder(torch.optim.SGD):
    """SGD that records, before each step, the gradient norm computed here in float64."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad.double().flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return super().step(closure)


@pytest.mark.parametrize("print_freq,clip,start,sampled", [
    (3, 0.0, 0, [3, 6, 7]),  # where the log prints: every 3rd iteration and the epoch's last
    (3, 1e9, 0, [1, 2, 3, 4, 5, 6, 7]),  # clipping needs it at every one
    (0, 0.0, 0, [7]),  # no log lines: the last iteration only
    (3, 0.0, 2, [1, 4, 5]),  # resumed before iteration 2 of 7: its 3rd, 6th and 7th, as in a straight run
])  # fmt: skip
def test_train_one_epoch_samples_the_gradient_norm_where_it_logs(cfg, print_freq, clip, start, sampled):
    torch.manual_seed(0)
    net = build_model(cfg)
    train = torch.utils.data.Subset(build_dataset(cfg, "train", eval_mode=False), range(2 * (7 - start)))
    loader = DataLoader(train, batch_size=2, shuffle=False)
    opt = NormRecorder([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    sched = build_lr_scheduler(opt, 7)
    stats = train_one_epoch(
        net, torch.nn.functional.cross_entropy, opt, sched, NativeScaler(), loader, torch.device("cpu"), 0,
        print_freq=print_freq, clip_grad=clip, start=start,
    )  # fmt: skip
    assert len(opt.norms) == 7 - start
    expected = np.mean([opt.norms[i - 1] for i in sampled])
    assert stats["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert stats["grad_norm"] != pytest.approx(np.mean(opt.norms), rel=1e-5) or len(sampled) == len(opt.norms)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_train_one_epoch_clips_only_when_asked(cfg, clip):
    """Without ``clip_grad`` (the official recipe clips nothing) the optimizer gets the gradients as they are; with
    ``clip_grad 1.0``, scaled to norm 1."""
    torch.manual_seed(0)
    net = build_model(cfg)
    loader = DataLoader(torch.utils.data.Subset(build_dataset(cfg, "train", eval_mode=False), range(4)), batch_size=2)
    opt = NormRecorder([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    asked = {} if clip is None else {"clip_grad": clip}
    sched = build_lr_scheduler(opt, 2)
    train_one_epoch(net, loud_cross_entropy, opt, sched, NativeScaler(), loader, torch.device("cpu"), 0, **asked)
    assert len(opt.norms) == 2
    if clip is None:
        assert min(opt.norms) > 3
    else:
        assert opt.norms == pytest.approx([1.0, 1.0], rel=1e-4)


def test_shuffled_donors_form_one_cycle_per_image():
    """Within each image the objects pass their expressions along one cycle through all of them (so none keeps its
    own, also with two objects in the image); an object alone in its image is left out."""
    class Refs(list):  # what the control reads of a ReferDataset to pair its objects
        eval_mode = True

        @property
        def refs(self) -> list[dict]:
            return self

    sizes = {10: 2, 11: 3, 12: 4, 13: 5, 14: 1}
    refs = Refs({"image_id": image} for image, n in sizes.items() for _ in range(n))
    shuffled = ShuffledExpressions(refs, seed=3)
    assert shuffled.left_out == 1 and len(shuffled) == len(refs) - 1
    for image, n in sizes.items():
        members = {i for i, ref in enumerate(refs) if ref["image_id"] == image}
        if n == 1:
            assert not members & shuffled.donor.keys()
            continue
        start, seen = min(members), []
        i = start
        for _ in range(n):
            seen.append(i)
            i = shuffled.donor[i]
            assert i in members
        assert i == start and sorted(seen) == sorted(members)  # back after exactly n steps, through all of them


def test_shuffled_expressions_move_to_another_object_of_the_image(cfg, val_set):
    train_mode_val = build_dataset(cfg, "val", eval_mode=False)
    shuffled = ShuffledExpressions(val_set, seed=0)
    by_image = {}
    for ref in val_set.refs:
        by_image.setdefault(ref["image_id"], []).append(ref["ref_id"])
    alone = sum(len(v) == 1 for v in by_image.values())
    assert len(shuffled) + shuffled.left_out == len(val_set) and shuffled.left_out == alone
    own = {ref["ref_id"]: [s["sent_id"] for s in ref["sentences"]] for ref in val_set.refs}
    owner_of = {sid: ref_id for ref_id, sids in own.items() for sid in sids}
    image_of = {ref["ref_id"]: ref["image_id"] for ref in val_set.refs}
    donors = []
    for i in range(len(shuffled)):
        item = shuffled[i]
        donor = owner_of[item["sent_ids"][0]]
        assert donor != item["ref_id"] and image_of[donor] == item["image_id"]
        assert item["input_ids"].shape[0] == len(item["sentences"]) == len(own[donor])
        donors.append(donor)
    assert len(set(donors)) == len(donors)  # a permutation: every expression is used once
    refused = r"^ShuffledExpressions needs an eval-mode ReferDataset \(eval_mode=True\)$"
    for not_eval in (train_mode_val, [val_set[0]]):  # a training-form dataset, or no dataset at all
        with pytest.raises(ValueError, match=refused):
            ShuffledExpressions(not_eval)


@pytest.mark.parametrize("resolution", ["network", "original"])
@pytest.mark.parametrize("mode", ["each", "cat", "avg"])
def test_scoring_computes_on_the_device_it_is_given(val_set, mode, resolution):
    """Images, words and ground truth go to the device; "meta" (shapes only) stands in for a GPU here, where a tensor
    left on the CPU meets a meta one and fails, as it would meet a CUDA one."""
    from engine.loops import _score_batch

    meta = torch.device("meta")
    batch = next(iter(_loader(val_set, batch_size=3)))
    keys, inter, union, records = _score_batch(AllForeground("meta"), batch, meta, mode, resolution, amp="")
    expressions = len(batch["expr_index"]) if mode == "each" else 3
    assert inter.device == union.device == meta and inter.shape == union.shape == (expressions,)
    assert len(keys) == len(records) == expressions  # a record for each scored unit


def test_unwrap_takes_the_model_out_of_its_ddp_wrapper(tmp_path):
    """Evaluation and the text cache reach the model's own attributes (``text_encoder``) and forward through
    ``unwrap``: a DDP-wrapped model (here in a one-process Gloo group) gives the module inside, any other itself."""
    model = torch.nn.Linear(2, 2)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap(wrapped) is model and unwrap(model) is model
    finally:
        torch.distributed.destroy_process_group()

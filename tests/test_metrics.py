import math

import pytest
import torch

from utils.metrics import (
    MIOU_LABEL,
    OIOU_LABEL,
    IoUAccumulator,
    format_table,
    intersection_union,
    iou_from_counts,
    results_summary,
    summarize_counts,
)

# Four expressions on 2x3 masks, counted by hand:
#   e0: I=1 U=2 IoU=0.5   e1: I=4 U=5 IoU=0.8   e2: both empty, I=0 U=0 IoU=0   e3: I=0 U=1 IoU=0
PRED = torch.tensor(
    [
        [[1, 1, 0], [0, 0, 0]],
        [[1, 1, 1], [1, 0, 0]],
        [[0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0]],
    ],
    dtype=torch.bool,
)
GT = torch.tensor(
    [
        [[1, 0, 0], [0, 0, 0]],
        [[1, 1, 1], [1, 1, 0]],
        [[0, 0, 0], [0, 0, 0]],
        [[1, 0, 0], [0, 0, 0]],
    ],
    dtype=torch.bool,
)


def test_intersection_union_hand_counted():
    inter, union = intersection_union(PRED, GT)
    assert inter.tolist() == [1, 4, 0, 0]
    assert union.tolist() == [2, 5, 0, 1]
    assert iou_from_counts(inter, union).tolist() == [0.5, 0.8, 0.0, 0.0]
    # one pixel predicted where the one object pixel is: a union of 1 scores 1, an empty union 0
    assert iou_from_counts(torch.tensor([1, 0]), torch.tensor([1, 0])).tolist() == [1.0, 0.0]


def test_intersection_union_shape_mismatch():
    with pytest.raises(ValueError, match=r"pred \(4, 2, 3\) and target \(4, 3, 2\)"):
        intersection_union(PRED, GT.transpose(1, 2))
    # one mask without its batch dimension is refused, not counted as two masks of one row each
    with pytest.raises(ValueError, match=r"pred \(2, 3\) and target \(2, 3\) must be equal shapes \[B, H, W\]"):
        intersection_union(PRED[1], GT[1])
    with pytest.raises(ValueError, match=r"pred \(1, 4, 2, 3\)"):
        intersection_union(PRED[None], GT[None])
    assert [t.tolist() for t in intersection_union(PRED[1:2], GT[1:2])] == [[4], [5]]  # a batch of one


def test_summary_hand_computed():
    m = summarize_counts(*intersection_union(PRED, GT))
    assert m["num_expressions"] == 4
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.8) / 4)  # 32.5
    assert m["oIoU"] == pytest.approx(100 * 5 / 8)  # cumulative I / cumulative U = 62.5
    assert (m["cum_I"], m["cum_U"]) == (5, 8)
    # thresholds are counted with >=: IoU 0.5 passes @0.5 and 0.8 passes @0.8, as the official code
    assert m["precision@0.5"] == pytest.approx(50.0)
    assert m["precision@0.6"] == pytest.approx(25.0)
    assert m["precision@0.7"] == pytest.approx(25.0)
    assert m["precision@0.8"] == pytest.approx(25.0)
    assert m["precision@0.9"] == pytest.approx(0.0)


def test_overall_iou_is_not_mean_of_ratios():
    # one big well-segmented object and one tiny missed one: oIoU high, mIoU ~50
    m = summarize_counts(torch.tensor([99, 0]), torch.tensor([100, 1]))
    assert m["oIoU"] == pytest.approx(100 * 99 / 101)
    assert m["mIoU"] == pytest.approx(100 * 0.99 / 2)


def test_accumulator_sorts_by_key_and_fills_records():
    acc = IoUAccumulator()
    inter, union = intersection_union(PRED, GT)
    # batches arrive out of order (as from a sharded loader); records come back sorted by key
    acc.update(torch.tensor([3, 1]), inter[[3, 1]], union[[3, 1]], [{"sent_id": 3}, {"sent_id": 1}])
    acc.update(torch.tensor([0, 2]), inter[[0, 2]], union[[0, 2]], [{"sent_id": 0}, {"sent_id": 2}])
    assert len(acc) == 4
    metrics, records = acc.compute()
    assert metrics == summarize_counts(inter, union)
    assert [r["sent_id"] for r in records] == [0, 1, 2, 3]
    assert [(r["I"], r["U"], r["IoU"]) for r in records] == [(1, 2, 0.5), (4, 5, 0.8), (0, 0, 0.0), (0, 1, 0.0)]


def test_a_rank_without_expressions_changes_nothing(monkeypatch):
    """Two ranks, one of which scored nothing (more ranks than expressions): the same metrics and integer records as
    the other rank alone (its empty share must not turn the counts into floats)."""
    import utils.metrics as metrics_module

    inter, union = intersection_union(PRED, GT)
    full, empty, shared = IoUAccumulator(), IoUAccumulator(), []
    full.update(torch.arange(4), inter, union, [{"sent_id": i} for i in range(4)])
    monkeypatch.setattr(metrics_module, "all_gather_object", lambda obj: shared.append(obj) or [obj])
    alone = full.compute()
    monkeypatch.setattr(metrics_module, "all_gather_object", lambda obj: [shared[0], obj])  # rank 0's share, then ours
    metrics, records = empty.compute()
    assert (metrics, records) == alone and metrics["cum_I"] == 5
    assert all(type(r["I"]) is int and type(r["U"]) is int for r in records)


def test_accumulator_rejects_duplicates_and_mixed_records():
    acc = IoUAccumulator()
    acc.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    acc.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    twice = r"^IoUAccumulator: an expression was counted twice \(duplicate keys across ranks\)$"
    with pytest.raises(RuntimeError, match=twice):
        acc.compute()
    mixed = r"^IoUAccumulator\.update: records must be given with every batch or with none$"
    with pytest.raises(ValueError, match=mixed):
        acc.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([2]), [{"x": 1}])
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        acc.update(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([2]))


def test_all_empty_masks_score_zero():
    """Every prediction and ground truth empty (U = 0 throughout): IoU 0 each, as the official code, and oIoU 0."""
    m = summarize_counts(torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert (m["num_expressions"], m["mIoU"], m["oIoU"], m["precision@0.5"]) == (2, 0.0, 0.0, 0.0)


def test_empty_accumulator():
    metrics, records = IoUAccumulator().compute()
    assert metrics["num_expressions"] == 0 and math.isnan(metrics["mIoU"]) and records == []
    summary = results_summary(metrics, dataset="d", split="s", protocol="each", resolution="r", checkpoint="c")
    # N, mIoU, oIoU (0 / 0 counted as 0, as summarize_counts does), P@t
    assert format_table([summary]).splitlines()[2].split()[4:] == ["0", "nan", "0.00"] + ["nan"] * 5


def test_summary_and_table_state_setting_and_labels():
    m = summarize_counts(*intersection_union(PRED, GT))
    s = results_summary(
        m, dataset="refcoco", split="testA", protocol="cat", resolution="network 480x480", checkpoint="ck.pth"
    )
    setting = {"dataset": "refcoco", "split": "testA", "protocol": "cat", "resolution": "network 480x480"}
    assert {k: s[k] for k in setting} == setting and s["checkpoint"] == "ck.pth"
    assert s["definitions"] == {"mIoU": MIOU_LABEL, "oIoU": OIOU_LABEL, "precision@t": "% of expressions with IoU >= t"}
    table = format_table([s])
    for field in ("refcoco", "testA", "cat", "network 480x480", "ck.pth", MIOU_LABEL, OIOU_LABEL, "32.50", "62.50"):
        assert field in table
    header, rule, row = table.splitlines()[:3]
    wide = format_table([s, {**s, "dataset": "refcocog", "resolution": "original", "split": "val"}]).splitlines()
    for line in wide[2:4]:  # every column starts where its name does, past the widest value ("network 480x480")
        for column, value in (("protocol", "cat "), ("N", f"{len(PRED)} "), ("mIoU", "32.50 "), ("oIoU", "62.50 ")):
            assert line[wide[0].index(f" {column} ") + 1 :].startswith(value), (column, line)
    assert len(wide[1]) == len(wide[0]) and wide[2].index("32.50") > wide[2].index("480x480") + len("480x480")
    assert header.split() == ["dataset", "split", "protocol", "resolution", "N", "mIoU", "oIoU", "P@0.5", "P@0.6",
                              "P@0.7", "P@0.8", "P@0.9"] and set(rule) == {"-"}  # fmt: skip
    assert row.split()[:4] == ["refcoco", "testA", "cat", "network"] and row.split()[5] == str(len(PRED))
    assert table.splitlines()[-3:-1] == [  # the definitions a reader of the table needs, all of them
        f"{MIOU_LABEL}; {OIOU_LABEL}; P@t: % of expressions with IoU >= t. All in percent.",
        "protocol: each = every expression scored alone (the paper's tables); cat = an object's expressions joined "
        "into one; avg = their logits averaged. resolution: network = the NxN network input (official), original = "
        "the image's own size.",
    ]
    assert table.splitlines()[-1] == "checkpoint: ck.pth"
    assert format_table([{**s, "checkpoint": "b.pth"}, s, s]).splitlines()[-1] == "checkpoint: b.pth, ck.pth"

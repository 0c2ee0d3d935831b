import logging

import pytest
import torch
import torch.distributed as dist

from utils.distributed import (
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    cleanup,
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
)
from utils.logger import MetricLogger, SmoothedValue, setup_logging


def test_single_process_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed_mode("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed, info.device) == (
        0, 1, 0, False, torch.device("cpu")
    )  # fmt: skip
    assert get_world_size() == 1 and all_gather_object(3) == [3]
    t = torch.tensor([1.0])
    assert torch.equal(all_reduce_sum(t), t)


def test_collectives_inside_a_process_group(tmp_path):
    """The same calls inside a real (Gloo, one-process) group go through torch.distributed: the sum is a new
    tensor, the input left as it was; the mean divides by the group's size; the gathered list holds each rank's."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        t = torch.tensor([1.0, 2.5])
        total = all_reduce_sum(t)
        assert is_dist_avail_and_initialized() and get_world_size() == 1
        assert torch.equal(total, t) and total.data_ptr() != t.data_ptr()
        assert torch.equal(all_reduce_mean(t), t) and all_gather_object({"rank": 0}) == [{"rank": 0}]
    finally:
        cleanup()
    assert not is_dist_avail_and_initialized()


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'zero'"):
        init_distributed_mode("cpu")


def test_smoothed_value():
    v = SmoothedValue(window_size=2)
    for x in (1.0, 2.0, 6.0):
        v.update(x)
    assert (v.median, v.avg, v.global_avg, v.max, v.value) == (2.0, 4.0, 3.0, 6.0, 6.0)


def test_log_every_yields_all_and_writes_log_file(tmp_path):
    log_file = tmp_path / "log.txt"
    setup_logging(log_file, rank=0)
    ml = MetricLogger()
    seen = []
    for i in ml.log_every(range(5), print_freq=2, header="Epoch [0]"):
        ml.update(loss=torch.tensor(float(i)), lr=1e-3)
        seen.append(i)
    for h in logging.getLogger("lavt").handlers:
        h.flush()
    assert seen == list(range(5))
    text = log_file.read_text()
    assert "Epoch [0] [2/5]" in text and "Epoch [0] [5/5]" in text and "loss:" in text and "lr:" in text
    assert ml.loss.global_avg == 2.0
    # the library modules' own loggers (logging.getLogger(__name__)) reach the run's log file too
    logging.getLogger("models.weights").info("loaded 3 tensors from x.pth")
    logging.getLogger("data.synthetic").info("synthetic REFER dataset: 2 images")
    for h in logging.getLogger("lavt").handlers:
        h.flush()
    text = log_file.read_text()
    assert "loaded 3 tensors from x.pth" in text and "synthetic REFER dataset: 2 images" in text
    logging.getLogger("data.dataset").debug("not at INFO")
    assert "not at INFO" not in log_file.read_text()
    with pytest.raises(TypeError, match="loss must be a number"):
        ml.update(loss="x")
    setup_logging(None)

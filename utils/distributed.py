"""Process-group helpers for ``torchrun`` and SLURM's ``srun`` (DETR's util/misc.py is the model).

``utils.launcher.detect_launch`` reads who started the process: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) or nobody (plain ``python main.py``: one process).
NCCL is used on GPUs, Gloo on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .launcher import Launch, detect_launch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``device`` is the one it computes on; ``launcher`` says who started it (a line
    for the log, ``utils.launcher.Launch.describe``)."""

    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    device: torch.device
    launcher: str = "no launcher: one process"


class LaunchError(ValueError):
    """The processes a launcher announced did not form one group (a user mistake: one line from ``main.py``)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or cuda when available and None; a cuda device without CUDA is an error that says so."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # (torch's message lists twenty device types)
        raise ValueError(f"device {device!r} is not a device (cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available (use --device cpu)")
    return device


def cuda_index(local_rank: int) -> int:
    """The GPU of the process with this local rank: ``local_rank``, or 0 when the launcher shows each process one
    GPU only (SLURM's ``--gpus-per-task 1`` sets CUDA_VISIBLE_DEVICES per task)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise LaunchError(
            f"local rank {local_rank} but {count} GPU(s) visible on this node: start one process per GPU "
            "(torchrun --nproc_per_node / srun --ntasks-per-node = GPUs per node)"
        )
    return local_rank


def init_distributed_mode(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun or srun describes, or return a single-process ``DistInfo``.

    Args:
        device: "cuda", "cpu" or None (cuda when available). Each process uses one GPU (``cuda_index``).
    """
    device = resolve_device(device)
    launch = detect_launch()
    log.info("launcher: %s", launch.describe())
    if launch.world_size == 1:
        return DistInfo(0, 1, 0, False, device, launch.describe())
    if device.type == "cuda":
        index = cuda_index(launch.local_rank)
        torch.cuda.set_device(index)
        dev, backend = torch.device("cuda", index), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        _join(launch, backend)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, True, dev, launch.describe())


def _join(launch: Launch, backend: str) -> None:
    """``init_process_group``; torchrun's rendezvous through ``env://``, SLURM's at the host and port it names."""
    init_method = None
    if launch.master_addr:
        host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr  # IPv6 in a URL
        init_method = f"tcp://{host}:{launch.master_port}"
    try:
        dist.init_process_group(
            backend=backend, init_method=init_method, rank=launch.rank, world_size=launch.world_size
        )
    except RuntimeError as e:  # DistStoreError after the rendezvous timeout, or the port taken
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(
            f"{launch.describe()}: the group of {launch.world_size} processes did not form ({first}); "
            f"were all {launch.world_size} started, can they reach the rendezvous host, is its port free (MASTER_PORT)?"
        ) from e


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor; ``t`` itself unchanged). Identity in one process."""
    if not is_dist_avail_and_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (floating point)."""
    return all_reduce_sum(t) / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in one process."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: every item exactly once over all ranks.

    Unlike ``DistributedSampler`` it never pads with repeated items, so a sharded evaluation counts each
    expression once (shards may differ in length by one).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} outside world size {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))

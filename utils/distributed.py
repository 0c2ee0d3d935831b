"""Process-group helpers for ``torchrun`` (DETR's util/misc.py is the model).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; plain ``python main.py`` sets none and runs one process.
NCCL is used on GPUs, Gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``device`` is the one it computes on."""

    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    device: torch.device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from e


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or cuda when available and None; a cuda device without CUDA is an error that says so."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available (use --device cpu)")
    return device


def init_distributed_mode(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes, or return a single-process ``DistInfo``.

    Args:
        device: "cuda", "cpu" or None (cuda when available). Each process uses cuda:LOCAL_RANK.
    """
    device = resolve_device(device)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world_size is None or world_size == 1:
        return DistInfo(0, 1, 0, False, device)
    local_rank = rank if local_rank is None else local_rank
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, True, dev)


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

"""Which launcher started this process, read from the environment: torchrun, SLURM's srun, or none.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. They win whenever RANK and WORLD_SIZE
  are set, also inside a SLURM allocation (torchrun started by an sbatch script).
- srun sets, for each task, SLURM_PROCID (rank), SLURM_NTASKS (world size), SLURM_LOCALID (rank on its node) and the
  job's hosts in SLURM_JOB_NODELIST (SLURM_NODELIST on old versions), compressed (``gpu[01-04,07]``). The rendezvous
  host is the first host of that list; the port is MASTER_PORT when set, else ``port_from_job_id(SLURM_JOB_ID)``.
- Neither: one process.

Everything here is pure (an environment mapping in, a ``Launch`` out), so it is tested without a cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

# The port derived from a SLURM job id lies in [PORT_BASE, PORT_BASE + PORT_SPAN): above the registered services
# most clusters run, below Linux's ephemeral range (32768-60999) where the kernel picks outgoing ports. Two jobs
# whose ids differ by a multiple of PORT_SPAN and whose first node is the same would collide: set MASTER_PORT then.
PORT_BASE, PORT_SPAN = 12000, 20000


@dataclass(frozen=True)
class Launch:
    """What the launcher says about this process. ``master_addr``/``master_port`` are None when the process
    group's rendezvous is left to torch's ``env://`` (torchrun) or there is no group (one process)."""

    launcher: str  # "torchrun", "slurm" or "none"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None

    def describe(self) -> str:
        """One line for the log, e.g. ``slurm (srun): rank 3 of 8, local rank 1, rendezvous gpu01:13456``."""
        if self.launcher == "none":
            return "no launcher (RANK/WORLD_SIZE and SLURM_NTASKS unset): one process"
        name = "slurm (srun)" if self.launcher == "slurm" else self.launcher
        where = f", rendezvous {self.master_addr}:{self.master_port}" if self.master_addr else ""
        return f"{name}: rank {self.rank} of {self.world_size}, local rank {self.local_rank}{where}"


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    """``int(environ[name])``, None when unset; a value that is not an integer is an error naming the variable."""
    value = environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from e


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch this environment describes (``os.environ`` when None); inconsistent variables raise ValueError
    with one line naming them."""
    env = os.environ if environ is None else environ
    rank, world_size = env_int(env, "RANK"), env_int(env, "WORLD_SIZE")
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            have, miss = ("RANK", "WORLD_SIZE") if world_size is None else ("WORLD_SIZE", "RANK")
            raise ValueError(f"{have} is set but {miss} is not: start main.py with torchrun, or unset {have}")
        _check_rank("RANK", rank, "WORLD_SIZE", world_size)
        local_rank = env_int(env, "LOCAL_RANK")
        return Launch("torchrun", rank, world_size, rank if local_rank is None else local_rank)
    ntasks = env_int(env, "SLURM_NTASKS")
    if ntasks is None:
        return Launch("none", 0, 1, 0)
    if ntasks == 1:
        return Launch("slurm", 0, 1, 0)
    return _slurm_launch(env, ntasks)


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"{rank_name}={rank} is not a rank of {size_name}={size} (expected 0..{size - 1})")


def _slurm_launch(env: Mapping[str, str], ntasks: int) -> Launch:
    """Several SLURM tasks: every variable the process group needs must be there and agree."""
    missing = [n for n in ("SLURM_PROCID", "SLURM_LOCALID") if n not in env]
    if missing:
        raise ValueError(
            f"SLURM_NTASKS={ntasks} but {' and '.join(missing)} unset: this process was not started by srun; "
            "run `srun python main.py ...` (one task per GPU), or unset SLURM_NTASKS for one process"
        )
    rank, local_rank = env_int(env, "SLURM_PROCID"), env_int(env, "SLURM_LOCALID")
    assert rank is not None and local_rank is not None  # checked above
    _check_rank("SLURM_PROCID", rank, "SLURM_NTASKS", ntasks)
    if not 0 <= local_rank <= rank:
        raise ValueError(f"SLURM_LOCALID={local_rank} does not fit SLURM_PROCID={rank} (expected 0..{rank})")
    addr = env.get("MASTER_ADDR")
    if not addr:
        name = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None)
        if name is None:
            raise ValueError(
                f"SLURM_NTASKS={ntasks} but neither SLURM_JOB_NODELIST nor SLURM_NODELIST nor MASTER_ADDR is set: "
                "no host to meet at"
            )
        try:
            addr = expand_nodelist(env[name])[0]
        except ValueError as e:
            raise ValueError(f"{name}: {e}; set MASTER_ADDR to the first host of the job") from e
    port = env_int(env, "MASTER_PORT")
    if port is None:
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            raise ValueError(f"SLURM_NTASKS={ntasks} but neither MASTER_PORT nor SLURM_JOB_ID is set: no port")
        port = port_from_job_id(job_id)
    return Launch("slurm", rank, ntasks, local_rank, addr, port)


def port_from_job_id(job_id: str) -> int:
    """The rendezvous port of a SLURM job: ``PORT_BASE + (numeric job id) % PORT_SPAN``, the same on every task.

    An array task's SLURM_JOB_ID is its own number; a ``123_4``-style id uses its digits (123 * 10 + 4 ...)."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID {job_id!r} has no digits to derive MASTER_PORT from: set MASTER_PORT")
    return PORT_BASE + int(digits) % PORT_SPAN


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM host list, in order, as ``scontrol show hostnames`` prints them.

    ``"node[01-03,07]"`` -> node01 node02 node03 node07; ``"gpu-a[1,3],cpu1"`` -> gpu-a1 gpu-a3 cpu1;
    ``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1 r2n2; a range keeps the zero padding of its lower bound.
    Commas separate hosts outside brackets and ranges inside them.
    """
    if not nodelist.strip():
        raise ValueError("empty host list")
    hosts: list[str] = []
    for group in _split_top_level(nodelist):
        names = [""]
        # odd pieces are the bracketed ranges: "gpu[1-2]-ib" -> ["gpu", "[1-2]", "-ib"]
        for i, piece in enumerate(re.split(r"(\[[^\]]*\])", group)):
            parts = _expand_ranges(piece[1:-1], nodelist) if i % 2 else [piece]
            names = [n + p for n in names for p in parts]
        hosts += names
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """``"a[1,2],b"`` -> ``["a[1,2]", "b"]``: commas outside brackets; brackets must pair and not nest."""
    groups, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            groups.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"host list {nodelist!r}: unbalanced or nested brackets at character {i}")
    groups.append(nodelist[start:])
    if depth != 0:
        raise ValueError(f"host list {nodelist!r}: '[' without ']'")
    if any(not g.strip() for g in groups):
        raise ValueError(f"host list {nodelist!r}: empty host name")
    return groups


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``."""
    out: list[str] = []
    for part in ranges.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"host list {nodelist!r}: {part!r} is not a number or a range lo-hi")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"host list {nodelist!r}: range {part!r} runs backwards")
        out += [f"{k:0{len(lo)}d}" for k in range(int(lo), int(hi) + 1)]
    return out

"""``RunLock``: one process group at a time trains in a run folder.

The lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+), holding
who took it: host, pid, the process's start time, when, and the command. While held, a daemon thread touches the
file every ``HEARTBEAT_S`` seconds. It is removed on release, which ``RunLock`` does on exit, exceptions and SIGTERM
included (``kill -9``, a power cut or a lost node cannot release anything: that is what the stale rule is for).

Stale rule (the lock is then taken over, with a warning):
- holder on this host: its pid is not running, or is running but is another process (another start time: the pid
  was reused);
- holder on another host (its processes cannot be seen from here): no heartbeat for ``stale_after_s`` seconds
  (``STALE_AFTER_S``, 30 minutes by default); also a lock file that cannot be read;
- holder of an earlier run of the same SLURM job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT): SLURM ends every
  process of a job before it requeues it, so a requeued job takes its own lock over at once, on any node.
Limits: the hostname tells hosts apart (two containers with one hostname and separate pid namespaces look like one
host); on another host, a holder that is alive but suspended (SIGSTOP) longer than ``stale_after_s`` is taken over;
the file's modification time is set by the file server, compared with this host's clock (skews of minutes are
harmless against 30 minutes). Two processes taking over the same stale lock at once are told apart by a token.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import raise_storage_error

STALE_AFTER_S = 30 * 60.0  # no heartbeat for this long: a holder on another host is taken for dead
HEARTBEAT_S = 60.0


class RunLockedError(RuntimeError):
    """Another process group holds the run folder's lock."""


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the process that holds it."""

    host: str
    pid: int
    started: str  # when it took the lock (UTC, ISO 8601)
    command: str
    pid_start: int | None = None  # the process's start time in clock ticks since boot (Linux), to detect pid reuse
    token: str = ""
    slurm_job: str = ""  # "<SLURM_JOB_ID>.<SLURM_RESTART_COUNT>" when started by SLURM

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started}, command: {self.command}"


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if unknown."""
    try:
        return start_from_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def start_from_stat(stat: str) -> int:
    """Field 22 (start time) of a /proc/<pid>/stat line "pid (comm) state ...": ``comm``, the executable's name,
    may itself hold ")" and spaces, so the fields are counted from its last ")" (they start at field 3)."""
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def read_holder(path: Path) -> LockHolder | None:
    """The holder a lock file names, or None when it cannot be read (being written, or damaged)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(**data)
    except (OSError, ValueError, TypeError):
        return None


def describe_holder(holder: LockHolder | None) -> str:
    """Who holds a lock, for a message: ``read_holder``'s holder described, or what an unreadable lock file means."""
    return holder.describe() if holder else "its lock file is being written"


def slurm_incarnation(env: dict[str, str] | None = None) -> str:
    """``"<job id>.<restart count>"`` of the SLURM job this process belongs to, or "" outside SLURM."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "")
    return f"{job}.{env.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def _earlier_run_of(holder_job: str, mine: str) -> bool:
    """Whether ``holder_job`` is an earlier run of the same SLURM job as ``mine`` (both ``slurm_incarnation()``,
    "<job>.<restart count>"); an empty one, outside SLURM, has no count and never is."""
    (job_a, _, count_a), (job_b, _, count_b) = holder_job.partition("."), mine.partition(".")
    return job_a == job_b and count_a.isdigit() and count_b.isdigit() and int(count_a) < int(count_b)


def stale_reason(
    holder: LockHolder | None, age_s: float, stale_after_s: float, host: str, slurm_job: str = ""
) -> str | None:
    """Why a lock whose file was last touched ``age_s`` seconds ago is stale, or None while it is held.
    ``slurm_job``: this process's ``slurm_incarnation()``."""
    if holder is not None and _earlier_run_of(holder.slurm_job, slurm_job):
        return f"it was taken by an earlier run of this SLURM job ({holder.slurm_job}; this is {slurm_job})"
    if holder is not None and holder.host == host:
        if not _pid_running(holder.pid):
            return f"its process {holder.pid} is not running"
        if holder.pid_start is not None and process_start(holder.pid) not in (None, holder.pid_start):
            return f"pid {holder.pid} now belongs to another process"
        return None
    if age_s > stale_after_s:
        what = "its holder on another host has not touched it" if holder else "the unreadable lock file is untouched"
        return f"{what} for {age_s / 60:.0f} min (stale after {stale_after_s / 60:.0f} min without a heartbeat)"
    return None


class RunLock:
    """The lock file ``path``: ``acquire`` (raises ``RunLockedError`` naming the holder) and ``release``.

    Usable as a context manager. ``acquire`` returns a message when it took over a stale lock, for the run's log.
    """

    def __init__(self, path: str | Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(path)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.holder: LockHolder | None = None  # this process, while it holds the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_sigterm: Any = None

    def acquire(self) -> str | None:
        host = socket.gethostname()
        me = LockHolder(
            host=host,
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command=shlex.join([Path(sys.executable).name, *sys.argv]),
            pid_start=process_start(os.getpid()),
            token=secrets.token_hex(8),
            slurm_job=slurm_incarnation(),
        )
        took_over = None
        for _ in range(3):  # a lock released or taken over between two looks: look again
            if self._create(me):
                break
            holder = read_holder(self.path)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            reason = stale_reason(holder, age, self.stale_after_s, host, me.slurm_job)
            if reason is None:
                raise RunLockedError(self._in_use(holder))
            self._remove_if(holder)
            took_over = f"took over the stale lock {self.path} ({reason}): " + (
                holder.describe() if holder else "unreadable lock file"
            )
        else:
            raise RunLockedError(self._in_use(read_holder(self.path)))
        self.holder = me
        self._start_heartbeat()
        self._release_on_sigterm()
        return took_over

    def _in_use(self, holder: LockHolder | None) -> str:
        return (
            f"run folder {self.path.parent} is in use by another training ({describe_holder(holder)}); wait for it "
            f"to end, or remove {self.path} if you are sure it is not running"
        )

    def _create(self, me: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with raise_storage_error(f"the lock file {self.path}", "no lock is left behind"):
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(me.__dict__, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:  # a lock file left half written would hold the folder until it went stale
                self.path.unlink(missing_ok=True)
                raise
        return True

    def _remove_if(self, holder: LockHolder | None) -> None:
        """Remove the lock file if it still names ``holder`` (moved aside first: the check and removal are one
        step, so a fresh lock written meanwhile by another process is put back, not removed)."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        now = read_holder(aside)
        if (now is not None) if holder is None else (now is None or now.token != holder.token):
            try:  # not the lock judged stale: put it back unless a new one exists
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:  # removed by hand: nothing to keep fresh
                    return

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _release_on_sigterm(self) -> None:
        # torchrun and batch schedulers stop jobs with SIGTERM, whose default action skips every `finally`
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.SIG_DFL

            def stop(signum: int, frame: Any) -> None:
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, stop)

    def release(self) -> None:
        """Remove the lock file if this process holds it (a forked child, e.g. a data-loader worker, never does)."""
        if self.holder is None or self.holder.pid != os.getpid():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self.holder = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

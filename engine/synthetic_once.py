"""``ensure_synthetic_once``: the synthetic dataset made once for the runs that share its root.

Two runs started together on one ``DATA.ROOT`` (a demo's two seeds, a job array) would each find the other's
generation under way, take it for one cut off, remove its files and generate anew, each under the other. So
``main.py`` ensures the dataset under a lock in the root (``<root>/synthetic/generation.lock``, ``utils.lock.RunLock``
with its stale rule): a run that finds it held waits, saying for whom, then finds the dataset complete; a holder that
died (``kill -9``) leaves a stale lock, taken over, and its cut-off generation is removed and made anew.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

from data.synthetic import ensure_synthetic, wanted_params
from data.synthetic_root import generation_lock
from utils.lock import RunLock, RunLockedError, describe_holder, read_holder
from utils.logger import get_logger

POLL_S = 1.0  # how often a waiting run looks at the lock again
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}  # a lock file that cannot be created there


def ensure_synthetic_once(root: str | Path, poll_s: float = POLL_S, force: bool = False, **kwargs: Any) -> Path:
    """``data.synthetic.ensure_synthetic(root, force, **kwargs)`` holding ``<root>/synthetic/generation.lock``, after
    any other run holding it has finished; arguments it would refuse are refused first, nothing written. Returns
    ``<root>/synthetic``."""
    wanted_params(root, **kwargs)
    lock, logger, waited = RunLock(generation_lock(root)), get_logger(), False
    while True:
        try:
            took_over = lock.acquire()
            break
        except OSError as e:  # a dataset on a read-only disk (made once, shared): read as it is, no lock needed
            if e.errno not in _READ_ONLY:
                raise
            return ensure_synthetic(root, force, **kwargs)
        except RunLockedError:
            if not waited:
                logger.warning("waiting for another run to make the synthetic dataset in %s (%s)", Path(root).resolve(),
                               describe_holder(read_holder(lock.path)))  # fmt: skip
                waited = True
            time.sleep(poll_s)
    try:
        if took_over:
            logger.warning("%s", took_over)
        return ensure_synthetic(root, force, **kwargs)
    finally:
        lock.release()

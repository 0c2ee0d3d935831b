"""Test-session setup that must happen before torch is imported."""
import os

# OpenMP threads busy-wait by default: with two processes on two cores (torchrun tests, a parallel job) a step
# becomes ~40x slower. A short spin keeps the idle speed and stays fast under contention.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import logging  # noqa: E402

import pytest  # noqa: E402

from utils.logger import PACKAGE_LOGGERS  # noqa: E402


@pytest.fixture(autouse=True)
def library_logs_reach_caplog():
    """A test that ran main.py left the library loggers writing to that run's handlers only (``setup_logging``):
    give their records back to the root logger, where pytest's caplog listens."""
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = True
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    yield

"""Test-session setup that must happen before torch is imported, the one tiny configuration, shared fixtures."""

from __future__ import annotations

import os

from utils.openmp import set_spin_count  # imports no torch

# OpenMP threads busy-wait by default: with two processes on two cores (torchrun tests, a parallel job) a step
# becomes ~40x slower. The suite keeps every core busy, so it spins less than main.py does (utils/openmp.py).
set_spin_count(count=1000)
# pytest-xdist runs one worker per core: one intra-op thread each (their subprocesses inherit it), not cores^2
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from utils.logger import LOGGER_NAME, PACKAGE_LOGGERS  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "lavt_small_w7_224.pt"
TINY_IMAGES = 33  # synthetic images of a tiny run: 24 train, 3 val, 3 testA, 3 testB

#: The tiny LAVT every test builds (embed dim 8, window 4, two blocks a stage so that stage has a shifted block, no
#: text encoder: language features of width 12). Variants are overrides of it, never a second copy.
TINY: dict[str, Any] = {
    "MODEL.SWIN.EMBED_DIM": 8,
    "MODEL.SWIN.DEPTHS": [2, 2, 2, 2],
    "MODEL.SWIN.NUM_HEADS": [1, 2, 2, 4],
    "MODEL.SWIN.WINDOW_SIZE": 4,
    "MODEL.SWIN.DROP_PATH_RATE": 0.0,
    "MODEL.TEXT.ENCODER": "",
    "MODEL.TEXT.DIM": 12,
    "MODEL.PRETRAINED_SWIN": "",
}

#: What a tiny main.py run changes on top of ``TINY``: one block a stage (a run checks wiring, not the blocks), a
#: trained text encoder's first layer, 48 px on ``TINY_IMAGES`` synthetic images, two epochs.
TINY_RUN: dict[str, Any] = {
    "MODEL.SWIN.DEPTHS": [1, 1, 1, 1],
    "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1],
    "MODEL.SWIN.DROP_PATH_RATE": 0.1,
    "MODEL.TEXT.TRAIN_LAYERS": 1,
    "MODEL.TEXT.MAX_TOKENS": 12,
    "DATA.DATASET": "synthetic",
    "DATA.SIZE": 48,
    "DATA.WORKERS": 0,
    "DATA.SYNTHETIC_IMAGES": TINY_IMAGES,
    "TRAIN.EPOCHS": 2,
    "TRAIN.BATCH_SIZE": 4,
    "TRAIN.LR": 1e-3,
    "EVAL.SPLITS": ["val"],
    "MODEL_ID": "tiny",
}


def tiny_opts(*, run: bool = False, **over: Any) -> list[str]:
    """``TINY`` (with ``TINY_RUN`` when ``run``) and ``over`` as a yacs/``--opts`` list of strings; keyword keys
    use '__' for '.' (``MODEL__SWIN__EMBED_DIM=16``)."""
    opts = {**TINY, **(TINY_RUN if run else {})}
    opts.update({k.replace("__", "."): v for k, v in over.items()})
    flat: list[str] = []
    for k, v in opts.items():
        flat += [k, v if isinstance(v, str) else repr(v).replace(" ", "")]
    return flat


def load_official_file(path: str | Path) -> dict:
    """A file in the authors' layout, read as a user's torch would read it: ``weights_only=True``, their pickled
    ``argparse.Namespace`` (``args``) the one class allowed (independent of ``models.read_checkpoint``)."""
    import argparse

    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def reference() -> dict:
    """The recorded official outputs (tests/fixtures/lavt_small_w7_224.pt, read-only: never modify it)."""
    import torch

    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="session")
def tiny_run_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(synthetic data root, tiny text encoder folder) of the tiny runs, made once per session."""
    from .helpers_train import tiny_env

    return tiny_env(tmp_path_factory)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated REFER dataset (22 images of 64-96 px), made once per test module that asks for it."""
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("syn")
    generate(root, num_images=22, seed=3, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def syn(syn_root: Path):
    """``syn_root`` read by the REFER port."""
    from refer import REFER

    return REFER(syn_root, "synthetic", "unc")


@pytest.fixture(autouse=True)
def library_logs_reach_caplog():
    """A test that ran main.py left the ``lavt`` and library loggers writing to that run's handlers only
    (``setup_logging``): give their records back to the root logger, where pytest's caplog listens."""
    for name in (LOGGER_NAME, *PACKAGE_LOGGERS):
        logger = logging.getLogger(name)
        logger.propagate = True
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    yield


@pytest.fixture
def ctrl_c_default():
    """SIGINT as in a terminal (Python's KeyboardInterrupt), whatever the test process was started with."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

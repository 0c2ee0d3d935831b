"""Command-line entry points of ``tools``: a user's mistake ends as one line and exit status 2, as in ``main.py``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from data.image_io import ImageReadError
from models import CheckpointError
from utils.cli import STANDARD_USER_ERRORS
from utils.cli import run_cli as _run_cli

# What a user can get wrong (files, checkpoints, config, flags); anything else is a bug and keeps its traceback.
USER_ERRORS = (*STANDARD_USER_ERRORS, ImageReadError, CheckpointError)


def run_cli(prog: str, main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> int:
    """``utils.cli.run_cli`` with ``USER_ERRORS``: a user's mistake is one line and status 2."""
    return _run_cli(prog, main, argv, USER_ERRORS)

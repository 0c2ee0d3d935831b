"""Command-line entry points of ``tools``: a user's mistake ends as one line and exit status 2, as in ``main.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from data.image_io import ImageReadError
from engine.preemption import EXIT_INTERRUPTED
from models import CheckpointError
from utils.atomic import StorageError
from utils.errors import error_line

DEBUG_EPILOG = "--debug: the Python traceback of an error instead of its one line."


def cli_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of a command run by ``run_cli``, whose ``--help`` names ``--debug`` (taken out of ``argv`` before
    the parser sees it)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=DEBUG_EPILOG, **kwargs)


# What a user can get wrong (files, checkpoints, config, flags), and a full disk; anything else is a bug and keeps
# its traceback.
USER_ERRORS = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, ImageReadError, CheckpointError,
    StorageError,
)  # fmt: skip


def run_cli(
    prog: str, main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = USER_ERRORS, after_interrupt: str = "",
) -> int:
    """``main(argv)``; an ``errors`` exception becomes ``<prog>: error: <Type>: <message>`` on one line of stderr
    and status 2, Ctrl-C ``<prog>: interrupted (Ctrl-C)`` (then ``; <after_interrupt>`` if given) and status 130, as
    a shell reports it (``--debug`` in ``argv`` shows the traceback instead). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main([a for a in argv if a != "--debug"])
    except errors as e:
        if debug:
            raise
        print(error_line(prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (Ctrl-C)" + (f"; {after_interrupt}" if after_interrupt else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def require_at_least(args: Any, least: dict[str, int]) -> None:
    """ValueError ``--NAME must be >= N, got V`` for the first flag of ``least`` (flag name -> least value) that
    ``args`` (argparse's namespace) holds below it."""
    for name, lowest in least.items():
        value = getattr(args, name)
        if value < lowest:
            raise ValueError(f"--{name} must be >= {lowest}, got {value}")

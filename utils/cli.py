"""Command lines that end a user's mistake in one line, ``<prog>: error: <Type>: <message>``, and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

# the standard library's user errors (a value, a path); callers add their own (e.g. tools.cli.USER_ERRORS)
STANDARD_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError,
)  # fmt: skip


def run_cli(
    prog: str,
    main: Callable[[Sequence[str]], Any],
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = STANDARD_USER_ERRORS,
) -> int:
    """``main(argv)``; an exception of ``errors`` becomes ``<prog>: error: <Type>: <message>`` on one line of stderr
    and status 2 (``--debug`` in ``argv`` shows the traceback instead); anything else is a bug and keeps its
    traceback. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main([a for a in argv if a != "--debug"])
    except errors as e:
        if debug:
            raise
        print(f"{prog}: error: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


def require_at_least(args: Any, least: dict[str, int]) -> None:
    """ValueError ``--NAME must be >= N, got V`` for the first flag of ``least`` (flag name -> least value) that
    ``args`` (argparse's namespace) holds below it."""
    for name, lowest in least.items():
        value = getattr(args, name)
        if value < lowest:
            raise ValueError(f"--{name} must be >= {lowest}, got {value}")

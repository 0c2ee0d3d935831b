"""The one line a command prints for an error: ``<prog>: error: <Type>: <message>``.

An error raised in a DataLoader worker reaches the training's process re-raised by PyTorch, its message the worker's
whole traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."): the line keeps the original
message and says where it was raised.
"""

from __future__ import annotations

import re

__all__ = ["error_line", "error_message", "is_worker_death"]

# PyTorch's ExceptionWrapper.reraise: "Caught <Type> <where>.\nOriginal Traceback (most recent call last):\n..."
_WRAPPED = re.compile(r"Caught (\w+) (in .+?)\.\nOriginal Traceback \(most recent call last\):\n")


def error_message(error: BaseException) -> str:
    """``str(error)``, or for an error re-raised from a DataLoader worker (or another thread PyTorch wraps) its
    original message and where it came from: ``image not found: x.jpg (in DataLoader worker process 0)``."""
    text = str(error)
    wrapped = _WRAPPED.match(text)
    if wrapped is None:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]  # "<module>.<Type>: <message>"
    head, _, message = last.partition(": ")
    if head.rsplit(".", 1)[-1] != wrapped.group(1):  # (not the shape of a traceback's last line: keep it whole)
        message = last
    return f"{message} ({wrapped.group(2)})"


def error_line(prog: str, error: BaseException) -> str:
    """``<prog>: error: <Type>: <message>`` on one line (``error_message``; line breaks become spaces)."""
    return f"{prog}: error: {type(error).__name__}: {error_message(error)}".replace("\n", " ")


def is_worker_death(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch's report of a DataLoader worker that died (killed by a signal, most often the
    out-of-memory killer's SIGKILL, or exited): "DataLoader worker (pid 123) is killed by signal: Killed."."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker (pid")

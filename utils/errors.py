"""The one line a command prints for an error: ``<prog>: error: <Type>: <message>``.

An error raised in a DataLoader worker reaches the training's process re-raised by PyTorch, its message the worker's
whole traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."): the line keeps the original
message and says where it was raised.
"""

from __future__ import annotations

import re

__all__ = ["error_line", "error_message", "is_out_of_memory", "is_worker_death"]

# PyTorch's ExceptionWrapper.reraise: "Caught <Type> <where>.\nOriginal Traceback (most recent call last):\n..."
_WRAPPED = re.compile(r"Caught (\w+) (in .+?)\.\nOriginal Traceback \(most recent call last\):\n")
# c10's prefix of its checks' messages, which says where in its C++ source the check is: "[enforce fail at
# alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: ..."
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\] [^.]*\. ")


def error_message(error: BaseException) -> str:
    """``str(error)`` (without c10's "[enforce fail at <file>:<line>] <condition>. "), or for an error re-raised from a
    DataLoader worker (or another thread PyTorch wraps) its original message and where it came from:
    ``image not found: x.jpg (in DataLoader worker process 0)``."""
    text = _ENFORCE.sub("", str(error))
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out: torch's ``OutOfMemoryError`` (CUDA), the CPU allocator's "can't
    allocate memory" RuntimeError, or Python's MemoryError."""
    if isinstance(error, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)

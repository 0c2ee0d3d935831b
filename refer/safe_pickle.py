"""Loading pickles of plain data only, so that an annotation file cannot run code.

REFER's ``refs(<splitBy>).p`` files are Python 2 pickles of lists and dicts of strings and numbers. ``pickle.load``
would also import and call whatever the file names (``os.system``, ``builtins.eval``, any class's constructor):
unpickling an untrusted file is running it. The unpickler here refuses every global, so only what pickle builds
from its own opcodes gets through: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
``tuple``, ``dict`` and (protocol 4+) ``set`` / ``frozenset``. The only globals admitted are ``set`` and
``frozenset`` themselves, as protocols 0-3 spell them (``complex``, ``bytearray`` and Python 3 ``bytes`` under
protocols 0-2 are pickled as calls of globals, and refused).

Python 2 byte strings are decoded as Latin-1: every byte maps to one character, so nothing fails to decode, and
ASCII text (all of RefCOCO/+/g) reads as it was written.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

__all__ = ["UnsafePickleError", "load_plain_pickle", "loads_plain_pickle"]

# (module, name) -> the object; protocols 0-3 pickle a set as a call of the builtin on a list.
_ALLOWED_GLOBALS: dict[tuple[str, str], type] = {
    (module, name): obj
    for module in ("builtins", "__builtin__")  # Python 3 and Python 2 spellings
    for name, obj in (("set", set), ("frozenset", frozenset))
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a class or function (anything but plain containers and scalars); nothing of it was run."""


class _PlainUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves no global but ``set`` and ``frozenset``, and no persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        # Called for GLOBAL / STACK_GLOBAL / extension codes, before any REDUCE or NEWOBJ could call the result.
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"it names {module}.{name}; only plain lists, dicts, tuples, sets, strings and numbers are "
                "allowed, so it was refused unrun"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"it holds a persistent id {pid!r:.80}; only plain data is allowed")


def loads_plain_pickle(data: bytes) -> Any:
    """The plain data pickled in ``data`` (UnsafePickleError if it names any global; UnpicklingError and others
    as ``pickle.loads`` if it is corrupt)."""
    return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_plain_pickle(path: str | Path) -> Any:
    """The plain data pickled in the file ``path`` (errors as ``loads_plain_pickle``, OSError if unreadable)."""
    with open(path, "rb") as f:
        return _PlainUnpickler(f, encoding="latin1").load()

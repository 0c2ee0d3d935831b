"""The REFER API's errors: each message names the file, key or value at fault."""

from __future__ import annotations


class ReferFileNotFoundError(FileNotFoundError):
    """A REFER file or folder is missing; the message names the path expected and what belongs there."""


class ReferDataError(ValueError):
    """A REFER file exists but cannot be read, or its content is inconsistent (names the file and the key)."""


class ReferKeyError(KeyError):
    """An id that the dataset does not hold. Prints its message as is (KeyError would print its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

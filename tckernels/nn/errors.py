"""The error every checkpoint reader raises: it names the file and, where there is one, the key."""
from __future__ import annotations

import os
from typing import Any, Optional


class FormatError(ValueError):
    """A checkpoint does not have the expected format. ``path`` and ``key`` say where."""

    def __init__(self, message: str, *, path: Any = None, key: Optional[str] = None):
        where = []
        if path is not None:
            where.append(f"file {os.fspath(path) if isinstance(path, os.PathLike) else path}")
        if key is not None:
            where.append(f"key {key!r}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.path, self.key, self.message = path, key, full

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class MissingKeyError(FormatError, KeyError):
    """A required key is missing from a checkpoint (both a ``ValueError`` and a ``KeyError``)."""

"""The one exception type of velodiff's checkpoint loading."""
from __future__ import annotations

from typing import Iterable


class CheckpointError(ValueError):
    """A checkpoint file or folder is unreadable, corrupt, refused, or does not fit the model.

    The message always names the file (or folder) and, where one is at fault, the key.
    """


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file a checkpoint needs does not exist (both a :class:`CheckpointError` and a FileNotFoundError)."""


def list_keys(keys: Iterable[str], limit: int = 10) -> str:
    """Format up to ``limit`` keys, then a count of the rest: ``'a', 'b' (and 3 more)``."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f" (and {len(keys) - limit} more)"
    return shown

"""Checkpoint and table files: written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(handle)`` to a temporary file beside ``path``, flush it to disk, then rename it over
    ``path`` and flush the folder: a crash, a power loss or a concurrent reader never sees half a
    file. Parent folders are created; the file gets the permissions of any new file (the umask's),
    so other users (an MLflow server) can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_folder(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk, where the file system can (some network ones refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomically(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through :func:`write_atomically`."""
    import torch

    return write_atomically(path, lambda handle: torch.save(payload, handle))

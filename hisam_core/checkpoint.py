"""Checkpoint and table files, written whole or not at all, and the RNG states a resumable
checkpoint holds."""

from __future__ import annotations

import contextlib
import os
import random
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


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy global RNG states, as tensors and plain values that
    ``torch.load(weights_only=True)`` reads back."""
    import numpy as np
    import torch

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA's where this machine has CUDA: of the devices it
    sees, so a retry on a node exposing fewer GPUs than the saving one still resumes)."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    random.setstate(state["python"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], *numpy["gauss"]))


def load_training_state(
    path: str | Path, conflicts: Callable[[dict[str, Any]], list[str]], elsewhere: str
) -> dict[str, Any]:
    """A training state to resume from (on the CPU: the RNG states must stay CPU tensors; weights and
    moments follow their parameters when loaded), refused with a ValueError when ``conflicts(state)``
    names the settings it differs in; ``elsewhere`` says where a new training should go instead."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if changed := conflicts(state):
        raise ValueError(
            f"{path} belongs to another training (it differs in {changed}): train into another "
            f"{elsewhere}, or delete it to start over"
        )
    return state

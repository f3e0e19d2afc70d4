"""Checkpoints are replaced whole: a save that fails leaves the previous file and no temporary."""

from __future__ import annotations

import pytest
import torch

from hisam_core.checkpoint import save_atomically


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run" / "model.pt"
    save_atomically({"step": 1, "w": torch.ones(3)}, path)  # creates the folder
    with pytest.raises(Exception, match="pickle"):
        save_atomically({"step": 2, "hook": lambda: None}, path)  # fails while writing
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    save_atomically({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path):
    """Not mkstemp's owner-only 0600: an MLflow server or serving user must be able to read it."""
    import os

    path = save_atomically({"step": 1}, tmp_path / "model.pt")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_the_file_and_its_rename_reach_the_disk_before_save_returns(tmp_path, monkeypatch):
    """A power loss after the rename must not leave an empty file: the data is flushed before the
    rename, and the folder (which holds the rename) after it."""
    import os
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else f"file of {os.fstat(fd).st_size} bytes")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = save_atomically({"step": 1, "w": torch.ones(3)}, tmp_path / "model.pt")
    assert synced == [f"file of {path.stat().st_size} bytes", "folder"]


def test_cuda_rng_states_are_restored_for_the_devices_this_node_sees(monkeypatch):
    """A training state saved on a node with two GPUs resumes on a node that exposes one: only the
    visible device's state is set (torch sets them by index, so the second raised IndexError). No GPU
    here: torch.cuda's three calls stand in for a one-GPU node."""
    import torch

    from hisam_core.checkpoint import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    set_rng_state(state)
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], state["cuda"][0])

"""One torch thread; ``planted`` is the root conftest's synthetic log with planted preferences."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny models are faster and deterministic on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def planted(planted_interactions):
    return planted_interactions

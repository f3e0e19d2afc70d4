"""One torch thread and a small synthetic interaction log with planted preferences."""

from __future__ import annotations

import numpy as np
import pandas as pd
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
def planted() -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """80 users x 60 items: an item quality and item taste vectors drive both the labels
    (user . taste + 2 quality > 0) and two item feature modalities (noisy linear views of both).
    Returns (interactions, features by modality, item ids)."""
    rng = np.random.default_rng(0)
    users, items, dim = 80, 60, 4
    taste = rng.normal(size=(items, dim))
    quality = rng.normal(size=items)
    preference = rng.normal(size=(users, dim))
    rows = []
    clock = 0
    for user in range(users):
        for item in rng.choice(items, size=int(rng.integers(8, 30)), replace=False):
            clock += int(rng.integers(1, 5))
            rows.append(
                (user + 1, item + 1, int(preference[user] @ taste[item] + 2 * quality[item] > 0), clock)
            )
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp"])
    frame = frame.sample(frac=1.0, random_state=0)  # file order must not matter
    features = {
        name: (
            np.column_stack([taste, 2 * quality]) @ rng.normal(size=(dim + 1, 8))
            + 0.1 * rng.normal(size=(items, 8))
        ).astype(np.float32)
        for name in ("behavior", "text")
    }
    return frame, features, np.arange(1, items + 1)

"""Stand-in data for tests and benchmarks: a random semantic-ID table (the DST contract) and users
whose action depends on one semantic code of the item, a task HMAT must learn from item tokens."""

from __future__ import annotations

import numpy as np

from hisam_core.ranker.sequence import SequenceConfig, UserHistory
from hisam_core.semantic_ids import SemanticIds


def random_semantic_ids(num_items: int, config: SequenceConfig, seed: int = 0) -> SemanticIds:
    """Uniformly random codes for items ``0 .. num_items - 1`` (a stand-in for a DST table)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, config.codebook_size, size=(num_items, config.num_positions))
    return SemanticIds(np.arange(num_items), codes, config.codebook_size, f"random-{seed}")


def synthetic_histories(
    semantic_ids: SemanticIds,
    config: SequenceConfig,
    num_users: int,
    min_items: int = 3,
    max_items: int = 12,
    signal_position: int = 0,
    seed: int = 0,
) -> list[UserHistory]:
    """Users with random items and profiles; the action is the positive one iff the item's code at
    ``signal_position`` lies in the lower half of the codebook (negative otherwise)."""
    rng = np.random.default_rng(seed)
    positive = config.action_names.index(config.positive_action)
    negative = next(i for i in range(len(config.action_names)) if i != positive)
    histories = []
    for user in range(num_users):
        items = rng.integers(0, len(semantic_ids.item_ids), size=int(rng.integers(min_items, max_items + 1)))
        codes = semantic_ids.lookup(semantic_ids.item_ids[items])
        actions = np.where(codes[:, signal_position] < config.codebook_size // 2, positive, negative)
        profile = {name: int(rng.integers(0, buckets)) for name, buckets in config.profile_fields.items()}
        histories.append(UserHistory(user, codes, actions, profile))
    return histories

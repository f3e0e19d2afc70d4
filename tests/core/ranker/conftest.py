"""Tiny HMAT configs, a stand-in semantic-ID table and synthetic users for the ranker tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, UserHistory
from hisam_core.ranker.synthetic import random_semantic_ids, synthetic_histories
from hisam_core.semantic_ids import SemanticIds


@pytest.fixture
def seq_config() -> SequenceConfig:
    return SequenceConfig(codebook_size=16, profile_fields={"age": 4, "gender": 3}, max_tokens=64)


def tiny_model_config(**overrides) -> HMATConfig:
    return HMATConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128, **overrides)


@pytest.fixture
def make_model(seq_config: SequenceConfig) -> Callable[..., HMAT]:
    """Factory of tiny HMATs (hidden 64, 2 layers, 4 query / 2 key-value heads) with a fixed seed,
    initialised ten times wider than for training (``init_std`` 0.2): scores spread well beyond the
    tolerances that hold fast paths equal to their references, so a wrong position or a leaked token
    moves them past it (at 0.02 some such errors moved scores by only 8e-5). ``sequence``: the
    vocabulary's config, when not ``seq_config``."""

    def make(seed: int = 0, sequence: SequenceConfig | None = None, **overrides) -> HMAT:
        torch.manual_seed(seed)
        config = tiny_model_config(**{"init_std": 0.2, **overrides})
        return HMAT(config, SequenceBuilder(sequence or seq_config).vocab.size).eval()

    return make


@pytest.fixture
def semantic_ids(seq_config: SequenceConfig) -> SemanticIds:
    return random_semantic_ids(200, seq_config, seed=0)


@pytest.fixture
def history(seq_config: SequenceConfig, semantic_ids: SemanticIds) -> UserHistory:
    """A user with 5 interactions (fits the 64-token budget with a candidate)."""
    rng = np.random.default_rng(3)
    codes = semantic_ids.codes[rng.choice(200, size=5, replace=False)]
    return UserHistory(7, codes, rng.integers(0, 2, size=5), {"age": 2, "gender": 1})


@pytest.fixture
def histories(seq_config: SequenceConfig, semantic_ids: SemanticIds) -> list[UserHistory]:
    return synthetic_histories(semantic_ids, seq_config, 40, seed=1)

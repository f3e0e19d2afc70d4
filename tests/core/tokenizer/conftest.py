"""Fixtures of the DST tests: single-threaded torch (these models are tiny) and one trained model."""

from __future__ import annotations

import pytest
import torch

from hisam_core.tokenizer.synthetic import planted_features
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer

#: Tiny DST for the planted data: d=32, 3 shared + 3 specific codebooks of 16 codes.
TINY = {
    "model": {
        "dim": 32,
        "hidden_dim": 64,
        "codebook_size": 16,
        "vclub_hidden_dim": 32,
    },
    "epochs": 30,
    "alignment_warmup_epochs": 3,
    "batch_size": 128,
    "lr": 3e-3,
    "vclub_lr": 3e-3,
    "vclub_steps": 3,
    "dead_code_threshold": 30,
}


@pytest.fixture(scope="session")
def tiny() -> dict:
    return TINY


@pytest.fixture(scope="session")
def planted():
    return planted_features(num_items=1000, seed=0)


@pytest.fixture(scope="session")
def trained():
    """A DST trained on a planted catalogue, with the per-epoch metrics it reported. The shared factor
    has 64 values, more than one codebook of 16 can hold, so each shared layer has some of it left
    to code; 4,000 items keep the 64-valued factors' chance agreement with a code small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    features, factors = planted_features(num_items=4000, num_shared=64, num_private=64, seed=0)
    history = []
    model = train_tokenizer(
        features, TokenizerTrainConfig.model_validate(TINY), callback=lambda e, m: history.append(m)
    )
    torch.set_num_threads(threads)
    return model, features, factors, history

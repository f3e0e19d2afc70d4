"""Fixtures for the encoder tests: one text encoder per session (the real offline MiniLM)."""

from __future__ import annotations

import pytest
import torch

from hisam_core.encoders.text import TextEncoder, TextEncoderConfig


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(batch_size=4), device="cpu")


@pytest.fixture(autouse=True)
def single_torch_thread():
    """These tests run tiny models, where a second intra-op thread only adds sync overhead (and
    slows badly on a busy 2-core machine); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""``planted``: the root conftest's synthetic interaction log with planted preferences."""

from __future__ import annotations

import pytest


@pytest.fixture
def planted(planted_interactions):
    return planted_interactions

"""Shared fixtures: one local Spark session per test run, the MovieLens bundle when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MOVIELENS = Path(
    os.environ.get(
        "HISAM_MOVIELENS_DIR", Path(__file__).resolve().parents[1] / "../shared/data/movielens-100k"
    )
)


@pytest.fixture(scope="session")
def spark():
    from spark_jobs.session import get_spark

    session = get_spark("hisam-tests", master="local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """The MovieLens-100K bundle (never committed: its licence forbids redistribution)."""
    if not (MOVIELENS / "raw" / "u.data").exists():
        pytest.skip(f"MovieLens-100K bundle not found at {MOVIELENS.resolve()}")
    return MOVIELENS.resolve()

"""Which Spark master a job asks for: explicit, then the environment, then spark-submit's, then local."""

from __future__ import annotations

import pytest

from spark_jobs.session import resolve_master


@pytest.mark.parametrize(
    ("given", "env", "submitted", "expected"),
    [
        (None, None, False, "local[2]"),  # a laptop
        (None, None, True, None),  # spark-submit --master yarn: the builder must not override it
        (None, "spark://h:7077", True, "spark://h:7077"),  # an explicit choice wins everywhere
        ("local[1]", "spark://h:7077", False, "local[1]"),
    ],
)
def test_master_resolution(monkeypatch, given, env, submitted, expected) -> None:
    monkeypatch.delenv("HISAM_SPARK_MASTER", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    if env:
        monkeypatch.setenv("HISAM_SPARK_MASTER", env)
    if submitted:
        monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "40000")
    assert resolve_master(given) == expected

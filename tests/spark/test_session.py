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


def test_local_workers_run_this_interpreter_and_sessions_keep_utc(spark) -> None:
    """Python workers of a local session run the driver's interpreter (its packages), not whatever
    ``python3`` is on PATH; the session reads and writes times in UTC and shuffles into one partition
    per local core."""
    import sys

    assert spark.range(1).rdd.map(lambda _: __import__("sys").executable).first() == sys.executable
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.sparkContext.defaultParallelism == 2  # local[2]
    assert spark.conf.get("spark.sql.shuffle.partitions") == "2"


def test_shuffle_partitions_someone_set_are_kept(spark) -> None:
    """One shuffle partition per core only where nothing set them: a value from ``conf`` (or set on
    the running session) survives a later ``get_spark()`` of the same session."""
    from spark_jobs.session import get_spark

    try:
        assert get_spark(conf={"spark.sql.shuffle.partitions": "3"}) is spark
        assert get_spark() is spark
        assert spark.conf.get("spark.sql.shuffle.partitions") == "3"
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "2")


def test_spark_settings_from_the_environment_are_key_value_pairs(monkeypatch) -> None:
    from spark_jobs.session import _env_conf

    monkeypatch.setenv("HISAM_SPARK_CONF", " spark.a = 1 ,spark.b=x=y,, ")
    assert _env_conf() == {"spark.a": "1", "spark.b": "x=y"}
    monkeypatch.setenv("HISAM_SPARK_CONF", "spark.a=1,spark.executor.memory")
    with pytest.raises(ValueError, match=r"must be key=value, got \['spark.executor.memory'\]"):
        _env_conf()
    # a value with a comma needs the JSON form
    packages = "org.apache.hadoop:hadoop-aws:3.5.0,io.delta:delta-spark_2.13:4.4.1"
    monkeypatch.setenv(
        "HISAM_SPARK_CONF", f' {{"spark.jars.packages": "{packages}", "spark.a": 2, "spark.b": true}}'
    )
    assert _env_conf() == {"spark.jars.packages": packages, "spark.a": "2", "spark.b": "true"}
    for bad in ('{"spark.a": [1]}', '{"spark.a": 1', '{"spark.a": null}'):
        monkeypatch.setenv("HISAM_SPARK_CONF", bad)
        with pytest.raises(ValueError, match="HISAM_SPARK_CONF"):
            _env_conf()

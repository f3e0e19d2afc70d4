"""One way to get a SparkSession: master and conf from config or environment.

``HISAM_SPARK_MASTER`` (default ``local[2]``) and ``HISAM_SPARK_CONF`` (``k=v,k=v`` or a JSON object) override the
defaults, so the same entry point runs on a laptop and, unchanged, under spark-submit on a cluster:
there (spark-submit starts the Python driver with ``PYSPARK_GATEWAY_PORT`` set) the builder sets no
master and no local defaults, so spark-submit's ``--master`` and properties file hold.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from pyspark.sql import SparkSession

LOCAL_DEFAULTS: dict[str, str] = {
    "spark.ui.enabled": "false",
    # Stage bars on stderr interleave with the steps' logs and progress bars (and fill Airflow's).
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.driver.memory": "4g",
}
#: Every session, local or not: timestamps without an offset are UTC (the lake's convention), not the
#: time zone of whichever worker JVM runs the task.
SESSION_TIME_ZONE = "UTC"


def _env_conf() -> dict[str, str]:
    """``$HISAM_SPARK_CONF``: ``k=v,k=v``, or a JSON object when a value holds a comma (a list of
    ``spark.jars.packages``)."""
    raw = os.environ.get("HISAM_SPARK_CONF", "")
    if raw.strip().startswith("{"):
        try:
            settings = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"HISAM_SPARK_CONF is not a valid JSON object: {err}") from None
        bad = [k for k, v in settings.items() if isinstance(v, dict | list) or v is None]
        if bad:
            raise ValueError(f"HISAM_SPARK_CONF as JSON must map keys to strings or numbers, got {bad}")
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise ValueError(f"HISAM_SPARK_CONF entries must be key=value, got {bad}")
    return {k.strip(): v.strip() for k, v in pairs}


def under_spark_submit() -> bool:
    """True in a Python driver that spark-submit launched (it passes the JVM gateway's port)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def resolve_master(master: str | None = None) -> str | None:
    """``master``, else ``$HISAM_SPARK_MASTER``, else None under spark-submit (its own), else ``local[2]``."""
    master = master or os.environ.get("HISAM_SPARK_MASTER") or None
    return master if master is not None or under_spark_submit() else "local[2]"


def get_spark(
    app_name: str = "hisam", master: str | None = None, conf: dict[str, str] | None = None
) -> SparkSession:
    """Return the active session or build one: ``local[2]`` unless told otherwise (or spark-submit's)."""
    master = resolve_master(master)
    local = master is not None and master.startswith("local")
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers must run this interpreter (pandas, torch), not whatever `python3` is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings = {**(LOCAL_DEFAULTS if local else {}), **(conf or {}), **_env_conf()}
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.conf.set("spark.sql.session.timeZone", SESSION_TIME_ZONE)  # also on a session spark-submit made
    if local and spark.conf.get("spark.sql.shuffle.partitions", None) is None:  # set nowhere
        # One shuffle partition per local core, as Spark's default parallelism there, not Spark's 200:
        # every Spark job of a write streamed through the driver costs (spark_jobs.lake.arrow_batches).
        spark.conf.set("spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism))
    spark.sparkContext.setLogLevel("WARN")
    # py4j logs every gateway connection it closes at INFO, also from __del__ at interpreter exit,
    # when a CLI's log stream may already be closed ("--- Logging error ---"): WARN, like the JVM.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return spark

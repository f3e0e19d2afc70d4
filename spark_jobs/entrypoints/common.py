"""Arguments and set-up shared by the entry points: lake location, Spark master, logical date."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from typing import Any

from pyspark.sql import SparkSession

from spark_jobs.lake import LAKE_ROOT_ENV, Lake, LakeConfig
from spark_jobs.session import get_spark
from spark_jobs.tables import check_dataset

logger = logging.getLogger(__name__)


def logical_date(text: str) -> dt.date:
    """``YYYY-MM-DD`` -> date (argparse type)."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"logical date must be YYYY-MM-DD, got {text!r}") from None


def dataset_name(text: str) -> str:
    """A dataset name (argparse type): refused here, before Spark starts, when the lake would not take it."""
    try:
        return check_dataset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser(description: str, *, spark: bool = True, date: bool = True) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the common options (lake, Spark, logical date, logging). The
    logical date has no default: a retry after midnight must repeat its run, not import the same
    files again under the next day."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if spark:
        p.add_argument("--lake-root", help="lake root directory or URI (default: lake config, "
                       "$HISAM_LAKE_ROOT, then $HISAM_HOME/lake)")  # fmt: skip
        p.add_argument("--lake-config", help="YAML LakeConfig (e.g. configs/lake.yaml)")
        p.add_argument("--master", help="Spark master (default: $HISAM_SPARK_MASTER, else spark-submit's "
                       "--master when run by spark-submit, else local[2])")  # fmt: skip
    if date:
        p.add_argument(
            "--logical-date",
            type=logical_date,
            required=True,
            help="the run's logical date, YYYY-MM-DD (the Airflow run's); a rerun replaces its partitions",
        )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def setup(args: argparse.Namespace, app_name: str) -> tuple[SparkSession, Lake]:
    """Logging, the Spark session and the lake from parsed arguments."""
    configure_logging(args.log_level)
    spark = get_spark(app_name, master=args.master)
    config = LakeConfig.from_yaml(args.lake_config) if args.lake_config else LakeConfig()
    if args.lake_root:
        config.root = args.lake_root
    check_lake_named(spark.sparkContext.master, config.root)
    return spark, Lake.from_config(spark, config)


def check_lake_named(master: str, root: str | None) -> None:
    """On a cluster, the lake must be named (``--lake-root``, the lake config or ``$HISAM_LAKE_ROOT``):
    the default, ``$HISAM_HOME/lake``, is a folder on the driver's disk, which the executors and the
    pipeline's steps do not see."""
    if master.startswith("local") or root or os.environ.get(LAKE_ROOT_ENV):
        return
    raise ValueError(
        f"Spark master {master!r} is a cluster, but no lake root was given: pass --lake-root (or a "
        f"--lake-config with root, or set ${LAKE_ROOT_ENV}); the default $HISAM_HOME/lake would be "
        "a folder on the driver's disk"
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)


def jsonable(value: Any) -> Any:
    """Dataclasses (also nested in dicts/lists) -> dicts; dates and paths are stringified by ``emit``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def emit(summary: Any) -> None:
    """Print the run summary as one JSON line on stdout (the CLI's output for orchestrators)."""
    sys.stdout.write(json.dumps(jsonable(summary), default=str, sort_keys=True) + "\n")

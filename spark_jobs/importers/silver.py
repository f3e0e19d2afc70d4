"""Bronze -> silver: int64 ids, binary labels, duplicates removed, MERGE into the silver tables.

For one ``(dataset, logical_date)`` import run:

* interactions: ``user_id``/``item_id`` -> :func:`spark_jobs.tables.stable_id` (source ids kept as
  ``*_key``); ``label`` = the source's label, else ``rating > positive_threshold`` (ratings above 3
  are positive, Sec. 4.1); rows with neither are quarantined; repeated events (same user, item and
  time) keep one row and quarantine the others.
* items / users: ids mapped the same way; duplicate ids within the run are quarantined.

Rows are upserted on the silver keys, matched rows only when the run is at least as recent as the
stored row (``s.logical_date >= t.logical_date``), so rerunning or backfilling a date never makes
silver older. A rerun retracts: silver rows whose latest import was this date and that the rerun no
longer contains are deleted (a corrected file, an event whose timestamp was fixed: it is not kept
twice). Rows a later date also imported carry that date and stay. Silver keeps no earlier version
of a row (SCD1), so a row an earlier date imported and this date updated is retracted with it.
Only a rerun of a date retracts: a later date's import does not, so a snapshot source (one path read
every day) that drops a record, or moves an event to another time (another key), leaves the earlier
date's row in silver.
Rejects go to ``bronze.quarantine`` with ``target_table = silver.*``; for every table, bronze rows
of the run = merged + quarantined.
"""

from __future__ import annotations

import datetime as dt
import logging

from pydantic import Field
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from hisam_core.config import Config
from spark_jobs.importers.common import (
    RAW,
    REASON,
    ImportReport,
    Parsed,
    first_reason,
    flag_duplicates,
    unfinished_import,
    write_parsed,
)
from spark_jobs.lake import Lake, sql_literal
from spark_jobs.tables import (
    BRONZE_INTERACTIONS,
    BRONZE_ITEMS,
    BRONZE_USERS,
    SILVER_INTERACTIONS,
    SILVER_ITEMS,
    SILVER_USERS,
    row_json,
    stable_id,
)

logger = logging.getLogger(__name__)


class SilverConfig(Config):
    """How bronze becomes silver."""

    #: rating > threshold is a positive (label 1), else 0 (Sec. 4.1 of the paper).
    positive_threshold: float = Field(3.0)


def _bronze_run(lake: Lake, table: str, dataset: str, logical_date: dt.date) -> DataFrame:
    return lake.read(table, partitions={"dataset": dataset, "logical_date": logical_date})


def clean_interactions(bronze: DataFrame, config: SilverConfig) -> DataFrame:
    """bronze.interactions rows -> silver.interactions rows + ``_reason``/``_raw``/``source_file``."""
    label = F.coalesce(
        F.col("label"),
        F.when(  # NaN sorts above every number in Spark: it is no rating, not a positive
            F.col("rating").isNotNull() & ~F.isnan("rating"),
            (F.col("rating") > config.positive_threshold).cast("int"),
        ),
    )
    reason = first_reason(
        (label.isNull(), "neither rating nor label"),
        (
            ~label.isin(0, 1),
            F.concat(F.lit("label "), F.col("label").cast("string"), F.lit(" is not 0 or 1")),
        ),
    )
    rows = bronze.select(
        "dataset",
        stable_id(F.col("user_id")).alias("user_id"),
        stable_id(F.col("item_id")).alias("item_id"),
        "event_ts",
        F.col("user_id").alias("user_key"),
        F.col("item_id").alias("item_key"),
        "rating",
        label.alias("label"),
        "action",
        "logical_date",
        "source_file",
        reason.alias(REASON),
        row_json(*bronze.columns).alias(RAW),
    )
    return flag_duplicates(rows, ["dataset", "user_id", "item_id", "event_ts"], "event (user, item, time)")


def clean_items(bronze: DataFrame) -> DataFrame:
    """bronze.items rows -> silver.items rows + ``_reason``/``_raw``/``source_file``."""
    rows = bronze.select(
        "dataset",
        stable_id(F.col("item_id")).alias("item_id"),
        F.col("item_id").alias("item_key"),
        "title",
        "categories",
        "attributes",
        "image_path",
        "image_url",
        "logical_date",
        "source_file",
        F.lit(None).cast("string").alias(REASON),
        row_json(*bronze.columns).alias(RAW),
    )
    return flag_duplicates(rows, ["dataset", "item_id"], "item_id")


def clean_users(bronze: DataFrame) -> DataFrame:
    """bronze.users rows -> silver.users rows + ``_reason``/``_raw``/``source_file``."""
    rows = bronze.select(
        "dataset",
        stable_id(F.col("user_id")).alias("user_id"),
        F.col("user_id").alias("user_key"),
        "attributes",
        "logical_date",
        "source_file",
        F.lit(None).cast("string").alias(REASON),
        row_json(*bronze.columns).alias(RAW),
    )
    return flag_duplicates(rows, ["dataset", "user_id"], "user_id")


#: ``job`` of the commit metadata of a silver promotion; with ``dataset`` and ``logical_date``, its
#: ``bronze.quarantine`` commit marks that the day's data is in silver (:func:`promotion_record`).
PROMOTION_JOB = "promote_to_silver"


def promotion_record(dataset: str, logical_date: dt.date) -> dict[str, str]:
    """The commit metadata of the silver promotion of one import run."""
    return {"job": PROMOTION_JOB, "dataset": dataset, "logical_date": logical_date.isoformat()}


def promote_to_silver(
    lake: Lake, dataset: str, logical_date: dt.date, config: SilverConfig | None = None
) -> ImportReport:
    """Merge the bronze rows of one import run into silver; returns counts and versions. Refused
    (ValueError) when that run stopped before it finished (:func:`unfinished_import`): its new
    interactions would meet an earlier run's items and users."""
    config = config or SilverConfig()
    tables = [t.name for t in (BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS)]
    if why := unfinished_import(lake, dataset, logical_date, tables):
        raise ValueError(f"{why}; rerun the import of {logical_date} before promoting it")
    interactions, items, users = (
        _bronze_run(lake, t.name, dataset, logical_date)
        for t in (BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS)
    )
    parsed = [
        Parsed(
            BRONZE_INTERACTIONS.name,
            SILVER_INTERACTIONS.name,
            clean_interactions(interactions, config),
            interactions,
        ),
        Parsed(BRONZE_ITEMS.name, SILVER_ITEMS.name, clean_items(items), items),
        Parsed(BRONZE_USERS.name, SILVER_USERS.name, clean_users(users), users),
    ]
    report = ImportReport(dataset, logical_date)
    return write_parsed(
        lake,
        dataset,
        logical_date,
        parsed,
        report,
        mode="merge",
        update_condition="s.logical_date >= t.logical_date",
        delete_unmatched=f"t.logical_date = {sql_literal(logical_date)}",
        metadata=promotion_record(dataset, logical_date),
    )

"""Step ``maintain-lake`` (weekly): compact and vacuum every table of the lake.

Every day writes new files into bronze, silver and gold (a replaced partition, a MERGE, a rebuilt
partition), and Delta keeps the files the older versions read. Without upkeep, a table's small files
slow every read and its storage grows without bound. For each declared table that exists this step
compacts small files (OPTIMIZE) and deletes files that only versions older than
``lake.retention_days`` read (VACUUM, :meth:`spark_jobs.lake.Lake.maintain`). Contents do not change,
newer versions stay readable (time travel, the versions MLflow runs logged), and a rerun with
nothing left to do commits nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from tqdm.auto import tqdm

from pipelines.context import StepContext

log = logging.getLogger(__name__)


def maintain_lake(ctx: StepContext) -> dict[str, Any]:
    """Compact and vacuum every existing lake table; per table what it rewrote and deleted."""
    from spark_jobs.tables import TABLES

    retention = dt.timedelta(days=ctx.config.lake.retention_days)
    tables = {}
    for name in tqdm(sorted(TABLES), desc="maintain-lake", unit="table"):
        report = ctx.lake.maintain(name, retention)
        if report["version"] < 0:
            continue  # not created yet
        tables[name] = report
        log.info(
            "%s: %d small files compacted into %d, %d files deleted (older than %s), now version %d",
            name,
            report["files_compacted"],
            report["files_written"],
            report["files_deleted"],
            retention,
            report["version"],
        )
    return {"retention_days": ctx.config.lake.retention_days, "tables": tables}

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


def snapshot_readers(ctx: StepContext) -> list[str]:
    """Tokenizer versions that serve (``@current``'s, ``@champion``'s, and ``@previous``'s, which a
    rollback restores) and were registered before the model carried its cold behaviour row:
    ``tokenize-new-items`` reads their embeddings snapshot."""
    from pipelines.registry import find_versions
    from pipelines.tokenizer import COLD_BEHAVIOUR, serving_tokenizer_versions

    readers = []
    for version in sorted(serving_tokenizer_versions(ctx).values()):
        registered = find_versions(ctx.mlflow, ctx.config.models.tokenizer, tokenizer_version=version)
        if registered and COLD_BEHAVIOUR not in registered[0].tags:
            readers.append(version)
    return readers


def maintain_lake(ctx: StepContext) -> dict[str, Any]:
    """Compact and vacuum every existing lake table; per table what it rewrote and deleted. While a
    serving tokenizer reads its embeddings snapshot (:func:`snapshot_readers`), ``gold.item_embeddings``
    is compacted but not vacuumed, and its checkpoints keep every commit (a snapshot older than the
    log retention would lose its commit, and with it the version, though its files stay)."""
    from spark_jobs.tables import GOLD_ITEM_EMBEDDINGS, TABLES

    retention = dt.timedelta(days=ctx.config.lake.retention_days)
    readers = snapshot_readers(ctx)
    if readers:
        log.warning(
            "%s not vacuumed: tokenizer(s) %s, registered before they carried their cold behaviour "
            "row, read their embeddings snapshot (the next monthly tokenizer lifts this)",
            GOLD_ITEM_EMBEDDINGS.name,
            ", ".join(readers),
        )
    tables = {}
    for name in tqdm(sorted(TABLES), desc="maintain-lake", unit="table"):
        report = ctx.lake.maintain(
            name, retention, vacuum=not (readers and name == GOLD_ITEM_EMBEDDINGS.name)
        )
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
    return {"retention_days": ctx.config.lake.retention_days, "tables": tables, "snapshot_readers": readers}

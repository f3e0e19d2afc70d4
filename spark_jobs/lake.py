"""The lake: versioned Delta tables behind one small interface, two interchangeable backends.

``Lake.write(df, table, mode=...)`` returns the Delta version it committed (record it for lineage),
``Lake.read(table, version=...)`` reads any version back (time travel). Tables and their schemas are
declared in :mod:`spark_jobs.tables`; a DataFrame whose columns or types drift from the declaration
is refused with a :class:`SchemaDriftError` that names the columns.

Backends (picked by ``backend="auto"``):

* ``spark``: native ``format("delta")`` when the delta-spark jars are on the classpath (clusters,
  ``spark-submit --packages io.delta:delta-spark_2.13:<v>`` with the Delta session extension).
* ``delta-rs``: the ``deltalake`` package through Arrow, for laptops and CI where no jars can be
  fetched. Writes stream to the driver one partition per Spark job (:func:`arrow_batches`), so
  ``spark.driver.maxResultSize`` caps a partition, not a write, into ``write_deltalake``, which
  writes batch by batch, or ``DeltaTable.merge``, whose memory grows with its source
  (``benchmarks/results/lake_write.json``). delta-rs reads the table before the stream starts, so
  another commit to the same partitions while ``df`` is computed makes the write fail
  (``CommitFailedError``; :class:`ConcurrentWriteError` with ``read_version``); a retry succeeds.
  Reads are distributed: Spark reads the version's Parquet files directly and takes partition
  values from the Delta log.

Write modes and rerun semantics (a job rerun for the same logical date leaves identical contents):

* ``replace_partition``: atomically replaces the rows matching ``partition_values`` (a subset of the
  partition columns, e.g. ``{"dataset": "ml", "logical_date": date(2024, 1, 1)}``; a list value
  means any of those, ``{"target_table": ["a", "b"]}``). Every row of ``df`` must lie inside,
  otherwise ``ValueError``.
* ``merge``: upsert on the table's keys (or ``keys=``): matched rows are updated, new rows inserted;
  nothing is deleted unless ``delete_unmatched`` names the target rows a rerun may retract.
  ``partition_values`` narrows the target scan. Duplicate keys in ``df`` are a ``ValueError``.
* ``overwrite``: replaces the whole table. ``append``: adds rows (not idempotent; avoid in jobs).

Every successful ``write`` commits a new table version, also when the rows are unchanged (a rerun
gives version N+1 with the same contents as version N); Delta has no cheap no-op detection. The
exceptions: a ``merge`` of an empty DataFrame without ``delete_unmatched``, and a ``merge`` delta-rs
finds nothing to change for, commit nothing and return the version before the write. Otherwise the
version returned is the write's own commit, found in the log by a write id it carries, also when
other writers committed right after it. ``metadata`` adds key/value pairs to that commit
(``history`` returns them); ``read_version`` refuses the write with a :class:`ConcurrentWriteError`
when a commit after the version its rows were derived from changed the same partitions.
Tables are created on first use with the declared schema and partitioning (that creation is
version 0, an empty table).

``Lake.maintain`` is the table upkeep a daily writer needs (the weekly ``maintain-lake`` step):
OPTIMIZE compacts the small files of each partition, VACUUM deletes files that only versions older
than the retention read. Neither changes a table's contents.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import json
import logging
import math
import numbers
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from hisam_core.config import Config
from spark_jobs.tables import SchemaDriftError, TableSpec, get_table, type_name

logger = logging.getLogger(__name__)

WriteMode = Literal["replace_partition", "merge", "overwrite", "append"]
Backend = Literal["auto", "spark", "delta-rs"]
LAKE_ROOT_ENV = "HISAM_LAKE_ROOT"
HOME_ENV = "HISAM_HOME"  # the pipeline's state folder; its lake is <home>/lake


class ConcurrentWriteError(RuntimeError):
    """The table changed after the version a write was derived from (read again and retry)."""


#: Prefix of the commit metadata keys the lake writes (delta-rs custom metadata, Spark userMetadata).
METADATA_PREFIX = "hisam."
WRITE_ID = "write_id"


class LakeConfig(Config):
    """Where the lake lives and how it is accessed."""

    #: Root directory or URI; None = ``$HISAM_LAKE_ROOT``, else ``$HISAM_HOME/lake`` (``HISAM_HOME``
    #: default ``.hisam`` in the current directory), as for the pipeline steps.
    root: str | None = None
    #: ``auto``: native Delta when delta-spark is on the classpath, else delta-rs.
    backend: Backend = "auto"
    #: Object-store options for delta-rs (``AWS_REGION``...); unused by the native backend.
    storage_options: dict[str, str] = Field(default_factory=dict)
    #: Days a data file replaced by a newer version stays readable (time travel): ``maintain-lake``
    #: sets each table's ``delta.deletedFileRetentionDuration`` to it and VACUUM deletes what is
    #: older. At least Delta's own floor of 7 days. Steps read an older version only within their run
    #: and its retries (``tokenize-catalogue`` the snapshot DST trained on, a resumed fine-tune its
    #: samples snapshot), except for a tokenizer registered before it carried its cold behaviour row,
    #: whose snapshot ``maintain-lake`` then keeps; the versions MLflow runs logged as inputs stay
    #: readable this long.
    retention_days: int = Field(30, ge=7)


def resolve_root(root: str | Path | None = None) -> str:
    """The lake root: ``root`` if given, else ``$HISAM_LAKE_ROOT``, else ``$HISAM_HOME/lake`` (the
    pipeline steps' lake; ``HISAM_HOME`` default ``.hisam``).

    Local paths are made absolute (Spark executors and delta-rs must agree on them); URIs with a
    scheme (``s3://``, ``abfss://``...) are kept as they are.
    """
    home = Path(os.environ.get(HOME_ENV, ".hisam"))
    value = str(root) if root is not None else os.environ.get(LAKE_ROOT_ENV) or str(home / "lake")
    if "://" in value:
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def delta_spark_available(spark: SparkSession) -> bool:
    """True when the delta-spark jars (JVM) and Python package are usable from ``spark``."""
    try:
        from py4j.java_gateway import JavaClass

        jvm = spark._jvm  # absent on Spark Connect sessions
        if jvm is None or not isinstance(jvm.io.delta.tables.DeltaTable, JavaClass):
            return False
        import delta.tables  # noqa: F401  (the delta-spark Python package)
    except Exception:  # any failure means "not available", never an error
        return False
    return True


def check_schema(schema: T.StructType, table: str | TableSpec) -> None:
    """Raise :class:`SchemaDriftError` naming every missing, unexpected or re-typed column.

    Column order and nullability are not compared (nulls in NOT NULL columns are caught on write).
    """
    spec = get_table(table)
    declared = {f.name: f.dataType for f in spec.schema.fields}
    actual = {f.name: f.dataType for f in schema.fields}
    missing = [c for c in declared if c not in actual]
    unexpected = [c for c in actual if c not in declared]
    retyped = [
        f"{c} (declared {type_name(declared[c])}, got {type_name(actual[c])})"
        for c in declared
        if c in actual and type_name(declared[c]) != type_name(actual[c])
    ]
    if missing or unexpected or retyped:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if unexpected:
            parts.append(f"unexpected columns {unexpected}")
        if retyped:
            parts.append(f"columns with another type: {', '.join(retyped)}")
        raise SchemaDriftError(f"schema drift writing {spec.name}: " + "; ".join(parts))


def conform(df: DataFrame, table: str | TableSpec) -> DataFrame:
    """``df`` with its columns in declared order, after :func:`check_schema`."""
    spec = get_table(table)
    check_schema(df.schema, spec)
    return df.select(*spec.columns)


def sql_literal(value: Any) -> str:
    """A SQL literal understood by Spark SQL and DataFusion (delta-rs) alike (NaN and inf refused)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):  # numpy's too: repr(np.int64(1)) is not SQL
        return str(int(value))
    if isinstance(value, numbers.Real) and math.isfinite(value):  # NaN and inf have no literal
        return repr(float(value))
    if isinstance(value, dt.datetime):
        return f"'{value.isoformat(sep=' ')}'"
    if isinstance(value, dt.date):
        return f"'{value.isoformat()}'"
    if isinstance(value, str):
        # a backslash is an escape to Spark SQL, itself to DataFusion: no one literal means both
        if "\\" in value:
            raise ValueError(f"cannot use {value!r} as a partition value: it has a backslash")
        return "'" + value.replace("'", "''") + "'"
    raise ValueError(f"cannot use {value!r} ({type(value).__name__}) as a partition value")


def partition_predicate(partition_values: Mapping[str, Any], prefix: str = "") -> str:
    """``dataset = 'ml' AND logical_date = '2024-01-01'``; None -> ``IS NULL``, a list -> ``IN (...)``."""
    parts = []
    for column, value in partition_values.items():
        ref = f"{prefix}{column}"
        if value is None:
            parts.append(f"{ref} IS NULL")
        elif isinstance(value, list | tuple | set | frozenset):
            if not value:
                raise ValueError(f"partition value list for {column!r} is empty")
            parts.append(f"{ref} IN ({', '.join(sql_literal(v) for v in sorted(value))})")
        else:
            parts.append(f"{ref} = {sql_literal(value)}")
    return " AND ".join(parts)


class Lake:
    """Versioned Delta tables under one root; see the module docstring for the semantics."""

    def __init__(
        self,
        spark: SparkSession,
        root: str | Path | None = None,
        *,
        backend: Backend = "auto",
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        if backend not in get_args(Backend):
            raise ValueError(f"unknown lake backend {backend!r}, expected one of {get_args(Backend)}")
        self.spark = spark
        self.root = resolve_root(root)
        native = delta_spark_available(spark)
        if backend == "spark" and not native:
            raise ValueError(
                "lake backend 'spark' needs delta-spark on the classpath "
                "(spark-submit --packages io.delta:delta-spark_2.13:<version>); use 'delta-rs' or 'auto'"
            )
        self.backend: str = "spark" if backend == "spark" or (backend == "auto" and native) else "delta-rs"
        self._impl: _Backend = (
            _SparkDelta(spark) if self.backend == "spark" else _DeltaRs(spark, dict(storage_options or {}))
        )
        logger.info("lake at %s (backend %s)", self.root, self.backend)
        master = spark.conf.get("spark.master", "local")  # (a Spark Connect session has no sparkContext)
        if self.backend == "delta-rs" and not master.startswith("local"):
            logger.warning(
                "lake backend delta-rs on the cluster %s: every write goes through the driver (Arrow, "
                "one partition at a time; a merge holds its whole source); put delta-spark on the "
                "classpath for distributed writes (backend 'auto' then takes it)",
                master,
            )

    @classmethod
    def from_config(cls, spark: SparkSession, config: LakeConfig | None = None) -> Lake:
        config = config or LakeConfig()
        return cls(spark, config.root, backend=config.backend, storage_options=config.storage_options)

    def path(self, table: str | TableSpec) -> str:
        """Directory (or URI) of the table: ``<root>/<layer>/<name>``."""
        return f"{self.root}/{get_table(table).relative_path}"

    def exists(self, table: str | TableSpec) -> bool:
        """Whether the Delta table has been created."""
        return self._impl.exists(self.path(table))

    def version(self, table: str | TableSpec) -> int | None:
        """Latest committed version, None when the table does not exist yet."""
        path = self.path(table)
        return self._impl.version(path) if self._impl.exists(path) else None

    def history(self, table: str | TableSpec, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits, newest first (the ``limit`` newest): ``version``, ``timestamp`` (UTC datetime),
        ``operation``, ``parameters`` and ``metrics`` (dicts as Delta records them), and ``metadata``
        (what ``write(metadata=...)`` attached, plus its ``write_id``). Empty when absent."""
        path = self.path(table)
        return self._impl.history(path, limit) if self._impl.exists(path) else []

    def maintain(
        self, table: str | TableSpec, retention: dt.timedelta, *, vacuum: bool = True
    ) -> dict[str, int]:
        """Compact the table's small files (OPTIMIZE), then delete the files no version younger than
        ``retention`` reads (VACUUM; ``vacuum=False`` skips it, and keeps every commit in the log
        until a maintenance vacuums again: every version stays readable). Contents are unchanged and
        versions younger than ``retention`` stay readable: ``retention`` (whole hours, rounded up)
        becomes the table's ``delta.deletedFileRetentionDuration``, which checkpoints keep tombstones
        for, and its ``delta.logRetentionDuration`` (at least Delta's 30 days), how long commits stay
        in the log. Files no version names (a crashed writer's, or one whose tombstone a checkpoint
        dropped) are deleted too once older than ``retention``, but only after the retention has held
        for as long (:data:`RETENTION_SET_AT`): a checkpoint written under Delta's default of 7 days
        may have dropped the tombstone of a file a younger version still reads. A rerun with nothing
        to do commits nothing (delta-rs). Returns ``files_compacted`` (small files rewritten),
        ``files_written`` (their replacements), ``files_deleted`` and ``version``; a table that does
        not exist yet is left alone (all zeros, ``version`` -1)."""
        path = self.path(table)
        if not self._impl.exists(path):
            return {"files_compacted": 0, "files_written": 0, "files_deleted": 0, "version": -1}
        if retention < dt.timedelta(0):
            raise ValueError(f"retention must not be negative, got {retention}")
        report = self._impl.maintain(path, retention, vacuum)
        return {**report, "version": self._impl.version(path)}

    def merge_counts(self, table: str | TableSpec, version: int) -> dict[str, int]:
        """Target rows the merge committed as ``version`` ``inserted``, ``updated`` (a matched row
        that failed ``update_condition`` is neither) and ``deleted`` (``delete_unmatched``), from the
        commit's metrics (delta-rs' and Delta's names); all 0 when the commit is no longer among the
        20 newest."""
        names = {
            "inserted": ("num_target_rows_inserted", "numTargetRowsInserted"),
            "updated": ("num_target_rows_updated", "numTargetRowsUpdated"),
            "deleted": ("num_target_rows_deleted", "numTargetRowsDeleted"),
        }
        for entry in self.history(table, limit=20):
            if entry["version"] == version:
                metrics = entry["metrics"]
                return {k: int(metrics.get(a, metrics.get(b, 0)) or 0) for k, (a, b) in names.items()}
        return dict.fromkeys(names, 0)

    def read(
        self,
        table: str | TableSpec,
        version: int | None = None,
        *,
        partitions: Mapping[str, Any] | None = None,
    ) -> DataFrame:
        """The table at its latest or a given ``version``, columns in declared order.

        ``partitions`` (e.g. ``{"dataset": "ml"}``) keeps only those partition values and skips the
        other files before anything is read. A table never written reads as an empty DataFrame
        (``version`` must then be None).
        """
        spec = get_table(table)
        partitions = dict(partitions or {})
        unknown = [c for c in partitions if c not in spec.partition_by]
        if unknown:
            raise ValueError(
                f"{spec.name}: {unknown} are not partition columns (partitioned by {list(spec.partition_by)})"
            )
        path = self.path(spec)
        if not self._impl.exists(path):
            if version is not None:
                raise ValueError(f"{spec.name} does not exist, so it has no version {version}")
            return self.spark.createDataFrame([], spec.schema)
        if version is not None:
            latest = self._impl.version(path)
            if not 0 <= version <= latest:
                raise ValueError(f"{spec.name} has versions 0..{latest}, not {version}")
        stored = self._impl.schema(path, version)
        return _with_declared_columns(self._impl.read(spec, path, version, partitions), spec, stored)

    def write(
        self,
        df: DataFrame,
        table: str | TableSpec,
        *,
        mode: WriteMode,
        partition_values: Mapping[str, Any] | None = None,
        keys: Sequence[str] | None = None,
        update_condition: str | None = None,
        delete_unmatched: str | None = None,
        metadata: Mapping[str, str] | None = None,
        read_version: int | None = None,
    ) -> int:
        """Write ``df`` into ``table`` and return the Delta version this write committed.

        ``partition_values`` is required for ``replace_partition`` and optional for ``merge``
        (pruning); ``keys`` overrides the declared keys for ``merge``; ``update_condition`` (merge
        only) is a SQL condition on target ``t`` and source ``s`` that a matched row must meet to be
        updated, e.g. ``"s.logical_date >= t.logical_date"`` so a backfill of an old date does not
        overwrite newer rows; ``delete_unmatched`` (merge only) is a SQL condition on ``t``: target
        rows inside ``partition_values`` that no source row matches and that meet it are deleted,
        e.g. ``"t.logical_date = '2024-01-02'"`` so a corrected rerun of a date retracts the rows
        it no longer contains. ``metadata`` is recorded with the commit (see :meth:`history`);
        ``read_version``: the version ``df`` was derived from; the write is refused with
        :class:`ConcurrentWriteError` when a later commit conflicts with it (delta-rs: one that
        changed the same partitions; native Delta: any later commit, checked just before). Raises
        :class:`SchemaDriftError` on column or type drift and ``ValueError`` on nulls in NOT NULL
        columns, rows outside the replaced partition, or duplicate merge keys.
        """
        spec = get_table(table)
        if mode not in get_args(WriteMode):
            raise ValueError(f"unknown write mode {mode!r}, expected one of {get_args(WriteMode)}")
        df = conform(df, spec)
        partition_values = dict(partition_values or {})
        unknown = [c for c in partition_values if c not in spec.partition_by]
        if unknown:
            raise ValueError(
                f"{spec.name}: {unknown} are not partition columns (partitioned by {list(spec.partition_by)})"
            )
        if mode == "replace_partition" and not partition_values:
            raise ValueError(f"{spec.name}: mode 'replace_partition' needs partition_values")
        for column, value in partition_values.items():
            values = value if isinstance(value, list | tuple | set | frozenset) else [value]
            if any(isinstance(v, str) and not v.strip() for v in values):
                raise ValueError(f"{spec.name}: blank {column} partition value {value!r}{_EMPTY_PARTITION}")
        merge_keys = tuple(keys) if keys is not None else spec.keys
        if mode == "merge":
            if not merge_keys:
                raise ValueError(f"{spec.name}: mode 'merge' needs keys (the table declares none)")
            bad = [k for k in merge_keys if k not in spec.columns]
            if bad:
                raise ValueError(f"{spec.name}: merge keys {bad} are not columns of the table")
        for name, value in (("update_condition", update_condition), ("delete_unmatched", delete_unmatched)):
            if value is not None and mode != "merge":
                raise ValueError(f"{spec.name}: {name} only applies to mode 'merge', not {mode!r}")
        if read_version is not None and mode == "append":  # delta-rs checks an append against nothing
            raise ValueError(
                f"{spec.name}: read_version needs mode 'replace_partition' or 'merge', not 'append'"
            )
        if delete_unmatched is not None and partition_values:
            delete_unmatched = (
                f"({delete_unmatched}) AND {partition_predicate(partition_values, prefix='t.')}"
            )
        path = self.path(spec)
        self._impl.ensure(spec, path)
        read_version = self._add_declared_columns(spec, path, read_version)
        write_id = uuid.uuid4().hex
        commit = {
            f"{METADATA_PREFIX}{k}": str(v) for k, v in {**(metadata or {}), WRITE_ID: write_id}.items()
        }
        before = self._impl.version(path)
        self._impl.write(
            df,
            spec,
            path,
            mode,
            partition_values,
            merge_keys,
            update_condition,
            delete_unmatched,
            commit,
            read_version,
        )
        version = self._commit_of(path, write_id, before)
        logger.info("wrote %s (%s %s) -> version %d", spec.name, mode, partition_values or "", version)
        return version

    def _add_declared_columns(self, spec: TableSpec, path: str, read_version: int | None) -> int | None:
        """Schema evolution (:mod:`spark_jobs.tables`): columns declared after the table's own, all
        nullable, are added to it (one commit; older rows read them as null). Any other difference
        between the stored and the declared columns is a :class:`SchemaDriftError`: it needs a
        migration. Returns the ``read_version`` the write is then checked against: the version
        after the one it was derived from, the added columns' commit. A write derived from an older
        version is refused before the columns are added (stricter than delta-rs, which refuses only
        a commit to the same partitions; the retry reads again and adds them)."""
        stored = self._impl.schema(path)
        added = spec.columns[len(stored.fields) :]
        if spec.columns[: len(stored.fields)] != stored.fieldNames() or any(
            not spec.schema[c].nullable for c in added
        ):
            raise SchemaDriftError(
                f"{spec.name} at {path} stores columns {stored.fieldNames()}, but {list(spec.columns)} are "
                "declared: only nullable columns declared after the stored ones are added on write; "
                "anything else needs a migration of the table"
            )
        spec.added_since(stored)  # a stored column of another type needs one too
        if not added:
            return read_version
        if read_version is not None and (latest := self._impl.version(path)) != read_version:
            raise ConcurrentWriteError(
                f"{spec.name} is at version {latest}, but this write was derived from version "
                f"{read_version}: read it again (its next write adds the declared columns {added})"
            )
        self._impl.add_columns(spec, path, added)
        logger.warning("%s: added the declared columns %s (older rows read them as null)", spec.name, added)
        # the added columns' commit, when nothing came between: a commit that did is checked against
        return read_version + 1 if read_version is not None else None

    def _commit_of(self, path: str, write_id: str, before: int) -> int:
        """The version whose commit carries ``write_id`` among those after ``before``; ``before``
        itself when there is none (a merge that changes nothing commits nothing). Other writers may
        commit meanwhile: the newest commits are read until every one after ``before`` was seen."""
        newer = self._impl.version(path) - before
        seen = 0
        while newer > seen:
            entries = self._impl.history(path, newer)
            for entry in entries:
                if int(entry["version"]) > before and entry["metadata"].get(WRITE_ID) == write_id:
                    return int(entry["version"])
            seen = newer
            newer = max((int(e["version"]) for e in entries), default=before) - before
        if newer > 0:
            logger.info(
                "%d commits since version %d, none of this write: it committed nothing", newer, before
            )
        return before


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


class _Backend:
    """What a storage backend implements; ``Lake`` validates arguments before calling it."""

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def ensure(self, spec: TableSpec, path: str) -> None:
        raise NotImplementedError

    def schema(self, path: str, version: int | None = None) -> T.StructType:
        """The stored table's schema (at ``version``; default the latest), columns in order."""
        raise NotImplementedError

    def add_columns(self, spec: TableSpec, path: str, names: list[str]) -> None:
        """Add the declared (nullable) columns ``names`` at the end of the stored table."""
        raise NotImplementedError

    def version(self, path: str) -> int:
        raise NotImplementedError

    def history(self, path: str, limit: int | None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def maintain(self, path: str, retention: dt.timedelta, vacuum: bool) -> dict[str, int]:
        """:meth:`Lake.maintain` without the version."""
        raise NotImplementedError

    def read(self, spec: TableSpec, path: str, version: int | None, partitions: dict[str, Any]) -> DataFrame:
        raise NotImplementedError

    def write(
        self,
        df: DataFrame,
        spec: TableSpec,
        path: str,
        mode: WriteMode,
        partition_values: dict[str, Any],
        keys: tuple[str, ...],
        update_condition: str | None,
        delete_unmatched: str | None,
        metadata: dict[str, str],
        read_version: int | None,
    ) -> None:
        """Commit the write with ``metadata``; :class:`ConcurrentWriteError` when ``read_version``
        is given and a conflicting commit came after it."""
        raise NotImplementedError


def history_pages(
    history: Callable[[int | None], list[dict[str, Any]]], first: int | None = 200
) -> Iterator[list[dict[str, Any]]]:
    """A table's commits, newest first, in pages that grow. ``history(limit)`` gives the newest
    ``limit`` commits, as :meth:`Lake.history` does; it is read for ``first`` of them, then ten times
    as many each time, and past 20,000 for the whole history (at once with ``first=None``). A page
    holds only the commits older than the last one yielded, so a commit made between two reads is
    not yielded twice. What a step seeks is usually among the newest commits, so a busy table's
    whole history is seldom read."""
    limit, oldest = first, None
    while True:
        page = history(limit)
        new = [e for e in page if oldest is None or e["version"] < oldest]
        if new:
            yield new
            oldest = new[-1]["version"]
        if limit is None or len(page) < limit:
            return
        limit = limit * 10 if limit < 20_000 else None


def delta_history(
    path: str, limit: int | None = None, storage_options: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """:meth:`Lake.history` of the table at ``path`` read with delta-rs alone (no Spark session)."""
    from deltalake import DeltaTable

    out = []
    for entry in DeltaTable(path, storage_options=dict(storage_options or {}) or None).history(limit):
        out.append(
            {
                "version": int(entry["version"]),
                "timestamp": dt.datetime.fromtimestamp(entry["timestamp"] / 1000, tz=dt.UTC),
                "operation": entry.get("operation"),
                "parameters": entry.get("operationParameters", {}),
                "metrics": entry.get("operationMetrics", {}),
                "metadata": _commit_metadata(entry),
            }
        )
    return sorted(out, key=lambda e: -e["version"])


#: The table property that sets how long replaced files stay readable (VACUUM's default retention,
#: and how long checkpoints keep their tombstones), and the one for commits in the log.
DELETED_FILE_RETENTION = "delta.deletedFileRetentionDuration"
LOG_RETENTION = "delta.logRetentionDuration"
#: When :meth:`Lake.maintain` last set them (unix seconds), a table property of ours.
RETENTION_SET_AT = "hisam.retentionSetAt"
#: Whether a checkpoint deletes the commits older than the log retention (Delta's default: true).
EXPIRED_LOG_CLEANUP = "delta.enableExpiredLogCleanup"


def _log_cleanup(current: Mapping[str, str], vacuum: bool) -> dict[str, str]:
    """The property to set so that a table maintained without VACUUM keeps every commit as well (a
    version whose files stay but whose commit a checkpoint deleted cannot be read), and one vacuumed
    again drops the expired ones; empty when it already holds."""
    wanted = "true" if vacuum else "false"
    return {} if current.get(EXPIRED_LOG_CLEANUP, "true") == wanted else {EXPIRED_LOG_CLEANUP: wanted}


def retention_properties(retention: dt.timedelta) -> dict[str, str]:
    """The Delta table properties of ``retention`` (whole hours, rounded up): files for it, commits
    for at least Delta's default of 30 days."""
    hours = math.ceil(retention.total_seconds() / 3600)
    return {
        DELETED_FILE_RETENTION: f"interval {hours} hours",
        LOG_RETENTION: f"interval {max(hours, 720)} hours",
    }


def _retention_plan(current: Mapping[str, str], retention: dt.timedelta) -> tuple[dict[str, str], bool]:
    """For a table whose properties are ``current``: the properties to set for ``retention`` (with
    :data:`RETENTION_SET_AT`; empty when they already hold), and whether the retention has held as
    long as itself, after which files no version names may be deleted too (:meth:`Lake.maintain`)."""
    wanted = retention_properties(retention)
    now = time.time()
    if any(current.get(k) != v for k, v in wanted.items()):
        return {**wanted, RETENTION_SET_AT: str(int(now))}, retention.total_seconds() <= 0
    set_at = float(current.get(RETENTION_SET_AT, now))
    return {}, now - set_at >= retention.total_seconds()


def _commit_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """The lake's keys of a commit's metadata, without their prefix: top-level commit-info keys
    (delta-rs custom metadata) and the JSON of ``userMetadata`` (how Spark records them; delta-rs
    writes both, so either engine reads the other's)."""
    n = len(METADATA_PREFIX)
    try:
        user = json.loads(values.get("userMetadata") or "{}")
    except ValueError:  # another writer's free-text userMetadata
        user = {}
    merged = {**(user if isinstance(user, dict) else {}), **values}
    return {k[n:]: str(v) for k, v in merged.items() if k.startswith(METADATA_PREFIX)}


def _merge_condition(keys: Sequence[str], partition_values: Mapping[str, Any]) -> str:
    cond = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    if partition_values:
        cond += " AND " + partition_predicate(partition_values, prefix="t.")
    return cond


class _DeltaRs(_Backend):
    """delta-rs (``deltalake``) through Arrow: works without any JVM Delta jars."""

    def __init__(self, spark: SparkSession, storage_options: dict[str, str]) -> None:
        self.spark = spark
        self.storage_options = storage_options or None

    def _table(self, path: str, version: int | None = None):
        from deltalake import DeltaTable

        return DeltaTable(path, version=version, storage_options=self.storage_options)

    def exists(self, path: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(path, storage_options=self.storage_options)

    def ensure(self, spec: TableSpec, path: str) -> None:
        if self.exists(path):
            return
        from deltalake import DeltaTable

        DeltaTable.create(
            path,
            schema=_arrow_schema(spec),
            partition_by=list(spec.partition_by) or None,
            mode="ignore",
            name=spec.name,
            description=spec.description,
            storage_options=self.storage_options,
        )
        logger.info("created %s at %s", spec.name, path)

    def schema(self, path: str, version: int | None = None) -> T.StructType:
        return stored_schema(self._table(path, version))

    def add_columns(self, spec: TableSpec, path: str, names: list[str]) -> None:
        import pyarrow as pa
        from deltalake import Schema

        declared = _arrow_schema(spec)
        fields = Schema.from_arrow(pa.schema([declared.field(c) for c in names])).fields
        self._table(path).alter.add_columns(list(fields))

    def version(self, path: str) -> int:
        return int(self._table(path).version())

    def history(self, path: str, limit: int | None) -> list[dict[str, Any]]:
        return delta_history(path, limit, self.storage_options)

    def maintain(self, path: str, retention: dt.timedelta, vacuum: bool) -> dict[str, int]:
        table = self._table(path)
        current = table.metadata().configuration
        updates, held = _retention_plan(current, retention)
        updates |= _log_cleanup(current, vacuum)
        if updates:
            table.alter.set_table_properties(updates, raise_if_not_exists=False)
        compacted = self._table(path).optimize.compact()  # commits nothing when nothing is small
        deleted: list[str] = []
        if vacuum:  # the retention is the table's property
            deleted = self._table(path).vacuum(dry_run=False, full=held)
            self._table(path).create_checkpoint()  # drops the tombstones just vacuumed from the state
        return {
            "files_compacted": int(compacted["numFilesRemoved"]),
            "files_written": int(compacted["numFilesAdded"]),
            "files_deleted": len(deleted),
        }

    def read(self, spec: TableSpec, path: str, version: int | None, partitions: dict[str, Any]) -> DataFrame:
        """Distributed read: Spark scans the version's Parquet files; partition values come from
        the Delta log (joined on file name; read per partition where two files share a name or a
        name needs URL-encoding, as in a Hive layout converted to Delta), so no value is re-parsed
        from directory names."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self._table(path, version)
        if "deletionVectors" in (table.protocol().reader_features or []):
            # Files alone would miss deleted rows: let delta-rs apply them (driver-side).
            arrow = pa.table(table.to_pyarrow_table())
            declared = _arrow_schema(spec)
            for c in spec.columns:  # declared since this version was written: null (Lake.read checks)
                if c not in arrow.column_names:
                    arrow = arrow.append_column(
                        declared.field(c), pa.nulls(arrow.num_rows, declared.field(c).type)
                    )
            arrow = arrow.select(spec.columns)
            df = self.spark.createDataFrame(arrow.cast(declared), spec.schema)
            return df.filter(partition_predicate(partitions)) if partitions else df
        actions = pa.table(table.get_add_actions(flatten=True))
        for column, value in partitions.items():
            col = actions.column(f"partition.{column}")
            keep = (
                pc.is_null(col) if value is None else pc.is_in(col, value_set=_arrow_values(value, col.type))
            )
            actions = actions.filter(pc.fill_null(keep, False))
        if actions.num_rows == 0:
            return self.spark.createDataFrame([], spec.schema)
        uris = _action_uris(table.file_uris(), actions.column("path").to_pylist())
        names = [uri.rsplit("/", 1)[-1] for uri in uris]
        data_schema = T.StructType([spec.schema[c] for c in spec.data_columns])
        reader = self.spark.read.schema(data_schema)
        if not spec.partition_by:
            return reader.parquet(*uris)
        if len(set(names)) < len(names) or not all(map(_PLAIN_FILE_NAME.fullmatch, names)):
            # A join on file name would cross files or (Spark's names are URL-encoded) miss them.
            values = zip(
                *(actions.column(f"partition.{c}").to_pylist() for c in spec.partition_by), strict=True
            )
            groups: dict[tuple[Any, ...], list[str]] = {}
            for uri, key in zip(uris, values, strict=True):
                groups.setdefault(key, []).append(uri)
            scans = [
                reader.parquet(*files).withColumns(
                    {
                        c: F.lit(v).cast(spec.schema[c].dataType)
                        for c, v in zip(spec.partition_by, key, strict=True)
                    }
                )
                for key, files in groups.items()
            ]
            return functools.reduce(DataFrame.unionByName, scans)
        data = reader.parquet(*uris)
        files = pa.table(
            {"_file_name": names, **{c: actions.column(f"partition.{c}") for c in spec.partition_by}}
        )
        part_schema = T.StructType(
            [T.StructField("_file_name", T.StringType(), False)] + [spec.schema[c] for c in spec.partition_by]
        )
        parts = self.spark.createDataFrame(files.cast(_arrow_schema_of(part_schema)), part_schema)
        data = data.withColumn("_file_name", F.col("_metadata.file_name"))
        return data.join(F.broadcast(parts), "_file_name").drop("_file_name")

    def write(
        self,
        df: DataFrame,
        spec: TableSpec,
        path: str,
        mode: WriteMode,
        partition_values: dict[str, Any],
        keys: tuple[str, ...],
        update_condition: str | None,
        delete_unmatched: str | None,
        metadata: dict[str, str],
        read_version: int | None,
    ) -> None:
        from deltalake import CommitProperties, write_deltalake

        commit = CommitProperties(
            custom_metadata={**metadata, "userMetadata": json.dumps(metadata, sort_keys=True)}
        )
        checked = partition_values if mode in ("replace_partition", "merge") else {}
        source = _DeclaredBatches(df, spec, mode, checked, keys if mode == "merge" else ())
        # on a snapshot of read_version, delta-rs refuses the commit when a later one conflicts
        target = self._table(path, read_version) if read_version is not None else path
        options = {} if read_version is not None else {"storage_options": self.storage_options}
        partition_by = list(spec.partition_by) or None
        with _conflicts_refused(spec, read_version), source.refusal():
            if mode == "replace_partition":
                write_deltalake(
                    target,
                    source.reader(),
                    mode="overwrite",
                    predicate=partition_predicate(partition_values),
                    partition_by=partition_by,
                    commit_properties=commit,
                    **options,
                )
            elif mode in ("overwrite", "append"):
                write_deltalake(
                    target,
                    source.reader(),
                    mode=mode,
                    partition_by=partition_by,
                    commit_properties=commit,
                    **options,
                )
            else:  # merge
                if delete_unmatched is None and source.empty():
                    logger.info("merge into %s: empty source, nothing committed", spec.name)
                    return
                merger = (
                    (target if read_version is not None else self._table(path))
                    .merge(
                        source=source.reader(),
                        predicate=_merge_condition(keys, partition_values),
                        source_alias="s",
                        target_alias="t",
                        commit_properties=commit,
                    )
                    .when_matched_update_all(predicate=update_condition)
                    .when_not_matched_insert_all()
                )
                if delete_unmatched is not None:
                    merger = merger.when_not_matched_by_source_delete(predicate=delete_unmatched)
                merger.execute()


@contextlib.contextmanager
def _conflicts_refused(spec: TableSpec, read_version: int | None) -> Iterator[None]:
    """delta-rs's refusal of a commit on a stale snapshot, as :class:`ConcurrentWriteError`."""
    from deltalake.exceptions import CommitFailedError

    try:
        yield
    except CommitFailedError as err:
        if read_version is None:
            raise
        raise ConcurrentWriteError(
            f"{spec.name}: a commit after version {read_version}, which this write was derived from, "
            f"changed the same rows: read it again ({err})"
        ) from err


def delta_spark_schema(dtype: T.DataType) -> T.DataType:
    """A declared schema as Delta on Spark creates it: NOT NULL inside an array or a map is refused
    there (``DELTA_NESTED_NOT_NULL_CONSTRAINT``), so their elements and values are nullable; columns
    and struct fields keep their NOT NULL. Nullability is not part of a column's type for drift
    (:func:`spark_jobs.tables.type_name`), so tables of either backend hold the same columns."""
    if isinstance(dtype, T.StructType):
        return T.StructType(
            [T.StructField(f.name, delta_spark_schema(f.dataType), f.nullable, f.metadata) for f in dtype]
        )
    if isinstance(dtype, T.ArrayType):
        return T.ArrayType(delta_spark_schema(dtype.elementType), containsNull=True)
    if isinstance(dtype, T.MapType):
        key, value = (delta_spark_schema(t) for t in (dtype.keyType, dtype.valueType))
        return T.MapType(key, value, valueContainsNull=True)
    return dtype


class _SparkDelta(_Backend):
    """Native Delta Lake through delta-spark (``format("delta")``, ``DeltaTable``)."""

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark

    def _table(self, path: str):
        from delta.tables import DeltaTable

        return DeltaTable.forPath(self.spark, path)

    def exists(self, path: str) -> bool:
        from delta.tables import DeltaTable

        return bool(DeltaTable.isDeltaTable(self.spark, path))

    def ensure(self, spec: TableSpec, path: str) -> None:
        if self.exists(path):  # as declared when created; declared columns since: add_columns
            return
        from delta.tables import DeltaTable

        builder = (
            DeltaTable.createIfNotExists(self.spark)
            .location(path)
            .addColumns(delta_spark_schema(spec.schema))
        )
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        builder.comment(spec.description).execute()

    def schema(self, path: str, version: int | None = None) -> T.StructType:
        reader = self.spark.read.format("delta")
        return (reader if version is None else reader.option("versionAsOf", version)).load(path).schema

    def add_columns(self, spec: TableSpec, path: str, names: list[str]) -> None:
        added = ", ".join(f"{c} {spec.schema[c].dataType.simpleString()}" for c in names)
        self.spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({added})")

    def version(self, path: str) -> int:
        return int(self._table(path).history(1).select("version").head()[0])

    def history(self, path: str, limit: int | None) -> list[dict[str, Any]]:
        table = self._table(path)
        rows = (
            (table.history(limit) if limit else table.history())
            .select(
                "version",
                # as epoch microseconds: PySpark gives a timestamp as a naive datetime in the driver's
                # local time zone, where delta-rs's (and the contract's) is UTC
                F.unix_micros("timestamp").alias("timestamp"),
                "operation",
                "operationParameters",
                "operationMetrics",
                "userMetadata",
            )
            .collect()  # the commit log, not table data
        )
        return [
            {
                "version": int(r["version"]),
                "timestamp": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
                + dt.timedelta(microseconds=r["timestamp"]),
                "operation": r["operation"],
                "parameters": dict(r["operationParameters"] or {}),
                "metrics": dict(r["operationMetrics"] or {}),
                "metadata": _commit_metadata({"userMetadata": r["userMetadata"]}),
            }
            for r in rows
        ]

    def maintain(self, path: str, retention: dt.timedelta, vacuum: bool) -> dict[str, int]:
        current = self._table(path).detail().select("properties").head()[0] or {}
        updates, held = _retention_plan(current, retention)
        updates |= _log_cleanup(current, vacuum)
        if updates:
            values = ", ".join(f"'{k}' = '{v}'" for k, v in updates.items())
            self.spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({values})")
        compacted = self._table(path).optimize().executeCompaction().select("metrics").head()[0]
        deleted = 0
        # Delta on Spark lists every file a VACUUM could delete: only once the retention has held
        if vacuum and held:
            deleted = self.spark.sql(f"VACUUM delta.`{path}` DRY RUN").count()  # the files, then delete them
            self.spark.sql(f"VACUUM delta.`{path}`").collect()  # retention: the table's property
        return {
            "files_compacted": int(compacted["numFilesRemoved"]),
            "files_written": int(compacted["numFilesAdded"]),
            "files_deleted": int(deleted),
        }

    def read(self, spec: TableSpec, path: str, version: int | None, partitions: dict[str, Any]) -> DataFrame:
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(path)
        return df.filter(partition_predicate(partitions)) if partitions else df  # Delta prunes files

    def write(
        self,
        df: DataFrame,
        spec: TableSpec,
        path: str,
        mode: WriteMode,
        partition_values: dict[str, Any],
        keys: tuple[str, ...],
        update_condition: str | None,
        delete_unmatched: str | None,
        metadata: dict[str, str],
        read_version: int | None,
    ) -> None:
        user_metadata = json.dumps(metadata, sort_keys=True)
        # delta-spark has no writer API for a read snapshot: check the latest version instead (a
        # commit landing between this check and the write is not detected)
        if read_version is not None and (latest := self.version(path)) != read_version:
            raise ConcurrentWriteError(
                f"{spec.name} is at version {latest}, but this write was derived from version "
                f"{read_version}: read it again"
            )
        if mode == "merge":
            if delete_unmatched is None and df.isEmpty():
                return
            dupes = df.groupBy(*keys).count().filter("count > 1").limit(5).collect()
            if dupes:
                sample = [tuple(r[k] for k in keys) for r in dupes]
                raise ValueError(
                    f"merge into {spec.name}: duplicate keys {list(keys)} in the source, e.g. {sample}"
                )
            if partition_values:  # as the delta-rs backend's _rows_outside
                inside = F.coalesce(F.expr(partition_predicate(partition_values)), F.lit(False))
                outside = df.filter(~inside).count()
                if outside:
                    raise ValueError(
                        f"merge of {spec.name} {dict(partition_values)}: {outside} rows lie outside it"
                    )
            merger = (
                self._table(path)
                .alias("t")
                .merge(df.alias("s"), _merge_condition(keys, partition_values))
                .whenMatchedUpdateAll(condition=update_condition)
                .whenNotMatchedInsertAll()
            )
            if delete_unmatched is not None:
                merger = merger.whenNotMatchedBySourceDelete(condition=delete_unmatched)
            conf = "spark.databricks.delta.commitInfo.userMetadata"
            previous = self.spark.conf.get(conf, None)
            self.spark.conf.set(conf, user_metadata)  # a merge takes commit metadata from the session
            try:
                merger.execute()
            finally:
                if previous is None:
                    self.spark.conf.unset(conf)
                else:
                    self.spark.conf.set(conf, previous)
        else:
            writer = df.write.format("delta").option("userMetadata", user_metadata)
            if mode == "replace_partition":
                # Delta itself refuses rows outside the predicate (DELTA_REPLACE_WHERE_MISMATCH).
                writer = writer.mode("overwrite").option(
                    "replaceWhere", partition_predicate(partition_values)
                )
            else:
                writer = writer.mode(mode)
            writer.save(path)


# ---------------------------------------------------------------------------------------------
# Arrow helpers (delta-rs backend)
# ---------------------------------------------------------------------------------------------


def _arrow_schema_of(schema: T.StructType):
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema, timezone="UTC")


def _arrow_schema(spec: TableSpec):
    return _arrow_schema_of(spec.schema)


def stored_schema(table: Any) -> T.StructType:
    """A delta-rs ``DeltaTable``'s schema in Spark types, to compare with a declared one
    (:meth:`TableSpec.added_since`)."""
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(pa.schema(table.schema().to_arrow()))


#: Why a blank partition value is refused before any commit.
_EMPTY_PARTITION = ": Delta stores an empty partition value as null, which breaks every read of the table"


def _ipc_messages(batches: Iterator[Any]) -> Iterator[Any]:
    """``mapInArrow`` function: each Arrow batch of a partition as one row holding its IPC stream."""
    import pyarrow as pa

    schema = pa.schema([("ipc", pa.binary())])
    for batch in batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        yield pa.RecordBatch.from_pydict({"ipc": [sink.getvalue().to_pybytes()]}, schema=schema)


def arrow_batches(df: DataFrame) -> Generator[Any, None, None]:
    """``df``'s rows, in ``df.toArrow()``'s order, as Arrow batches fetched one partition per Spark job.

    ``df.toArrow()`` collects everything in one job, whose results ``spark.driver.maxResultSize``
    caps (1 GiB by default). Here the driver fetches partitions one at a time (the next computed
    while this one is consumed), so no job returns more than one partition (one partition past the
    cap is still refused) and the driver holds about two.

    Classic Spark: the JVM's own Arrow batches of each partition (what ``toArrow`` collects, as
    ``Dataset.toArrowBatchRdd``), served by the RDD local iterator that ``RDD.toLocalIterator`` uses;
    internal APIs of the pinned PySpark, held to ``toArrow`` by the tests. No Python worker touches
    the rows: serialising them in ``mapInArrow`` made streaming a small frame 2x slower. Not through
    ``DataFrame.toLocalIterator``, which (classic PySpark 4.3) keeps every partition it fetched on
    the JVM heap (five passes over 540 MB held 3.1 GB). Spark Connect has neither: there each
    partition goes through ``mapInArrow`` as Arrow IPC, untested here.
    """
    import pyarrow as pa
    from pyspark.sql.classic.dataframe import DataFrame as ClassicDataFrame

    if not isinstance(df, ClassicDataFrame):
        for row in df.mapInArrow(_ipc_messages, "ipc binary").toLocalIterator(prefetchPartitions=True):
            yield from pa.ipc.open_stream(row.ipc)
        return
    from pyspark.serializers import NoOpSerializer
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.util import _local_iterator_from_socket

    conf, jvm = df.sparkSession.conf, df.sparkSession.sparkContext._jvm
    time_zone = conf.get("spark.sql.session.timeZone")
    large_types = conf.get("spark.sql.execution.arrow.useLargeVarTypes") == "true"
    batches = df._jdf.toArrowBatchRdd(
        int(conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")), time_zone, True, large_types
    )
    # The batches carry no schema: read with the JVM's (as its ArrowBatchIterator builds it), cast
    # to toArrow's where they differ (UTC instants; Variant and geo binaries, large on the JVM).
    arrow_utils = jvm.org.apache.spark.sql.util.ArrowUtils
    default_last = getattr(arrow_utils, "toArrowSchema$default$5")()
    sink = jvm.java.io.ByteArrayOutputStream()
    jvm.org.apache.arrow.vector.ipc.message.MessageSerializer.serialize(
        jvm.org.apache.arrow.vector.ipc.WriteChannel(jvm.java.nio.channels.Channels.newChannel(sink)),
        arrow_utils.toArrowSchema(df._jdf.schema(), time_zone, True, large_types, default_last),
    )
    wire = pa.ipc.read_schema(pa.py_buffer(bytes(sink.toByteArray())))
    schema = to_arrow_schema(
        df.schema,
        error_on_duplicated_field_names_in_struct=True,
        timezone="UTC",
        prefers_large_types=large_types,
    )
    served, cast = jvm.PythonRDD.toLocalIteratorAndServe(batches, True), wire != schema
    with _job_errors():
        for message in _local_iterator_from_socket(served, NoOpSerializer()):
            batch = pa.ipc.read_record_batch(pa.py_buffer(message), wire)
            yield batch.cast(schema) if cast else batch


@contextlib.contextmanager
def _job_errors() -> Iterator[None]:
    """A failed Spark job's own error (what ``toArrow`` raises: a ``SparkRuntimeException``, a
    ``PythonException``...), not the ``Py4JJavaError`` of the fetch that waited for the job."""
    from py4j.java_gateway import is_instance_of
    from py4j.protocol import Py4JJavaError
    from pyspark import SparkContext
    from pyspark.errors.exceptions.captured import UnknownException, convert_exception

    try:
        yield
    except Py4JJavaError as err:
        cause = err.java_exception
        for _ in range(3):  # the fetch's SparkException, the job's, then the task's own error
            if cause is None:
                break
            converted = convert_exception(cause)
            if not isinstance(converted, UnknownException):
                raise converted from None
            if not is_instance_of(SparkContext._gateway, cause, "org.apache.spark.SparkException"):
                break  # not Spark's wrapping (a lost executor's own error): the whole error stands
            cause = cause.getCause()
        raise


class _DeclaredBatches:
    """A delta-rs write's source: ``df`` as Arrow batches typed exactly as ``spec`` declares, checked
    on their way to delta-rs, which writes one batch at a time.

    The checks (nulls in NOT NULL columns, blank partition values, rows outside ``partition_values``,
    duplicate merge ``keys``) count over the whole stream and raise at its end, with the totals:
    delta-rs commits only after its source ends, so a refused write commits nothing (the files it
    wrote before are left for VACUUM). delta-rs wraps an error of its source in its own;
    :meth:`refusal` raises the original.
    """

    def __init__(
        self,
        df: DataFrame,
        spec: TableSpec,
        mode: str,
        partition_values: Mapping[str, Any],
        keys: Sequence[str] = (),
    ) -> None:
        self.spec, self.mode = spec, mode
        self.partition_values, self.keys = dict(partition_values), list(keys)
        self.schema = _arrow_schema(spec)
        self.error: Exception | None = None
        self._peeked: list[Any] = []
        self._batches = self._checked(arrow_batches(df))

    def _checked(self, batches: Generator[Any, None, None]) -> Generator[Any, None, None]:
        import pyarrow as pa
        import pyarrow.compute as pc

        text = (pa.string(), pa.large_string())
        blank = {f.name: 0 for f in self.schema if f.name in self.spec.partition_by and f.type in text}
        nulls = {f.name: 0 for f in self.schema if not f.nullable}
        outside = dict.fromkeys(self.partition_values, 0)
        keys = []
        try:
            for batch in batches:
                for name in blank:
                    trimmed = pc.utf8_trim_whitespace(batch.column(name))
                    blank[name] += pc.sum(pc.equal(trimmed, "").cast("int64")).as_py() or 0
                for name in nulls:
                    nulls[name] += batch.column(name).null_count
                if any(blank.values()) or any(nulls.values()):
                    continue  # refused: count the rest for the message, write nothing more
                try:
                    batch = batch.cast(self.schema)
                except (ValueError, TypeError, NotImplementedError) as err:
                    raise SchemaDriftError(
                        f"writing {self.spec.name}: cannot store the data as declared: {err}"
                    ) from err
                for name, value in self.partition_values.items():
                    outside[name] += _rows_outside(batch.column(name), value)
                if self.keys:
                    # a merge: delta-rs holds its source whole; as views, its batches would pin every
                    # fetched message (benchmarks/lake_write's merge peaked at 5,013 MiB, 6,744 as views)
                    batch = pa.concat_batches([batch])
                    keys.append(batch.select(self.keys))
                yield batch
            self._check(blank, nulls, outside, pa.Table.from_batches(keys) if keys else None)
        except Exception as err:
            self.error = err
            raise
        finally:
            batches.close()  # a refused stream's Spark fetch ends now, not when the error is collected

    def _check(
        self, blank: dict[str, int], nulls: dict[str, int], outside: dict[str, int], keys: Any
    ) -> None:
        name = self.spec.name
        for column, count in blank.items():
            if count:
                raise ValueError(f"writing {name}: {count} rows have a blank {column}{_EMPTY_PARTITION}")
        if any(nulls.values()):
            listed = ", ".join(f"{c} ({n} nulls)" for c, n in nulls.items() if n)
            raise ValueError(f"writing {name}: NOT NULL columns contain nulls: {listed}")
        if keys is not None:
            _check_unique(keys, self.spec, self.keys)
        for column, count in outside.items():
            if count:
                raise ValueError(
                    f"{self.mode} of {name} {self.partition_values}: {count} rows have "
                    f"{column} outside {self.partition_values[column]!r}"
                )

    def empty(self) -> bool:
        """Whether the source has no rows (reads up to its first row, which :meth:`reader` keeps)."""
        for batch in self._batches:
            self._peeked.append(batch)
            if batch.num_rows:
                return False
        return True

    def reader(self) -> Any:
        import pyarrow as pa

        return pa.RecordBatchReader.from_batches(self.schema, itertools.chain(self._peeked, self._batches))

    @contextlib.contextmanager
    def refusal(self) -> Iterator[None]:
        """Raise the source's own error in place of delta-rs's wrapping of it; close a stream a failed
        write left half read (its Spark fetch with it)."""
        try:
            yield
        except Exception:
            if self.error is not None:
                raise self.error from self.error.__cause__
            raise
        finally:
            self._batches.close()


def _with_declared_columns(df: DataFrame, spec: TableSpec, stored: T.StructType) -> DataFrame:
    """``df``, a version of ``spec``'s table that stores ``stored``, in the declared columns; those
    declared since that version was written read as null (:meth:`TableSpec.added_since`)."""
    missing = spec.added_since(stored)
    nulls = {c: F.lit(None).cast(spec.schema[c].dataType) for c in missing if c not in df.columns}
    return (df.withColumns(nulls) if nulls else df).select(*spec.columns)


#: File names Spark's ``_metadata.file_name`` gives as they are (it URL-encodes others): every
#: Delta writer's ``part-...-<uuid>...snappy.parquet``.
_PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _action_uris(uris: Sequence[str], paths: Sequence[str]) -> list[str]:
    """The URI (one of ``uris``, delta-rs' ``file_uris``) of each add action's ``path``: a relative
    or absolute URI, URL-encoded (Delta protocol), so ``a%20b.parquet`` is the file ``a b.parquet``."""
    by_name: dict[str, list[str]] = {}
    for uri in uris:
        by_name.setdefault(uri.rsplit("/", 1)[-1], []).append(uri)
    found = []
    for path in paths:
        file = urllib.parse.unquote(path)
        named = by_name.get(file.rsplit("/", 1)[-1], [])
        uri = next((u for u in named if u == file or u.endswith(f"/{file}")), None)
        if uri is None:
            raise ValueError(f"the Delta log's file {path!r} is not among the table's files {named[:3]}")
        found.append(uri)
    return found


def _arrow_values(value: Any, type_: Any) -> Any:
    """A partition value (or list of values, as :func:`partition_predicate` takes them) as an Arrow
    array of the column's type; text is cast, so ``"2024-01-02"`` matches a date column as in SQL."""
    import pyarrow as pa

    values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(values).cast(type_)


def _rows_outside(column: Any, value: Any) -> int:
    """How many values of ``column`` lie outside the partition value(s) ``value`` (a merge or a
    replace restricted to them would leave such a row out: a merge would insert it again on every
    run, as it never matches its target row)."""
    import pyarrow.compute as pc

    if value is None:
        return len(column) - column.null_count
    inside = pc.is_in(column, value_set=_arrow_values(value, column.type))
    return len(column) - (pc.sum(pc.fill_null(inside, False).cast("int64")).as_py() or 0)


def _check_unique(arrow, spec: TableSpec, keys: Sequence[str]) -> None:
    import pyarrow.compute as pc

    counts = arrow.group_by(list(keys)).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dupes.num_rows:
        sample = dupes.slice(0, 5).select(list(keys)).to_pylist()
        raise ValueError(
            f"merge into {spec.name}: {dupes.num_rows} duplicate keys {list(keys)} in the source, e.g. {sample}"
        )

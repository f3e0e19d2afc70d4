"""Pieces shared by the importers: reading lines, checking fields, quarantining, writing bronze.

Every importer turns each input record into exactly one row of a *parsed* DataFrame: the bronze
columns plus ``_reason`` (None when the record is good, else why it is rejected), ``_raw`` (the
line, or the row as JSON) and ``source_file``. :func:`write_bronze` splits it: good rows replace
the ``(dataset, logical_date)`` partition of the bronze table, rejected ones the matching partition
of ``bronze.quarantine``, and the counts it reports reconcile exactly (in = imported + quarantined).
"In" is counted on the records as read, before any parsing, so a parse step that loses or
duplicates a record (a filter, a join) stops the import before anything is written.

Blank lines are not records: line-based readers skip them and they are counted nowhere.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from spark_jobs.lake import Lake, history_pages
from spark_jobs.tables import BRONZE_QUARANTINE, get_table

logger = logging.getLogger(__name__)

REASON = "_reason"
RAW = "_raw"
#: Position of a record in its input (``monotonically_increasing_id`` at read time: increasing in
#: file order within a file, the same on every run over the same files); keeps "first" well defined.
LINE = "_line"
CORRUPT = "_corrupt_record"
#: Why a record as read cannot be trusted (:func:`undecodable`, :func:`not_utf8`,
#: :func:`json_record_problem`), else null.
RECORD_PROBLEM = "_record_problem"
#: What a decoder writes for bytes that are not text in the encoding it was given.
REPLACEMENT_CHARACTER = "\ufffd"
#: Separator of the one-column CSV trick in :func:`read_lines`; a line containing it is quarantined.
LINE_SEP_GUARD = "\u0001"
#: Unit of a numeric timestamp by magnitude (``timestamp_unit="auto"``): values below 1e11 are
#: seconds (1e11 s is the year 5138), below 1e14 milliseconds, below 1e17 microseconds, else
#: nanoseconds (1e11 ms, 1e14 us and 1e17 ns are all in 1973: later data is read right).
UNIT_BOUNDS: tuple[tuple[str, float], ...] = (("s", 1e11), ("ms", 1e14), ("us", 1e17), ("ns", 1e20))


@dataclass(frozen=True)
class SourceCount:
    """Counts of one input (file or directory) into one bronze table."""

    source: str
    table: str
    records_in: int
    imported: int
    quarantined: int
    #: Its good records were merged into another input's rows of ``table`` (:attr:`Parsed.write_good`).
    merged: bool = False

    @property
    def reconciles(self) -> bool:
        return self.records_in == self.imported + self.quarantined


@dataclass
class ImportReport:
    """What one import run did: counts per input, Delta versions per table written."""

    dataset: str
    logical_date: dt.date
    sources: list[SourceCount] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    #: Rows a merge deleted per table: rows this date's earlier run wrote that its rerun no longer
    #: contains (not part of this run's reconciliation).
    retracted: dict[str, int] = field(default_factory=dict)
    #: Rows a merge inserted or updated per table; fewer than :meth:`imported` when a later date
    #: already holds some of the rows (a backfill does not overwrite them).
    written: dict[str, int] = field(default_factory=dict)

    def imported(self, table: str) -> int:
        """Rows this run kept for ``table`` (over all its inputs; records merged into another
        input's rows are not rows of their own): all written by a partition write; a merge writes
        those no later date holds (:attr:`written`)."""
        return sum(s.imported for s in self.sources if s.table == table and not s.merged)

    def quarantined(self, table: str | None = None) -> int:
        return sum(s.quarantined for s in self.sources if table is None or s.table == table)

    def check(self) -> None:
        """Raise ValueError when some input's counts do not reconcile (an importer bug)."""
        bad = [s for s in self.sources if not s.reconciles]
        if bad:
            detail = "; ".join(
                f"{s.source} -> {s.table}: {s.records_in} records read, {s.imported} imported + "
                f"{s.quarantined} quarantined"
                for s in bad
            )
            raise ValueError(f"import of {self.dataset} @ {self.logical_date} does not reconcile: {detail}")

    def summary(self) -> str:
        lines = [f"import {self.dataset} @ {self.logical_date}:"]
        for s in self.sources:
            kept = "merged into its rows" if s.merged else "imported"
            lines.append(
                f"  {s.source} -> {s.table}: {s.records_in} in, {s.imported} {kept}, {s.quarantined} quarantined"
            )
        lines.extend(f"  {t} version {v}" for t, v in sorted(self.versions.items()))
        lines.extend(f"  {t}: {n} rows inserted or updated" for t, n in sorted(self.written.items()))
        lines.extend(f"  {t}: {n} rows retracted" for t, n in sorted(self.retracted.items()) if n)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read_lines(spark: SparkSession, path: str, *, encoding: str = "UTF-8") -> DataFrame:
    """Non-blank lines of text file(s) as ``value`` plus ``_corrupt_record`` and ``source_file``.

    Uses the CSV reader with quoting off so any encoding works (``spark.read.text`` only decodes
    UTF-8). ``_corrupt_record`` is set (to the whole line) for the rare line containing U+0001,
    which this trick cannot represent; :func:`line_problem` turns it into a quarantine reason.
    """
    return (
        spark.read.schema(f"value string, {CORRUPT} string")
        .option("encoding", encoding)
        .option("sep", LINE_SEP_GUARD)
        .option("quote", "")
        .option("header", False)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("ignoreLeadingWhiteSpace", False)
        .option("ignoreTrailingWhiteSpace", False)
        .csv(path)
        .withColumn("source_file", F.col("_metadata.file_path"))
        .withColumn(LINE, F.monotonically_increasing_id())
    )


def line_problem(expected_fields: int, parts: Column, sep_name: str) -> Column:
    """Reason for a line that cannot be split into ``expected_fields`` fields, else null."""
    return F.when(F.col(CORRUPT).isNotNull(), F.lit("line contains the control character U+0001")).when(
        F.size(parts) != expected_fields,
        F.concat(
            F.lit(f"expected {expected_fields} {sep_name}-separated fields, got "),
            F.size(parts).cast("string"),
        ),
    )


def undecodable(text: Column, encoding: str) -> Column:
    """The reason for a record whose ``text`` holds U+FFFD, which the reader writes for bytes that
    are not ``encoding`` (the record's text is lost there), else null. The decoded text cannot tell
    that from a U+FFFD the file itself holds (an earlier mis-decoding upstream), so the reason names
    both."""
    return F.when(
        F.instr(text, REPLACEMENT_CHARACTER) > 0,
        F.lit(
            f"U+FFFD in the text: bytes that are not {encoding} (set the input's encoding), or a "
            "replacement character already in the data (repair it upstream)"
        ),
    )


def not_utf8(line: Column) -> Column:
    """The reason for a line (``spark.read.text``, which keeps the bytes as read) that is not UTF-8,
    else null: JSON lines are UTF-8, and ``from_json`` would turn the bad bytes into U+FFFD."""
    return F.when(~F.is_valid_utf8(line), F.lit("not valid UTF-8 text: JSON lines must be UTF-8"))


def repeated_keys(keys: Column) -> Column:
    """The values that occur more than once in the array ``keys``, each once."""
    return F.array_distinct(F.filter(keys, lambda k: F.size(F.filter(keys, lambda j: j == k)) > 1))


def json_record_problem(value: Column) -> Column:
    """Why the JSON-lines record ``value`` (an object, as ``from_json`` read it) is not exactly one
    object with distinct keys, else null.

    ``from_json`` reads a line's first value and ignores what follows it, so two records glued on one
    line would lose the second, and a repeated key keep its last value, both silently. A line is one
    value when it parses as one element inside ``[...]`` and as a field inside ``{"_": ...}``: text
    after the first value would have to close both brackets at once.
    """
    as_array = F.from_json(F.concat(F.lit("["), value, F.lit("]")), "array<string>")
    as_field = F.from_json(F.concat(F.lit('{"_":'), value, F.lit("}")), "struct<_:string>")
    keys = F.json_object_keys(value)
    repeats = F.coalesce(F.size(F.array_distinct(keys)) < F.size(keys), F.lit(False))  # the cheap test
    return first_reason(
        (F.coalesce(F.size(as_array) > 1, F.lit(False)), "more than one JSON value on one line"),
        (as_array.isNull() | as_field.getField("_").isNull(), "malformed JSON (text after the object)"),
        (repeats, F.concat(F.lit("repeated keys: "), F.array_join(repeated_keys(keys), ", "))),
    )


#: A JSON-lines record parsed once (``F.try_parse_json``, a variant) for :func:`json_id_types`, in a
#: select of its own: Spark keeps an expensive expression that a later select uses more than once in
#: its own projection instead of repeating it per use.
JSON_RECORD = "_json_record"


def json_id_types(record: Column, keys: Mapping[str, str]) -> Column:
    """Why a JSON-lines ``record`` (:data:`JSON_RECORD`) holds an id that is an object, an array, a
    boolean or a number beyond a double's range, else null (``keys``: JSON key -> the id's name).
    Read as a string, such a value is its JSON text: an id no other record shares, imported as if
    whole; or, for ``1e400`` and ``2e400`` alike, ``"Infinity"``, which merges them."""
    checks = []
    for key, name in keys.items():
        if "'" in key and '"' in key:
            raise ValueError(f"id column {key!r}: a JSON key with both quote characters cannot be read")
        path = f'$["{key}"]' if "'" in key else f"$['{key}']"
        kind = F.split(F.schema_of_variant(F.try_variant_get(record, path, "variant")), "<").getItem(0)
        message = F.concat(F.lit(f"{name} is a JSON "), F.lower(kind), F.lit(", not a string or number"))
        checks.append((kind.isin("OBJECT", "ARRAY", "BOOLEAN"), message))
        infinite = (kind == "DOUBLE") & (F.abs(F.try_variant_get(record, path, "double")) == F.lit(math.inf))
        checks.append((infinite, f"{name} is a JSON number beyond a double's range"))
    return first_reason(*checks)


def raw_line() -> Column:
    return F.coalesce(F.col(CORRUPT), F.col("value"))


def first_reason(*checks: tuple[Column, Column | str]) -> Column:
    """The message of the first failing check, else null. ``checks``: (failed?, message)."""
    expr = None
    for failed, message in checks:
        msg = F.lit(message) if isinstance(message, str) else message
        expr = F.when(failed, msg) if expr is None else expr.when(failed, msg)
    return expr if expr is not None else F.lit(None).cast("string")


#: What a text value loses at its ends: not only spaces (all ``F.trim`` strips) but every Unicode
#: separator (no-break space from spreadsheet exports), control (tab, newline) and format character
#: (zero-width space, byte-order mark). ``"i42\u00a0"`` would otherwise be an id apart from ``"i42"``.
_EDGES = r"^[\p{Z}\p{Cc}\p{Cf}]+|[\p{Z}\p{Cc}\p{Cf}]+$"


def trimmed(col: Column) -> Column:
    """``col`` without the separators, controls and format characters at its ends (:data:`_EDGES`)."""
    return F.regexp_replace(col, _EDGES, "")


def blank(col: Column) -> Column:
    """True for null strings and strings of nothing but what :func:`trimmed` strips."""
    return col.isNull() | (trimmed(col) == "")


#: What exporters write for a missing value, compared without case: MySQL and Hive ``\N``, SQL
#: ``NULL``, Python ``None``, pandas ``nan``, JavaScript ``undefined``. Taken as an id, one would
#: gather every record that lacks an id into a single user or item.
NULL_MARKERS = ("\\n", "null", "none", "nan", "undefined")


def null_marker(col: Column) -> Column:
    """True for a :data:`NULL_MARKERS` text (ends :func:`trimmed`)."""
    return F.coalesce(F.lower(trimmed(col)).isin(*NULL_MARKERS), F.lit(False))


def id_problem(name: str, value: Column) -> Column:
    """Why ``value``, the text of the id column ``name``, is no id (missing, or a null marker), else null."""
    marker = F.concat(F.lit(f"{name} "), quoted(trimmed(value)), F.lit(" is a null marker, not an id"))
    return first_reason((blank(value), f"missing {name}"), (null_marker(value), marker))


#: The most characters of a source value a quarantine reason quotes (the record is whole in ``raw``).
QUOTED_MAX_CHARS = 60


def quoted(col: Column) -> Column:
    """``'value'`` for messages (``null`` for null), cut to :data:`QUOTED_MAX_CHARS` with ``...``: a
    reason is counted, grouped and sent in alerts, so a megabyte field must not be in it."""
    cut = F.when(
        F.length(col) > QUOTED_MAX_CHARS, F.concat(F.substring(col, 1, QUOTED_MAX_CHARS), F.lit("..."))
    ).otherwise(col)
    return F.coalesce(F.concat(F.lit("'"), cut, F.lit("'")), F.lit("null"))


def not_int(col: Column) -> Column:
    """True unless ``col`` is a non-negative integer (``try_cast``: cheaper than a regex per row)."""
    value = F.trim(col).try_cast("long")
    return F.coalesce(value < 0, F.lit(True))


def to_double(col: Column) -> Column:
    """Text -> finite double; null for non-numbers, NaN and infinities."""
    value = F.trim(col).try_cast("double")
    return F.when(~F.isnan(value) & (F.abs(value) != float("inf")), value)


def str_map(pairs: Sequence[tuple[str, Column]]) -> Column:
    """``map<string,string>`` of the values, keys in the given order (:func:`text_values`)."""
    if not pairs:
        return F.create_map().cast("map<string,string>")
    return text_values(F.create_map(*[c for name, col in pairs for c in (F.lit(name), col.cast("string"))]))


def text_values(m: Column) -> Column:
    """A ``map<string,string>`` without its blank values, the others :func:`trimmed`."""
    return F.transform_values(F.map_filter(m, lambda _k, v: ~blank(v)), lambda _k, v: trimmed(v))


def text_list(values: Column) -> Column:
    """An ``array<string>`` (null: empty) of its non-blank values, :func:`trimmed`."""
    return F.filter(
        F.transform(F.coalesce(values, F.array().cast("array<string>")), trimmed), lambda c: c != ""
    )


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def quarantine_rows(parsed: DataFrame, dataset: str, table: str, logical_date: dt.date) -> DataFrame:
    """Rejected rows of ``parsed`` in the ``bronze.quarantine`` layout."""
    return parsed.filter(F.col(REASON).isNotNull()).select(
        F.lit(dataset).alias("dataset"),
        F.lit(table).alias("target_table"),
        F.lit(logical_date).alias("logical_date"),
        F.col(REASON).alias("reason"),
        F.col(RAW).alias("raw"),
        F.col("source_file"),
    )


@dataclass
class Parsed:
    """One input's parsed rows for one bronze table (see module docstring)."""

    source: str
    table: str
    rows: DataFrame
    #: The input's records as read, before parsing: counted on their own as the input's "in".
    records: DataFrame
    #: False for inputs folded into another input's rows (e.g. item_extra.tsv into u.item): their
    #: good rows are counted as imported but not written; their rejects are quarantined.
    write_good: bool = True


def write_parsed(
    lake: Lake,
    dataset: str,
    logical_date: dt.date,
    parsed: Iterable[Parsed],
    report: ImportReport,
    *,
    mode: Literal["replace_partition", "merge"] = "replace_partition",
    update_condition: str | None = None,
    delete_unmatched: str | None = None,
    metadata: Mapping[str, str] | None = None,
    tables: Sequence[str] = (),
) -> ImportReport:
    """Write every parsed input: good rows to their tables, rejects to ``bronze.quarantine``
    (last, in one commit, so its commit marks the end of the import); ``metadata`` goes with every
    commit. ``tables``: every table the importer can write, also written (empty) when no input of
    this run has rows for it, so a rerun with fewer inputs leaves none of the date's earlier rows.

    Inputs for the same table are unioned and written once: ``replace_partition`` of
    ``(dataset, logical_date)`` (bronze), or ``merge`` on the table's keys within the dataset
    (silver; ``delete_unmatched`` as in :meth:`Lake.write`). The quarantine partitions ``(dataset, <each target table>, logical_date)`` are
    replaced in one commit. So a rerun of the same logical date leaves identical contents. Each
    input is parsed once (persisted); the parsed counts come from one aggregation over the inputs,
    the records read from another, and an input whose counts differ stops the run before any write.
    """
    parsed = list(parsed)
    partition: dict[str, object] = (
        {"dataset": dataset, "logical_date": logical_date}
        if mode == "replace_partition"
        else {"dataset": dataset}
    )
    cached = [p.rows.persist(StorageLevel.MEMORY_AND_DISK) for p in parsed]
    try:
        tally = (
            _union(
                [
                    rows.select(F.lit(i).alias("_input"), F.col(REASON).isNotNull().alias("_bad"), REASON)
                    for i, rows in enumerate(cached)
                ]
            )
            .groupBy("_input", "_bad")
            .agg(F.count(F.lit(1)).alias("n"), F.min(REASON).alias("first"), F.max(REASON).alias("last"))
        )
        stats = {(r["_input"], r["_bad"]): r for r in tally.collect()}  # at most 2 rows per input
        read = _union([p.records.select(F.lit(i).alias("_input")) for i, p in enumerate(parsed)])
        records_in = {r["_input"]: int(r["count"]) for r in read.groupBy("_input").count().collect()}
        counts = [
            SourceCount(
                p.source,
                p.table,
                records_in.get(i, 0),
                int(stats[(i, False)]["n"]) if (i, False) in stats else 0,
                int(stats[(i, True)]["n"]) if (i, True) in stats else 0,
                merged=not p.write_good,
            )
            for i, p in enumerate(parsed)
        ]
        report.sources.extend(counts)
        report.check()
        good_by_table: dict[str, list[DataFrame]] = {table: [] for table in tables}
        bad: list[DataFrame] = []
        for i, (p, rows, count) in enumerate(zip(parsed, cached, counts, strict=True)):
            n_bad = count.quarantined
            if n_bad:
                examples = sorted({stats[(i, True)]["first"], stats[(i, True)]["last"]})
                logger.warning(
                    "%s -> %s: %d records quarantined, e.g. %s", p.source, p.table, n_bad, examples
                )
            good = good_by_table.setdefault(p.table, [])
            if p.write_good:
                good.append(rows.filter(F.col(REASON).isNull()).select(*get_table(p.table).columns))
            bad.append(quarantine_rows(rows, dataset, p.table, logical_date))
        for table, frames in good_by_table.items():
            spec = get_table(table)
            good_df = _union(frames) if frames else lake.spark.createDataFrame([], spec.schema)
            before = lake.version(table)
            report.versions[table] = lake.write(
                good_df,
                table,
                mode=mode,
                partition_values=partition,
                update_condition=update_condition,
                delete_unmatched=delete_unmatched,
                metadata=metadata,
            )
            if mode == "merge":  # a merge that changed nothing committed nothing
                committed = report.versions[table] != before
                changed = lake.merge_counts(table, report.versions[table]) if committed else {}
                report.written[table] = changed.get("inserted", 0) + changed.get("updated", 0)
                if delete_unmatched is not None:
                    report.retracted[table] = changed.get("deleted", 0)
        report.versions[BRONZE_QUARANTINE.name] = lake.write(
            _union(bad) if bad else lake.spark.createDataFrame([], BRONZE_QUARANTINE.schema),
            BRONZE_QUARANTINE,
            mode="replace_partition",
            partition_values={
                "dataset": dataset,
                "target_table": list(good_by_table),
                "logical_date": logical_date,
            },
            metadata=metadata,
        )
    finally:
        for frame in cached:
            frame.unpersist()
    logger.info("%s", report.summary())
    return report


#: ``job`` of an import's commit metadata. With ``dataset``, ``logical_date`` and an ``import_id``
#: of its own, every bronze commit of one import names the run that wrote it, and the run's
#: ``bronze.quarantine`` commit, its last, that the run finished (:func:`unfinished_import`).
IMPORT_JOB = "import"


def import_record(dataset: str, logical_date: dt.date) -> dict[str, str]:
    """The commit metadata of one import run (a new ``import_id`` each call)."""
    import uuid

    return {
        "job": IMPORT_JOB,
        "dataset": dataset,
        "logical_date": logical_date.isoformat(),
        "import_id": uuid.uuid4().hex,
    }


def write_bronze(
    lake: Lake,
    dataset: str,
    logical_date: dt.date,
    parsed: Iterable[Parsed],
    report: ImportReport,
    *,
    tables: Sequence[str] = (),
) -> ImportReport:
    """:func:`write_parsed` of one import run into bronze (each ``(dataset, logical_date)`` partition
    replaced), every commit carrying the run's :func:`import_record`."""
    record = import_record(dataset, logical_date)
    return write_parsed(lake, dataset, logical_date, parsed, report, metadata=record, tables=tables)


def unfinished_import(lake: Lake, dataset: str, logical_date: dt.date, tables: Sequence[str]) -> str | None:
    """Why the bronze ``tables``' partitions of ``(dataset, logical_date)`` are not the work of
    finished imports, else None: a table whose newest import of that date never wrote
    ``bronze.quarantine`` (its last commit), i.e. a run that stopped before it finished, its
    interactions written and the items still an earlier run's. Not checked: commits without an
    :func:`import_record` (written before it existed), and a run whose quarantine commit may have left
    the log (the quarantine's oldest commit there is newer than the table's)."""
    wanted = (IMPORT_JOB, dataset, logical_date.isoformat())

    def commits(table: str) -> Iterator[dict[str, Any]]:
        return itertools.chain.from_iterable(history_pages(lambda n: lake.history(table, n)))

    def newest_import(table: str) -> tuple[str | None, dt.datetime | None]:
        for commit in commits(table):
            m = commit["metadata"]
            if (m.get("job"), m.get("dataset"), m.get("logical_date")) == wanted:
                return m.get("import_id"), commit["timestamp"]
        return None, None

    newest = {table: newest_import(table) for table in tables}
    pending = {run for run, written in newest.values() if run is not None and written is not None}
    oldest = None  # the quarantine's oldest commit in the log, once the search has read it all
    for commit in commits(BRONZE_QUARANTINE.name) if pending else ():  # one search for every run
        pending.discard(commit["metadata"].get("import_id"))
        if not pending:
            break
        oldest = commit["timestamp"]
    for table, (run, written) in newest.items():
        if run in pending and written is not None and (oldest is None or oldest <= written):
            return (
                f"{table} of {dataset!r} at {logical_date} was written by import {run}, which never wrote "
                f"{BRONZE_QUARANTINE.name} (its last commit): it stopped before it finished"
            )
    return None


def _canonical(field: T.StructField) -> Column:
    """A column as :func:`flag_duplicates` compares it: text :func:`trimmed`, a map's entries sorted
    (the same details in another key order are the same record)."""
    column = F.col(field.name)
    if isinstance(field.dataType, T.StringType):
        return trimmed(column)
    if isinstance(field.dataType, T.MapType):
        return F.array_sort(F.map_entries(column))
    return column


#: How a duplicate's reason ends when its values differ from the kept row's.
OTHER_VALUES = " with other values"


#: The columns two records of one event may differ in and still be the same event: its feedback
#: (rating, label, action) is what the event is; ``extra`` holds source metadata (an Amazon review's
#: variant ``asin``, its helpful votes at the crawl), kept from the first record.
EVENT_METADATA = ("extra",)


def flag_duplicates(rows: DataFrame, keys: Sequence[str], what: str, ignore: Sequence[str] = ()) -> DataFrame:
    """Give every good row after the first with the same ``keys`` the reason "duplicate <what> <keys>",
    ending in :data:`OTHER_VALUES` when its parsed values other than ``ignore`` differ from the kept
    row's (a conflict, not a repeated record).

    "First" is input order (``source_file``, ``_line``) when ``rows`` has ``_line``, else the
    order of ``_raw``; either way the same row is kept on every rerun.
    """
    key_text = F.concat_ws(", ", *[F.col(k).cast("string") for k in keys])
    good = F.col(REASON).isNull()
    order = ["source_file", LINE, RAW] if LINE in rows.columns else [RAW]
    window = Window.partitionBy(good, *keys).orderBy(*order)
    skip = (REASON, RAW, LINE, "source_file", *ignore)
    fields = [f for f in rows.schema.fields if f.name not in skip]
    values = F.to_json(F.struct(*[_canonical(f).alias(f.name) for f in fields]))
    same = values == F.first(values).over(window)
    reason = F.concat(F.lit(f"duplicate {what} "), key_text, F.when(~same, F.lit(OTHER_VALUES)).otherwise(""))
    return rows.withColumn(
        REASON, F.when(good & (F.row_number().over(window) > 1), reason).otherwise(F.col(REASON))
    )


def flag_duplicate_events(rows: DataFrame) -> DataFrame:
    """:func:`flag_duplicates` of interaction records: an event is a (user, item, ``event_ts``), its
    time to the microsecond (finer times are truncated), and two of its records conflict only in their
    feedback (:data:`EVENT_METADATA` aside)."""
    return flag_duplicates(
        rows, ["user_id", "item_id", "event_ts"], "event (user, item, time)", EVENT_METADATA
    )


def _union(frames: list[DataFrame]) -> DataFrame:
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def jvm_of(spark: SparkSession) -> Any:
    """The session's JVM gateway; None on Spark Connect, which has none to reach."""
    try:
        return spark._jvm
    except Exception:  # Connect raises PySparkAttributeError (JVM_ATTRIBUTE_NOT_SUPPORTED)
        return None


def hadoop_glob(spark: SparkSession, path: str) -> list[Any]:
    """Hadoop ``FileStatus`` of what ``path`` (a Hadoop glob) names, through the filesystem Spark
    reads it with (local, HDFS, S3A, ABFS...), so "there" means what the import would read."""
    jvm = jvm_of(spark)
    if jvm is None:
        raise RuntimeError("waiting for a drop needs a classic Spark session (Hadoop's FileSystem API)")
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    statuses = hadoop_path.getFileSystem(spark._jsc.hadoopConfiguration()).globStatus(hadoop_path)
    return list(statuses or [])


def local_path(path: str) -> str:
    """A Hadoop path as the user wrote it: ``file:/x`` is ``/x``."""
    return (
        path.removeprefix("file:") if path.startswith("file:/") and not path.startswith("file://") else path
    )


#: Names of the files the importers read (``.gz`` too); others in a subfolder (an items folder's
#: ``posters/``, which ``image_root`` defaults to) are no records.
DATA_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".json", ".jsonl", ".ndjson")


def refuse_unread_subfolders(spark: SparkSession, path: str) -> None:
    """Raise ValueError when a directory ``path`` names (or that its glob matches) holds a data file
    (:data:`DATA_SUFFIXES`) in a subfolder that is not a ``key=value`` partition: Spark reads a
    directory's own files and its partition folders only, so that file would be neither imported nor
    quarantined. Hidden names (``_``, ``.``) are skipped, as Spark skips them. Not checked on Spark
    Connect (no Hadoop API)."""
    if jvm_of(spark) is None:
        return
    conf = spark._jsc.hadoopConfiguration()

    def visible(status: Any) -> bool:
        return not status.getPath().getName().startswith(("_", "."))

    def skipped(folder: Any) -> list[str]:
        found = []
        for child in filter(visible, folder.getFileSystem(conf).listStatus(folder)):
            if not child.isDirectory():
                continue
            if "=" in child.getPath().getName():
                found += skipped(child.getPath())
                continue
            files = child.getPath().getFileSystem(conf).listFiles(child.getPath(), True)
            while files.hasNext():
                file = files.next()
                name = file.getPath().getName().lower().removesuffix(".gz")
                if visible(file) and name.endswith(DATA_SUFFIXES):
                    found.append(str(file.getPath()))
        return found

    found = [f for s in hadoop_glob(spark, path) if s.isDirectory() for f in skipped(s.getPath())]
    if found:
        raise ValueError(
            f"{path}: {len(found)} data file(s) in subfolders Spark does not read (not key=value "
            f"partitions), e.g. {local_path(found[0])}: move them into the input's directory, or point the "
            "input at them (a glob or another path)"
        )

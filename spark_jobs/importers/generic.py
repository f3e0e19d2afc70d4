"""Bring-your-own data: a documented generic format -> bronze tables.

Three inputs, each a file, a directory of part files or a glob, in CSV (with a header row),
Parquet or JSONL (one object per line; plain or ``.gz``):

**interactions** (required), one event per record:

=============  ========  ===========================================================================
column         required  meaning
=============  ========  ===========================================================================
``user_id``    yes       any string or integer id (in Parquet and JSON lines, a whole float number,
                         pandas' ``42.0``, is the id ``42``; in a CSV the text ``42.0`` is kept)
``item_id``    yes       any string or integer id (likewise)
``timestamp``  yes       unix time in s, ms, us or ns (told apart by magnitude, see
                         ``UNIT_BOUNDS``), a Parquet timestamp, or an ISO-8601 date-time
                         (``2023-11-15T10:00:00Z``); see ``timestamp_unit``
``rating``     one of    a number (explicit feedback); range-checked when ``rating_range`` is set
``label``      the two   ``0`` / ``1`` or ``true`` / ``false`` (implicit feedback); silver derives it
                         from ``rating`` if absent
``action``     no        event type, e.g. ``click``, ``purchase``
(other)        no        kept as JSON in ``extra``
=============  ========  ===========================================================================

**items** (optional): ``item_id`` (required); ``title``; ``categories`` or ``genres`` (a list in
Parquet/JSONL, or ``|``-separated text; an input with both gives one list, categories first);
``image_path`` (relative paths are resolved against
``image_root``, default the items file's directory); ``image_url``; every other column is a text
attribute of the item (``description``, ``plot``, ``director``...) unless ``text_columns`` lists them.

**users** (optional): ``user_id`` (required); every other column is a profile attribute (``age``,
``gender``, ``occupation``...).

**One date's inputs.** ``{logical_date}`` in a path becomes the import's date (ISO), so each date
reads its own drop and a rerun of a date reads the same files again; ``{logical_date-N}`` is N days
before it, and ``:<strftime format>`` formats either (``/data/raw/events/{logical_date-1:%Y/%m/%d}``).
The daily run of date D starts at 00:00 UTC on D, so a drop named after its events' day is the run's
``{logical_date-1}``. The daily DAG waits for a dated drop (``source-ready``, :func:`pending_inputs`)
and alerts when it has not landed by the sensor's timeout. A drop must be complete when it is read:
write it elsewhere and move it in, or set ``ready_marker`` (Hadoop's ``_SUCCESS``), which the producer
writes into the drop's directory last; the wait then ends only when the marker is there. A path without a
placeholder is a snapshot: every date's import reads the whole input, its bronze partition holds all
of it, and the import budget and the day's quality gate judge all of it, not what changed that day.

A directory is read with its files and its ``key=value`` partition folders; a data file in another
subfolder (which Spark would skip) is refused by name. A Parquet drop's files may differ in their
columns: each record reads the columns its file has (Spark's ``mergeSchema``); and in a column's type
(pandas writes an integer column with a gap as float64): each schema's files are then read apart
(:func:`read_parquet`), every value taken as text where they meet. A CSV drop's files
must share one header (checked per file: as Spark does for a header of distinct, non-empty names,
line by line for others, e.g. pandas' index column).

An input column named like one the import adds (:data:`READ_COLUMNS`: ``source_file``, ``_raw``...)
is refused by name, as are two columns that become one name (after ``rename``, in any case); ``rename``
them. A CSV's quoted fields may hold line breaks (``csv_multiline``);
read line by line (the default), an input with a line that ends inside a quoted field is refused: it
would become two records, the first cut short and imported as if whole. An input with no record (an
empty file) imports none; one that names no column (no JSON object, no CSV header) reads its required
columns as nulls, so each of its lines is quarantined as malformed.

Records that cannot be used (malformed line or JSON, a missing id or one that is a null marker such as
``\\N`` or ``NULL`` (:data:`NULL_MARKERS`) or a JSON object, array, boolean or number beyond a
double's range, an unreadable timestamp, rating or label, neither rating nor label, a duplicate item
or user id) go to
``bronze.quarantine`` with the reason; for every input, records in = imported + quarantined. A null
marker in ``rating``, ``label`` or ``action`` is no value there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from tqdm.auto import tqdm

from hisam_core.config import Config
from spark_jobs.importers.common import (
    CORRUPT,
    JSON_RECORD,
    LINE,
    RAW,
    REASON,
    RECORD_PROBLEM,
    UNIT_BOUNDS,
    ImportReport,
    Parsed,
    blank,
    first_reason,
    flag_duplicate_events,
    flag_duplicates,
    hadoop_glob,
    id_problem,
    json_id_types,
    json_record_problem,
    jvm_of,
    local_path,
    not_utf8,
    null_marker,
    quoted,
    read_lines,
    refuse_unread_subfolders,
    str_map,
    text_list,
    to_double,
    trimmed,
    undecodable,
    write_bronze,
)
from spark_jobs.lake import Lake
from spark_jobs.tables import BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS, NAME_PATTERN, row_json

logger = logging.getLogger(__name__)

Format = Literal["auto", "csv", "parquet", "jsonl"]
INTERACTION_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "rating", "label", "action")
#: The columns an interactions input must have (and ``rating`` or ``label``); an input that names none
#: (:func:`read_as_strings`' ``required``) reads these and ``rating`` as nulls.
INTERACTION_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "timestamp")
NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"
ITEM_RESERVED: tuple[str, ...] = ("item_id", "title", "categories", "genres", "image_path", "image_url")


#: The charsets Spark's CSV reader takes.
CSV_ENCODINGS = frozenset({"utf-8", "iso-8859-1", "us-ascii"})  # UTF-16/32: Spark splits lines on one byte


#: ``{logical_date}``, ``{logical_date-N}`` (N days before) and either with ``:<strftime format>`` in
#: an input path (other braces, as in a Hadoop glob's ``{a,b}``, are left as they are).
LOGICAL_DATE = re.compile(r"\{logical_date(?:-(\d+))?(?::([^{}]*))?\}")


def dated(path: str, day: dt.date) -> str:
    """``path`` with each :data:`LOGICAL_DATE` placeholder replaced by its date (ISO by default)."""

    def fill(match: re.Match[str]) -> str:
        when = day - dt.timedelta(days=int(match.group(1) or 0))
        return when.strftime(match.group(2)) if match.group(2) else when.isoformat()

    return LOGICAL_DATE.sub(fill, path)


class GenericImportConfig(Config):
    """Inputs in the generic format and how to read them."""

    dataset: str = Field(pattern=NAME_PATTERN)
    interactions: str
    items: str | None = None
    users: str | None = None
    #: ``auto``: from the extension (``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.json``/``.ndjson``,
    #: optionally ``.gz``); a directory uses the extension of its first data file.
    format: Format = "auto"
    csv_sep: str = ","
    #: True: a CSV's quoted fields may hold line breaks (RFC 4180: a multi-line description or plot),
    #: but a stray opening quote then swallows the lines up to the next quote into one corrupt record,
    #: and one large file is read by one task. False (Spark's default): line by line, and an input
    #: with a line that ends inside a quoted field is refused (:func:`refuse_split_records`).
    csv_multiline: bool = False
    #: Of CSV inputs: one of :data:`CSV_ENCODINGS` (what Spark's CSV reader decodes line by line); JSON lines are
    #: UTF-8. A record with bytes that are not this encoding is quarantined (the reader replaced them
    #: with U+FFFD; a U+FFFD the file itself holds reads the same, and is quarantined too).
    encoding: str = "UTF-8"
    #: ``auto``: numbers by magnitude (:data:`UNIT_BOUNDS`: s, ms, us or ns); text is ISO-8601.
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "iso"] = "auto"
    #: Ratings outside [low, high] are quarantined; None accepts any number.
    rating_range: tuple[float, float] | None = None
    #: Item columns that become text attributes; None = every non-reserved column.
    text_columns: list[str] | None = None
    #: Directory that relative ``image_path`` values are resolved against; None = the items input's.
    image_root: str | None = None
    #: Input column -> generic name, applied to every input first (e.g. ``{"UserID": "user_id"}``).
    rename: dict[str, str] = Field(default_factory=dict)
    #: A file the producer writes into each dated input's directory once the day's drop is complete
    #: (``_SUCCESS``, as Spark and Hadoop jobs do); None: an input is ready as soon as its path
    #: exists. A snapshot input (no ``{logical_date}``) is ready when it exists. Its name starts with
    #: ``_`` or ``.``, which Spark's readers skip, so the marker is never read as data.
    ready_marker: str | None = Field(None, pattern=r"^[_.][^/\\]*$")

    def for_date(self, day: dt.date) -> GenericImportConfig:
        """The inputs of ``day``: every path with its ``{logical_date}`` placeholders filled in."""
        paths = ("interactions", "items", "users", "image_root")
        return self.model_copy(
            update={k: dated(v, day) for k in paths if (v := getattr(self, k)) is not None}
        )

    @field_validator("encoding")
    @classmethod
    def _known(cls, encoding: str) -> str:
        if encoding.lower() not in CSV_ENCODINGS:
            raise ValueError(
                f"encoding must be one of {sorted(CSV_ENCODINGS)} (latin-1 is iso-8859-1), got {encoding!r}"
            )
        return encoding

    @field_validator("text_columns")
    @classmethod
    def _distinct(cls, columns: list[str] | None) -> list[str] | None:
        """One attribute per column: Spark would fail the whole import on the repeated map key."""
        repeated = sorted({c for c in columns if columns.count(c) > 1}) if columns else []
        if repeated:
            raise ValueError(f"text_columns lists {repeated} more than once")
        return columns


def field(name: str) -> Column:
    """The input column ``name`` taken literally: ``F.col("page.url")`` would read a struct field."""
    return F.col("`" + name.replace("`", "``") + "`")


def _as_text(f: T.StructField) -> Column:
    """A Parquet value as the text a CSV would carry: nested values as JSON, a whole float without
    ``.0`` or an exponent (pandas stores an integer id column with a missing value as float64: ``42.0``
    must still be the id ``42``), and NaN or an infinity as missing (not the id ``"NaN"``)."""
    value = field(f.name)
    if isinstance(f.dataType, T.ArrayType | T.MapType | T.StructType):
        return F.to_json(value)
    if isinstance(f.dataType, T.FloatType | T.DoubleType):
        return _float_text(value)
    return value.cast("string")


def _float_text(value: Column) -> Column:
    """A float as text: a whole one without ``.0`` or an exponent (up to 38 digits: ``1e30`` is
    ``"1000000000000000000000000000000"``, ``1e40`` stays ``"1.0E40"``), NaN and infinities as
    missing (as in a CSV). No ``floor``: past 2**63 it overflows, and under ANSI fails the job."""
    finite = ~F.isnan(value) & (F.abs(value) != F.lit(float("inf")))
    digits = value.try_cast("decimal(38,0)")  # rounded; null past 38 digits
    whole = F.when(digits.cast("double") == value, digits.cast("string"))
    return F.when(finite, F.coalesce(whole, value.cast("string")))


def detect_format(path: str) -> Literal["csv", "parquet", "jsonl"]:
    """Format of ``path`` from its extension (for a local directory: its first data file's)."""
    candidate = Path(path)
    if candidate.is_dir():
        files = sorted(p for p in candidate.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise ValueError(f"{path}: empty directory, cannot detect its format")
        candidate = files[0]
    name = candidate.name.lower().removesuffix(".gz")
    for suffixes, fmt in (
        ((".csv", ".tsv"), "csv"),
        ((".parquet", ".pq"), "parquet"),
        ((".jsonl", ".json", ".ndjson"), "jsonl"),
    ):
        if name.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    raise ValueError(f"{path}: cannot tell the format from the name; set format to csv, parquet or jsonl")


#: The columns :func:`read_as_strings` adds to an input's own: an input column of one of these names
#: (after ``rename``) is refused, naming it, instead of being overwritten or made ambiguous.
READ_COLUMNS: tuple[str, ...] = ("source_file", CORRUPT, RECORD_PROBLEM, RAW, LINE)


def _check_names(path: str, names: list[str], rename: dict[str, str]) -> list[str]:
    """The input's column names after ``rename``; refuses one of :data:`READ_COLUMNS`, and two that
    are one name in any case (one renamed onto another, or JSON keys ``rating`` and ``Rating``)."""
    renamed = [rename.get(c, c) for c in names]
    taken = sorted({c for c in renamed if c.lower() in READ_COLUMNS})  # Spark resolves names in any case
    if taken:
        raise ValueError(
            f"{path}: column(s) {taken} have names the import gives its own columns; rename them "
            f"(rename: {{{taken[0]}: another_name}})"
        )
    seen: dict[str, str] = {}
    for written, name in zip(names, renamed, strict=True):
        other = seen.setdefault(name.lower(), written)
        if other != written:
            raise ValueError(
                f"{path}: columns {other!r} and {written!r} both become {name!r} (after rename, in any "
                f"case, as Spark resolves names); rename one of them (rename: {{{written}: another_name}})"
            )
    return renamed


def _source(names: tuple[str, ...], rename: dict[str, str]) -> list[str]:
    """The input's names of columns ``names`` (after ``rename``)."""
    written = {new: old for old, new in rename.items()}
    return [written.get(n, n) for n in names]


def refuse_differing_headers(spark: SparkSession, path: str, encoding: str) -> None:
    """Raise ValueError when the CSV files of ``path`` do not all start with the same line. Used for
    a header Spark cannot check per file (an empty or repeated name): Spark would then drop every
    file's first line as a header and read its fields by position, so a file without a header or with
    its columns in another order would lose a record or fill the wrong columns. A path naming one file
    has nothing to compare, and is not read twice."""
    named = hadoop_glob(spark, path) if jvm_of(spark) is not None else []
    if len(named) == 1 and named[0].isFile():
        return
    firsts = (
        read_lines(spark, path, encoding=encoding)
        .groupBy("source_file")
        .agg(F.min_by("value", LINE).alias("header"))
    )
    headers = firsts.groupBy("header").agg(F.min("source_file").alias("file")).limit(3).collect()
    if len(headers) > 1:
        shown = "; ".join(f"{local_path(r.file)}: {r.header[:80]!r}" for r in headers)
        raise ValueError(
            f"{path}: its CSV files start with different header lines ({shown}); one header per input"
        )


def refuse_split_records(spark: SparkSession, path: str, sep: str, encoding: str) -> None:
    """Raise ValueError when a line of the CSV ``path`` ends inside a quoted field (after whole
    fields, a quote that is never closed: ``""`` is an escaped quote). Read line by line, such a
    field's line break splits its record in two: the first part, cut short, parses as a whole record
    and the rest as a malformed one, so the counts reconcile and the loss goes unseen. The pattern
    walks the line field by field with possessive quantifiers (no backtracking, no recursion per
    character: a 100,000-character field is one step). The separator may have several characters."""
    sep = {"\\t": "\t"}.get(sep, sep)  # Spark reads a written-out \t as a tab
    s = re.escape(sep)
    quoted = r'"[^"]*+(?:""[^"]*+)*+'  # an opening quote and what follows, up to a lone quote
    plain = rf'(?:(?!{s})[^"](?:(?!{s})[\s\S])*+)?'  # an unquoted field: up to the next separator
    open_field = rf'^(?:(?:{quoted}"|{plain}){s})*+{quoted}$'
    split = read_lines(spark, path, encoding=encoding).filter(F.col("value").rlike(open_field))
    found = split.select("value", "source_file").limit(1).collect()
    if found:
        line, source = found[0]
        raise ValueError(
            f"{source}: {split.count()} line(s) end inside a quoted field, e.g. {line[:80]!r}: a field "
            "with a line break, which reading line by line splits into two records (the first cut "
            "short); set csv_multiline: true, or repair the file"
        )


def read_as_strings(
    spark: SparkSession,
    path: str,
    fmt: Format,
    *,
    sep: str = ",",
    columns: tuple[str, ...] | None = None,
    rename: dict[str, str] | None = None,
    encoding: str = "UTF-8",
    multiline: bool = True,
    ids: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> tuple[DataFrame, list[str]]:
    """Records of ``path`` with every column as a string, plus ``_corrupt_record``,
    ``_record_problem``, ``_raw`` (the record as written), ``source_file`` and ``_line``. Returns the
    frame and the input's column names (after ``rename``, which applies before anything is added).

    ``columns``: names to read (JSONL only; default every key seen in the data). ``encoding``: of a
    CSV input (JSON lines are UTF-8). ``multiline``: a CSV's quoted fields may hold line breaks
    (RFC 4180); False reads line by line, which Spark can split within one large file. Lines that are
    empty or only whitespace are no records. ``ids``: the id columns (names after ``rename``); a JSON
    object, array or boolean there is a record problem, and a Parquet column of such a type refused.
    ``required``: the columns (after ``rename``) of an input that names none (a JSON-lines input
    without one object, an empty CSV file), read as nulls: such an input's records are malformed
    ones, quarantined with their reason, and an empty input holds no record (as a CSV header does).
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    rename = rename or {}
    refuse_unread_subfolders(spark, path)
    if fmt == "jsonl" and encoding.replace("-", "").upper() != "UTF8":
        raise ValueError(f"{path}: JSON lines are UTF-8 (RFC 8259), not {encoding}; encoding applies to CSV")
    if fmt == "csv":

        def reader() -> Any:  # a new one each time: option() changes the reader it is called on
            return spark.read.option("encoding", encoding).option("sep", sep).option("multiLine", multiline)

        if not multiline:
            refuse_split_records(spark, path, sep, encoding)
        first = reader().csv(path).first()  # the header as written
        written = [] if first is None else list(first)
        written_names = (
            reader().option("header", True).csv(path).columns if written else _source(required, rename)
        )
        # Spark names an empty column _c<i> and a repeated one <name><i>: such headers cannot be
        # checked against these names, so only a clean header has every file's header checked
        checkable = len(set(written)) == len(written) and all(written)
        if not checkable:
            refuse_differing_headers(spark, path, encoding)
        names = _check_names(path, written_names, rename)
        schema = T.StructType([T.StructField(c, T.StringType()) for c in [*written_names, CORRUPT]])
        df = (
            reader()
            .schema(schema)
            .option("header", True)
            .option("enforceSchema", not checkable)  # else each file's header must be the first's
            .option("quote", '"')
            .option("escape", '"')
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .csv(path)
        )
        df = df.select(
            *[field(c).alias(n) for c, n in zip(written_names, names, strict=True)],
            F.col(CORRUPT),
            F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*map(field, written_names)))).alias(RAW),
            F.col("_metadata.file_path").alias("source_file"),
        )
        problem = undecodable(F.concat_ws("", *map(field, names)), encoding)
    elif fmt == "jsonl":
        lines = (
            spark.read.text(path)
            .select(F.col("value").alias(RAW), F.col("_metadata.file_path").alias("source_file"))
            .filter(~F.col(RAW).rlike(r"^\s*$"))
            .select("*", F.try_parse_json(RAW).alias(JSON_RECORD))
        )
        if not columns:  # every top-level key of the data (Spark's inference fails on a repeated one)
            keys = lines.select(F.explode(F.json_object_keys(RAW)).alias("k")).distinct()
            columns = tuple(sorted(r.k for r in keys.collect() if r.k != CORRUPT)) or _source(
                required, rename
            )
        written_names = list(columns)
        names = _check_names(path, written_names, rename)
        schema = T.StructType([T.StructField(c, T.StringType()) for c in [*written_names, CORRUPT]])
        parsed = F.from_json(RAW, schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT})
        # a JSON number with a fraction or exponent reads as Parquet's float would (pandas writes an
        # integer id column with a gap as 42.0): the same number parsed as a double, where it is one
        # (a quoted "42.0" is text, kept as written; partial results give the other keys theirs)
        numbers = F.from_json(RAW, T.StructType([T.StructField(c, T.DoubleType()) for c in written_names]))

        def text(c: str) -> Column:
            value, number = parsed.getField(c), numbers.getField(c)
            return F.when(number.isNotNull() & value.rlike("[.eE]"), _float_text(number)).otherwise(value)

        df = lines.select(
            *[text(c).alias(n) for c, n in zip(written_names, names, strict=True)],
            F.when(parsed.isNull() | ~F.ltrim(RAW).startswith("{"), F.col(RAW))
            .otherwise(parsed.getField(CORRUPT))
            .alias(CORRUPT),
            F.col(RAW),
            F.col("source_file"),
            F.col(JSON_RECORD),
        )
        id_keys = {w: n for w, n in zip(written_names, names, strict=True) if n in ids}
        problem = F.coalesce(
            not_utf8(F.col(RAW)), json_record_problem(F.col(RAW)), json_id_types(F.col(JSON_RECORD), id_keys)
        )
    elif fmt == "parquet":
        # pandas writes TIMESTAMP(NANOS), which Spark cannot read as a timestamp; read such columns
        # as their int64 nanoseconds instead (parse_timestamp recognises the magnitude).
        if spark.conf.get(NANOS_AS_LONG, "false") != "true":
            logger.info("setting %s=true so Parquet nanosecond timestamps can be read", NANOS_AS_LONG)
            spark.conf.set(NANOS_AS_LONG, "true")
        parts = read_parquet(spark, path)
        written_names = list(dict.fromkeys(c for part in parts for c in part.columns))
        names = _check_names(path, written_names, rename)
        name_of = dict(zip(written_names, names, strict=True))
        texts = []
        for part in parts:
            for f in part.schema.fields:
                if name_of[f.name] in ids and isinstance(
                    f.dataType, T.ArrayType | T.MapType | T.StructType | T.BooleanType
                ):
                    raise ValueError(
                        f"{path}: id column {f.name!r} is {f.dataType.simpleString()}; an id is a string or a number"
                    )
            texts.append(
                part.select(
                    *[_as_text(f).alias(name_of[f.name]) for f in part.schema.fields],
                    F.lit(None).cast("string").alias(CORRUPT),
                    row_json(*map(field, part.columns)).alias(RAW),  # typed: microsecond timestamps
                    F.col("_metadata.file_path").alias("source_file"),
                )
            )
        df = texts[0]
        for text in texts[1:]:
            df = df.unionByName(text, allowMissingColumns=True)
        problem = F.lit(None).cast("string")
    else:
        raise ValueError(f"unknown format {fmt!r}, expected csv, parquet or jsonl")
    df = df.select(
        *[field(c) for c in names],
        F.col(CORRUPT),
        problem.alias(RECORD_PROBLEM),
        F.col(RAW),
        F.col("source_file"),
        F.monotonically_increasing_id().alias(LINE),
    )
    return df, names


def read_parquet(spark: SparkSession, path: str) -> list[DataFrame]:
    """The Parquet files of ``path``: one frame when their schemas merge (files may differ in their
    columns: Spark's ``mergeSchema``; without it, Spark reads one file's), else one frame per schema.
    pandas stores an integer column with a gap as float64, so one drop's files can hold a column as
    int64 in one part and double in another, which no one schema reads; the caller takes every value
    as text (``42.0`` as ``42``), where the parts meet. Each file's schema is read apart then (a footer
    per file), which needs a classic session and, for a directory's ``key=value`` partitions, a
    directory ``path`` (Spark's ``basePath``)."""
    try:
        return [spark.read.option("mergeSchema", True).parquet(path)]
    except Exception as err:
        if "CANNOT_MERGE_SCHEMAS" not in str(err) or jvm_of(spark) is None:
            raise
    statuses = hadoop_glob(spark, path)
    reader = spark.read
    if len(statuses) == 1 and statuses[0].isDirectory():
        reader = reader.option("basePath", path)
    groups: dict[str, list[str]] = {}
    files = spark.read.option("mergeSchema", False).parquet(path).inputFiles()
    for file in tqdm(files, desc="Parquet schemas", unit="file", disable=None):
        groups.setdefault(reader.parquet(file).schema.json(), []).append(file)
    logger.warning(
        "%s: its files store a column in different types (%d schemas, e.g. %s): each schema's files are "
        "read apart and their values taken as text",
        path,
        len(groups),
        "; ".join(T.StructType.fromJson(json.loads(g)).simpleString() for g in list(groups)[:2]),
    )
    return [reader.parquet(*files) for files in groups.values()]


def _col(names: list[str], name: str) -> Column:
    """The column if the input has it, else null."""
    return trimmed(field(name)) if name in names else F.lit(None).cast("string")


def parse_timestamp(value: Column, unit: str) -> Column:
    """Text -> timestamp, null when unreadable: unix s/ms/us/ns or ISO-8601 (``timestamp_unit``)."""
    number = value.try_cast("double")
    # integers beyond 2**53 (nanoseconds) without rounding: decimal arithmetic, never through a double
    exact = F.coalesce(value.try_cast("decimal(20,0)"), number.cast("decimal(20,0)"))
    ok = number.between(0, 1e20)
    by_unit = {
        "s": F.when(ok & (number < 1e11), F.timestamp_seconds(number)),
        "ms": F.when(ok & (number < 1e14), F.timestamp_micros((number * 1000).cast("long"))),
        "us": F.when(ok & (number < 1e17), F.timestamp_micros(exact.cast("long"))),
        "ns": F.when(ok & (number < 9e18), F.timestamp_micros((exact / 1000).cast("long"))),
        "iso": F.try_to_timestamp(value),
    }
    if unit != "auto":
        return by_unit[unit]
    expr = F.when(number.isNull(), by_unit["iso"])
    for name, bound in UNIT_BOUNDS:
        expr = expr.when(number < bound, by_unit[name])
    return expr


def parse_interactions(
    rows: DataFrame, names: list[str], config: GenericImportConfig, logical_date: dt.date
) -> DataFrame:
    """Generic interaction records -> bronze.interactions rows + ``_reason``/``_raw``."""
    user, item, ts, rating, label, action = (_col(names, c) for c in INTERACTION_COLUMNS)
    # a null marker (``\N``, ``NULL``, ``nan``...) in a feedback column is no value, as in an id column
    rating, label, action = (F.when(~null_marker(c), c) for c in (rating, label, action))
    event_ts = parse_timestamp(ts, config.timestamp_unit)
    user_problem, item_problem = id_problem("user_id", user), id_problem("item_id", item)
    rating_num = to_double(rating)
    label_num = F.when(label.isin("0", "1", "0.0", "1.0"), label.cast("double").cast("int")).when(
        F.lower(label).isin("true", "false"), (F.lower(label) == "true").cast("int")
    )  # a boolean column (Parquet, JSON) reads as true/false
    checks = [
        (F.col(CORRUPT).isNotNull(), "malformed record (field count, quoting or JSON)"),
        (F.col(RECORD_PROBLEM).isNotNull(), F.col(RECORD_PROBLEM)),
        (user_problem.isNotNull(), user_problem),
        (item_problem.isNotNull(), item_problem),
        (
            event_ts.isNull(),
            F.concat(F.lit("timestamp "), quoted(ts), F.lit(f" is not a {_unit_name(config)}")),
        ),
        (
            ~blank(rating) & rating_num.isNull(),
            F.concat(F.lit("rating "), quoted(rating), F.lit(" is not a number")),
        ),
        (
            ~blank(label) & label_num.isNull(),
            F.concat(F.lit("label "), quoted(label), F.lit(" is not 0 or 1")),
        ),
        (blank(rating) & blank(label), "neither rating nor label"),
    ]
    if config.rating_range is not None:
        low, high = config.rating_range
        checks.append(
            (
                rating_num.isNotNull() & ~rating_num.between(low, high),
                F.concat(F.lit("rating "), rating, F.lit(f" outside [{low:g}, {high:g}]")),
            )
        )
    reason = first_reason(*checks)
    ok = reason.isNull()
    others = [c for c in names if c not in INTERACTION_COLUMNS]
    extra = F.to_json(F.struct(*[field(c) for c in others])) if others else F.lit(None).cast("string")
    return rows.select(
        F.lit(config.dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(ok, user).alias("user_id"),
        F.when(ok, item).alias("item_id"),
        F.when(ok, rating_num).alias("rating"),
        F.when(ok, label_num).alias("label"),
        F.when(ok & ~blank(action), action).alias("action"),
        F.when(ok, event_ts).alias("event_ts"),
        F.when(ok, extra).alias("extra"),
        "source_file",
        LINE,
        reason.alias(REASON),
        F.col(RAW),
    )


def _unit_name(config: GenericImportConfig) -> str:
    return {
        "auto": "unix time (s, ms, us or ns) or ISO-8601 date-time",
        "s": "unix time in seconds",
        "ms": "unix time in milliseconds",
        "us": "unix time in microseconds",
        "ns": "unix time in nanoseconds",
        "iso": "ISO-8601 date-time",
    }[config.timestamp_unit]


def _categories(value: Column) -> Column:
    """A JSON list or ``|``-separated text (also text that only looks like a list, such as
    ``[Adult Swim] Cartoons``) -> array of distinct, trimmed, non-empty strings, in the order they
    first appear (``Drama |Drama`` is one category; Amazon's categories are a path, whose levels may
    repeat a name, and stay as given)."""
    as_list = F.from_json(value, T.ArrayType(T.StringType()))
    split = F.split(value, r"\|")
    arr = F.when(value.startswith("[") & as_list.isNotNull(), as_list).otherwise(split)
    return F.array_distinct(text_list(arr))


def _resolve_path(value: Column, root: str) -> Column:
    """Relative paths joined to ``root``; absolute paths and URIs kept."""
    absolute = value.startswith("/") | value.contains("://")
    return (
        F.when(blank(value), F.lit(None)).when(absolute, value).otherwise(F.concat(F.lit(root + "/"), value))
    )


def parse_items(
    rows: DataFrame, names: list[str], config: GenericImportConfig, logical_date: dt.date
) -> DataFrame:
    """Generic item records -> bronze.items rows + ``_reason``/``_raw``."""
    item = _col(names, "item_id")
    problem = id_problem("item_id", item)
    reason = first_reason(
        (F.col(CORRUPT).isNotNull(), "malformed record (field count, quoting or JSON)"),
        (F.col(RECORD_PROBLEM).isNotNull(), F.col(RECORD_PROBLEM)),
        (problem.isNotNull(), problem),
    )
    ok = reason.isNull()
    text_columns = config.text_columns
    if text_columns is None:
        text_columns = [c for c in names if c not in ITEM_RESERVED]
    missing = [c for c in text_columns if c not in names]
    if missing:
        raise ValueError(f"items input {config.items}: text_columns {missing} are not columns (has {names})")
    lists = [_categories(field(c)) for c in ("categories", "genres") if c in names]  # both: one list
    categories = F.array_distinct(F.concat(*lists)) if lists else F.array().cast("array<string>")
    root = config.image_root or _parent(config.items or "")
    title = _col(names, "title")
    return rows.select(
        F.lit(config.dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(ok, item).alias("item_id"),
        F.when(~blank(title), title).alias("title"),
        categories.alias("categories"),
        str_map([(c, field(c)) for c in text_columns]).alias("attributes"),
        _resolve_path(_col(names, "image_path"), root).alias("image_path"),
        F.when(~blank(_col(names, "image_url")), _col(names, "image_url")).alias("image_url"),
        F.lit(None).cast("string").alias("extra"),
        "source_file",
        LINE,
        reason.alias(REASON),
        F.col(RAW),
    )


def parse_users(
    rows: DataFrame, names: list[str], config: GenericImportConfig, logical_date: dt.date
) -> DataFrame:
    """Generic user records -> bronze.users rows + ``_reason``/``_raw``."""
    user = _col(names, "user_id")
    problem = id_problem("user_id", user)
    reason = first_reason(
        (F.col(CORRUPT).isNotNull(), "malformed record (field count, quoting or JSON)"),
        (F.col(RECORD_PROBLEM).isNotNull(), F.col(RECORD_PROBLEM)),
        (problem.isNotNull(), problem),
    )
    profile = [c for c in names if c != "user_id"]
    return rows.select(
        F.lit(config.dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(reason.isNull(), user).alias("user_id"),
        str_map([(c, field(c)) for c in profile]).alias("attributes"),
        "source_file",
        LINE,
        reason.alias(REASON),
        F.col(RAW),
    )


def _parent(path: str) -> str:
    """Directory of an input (itself when it is a directory), absolute for local paths."""
    if "://" in path:
        return path.rstrip("/").rsplit("/", 1)[0]
    p = Path(path).expanduser().resolve()
    return str(p if p.is_dir() else p.parent)


def pending_inputs(spark: SparkSession, config: GenericImportConfig, logical_date: dt.date) -> dict[str, str]:
    """The inputs of ``logical_date`` (:meth:`GenericImportConfig.for_date`) that have not landed:
    ``{input: why}``, empty when the import can run. An input is pending while its path names
    nothing (hidden ``_``/``.`` names aside, which Spark does not read), or, with ``ready_marker``,
    while a directory of a dated input lacks the marker: the input itself when it is a directory, and
    for a glob each directory it names and each directory holding a file it names, where a marker in
    a parent below the glob's fixed part counts too (Spark's partitioned writes put one at the top)."""
    day = config.for_date(logical_date)
    pending = {}
    for name in ("interactions", "items", "users"):
        path = getattr(day, name)
        if path is None:
            continue
        found = [f for f in hadoop_glob(spark, path) if not f.getPath().getName().startswith(("_", "."))]
        if not found:
            pending[name] = f"nothing at {path}"
        elif config.ready_marker and LOGICAL_DATE.search(getattr(config, name)):
            unmarked = _unmarked(spark, found, config.ready_marker, path)
            if unmarked:
                shown = ", ".join(local_path(folder) for folder in unmarked[:3])
                more = f" and {len(unmarked) - 3} more" if len(unmarked) > 3 else ""
                pending[name] = f"no {config.ready_marker} in {shown}{more} (the drop is still being written)"
    return pending


def _unmarked(spark: SparkSession, found: list[Any], marker: str, path: str) -> list[str]:
    """The directories of ``found`` (those it names, and those holding the files it names) with
    ``marker`` neither in them nor in a parent of theirs below the fixed part of the glob ``path``."""
    fixed = hadoop_glob(spark, _fixed_part(path))
    top = str(fixed[0].getPath()) if fixed else None
    seen: dict[str, bool] = {}

    def marked(folder: Any) -> bool:
        key = str(folder)
        if key not in seen:
            seen[key] = bool(hadoop_glob(spark, f"{key}/{marker}"))
        return seen[key]

    folders = {str(f.getPath()): f.getPath() for f in found if f.isDirectory()}
    folders |= {str(f.getPath().getParent()): f.getPath().getParent() for f in found if not f.isDirectory()}
    unmarked = []
    for key, folder in sorted(folders.items()):
        while not marked(folder):
            parent = folder.getParent()
            if parent is None or top is None or not (str(parent) == top or str(parent).startswith(f"{top}/")):
                unmarked.append(key)
                break
            folder = parent
    return unmarked


def _fixed_part(path: str) -> str:
    """The directories of a glob before its first wildcard (the path itself when it has none)."""
    parts = path.split("/")
    wild = next((k for k, part in enumerate(parts) if any(c in part for c in "*?[{")), len(parts))
    return "/".join(parts[:wild]) or "/"


def import_generic(
    spark: SparkSession, lake: Lake, config: GenericImportConfig, logical_date: dt.date
) -> ImportReport:
    """Import generic-format inputs into bronze for ``logical_date`` (the inputs of
    :meth:`GenericImportConfig.for_date`); reruns replace the partitions. A drop that has not landed
    (:func:`pending_inputs`) is a FileNotFoundError, before anything is read (on Spark Connect, only
    with a ``ready_marker``, which needs the JVM; without one, Spark's read names a missing path)."""
    check = config.ready_marker is not None or jvm_of(spark) is not None
    pending = pending_inputs(spark, config, logical_date) if check else {}
    if pending:
        raise FileNotFoundError(
            f"{config.dataset}'s drop for {logical_date} has not landed: "
            + "; ".join(f"{name}: {why}" for name, why in pending.items())
        )
    config = config.for_date(logical_date)
    options: dict[str, Any] = {
        "sep": config.csv_sep,
        "rename": config.rename,
        "encoding": config.encoding,
        "multiline": config.csv_multiline,
    }
    rows, names = read_as_strings(
        spark,
        config.interactions,
        config.format,
        ids=("user_id", "item_id"),
        required=(*INTERACTION_REQUIRED, "rating"),
        **options,
    )
    for column in INTERACTION_REQUIRED:
        if column not in names:
            raise ValueError(f"interactions input {config.interactions}: no {column!r} column (has {names})")
    if "rating" not in names and "label" not in names:
        raise ValueError(f"interactions input {config.interactions}: needs a 'rating' or 'label' column")
    parsed = [
        Parsed(
            config.interactions,
            BRONZE_INTERACTIONS.name,
            flag_duplicate_events(parse_interactions(rows, names, config, logical_date)),
            rows,
        )
    ]
    if config.items:
        rows, names = read_as_strings(
            spark, config.items, config.format, ids=("item_id",), required=("item_id",), **options
        )
        if "item_id" not in names:
            raise ValueError(f"items input {config.items}: no 'item_id' column (has {names})")
        items = flag_duplicates(parse_items(rows, names, config, logical_date), ["item_id"], "item_id")
        parsed.append(Parsed(config.items, BRONZE_ITEMS.name, items, rows))
    if config.users:
        rows, names = read_as_strings(
            spark, config.users, config.format, ids=("user_id",), required=("user_id",), **options
        )
        if "user_id" not in names:
            raise ValueError(f"users input {config.users}: no 'user_id' column (has {names})")
        users = flag_duplicates(parse_users(rows, names, config, logical_date), ["user_id"], "user_id")
        parsed.append(Parsed(config.users, BRONZE_USERS.name, users, rows))
    try:
        return write_bronze(
            lake,
            config.dataset,
            logical_date,
            parsed,
            ImportReport(config.dataset, logical_date),
            tables=(BRONZE_INTERACTIONS.name, BRONZE_ITEMS.name, BRONZE_USERS.name),  # fewer inputs
        )
    except Exception as err:  # Spark checks each CSV file's header only when it reads the file
        header = re.search(
            r"(CSV header does not conform|Number of column in CSV header)(.*?)CSV file: (\S+)",
            str(err),
            re.S,
        )
        if header is None:
            raise
        found = " ".join((header.group(1) + header.group(2)).split())
        raise ValueError(
            f"CSV file {header.group(3)}: its header differs from the one the columns were read from ({found}); "
            "every file of an input must list the same columns in the same order"
        ) from None

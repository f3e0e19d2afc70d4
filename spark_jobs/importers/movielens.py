"""MovieLens-100K (+ posters and plot text) -> bronze tables.

Input layout (the team's bundle, see its SOURCES.md; users download MovieLens themselves, its
licence forbids redistribution):

* ``raw/u.data``: ``user_id \\t item_id \\t rating \\t unix_seconds``
* ``raw/u.item``: ``item_id|title|release date|video release date|IMDb URL|19 genre flags``
  (latin-1); genre names from ``raw/u.genre`` when present.
* ``raw/u.user``: ``user_id|age|gender|occupation|zip``
* ``item_extra.tsv`` (optional): ``item_id ml1m_item_id rated genre director writer actors plot``
  with a header, tab-separated, CSV quoting; merged into the item's text attributes. UTF-8, but 178
  of the bundle's 1,397 rows were encoded twice (``Keyser SÃ¶ze``): :func:`undo_double_utf8` repairs
  such values.
* ``posters/<item_id>.jpg`` (optional): the item's ``image_path``.

Malformed lines (wrong field count, non-integer ids, ratings outside 1..5, timestamps that are not
unix seconds in [0, 1e11), genre flags other than 0/1), item_extra rows for items without a valid
u.item row and duplicate item_extra rows are quarantined with a reason; every input's counts
reconcile.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from pydantic import Field
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from hisam_core.config import Config
from spark_jobs.importers.common import (
    CORRUPT,
    LINE,
    RAW,
    REASON,
    UNIT_BOUNDS,
    ImportReport,
    Parsed,
    blank,
    first_reason,
    flag_duplicate_events,
    flag_duplicates,
    line_problem,
    not_int,
    quoted,
    raw_line,
    read_lines,
    str_map,
    to_double,
    write_bronze,
)
from spark_jobs.lake import Lake
from spark_jobs.tables import BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS, NAME_PATTERN

logger = logging.getLogger(__name__)

GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
EXTRA_TEXT_COLUMNS: tuple[str, ...] = ("rated", "genre", "director", "writer", "actors", "plot")
#: ``item_extra.tsv``'s header, in order.
EXTRA_COLUMNS = ["item_id", "ml1m_item_id", *EXTRA_TEXT_COLUMNS]
#: Characters Spark (Hadoop) reads as a glob in a path.
GLOB_CHARACTERS = "[]*?{}"
#: Timestamps at or past 1e11 s (the year 5138) are not seconds (milliseconds, most likely): they are
#: quarantined rather than read as a far future, or overflowing Spark's timestamp range.
MAX_SECONDS = dict(UNIT_BOUNDS)["s"]


class MovieLensImportConfig(Config):
    """Where the bundle is and what to call the dataset in the lake."""

    data_dir: str
    dataset: str = Field("movielens-100k", pattern=NAME_PATTERN)
    #: Encoding of u.item / u.user (u.data is ASCII).
    encoding: str = "ISO-8859-1"
    include_extra: bool = True
    include_posters: bool = True


def _genre_names(raw_dir: Path) -> tuple[str, ...]:
    """Genre names in flag order from ``u.genre`` (19 short lines), else the published list."""
    path = raw_dir / "u.genre"
    if not path.is_file():
        return GENRES
    pairs = [line.rsplit("|", 1) for line in path.read_text(encoding="latin-1").splitlines() if "|" in line]
    names = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
    if len(names) != len(GENRES):
        raise ValueError(f"{path}: expected {len(GENRES)} genres, got {len(names)}")
    return names


def parse_ratings(lines: DataFrame, dataset: str, logical_date: dt.date) -> DataFrame:
    """``u.data`` lines -> bronze.interactions rows + ``_reason``/``_raw``."""
    parts = F.split(F.col("value"), "\t", -1)
    user, item, rating, ts = (F.trim(F.get(parts, i)) for i in range(4))
    reason = F.coalesce(
        line_problem(4, parts, "tab"),
        first_reason(
            (not_int(user), F.concat(F.lit("user_id "), quoted(user), F.lit(" is not an integer"))),
            (not_int(item), F.concat(F.lit("item_id "), quoted(item), F.lit(" is not an integer"))),
            (
                to_double(rating).isNull(),
                F.concat(F.lit("rating "), quoted(rating), F.lit(" is not a number")),
            ),
            (~to_double(rating).between(1, 5), F.concat(F.lit("rating "), rating, F.lit(" outside [1, 5]"))),
            (not_int(ts), F.concat(F.lit("timestamp "), quoted(ts), F.lit(" is not unix seconds"))),
            (
                ts.try_cast("long") >= MAX_SECONDS,
                F.concat(F.lit("timestamp "), quoted(ts), F.lit(" is not unix seconds (1e11 or later)")),
            ),
        ),
    )
    return lines.select(
        F.lit(dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(reason.isNull(), user.try_cast("long").cast("string")).alias("user_id"),
        F.when(reason.isNull(), item.try_cast("long").cast("string")).alias("item_id"),
        F.when(reason.isNull(), to_double(rating)).alias("rating"),
        F.lit(None).cast("int").alias("label"),
        F.lit("rating").alias("action"),
        F.when(reason.isNull(), F.timestamp_seconds(ts.try_cast("long"))).alias("event_ts"),
        F.lit(None).cast("string").alias("extra"),
        "source_file",
        LINE,
        reason.alias(REASON),
        raw_line().alias(RAW),
    )


def parse_items(lines: DataFrame, dataset: str, logical_date: dt.date, genres: tuple[str, ...]) -> DataFrame:
    """``u.item`` lines -> bronze.items rows (before item_extra and posters) + ``_reason``/``_raw``."""
    n = 5 + len(genres)
    parts = F.split(F.col("value"), r"\|", -1)
    item = F.trim(F.get(parts, 0))
    flags = F.slice(parts, 6, len(genres))
    reason = F.coalesce(
        line_problem(n, parts, "pipe"),
        first_reason(
            (not_int(item), F.concat(F.lit("item_id "), quoted(item), F.lit(" is not an integer"))),
            (
                ~F.forall(flags, lambda flag: flag.isin("0", "1")),
                F.concat(F.lit("genre flags must be 0/1, got "), F.concat_ws("|", flags)),
            ),
        ),
    )
    title = F.trim(F.get(parts, 1))
    categories = F.array_compact(
        F.array(*[F.when(F.get(parts, 5 + i) == "1", F.lit(g)) for i, g in enumerate(genres)])
    )
    return lines.select(
        F.lit(dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(reason.isNull(), item.try_cast("long").cast("string")).alias("item_id"),
        F.when(~blank(title), title).alias("title"),
        categories.alias("categories"),
        str_map(
            [
                ("release_date", F.trim(F.get(parts, 2))),
                ("video_release_date", F.trim(F.get(parts, 3))),
            ]
        ).alias("attributes"),
        F.lit(None).cast("string").alias("image_path"),
        F.lit(None).cast("string").alias("image_url"),
        F.to_json(F.struct(F.when(~blank(F.get(parts, 4)), F.trim(F.get(parts, 4))).alias("imdb_url"))).alias(
            "extra"
        ),
        "source_file",
        LINE,
        reason.alias(REASON),
        raw_line().alias(RAW),
    )


def parse_users(lines: DataFrame, dataset: str, logical_date: dt.date) -> DataFrame:
    """``u.user`` lines -> bronze.users rows + ``_reason``/``_raw``."""
    parts = F.split(F.col("value"), r"\|", -1)
    user, age, gender, occupation, zip_code = (F.trim(F.get(parts, i)) for i in range(5))
    reason = F.coalesce(
        line_problem(5, parts, "pipe"),
        first_reason(
            (not_int(user), F.concat(F.lit("user_id "), quoted(user), F.lit(" is not an integer"))),
            (not_int(age), F.concat(F.lit("age "), quoted(age), F.lit(" is not an integer"))),
        ),
    )
    return lines.select(
        F.lit(dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(reason.isNull(), user.try_cast("long").cast("string")).alias("user_id"),
        str_map([("age", age), ("gender", gender), ("occupation", occupation), ("zip_code", zip_code)]).alias(
            "attributes"
        ),
        "source_file",
        LINE,
        reason.alias(REASON),
        raw_line().alias(RAW),
    )


def read_item_extra(spark: SparkSession, path: str) -> DataFrame:
    """``item_extra.tsv`` rows as read (all strings, ``_corrupt_record`` for a malformed row). The
    header must name the columns in order (a missing or reordered one is an error, not a first row
    read as a header or swapped columns), and a quoted field may hold a newline."""
    columns = EXTRA_COLUMNS
    schema = T.StructType([T.StructField(c, T.StringType()) for c in [*columns, CORRUPT]])
    return (
        spark.read.schema(schema)
        .option("header", True)
        .option("enforceSchema", False)
        .option("multiLine", True)
        .option("sep", "\t")
        .option("quote", '"')
        .option("escape", '"')
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .csv(path)
        .withColumn("source_file", F.col("_metadata.file_path"))
        .withColumn(LINE, F.monotonically_increasing_id())
        .withColumn(RAW, F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*columns))))
    )


def undo_double_utf8(text: Column) -> Column:
    """``text`` whose UTF-8 bytes were read as latin-1 and encoded again (``SÃ¶ze``) back to what was
    meant (``Söze``); any other text as it is. Repaired only when every character is latin-1, one at
    least is not ASCII, and those latin-1 bytes are valid UTF-8 (``Café`` is not: it stays)."""
    latin1 = text.rlike("^[\\x00-\\xFF]*[\\x80-\\xFF][\\x00-\\xFF]*$")  # so encode cannot fail
    meant = F.when(latin1, F.encode(text, "ISO-8859-1").cast("string"))
    return F.when(F.coalesce(F.is_valid_utf8(meant), F.lit(False)), meant).otherwise(text)


def check_item_extra(rows: DataFrame) -> DataFrame:
    """``item_extra.tsv`` rows with ``_reason`` for malformed or duplicate rows, their text trimmed
    and repaired (:func:`undo_double_utf8`) first: a row that repeats another but for the double
    encoding is a repeated record, not a conflict."""
    item = F.trim(F.col("item_id"))
    reason = first_reason(
        (F.col(CORRUPT).isNotNull(), "malformed line (field count or quoting)"),
        (not_int(item), F.concat(F.lit("item_id "), quoted(item), F.lit(" is not an integer"))),
    )
    rows = rows.withColumn(REASON, reason).withColumns(
        {
            "item_id": F.when(reason.isNull(), item.try_cast("long").cast("string")),
            "ml1m_item_id": F.trim(F.col("ml1m_item_id")),
            **{c: undo_double_utf8(F.trim(F.col(c))) for c in EXTRA_TEXT_COLUMNS},
        }
    )
    return flag_duplicates(rows, ["item_id"], "item_extra row for item_id")


def merge_item_extra(items: DataFrame, extra: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Fold item_extra text columns (as :func:`check_item_extra` left them) into valid items; returns
    (items, extra rows with ``_reason``).

    Extra rows whose item has no valid u.item row get the reason "no valid u.item row".
    """
    good_extra = extra.filter(F.col(REASON).isNull()).select(
        "item_id",
        str_map([(c, F.col(c)) for c in EXTRA_TEXT_COLUMNS]).alias("_extra_attrs"),
        F.col("ml1m_item_id").alias("_ml1m_item_id"),
    )
    valid_ids = items.filter(F.col(REASON).isNull()).select(F.col("item_id").alias("_valid_item"))
    joined = items.join(good_extra, "item_id", "left")
    merged = joined.select(
        *[c for c in items.columns if c not in ("attributes", "extra")],
        F.when(
            F.col(REASON).isNull() & F.col("_extra_attrs").isNotNull(),
            F.map_concat("attributes", "_extra_attrs"),
        )
        .otherwise(F.col("attributes"))
        .alias("attributes"),
        F.when(
            F.col(REASON).isNull(),
            F.to_json(
                F.struct(
                    F.get_json_object("extra", "$.imdb_url").alias("imdb_url"),
                    F.col("_ml1m_item_id").alias("ml1m_item_id"),
                )
            ),
        )
        .otherwise(F.col("extra"))
        .alias("extra"),
    ).select(*items.columns)
    checked = extra.join(valid_ids, extra["item_id"] == valid_ids["_valid_item"], "left").select(
        *[F.col(c) for c in extra.columns if c != REASON],
        F.when(
            F.col(REASON).isNull() & F.col("_valid_item").isNull(),
            F.concat(F.lit("no valid u.item row for item_id "), F.col("item_id")),
        )
        .otherwise(F.col(REASON))
        .alias(REASON),
    )
    return merged, checked


def list_images(spark: SparkSession, directory: str, pattern: str = "*.jpg") -> DataFrame:
    """``item_id`` (from ``<item_id>.<ext>``) and ``image_path`` of the images in ``directory``.

    Lists through Spark's ``binaryFile`` source (content is never read), so HDFS/S3 paths work;
    local paths come back without the ``file:`` scheme.
    """
    return (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", pattern)
        .load(directory)
        .select(F.regexp_replace("path", r"^file:(//)?(?=/)", "").alias("image_path"))
        .select(F.regexp_extract("image_path", r"([^/]+)\.[A-Za-z]+$", 1).alias("item_id"), "image_path")
        .filter(F.col("item_id") != "")
    )


def check_bundle(data_dir: str | Path, include_extra: bool = True) -> Path:
    """The bundle's ``raw`` folder; a ValueError names the first file it lacks, a path Spark would
    read as a glob, or an ``item_extra.tsv`` header other than its columns (when it is read:
    ``include_extra``). Cheap: callers check before a Spark session starts."""
    if any(c in str(data_dir) for c in GLOB_CHARACTERS):
        raise ValueError(
            f"MovieLens bundle at {data_dir}: Spark reads {GLOB_CHARACTERS} in a path as a glob; rename it"
        )
    raw = Path(data_dir) / "raw"
    for name in ("u.data", "u.item", "u.user"):
        if not (raw / name).is_file():
            raise ValueError(f"MovieLens bundle at {data_dir}: missing raw/{name}")
    extra = Path(data_dir) / "item_extra.tsv"
    if include_extra and extra.is_file():
        with extra.open(encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        if header != EXTRA_COLUMNS:
            raise ValueError(f"{extra}: the header must be {EXTRA_COLUMNS} (tab-separated), got {header}")
    return raw


def import_movielens(
    spark: SparkSession, lake: Lake, config: MovieLensImportConfig, logical_date: dt.date
) -> ImportReport:
    """Import the bundle into bronze for ``logical_date``; rerunning the date replaces its partitions."""
    root, raw = Path(config.data_dir), check_bundle(config.data_dir, config.include_extra)
    ds = config.dataset
    rating_lines = read_lines(spark, str(raw / "u.data"))
    item_lines = read_lines(spark, str(raw / "u.item"), encoding=config.encoding)
    user_lines = read_lines(spark, str(raw / "u.user"), encoding=config.encoding)
    ratings = flag_duplicate_events(parse_ratings(rating_lines, ds, logical_date))
    items = parse_items(item_lines, ds, logical_date, _genre_names(raw))
    items = flag_duplicates(items, ["item_id"], "item_id")
    users = parse_users(user_lines, ds, logical_date)
    users = flag_duplicates(users, ["user_id"], "user_id")
    parsed = [
        Parsed("u.data", BRONZE_INTERACTIONS.name, ratings, rating_lines),
        Parsed("u.user", BRONZE_USERS.name, users, user_lines),
    ]
    extra_path = root / "item_extra.tsv"
    if config.include_extra and extra_path.is_file():
        extra_rows = read_item_extra(spark, str(extra_path))
        items, extra = merge_item_extra(items, check_item_extra(extra_rows))
        parsed.append(Parsed("item_extra.tsv", BRONZE_ITEMS.name, extra, extra_rows, write_good=False))
    posters = root / "posters"
    if config.include_posters and posters.is_dir():
        images = list_images(spark, str(posters)).withColumnRenamed("image_path", "_poster")
        items = (
            items.join(images, "item_id", "left")
            .withColumn("image_path", F.when(F.col(REASON).isNull(), F.col("_poster")))
            .drop("_poster")
        )
    parsed.insert(1, Parsed("u.item", BRONZE_ITEMS.name, items, item_lines))
    report = ImportReport(ds, logical_date)
    return write_bronze(lake, ds, logical_date, parsed, report)

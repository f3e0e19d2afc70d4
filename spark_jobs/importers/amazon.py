"""Amazon Reviews 2023 (McAuley Lab) JSONL -> bronze tables.

Inputs, one JSON object per line, plain or ``.gz`` (a file, a directory or a glob):

* reviews (``<Category>.jsonl``): ``rating`` (1-5), ``title``, ``text``, ``images``, ``asin``,
  ``parent_asin``, ``user_id``, ``timestamp`` (unix **milliseconds**), ``helpful_vote``,
  ``verified_purchase``.
* item metadata (``meta_<Category>.jsonl``): ``main_category``, ``title``, ``average_rating``,
  ``rating_number``, ``features`` (list), ``description`` (list), ``price``, ``images`` (list of
  ``{thumb, large, variant, hi_res}``), ``videos``, ``store``, ``categories`` (list), ``details``
  (object), ``parent_asin``, ``bought_together``.

The item id is ``parent_asin`` (the benchmark's item; ``asin`` is a variant and is kept in
``extra``), falling back to ``asin`` when a review has no parent. Every field is first read as a
string, so a wrongly typed value gets its own reason instead of voiding the whole line (an id that
is a JSON object, list, boolean or number beyond a double's range, or a null marker such as
``NULL``, is quarantined too); a ``details`` object with a repeated key is quarantined (which value
is meant is unknown). A list
field (``features``, ``description``, ``categories``) given as another type, such as a plain
string, is kept as a one-item list, and a ``details`` that is not an object as the attribute
``details``: no value is dropped for its type. Review
title/text, votes and the verified flag go to ``extra`` (JSON); item text fields (main category,
store, features, description and every ``details`` entry, but one named like such a field that has
its own value) go to ``attributes``; the image URL is
the MAIN image's ``hi_res`` (else ``large``), not downloaded.
"""

from __future__ import annotations

import datetime as dt
import logging

from pydantic import Field
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

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
    id_problem,
    json_id_types,
    json_record_problem,
    not_utf8,
    null_marker,
    quoted,
    refuse_unread_subfolders,
    repeated_keys,
    str_map,
    text_list,
    text_values,
    to_double,
    trimmed,
    write_bronze,
)
from spark_jobs.lake import Lake
from spark_jobs.tables import BRONZE_INTERACTIONS, BRONZE_ITEMS, NAME_PATTERN

logger = logging.getLogger(__name__)

REVIEW_FIELDS: tuple[str, ...] = (
    "rating", "title", "text", "asin", "parent_asin", "user_id", "timestamp", "helpful_vote",
    "verified_purchase",
)  # fmt: skip
META_FIELDS: tuple[str, ...] = (
    "parent_asin", "title", "main_category", "categories", "features", "description", "images",
    "store", "details", "average_rating", "rating_number", "price",
)  # fmt: skip
IMAGE = T.ArrayType(
    T.StructType([T.StructField(f, T.StringType()) for f in ("thumb", "large", "variant", "hi_res")])
)
STRINGS = T.ArrayType(T.StringType())
#: Review timestamps are unix milliseconds; one below this (1973) is unix seconds by mistake.
MIN_MILLISECONDS = int(dict(UNIT_BOUNDS)["s"])


class AmazonImportConfig(Config):
    """Paths of one Amazon Reviews 2023 category and the dataset name to import it as."""

    reviews: str
    meta: str | None = None
    dataset: str = Field("amazon", pattern=NAME_PATTERN)


def read_json_lines(
    spark: SparkSession, path: str, fields: tuple[str, ...], ids: tuple[str, ...] = ()
) -> DataFrame:
    """Non-blank lines of JSONL file(s): ``value``, every field as a raw string, ``_corrupt_record``,
    ``_record_problem``.

    Numbers, booleans, lists and objects come back as their JSON text; JSON ``null`` as null. An
    object, list, boolean or infinite number in one of the ``ids`` is a record problem
    (:func:`json_id_types`).
    """
    schema = T.StructType([T.StructField(f, T.StringType()) for f in [*fields, CORRUPT]])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
    refuse_unread_subfolders(spark, path)
    lines = (
        spark.read.text(path)
        .filter(~F.col("value").rlike(r"^\s*$"))  # blank lines are no records
        .select("value", "_metadata", F.try_parse_json("value").alias(JSON_RECORD))
    )
    parsed = F.from_json("value", schema, options)
    return lines.select(
        "value",
        *[parsed.getField(f).alias(f) for f in fields],
        F.when(parsed.isNull(), F.col("value")).otherwise(parsed.getField(CORRUPT)).alias(CORRUPT),
        F.coalesce(
            not_utf8(F.col("value")),
            json_record_problem(F.col("value")),
            json_id_types(F.col(JSON_RECORD), {i: i for i in ids}),
        ).alias(RECORD_PROBLEM),
        F.col(JSON_RECORD),
        F.col("_metadata.file_path").alias("source_file"),
        F.monotonically_increasing_id().alias(LINE),
    )


def _not_object(value: Column) -> Column:
    return ~F.ltrim(value).startswith("{")


def parse_reviews(lines: DataFrame, dataset: str, logical_date: dt.date) -> DataFrame:
    """Review lines -> bronze.interactions rows + ``_reason``/``_raw``."""
    parent, asin = F.col("parent_asin"), F.col("asin")
    unusable = blank(parent) | null_marker(parent)  # then the variant's asin is the item
    item = F.coalesce(
        F.when(~unusable, trimmed(parent)), F.when(~blank(asin) & ~null_marker(asin), trimmed(asin))
    )
    marker = F.when(null_marker(parent), F.lit("parent_asin ")).otherwise(F.lit("asin "))
    marked = F.when(null_marker(parent), trimmed(parent)).otherwise(trimmed(asin))
    asin_type = json_id_types(F.col(JSON_RECORD), {"asin": "asin"})
    user_problem = id_problem("user_id", F.col("user_id"))
    rating, ts = F.col("rating"), F.trim("timestamp")
    number = to_double(ts)  # a whole float (1588687728923.0) is milliseconds too
    ts_ms = F.when(number % 1 == 0, number.try_cast("long"))  # 1e19: null (quarantined), not an overflow
    reason = first_reason(
        (F.col(CORRUPT).isNotNull() | _not_object(F.col("value")), "malformed JSON"),
        (F.col(RECORD_PROBLEM).isNotNull(), F.col(RECORD_PROBLEM)),
        (user_problem.isNotNull(), user_problem),
        (unusable & asin_type.isNotNull(), asin_type),
        (
            item.isNull() & (null_marker(parent) | null_marker(asin)),
            F.concat(marker, quoted(marked), F.lit(" is a null marker, not an id")),
        ),
        (item.isNull(), "missing parent_asin and asin"),
        (to_double(rating).isNull(), F.concat(F.lit("rating "), quoted(rating), F.lit(" is not a number"))),
        (~to_double(rating).between(1, 5), F.concat(F.lit("rating "), rating, F.lit(" outside [1, 5]"))),
        (
            ts_ms.isNull() | ~ts_ms.between(0, 10**14),
            F.concat(F.lit("timestamp "), quoted(ts), F.lit(" is not unix milliseconds")),
        ),
        (  # 1e11 ms is 1973, before any review: seconds, which would land in January 1970
            ts_ms < MIN_MILLISECONDS,
            F.concat(F.lit("timestamp "), quoted(ts), F.lit(" looks like unix seconds, not milliseconds")),
        ),
    )
    ok = reason.isNull()
    extra = F.to_json(
        F.struct(
            F.col("asin"),
            F.col("title").alias("review_title"),
            F.col("text").alias("review_text"),
            F.col("helpful_vote").try_cast("long").alias("helpful_vote"),
            F.lower("verified_purchase").try_cast("boolean").alias("verified_purchase"),
        )
    )
    return lines.select(
        F.lit(dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(ok, trimmed(F.col("user_id"))).alias("user_id"),
        F.when(ok, item).alias("item_id"),
        F.when(ok, to_double(rating)).alias("rating"),
        F.lit(None).cast("int").alias("label"),
        F.lit("review").alias("action"),
        F.when(ok, F.timestamp_millis(ts_ms)).alias("event_ts"),
        F.when(ok, extra).alias("extra"),
        "source_file",
        LINE,
        reason.alias(REASON),
        F.col("value").alias(RAW),
    )


def _strings(col: str) -> Column:
    """A JSON list, read as strings; a value of another type (a plain string, a number, an object, or
    text that only looks like a list) is kept whole as a one-item list, not dropped."""
    value = F.col(col)
    parsed = F.from_json(value, STRINGS)
    return F.when(parsed.isNotNull(), parsed).when(~blank(value), F.array(value))


def _json_list(col: str, sep: str) -> Column:
    """:func:`_strings` joined with ``sep`` (null when absent or empty)."""
    joined = F.array_join(_strings(col), sep)
    return F.when(joined != "", joined)


def parse_meta(lines: DataFrame, dataset: str, logical_date: dt.date) -> DataFrame:
    """Item metadata lines -> bronze.items rows + ``_reason``/``_raw``."""
    item = trimmed(F.col("parent_asin"))
    item_problem = id_problem("parent_asin", F.col("parent_asin"))
    repeated = repeated_keys(F.json_object_keys(F.col("details")))
    ambiguous = F.coalesce(F.size(repeated) > 0, F.lit(False))  # which value is meant is unknown
    reason = first_reason(
        (F.col(CORRUPT).isNotNull() | _not_object(F.col("value")), "malformed JSON"),
        (F.col(RECORD_PROBLEM).isNotNull(), F.col(RECORD_PROBLEM)),
        (item_problem.isNotNull(), item_problem),
        (ambiguous, F.concat(F.lit("repeated keys in details: "), F.array_join(repeated, ", "))),
    )
    ok = reason.isNull()
    base = str_map(
        [
            ("main_category", F.col("main_category")),
            ("store", F.col("store")),
            ("features", _json_list("features", "; ")),
            ("description", _json_list("description", " ")),
        ]
    )
    # Spark refuses a map with a repeated key for the whole job: such a line is quarantined above.
    parsed = F.from_json(F.when(~ambiguous, F.col("details")), T.MapType(T.StringType(), T.StringType()))
    details = text_values(
        F.when(  # not an object: its text, kept whole
            parsed.isNull() & ~ambiguous & ~blank(F.col("details")),
            F.create_map(F.lit("details"), F.col("details")),
        ).otherwise(
            F.map_filter(
                F.coalesce(parsed, F.create_map().cast("map<string,string>")),
                lambda k, _v: ~F.array_contains(F.map_keys(base), k),  # the field's own value wins
            )
        )
    )
    images = F.coalesce(F.from_json(F.col("images"), IMAGE), F.array().cast(IMAGE))
    main = F.coalesce(F.get(F.filter(images, lambda x: x["variant"] == "MAIN"), 0), F.get(images, 0))
    categories = _strings("categories")
    return lines.select(
        F.lit(dataset).alias("dataset"),
        F.lit(logical_date).alias("logical_date"),
        F.when(ok, item).alias("item_id"),
        F.when(~blank(F.col("title")), trimmed(F.col("title"))).alias("title"),
        text_list(categories).alias("categories"),
        F.map_concat(base, details).alias("attributes"),
        F.lit(None).cast("string").alias("image_path"),
        F.coalesce(main["hi_res"], main["large"]).alias("image_url"),
        F.to_json(
            F.struct(
                to_double(F.col("average_rating")).alias("average_rating"),
                F.col("rating_number").try_cast("long").alias("rating_number"),
                F.col("price"),
            )
        ).alias("extra"),
        "source_file",
        LINE,
        reason.alias(REASON),
        F.col("value").alias(RAW),
    )


def import_amazon(
    spark: SparkSession, lake: Lake, config: AmazonImportConfig, logical_date: dt.date
) -> ImportReport:
    """Import reviews (and metadata) into bronze for ``logical_date``; reruns replace the partition."""
    ds = config.dataset
    review_lines = read_json_lines(spark, config.reviews, REVIEW_FIELDS, ids=("user_id", "parent_asin"))
    reviews = flag_duplicate_events(parse_reviews(review_lines, ds, logical_date))
    parsed = [Parsed(config.reviews, BRONZE_INTERACTIONS.name, reviews, review_lines)]
    if config.meta:
        meta_lines = read_json_lines(spark, config.meta, META_FIELDS, ids=("parent_asin",))
        meta = flag_duplicates(parse_meta(meta_lines, ds, logical_date), ["item_id"], "parent_asin")
        parsed.append(Parsed(config.meta, BRONZE_ITEMS.name, meta, meta_lines))
    tables = (BRONZE_INTERACTIONS.name, BRONZE_ITEMS.name)  # a rerun without --meta empties the items
    return write_bronze(lake, ds, logical_date, parsed, ImportReport(ds, logical_date), tables=tables)

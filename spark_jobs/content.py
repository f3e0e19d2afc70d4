"""Content job: silver items/users -> gold item documents and user profile features.

* ``gold.item_documents``: one text document per item, the text-modality input of the encoders
  (Sec. 3.2.1: "title, category, brand..." for Amazon; title, genres, plot, director, actors for
  MovieLens). It is ``Label: value`` lines: title, categories, then the item's text attributes in
  ``field_order`` (unlisted ones after, alphabetically), minus ``exclude_fields``; each value cut
  to ``max_field_chars``. ``document_hash`` (SHA-256) lets the embedding job skip unchanged items.
  The image reference (``image_path`` / ``image_url``) rides along for the image encoder.
* ``gold.user_profiles``: bucketed age, gender, occupation and every profile attribute as a
  ``name=value`` token (ages bucketed, zip codes cut to their ``zip_prefix_len``-digit region).

Both are recomputed for the whole dataset and replace its partition, so a rerun is idempotent.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from pydantic import Field, field_validator
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from hisam_core.config import Config
from spark_jobs.lake import Lake
from spark_jobs.tables import GOLD_ITEM_DOCUMENTS, GOLD_USER_PROFILES, SILVER_ITEMS, SILVER_USERS

logger = logging.getLogger(__name__)


class ContentConfig(Config):
    """How documents and profile features are built."""

    #: Attribute order in the document (after title and categories); others follow alphabetically.
    field_order: list[str] = Field(
        default_factory=lambda: [
            "genre",
            "main_category",
            "director",
            "writer",
            "actors",
            "rated",
            "release_date",
            "store",
            "features",
            "description",
            "plot",
        ]
    )
    #: Attributes left out of the document (identifiers, URLs, empty MovieLens fields...).
    exclude_fields: list[str] = Field(default_factory=lambda: ["video_release_date", "imdb_url"])
    #: Label per attribute; default: ``release_date`` -> ``Release date``.
    field_labels: dict[str, str] = Field(default_factory=lambda: {"categories": "Genres"})
    max_field_chars: int = Field(2000, ge=16)
    #: Lower bounds of the age buckets after the first ("<18"): 18-24, 25-34, ..., 56+ (MovieLens-1M).
    age_buckets: list[int] = Field(default_factory=lambda: [18, 25, 35, 45, 50, 56])
    zip_prefix_len: int = Field(1, ge=0)

    @field_validator("age_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"age_buckets must be a non-empty increasing list, got {v}")
        return v


def _label(name: str, config: ContentConfig) -> str:
    return config.field_labels.get(name, name.replace("_", " ").capitalize())


def one_line(text: Column) -> Column:
    """``text`` trimmed, its line breaks as spaces: a value cannot start a line of its own, which
    would read as another field ("...\\n\\nDirector: Nobody")."""
    return F.trim(F.regexp_replace(text, r"\s*[\r\n]+\s*", " "))


def item_documents(items: DataFrame, config: ContentConfig) -> DataFrame:
    """silver.items rows -> gold.item_documents rows (one per item)."""
    order = (  # field names match whatever their case ("Genre" is "genre")
        F.array(*[F.lit(f.lower()) for f in config.field_order])
        if config.field_order
        else F.array().cast("array<string>")
    )
    excluded = F.array(*[F.lit(f.lower()) for f in config.exclude_fields]) if config.exclude_fields else None
    entries = F.map_entries(F.coalesce(F.col("attributes"), F.create_map().cast("map<string,string>")))
    if excluded is not None:
        entries = F.filter(entries, lambda e: ~F.array_contains(excluded, F.lower(e["key"])))
    labels = (
        F.create_map(*[c for k, v in config.field_labels.items() for c in (F.lit(k), F.lit(v))])
        if config.field_labels
        else None
    )

    def label_of(key: Column) -> Column:
        default = F.concat(
            F.upper(F.substring(key, 1, 1)), F.regexp_replace(F.substring(key, 2, 10_000), "_", " ")
        )
        return F.coalesce(F.try_element_at(labels, key), default) if labels is not None else default

    # sort key: position in field_order (unlisted: after all listed), then the name
    ranked = F.transform(
        entries,
        lambda e: F.struct(
            F.when(F.array_position(order, F.lower(e["key"])) > 0, F.array_position(order, F.lower(e["key"])))
            .otherwise(F.lit(10**6))
            .alias("rank"),
            e["key"].alias("key"),
            one_line(e["value"]).alias("value"),
        ),
    )
    attr_lines = F.transform(
        F.array_sort(F.filter(ranked, lambda e: e["value"] != "")),
        lambda e: F.concat(
            label_of(e["key"]), F.lit(": "), F.substring(e["value"], 1, config.max_field_chars)
        ),
    )
    categories = F.filter(
        F.transform(F.coalesce("categories", F.array().cast("array<string>")), one_line), lambda c: c != ""
    )
    head = F.array_compact(
        F.array(
            F.when(
                one_line(F.col("title")) != "",
                F.concat(F.lit(f"{_label('title', config)}: "), one_line(F.col("title"))),
            ),
            F.when(
                F.size(categories) > 0,
                F.concat(F.lit(f"{_label('categories', config)}: "), F.array_join(categories, ", ")),
            ),
        )
    )
    lines = F.concat(head, attr_lines)
    document = F.array_join(lines, "\n")
    return items.select(
        "dataset",
        "item_id",
        document.alias("document"),
        F.sha2(document, 256).alias("document_hash"),
        "image_path",
        "image_url",
        F.size(lines).cast("int").alias("num_text_fields"),
    )


#: The oldest age a profile may give (past it, the value is an error, not a bucket).
MAX_AGE = 130


def age_bucket(age: Column, bounds: list[int]) -> Column:
    """``"<18"``, ``"18-24"``, ..., ``"56+"`` for an age string (null when not a number, or not an
    age: NaN, infinite, negative or over :data:`MAX_AGE`)."""
    value = F.trim(age).try_cast("double")
    expr = F.when(value < bounds[0], F.lit(f"<{bounds[0]}"))
    for low, high in itertools.pairwise(bounds):
        expr = expr.when(value < high, F.lit(f"{low}-{high - 1}"))
    plausible = value.isNotNull() & ~F.isnan(value) & value.between(0, MAX_AGE)
    return F.when(plausible, expr.otherwise(F.lit(f"{bounds[-1]}+")))


def user_profiles(users: DataFrame, config: ContentConfig) -> DataFrame:
    """silver.users rows -> gold.user_profiles rows."""
    attrs = F.coalesce(F.col("attributes"), F.create_map().cast("map<string,string>"))
    own = lambda key: F.try_element_at(attrs, F.lit(key))  # noqa: E731
    # derived from age and zip_code; else the source's own age_bucket / zip_region, if it has them
    bucket = F.coalesce(age_bucket(own("age"), config.age_buckets), own("age_bucket"))
    zip_region = F.coalesce(
        F.substring(F.trim(own("zip_code")), 1, config.zip_prefix_len)
        if config.zip_prefix_len
        else F.lit(None),
        own("zip_region"),
    )
    derived = F.map_filter(
        F.create_map(F.lit("age_bucket"), bucket, F.lit("zip_region"), zip_region.cast("string")),
        lambda _k, v: v.isNotNull() & (v != ""),
    )
    rewritten = F.map_concat(
        F.map_filter(attrs, lambda k, _v: ~k.isin("age", "zip_code", "age_bucket", "zip_region")), derived
    )
    tokens = F.array_sort(
        F.transform(
            F.filter(F.map_entries(rewritten), lambda e: e["value"].isNotNull() & (F.trim(e["value"]) != "")),
            lambda e: F.concat(e["key"], F.lit("="), F.lower(F.trim(e["value"]))),
        )
    )
    clean = lambda c: F.when(F.trim(c) != "", F.lower(F.trim(c)))  # noqa: E731
    return users.select(
        "dataset",
        "user_id",
        bucket.alias("age_bucket"),
        clean(own("gender")).alias("gender"),
        clean(own("occupation")).alias("occupation"),
        tokens.alias("profile_tokens"),
    )


@dataclass(frozen=True)
class ContentReport:
    dataset: str
    items: int
    users: int
    items_without_text: int
    versions: dict[str, int]


def build_content(lake: Lake, dataset: str, config: ContentConfig | None = None) -> ContentReport:
    """Rebuild the gold content tables of ``dataset`` from silver; returns counts and versions."""
    config = config or ContentConfig()
    part = {"dataset": dataset}
    docs = item_documents(lake.read(SILVER_ITEMS, partitions=part), config).cache()
    profiles = user_profiles(lake.read(SILVER_USERS, partitions=part), config).cache()
    try:
        stats = docs.agg(
            F.count(F.lit(1)).alias("n"), F.sum((F.col("num_text_fields") == 0).cast("int")).alias("empty")
        ).first()
        n_users = profiles.count()
        versions = {
            GOLD_ITEM_DOCUMENTS.name: lake.write(
                docs, GOLD_ITEM_DOCUMENTS, mode="replace_partition", partition_values=part
            ),
            GOLD_USER_PROFILES.name: lake.write(
                profiles, GOLD_USER_PROFILES, mode="replace_partition", partition_values=part
            ),
        }
    finally:
        docs.unpersist()
        profiles.unpersist()
    report = ContentReport(dataset, int(stats["n"]), n_users, int(stats["empty"] or 0), versions)
    if report.items_without_text:
        logger.warning(
            "%s: %d items have no text at all (empty document)", dataset, report.items_without_text
        )
    logger.info(
        "content %s: %d item documents, %d user profiles, versions %s",
        dataset,
        report.items,
        n_users,
        versions,
    )
    return report

"""Every lake table, declared once: name, Spark schema, partition columns, merge keys.

The lake has three layers (medallion layout) under one root, one directory per table
(``<root>/<layer>/<name>``):

* **bronze**: raw records as imported, one partition per ``(dataset, logical_date)`` import run, ids
  still the source's strings. Rejected input lines land in ``bronze.quarantine`` with a reason.
* **silver**: cleaned and deduplicated, ids mapped to int64 (:func:`stable_id`), labels derived
  (rating > 3 is positive, Sec. 4.1 of the paper). Upserted (MERGE) on the table's keys.
* **gold**: model-ready tables: item content documents, user profile features, item embeddings per
  modality and encoder, semantic IDs per tokenizer version, user sequences, train/test samples.

Every table carries a ``dataset`` column (``movielens-100k``, ``amazon-movies``, ``synthetic``...) and
is partitioned by it first, so several catalogues share one lake. Jobs name tables by the constants
here (``tables.SILVER_INTERACTIONS``) or by their string names (``"silver.interactions"``).

Schema evolution: a change here is a change of contract. Nullable columns added at the end are
added to an existing table by its next write, and read as null from older rows and versions; anything
else needs a migration of the existing Delta tables (the lake refuses to read or write a table whose
stored columns differ otherwise, a column stored with another type included).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql import types as T

_NAME = re.compile(r"^(bronze|silver|gold)\.[a-z][a-z0-9_]*$")
#: A dataset name, a tokenizer version or a registered model name. A dataset is the first partition
#: value of every table, so never empty (Delta stores an empty partition value as null, and a null in
#: the NOT NULL ``dataset`` column breaks every later read); datasets and versions are folder names
#: under ``$HISAM_HOME``, so they start with a letter or digit (never ``..``); all three go into MLflow
#: filter strings, where a quote would break or retarget the query.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_COLUMN = re.compile(r"^[a-z][a-z0-9_]*$")


class SchemaDriftError(ValueError):
    """A DataFrame's columns or types differ from the table's declared schema."""


def type_name(dtype: T.DataType) -> str:
    """Type without nullability (``simpleString`` ignores it): ``array<float>``, ``map<string,string>``."""
    return dtype.simpleString()


@dataclass(frozen=True)
class TableSpec:
    """Declaration of one Delta table.

    ``keys`` identify a row (MERGE condition, uniqueness checks); ``partition_by`` are physical
    partition columns, always a subset of the schema. Columns in ``keys`` are declared NOT NULL.
    """

    name: str
    schema: T.StructType
    partition_by: tuple[str, ...]
    keys: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r} must look like '<bronze|silver|gold>.<snake_case>'")
        names = self.schema.fieldNames()
        bad = [c for c in names if not _COLUMN.match(c)]
        if bad:
            raise ValueError(f"table {self.name}: column names must be snake_case identifiers, got {bad}")
        for what, cols in (("partition_by", self.partition_by), ("keys", self.keys)):
            missing = [c for c in cols if c not in names]
            if missing:
                raise ValueError(f"table {self.name}: {what} columns {missing} are not in the schema")
        nullable_keys = [c for c in self.keys if self.schema[c].nullable]
        if nullable_keys:
            raise ValueError(f"table {self.name}: key columns {nullable_keys} must be declared NOT NULL")

    @property
    def layer(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def short_name(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def relative_path(self) -> str:
        """Directory of the table below the lake root: ``<layer>/<name>``."""
        return f"{self.layer}/{self.short_name}"

    @property
    def columns(self) -> list[str]:
        return self.schema.fieldNames()

    def added_since(self, stored: T.StructType, columns: Sequence[str] | None = None) -> list[str]:
        """Of ``columns`` (default: every declared one), those a stored version of the table lacks:
        declared since it was written, they read as null (schema evolution, module docstring). A NOT
        NULL one it lacks, or one it stores with another type, is a :class:`SchemaDriftError`: the
        table needs a migration."""
        wanted = self.columns if columns is None else columns
        kept = {f.name: f.dataType for f in stored.fields}
        retyped = [
            f"{c} (stored {type_name(kept[c])}, declared {type_name(self.schema[c].dataType)})"
            for c in wanted
            if c in kept and c in self.columns and type_name(kept[c]) != type_name(self.schema[c].dataType)
        ]
        if retyped:
            raise SchemaDriftError(
                f"{self.name}: the stored table has columns of another type: {', '.join(retyped)}: migrate it"
            )
        missing = [c for c in wanted if c not in kept]
        required = [c for c in missing if c in self.columns and not self.schema[c].nullable]
        if required:
            raise SchemaDriftError(
                f"{self.name}: the stored table lacks the declared NOT NULL columns {required}: migrate it"
            )
        return missing

    @property
    def data_columns(self) -> list[str]:
        """Columns stored inside the Parquet files (partition columns live in the Delta log)."""
        return [c for c in self.columns if c not in self.partition_by]


TABLES: dict[str, TableSpec] = {}


def _register(spec: TableSpec) -> TableSpec:
    if spec.name in TABLES:
        raise ValueError(f"table {spec.name} declared twice")
    TABLES[spec.name] = spec
    return spec


def get_table(table: str | TableSpec) -> TableSpec:
    """The declaration of ``table`` (a name such as ``"silver.items"`` or a spec)."""
    if isinstance(table, TableSpec):
        return table
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown lake table {table!r}; declared tables: {sorted(TABLES)}") from None


def _f(name: str, dtype: T.DataType, nullable: bool = True) -> T.StructField:
    return T.StructField(name, dtype, nullable)


STR = T.StringType()
LONG = T.LongType()
INT = T.IntegerType()
DOUBLE = T.DoubleType()
DATE = T.DateType()
TS = T.TimestampType()
STR_MAP = T.MapType(STR, STR, valueContainsNull=True)
STR_ARRAY = T.ArrayType(STR, containsNull=True)

# ---------------------------------------------------------------------------------------------
# bronze: raw records of one import run, source ids as strings
# ---------------------------------------------------------------------------------------------

BRONZE_INTERACTIONS = _register(
    TableSpec(
        name="bronze.interactions",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("logical_date", DATE, False),
                _f("user_id", STR, False),  # the source's id, e.g. "196" or "AGBFYI2DDIKXC5Y4FARTYDTQBMFQ"
                _f("item_id", STR, False),  # e.g. "242" or a parent_asin
                _f("rating", DOUBLE),  # explicit feedback when the source has it
                _f("label", INT),  # implicit/binary feedback when the source has it (0/1)
                _f("action", STR),  # e.g. "rating", "review", "click"
                _f("event_ts", TS, False),  # UTC
                _f("extra", STR),  # JSON object of source-specific fields (review text, votes...)
                _f("source_file", STR),
            ]
        ),
        partition_by=("dataset", "logical_date"),
        keys=("dataset", "logical_date", "user_id", "item_id", "event_ts"),
        description="Raw interaction events of one import run (logical_date), ids as in the source.",
    )
)

BRONZE_ITEMS = _register(
    TableSpec(
        name="bronze.items",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("logical_date", DATE, False),
                _f("item_id", STR, False),
                _f("title", STR),
                _f("categories", STR_ARRAY),  # genres / category path
                _f("attributes", STR_MAP),  # text attributes: plot, director, description, features...
                _f("image_path", STR),  # local or distributed-FS path of the item image, if any
                _f("image_url", STR),  # remote image URL, if any (not downloaded)
                _f("extra", STR),  # JSON object of non-text source fields (urls, ids, prices...)
                _f("source_file", STR),
            ]
        ),
        partition_by=("dataset", "logical_date"),
        keys=("dataset", "logical_date", "item_id"),
        description="Raw item catalogue of one import run.",
    )
)

BRONZE_USERS = _register(
    TableSpec(
        name="bronze.users",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("logical_date", DATE, False),
                _f("user_id", STR, False),
                _f("attributes", STR_MAP),  # profile columns: age, gender, occupation, zip_code...
                _f("source_file", STR),
            ]
        ),
        partition_by=("dataset", "logical_date"),
        keys=("dataset", "logical_date", "user_id"),
        description="Raw user profiles of one import run.",
    )
)

#: ``to_json``'s timestamps to the microsecond, the lake's precision (Spark's default keeps milliseconds)
JSON_OPTIONS = {
    "timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX",
    "timestampNTZFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSS",  # a column without a time zone
}


def row_json(*columns: str | Column) -> Column:
    """A row as JSON, as ``bronze.quarantine.raw`` holds it: timestamps to the microsecond (in the
    session's time zone, UTC), so a quarantined event keeps its exact time."""
    return F.to_json(F.struct(*columns), JSON_OPTIONS)


BRONZE_QUARANTINE = _register(
    TableSpec(
        name="bronze.quarantine",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("target_table", STR, False),  # the table the record was meant for
                _f("logical_date", DATE, False),
                _f("reason", STR, False),
                _f("raw", STR),  # the raw line, or the row as JSON
                _f("source_file", STR),
            ]
        ),
        partition_by=("dataset", "target_table", "logical_date"),
        keys=(),
        description="Rejected records with the reason; in = imported + quarantined for every run.",
    )
)

# ---------------------------------------------------------------------------------------------
# silver: cleaned, deduplicated, int64 ids, labels
# ---------------------------------------------------------------------------------------------

SILVER_INTERACTIONS = _register(
    TableSpec(
        name="silver.interactions",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("user_id", LONG, False),  # stable_id(user_key)
                _f("item_id", LONG, False),  # stable_id(item_key)
                _f("event_ts", TS, False),
                _f("user_key", STR, False),  # the source's id
                _f("item_key", STR, False),
                _f("rating", DOUBLE),
                _f("label", INT, False),  # 1 positive, 0 negative (rating > threshold, Sec. 4.1)
                _f("action", STR),
                _f("logical_date", DATE, False),  # import run the row last came from
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "user_id", "item_id", "event_ts"),
        description="Deduplicated interactions with int64 ids and binary labels.",
    )
)

SILVER_ITEMS = _register(
    TableSpec(
        name="silver.items",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("item_id", LONG, False),
                _f("item_key", STR, False),
                _f("title", STR),
                _f("categories", STR_ARRAY),
                _f("attributes", STR_MAP),
                _f("image_path", STR),
                _f("image_url", STR),
                _f("logical_date", DATE, False),
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "item_id"),
        description="Latest version of every item, int64 ids.",
    )
)

SILVER_USERS = _register(
    TableSpec(
        name="silver.users",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("user_id", LONG, False),
                _f("user_key", STR, False),
                _f("attributes", STR_MAP),
                _f("logical_date", DATE, False),
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "user_id"),
        description="Latest profile of every user, int64 ids.",
    )
)

# ---------------------------------------------------------------------------------------------
# gold: model-ready tables
# ---------------------------------------------------------------------------------------------

GOLD_ITEM_DOCUMENTS = _register(
    TableSpec(
        name="gold.item_documents",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("item_id", LONG, False),
                _f("document", STR, False),  # "Title: ... Genres: ... Plot: ..." (text modality input)
                _f("document_hash", STR, False),  # sha2-256 of document; a change re-embeds the item
                _f("image_path", STR),  # image modality input
                _f("image_url", STR),
                _f("num_text_fields", INT, False),
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "item_id"),
        description="One text document and image reference per item (inputs of the modality encoders).",
    )
)

GOLD_USER_PROFILES = _register(
    TableSpec(
        name="gold.user_profiles",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("user_id", LONG, False),
                _f("age_bucket", STR),  # "<18", "18-24", ..., "56+"
                _f("gender", STR),
                _f("occupation", STR),
                _f("profile_tokens", STR_ARRAY),  # every profile feature as "name=value", sorted
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "user_id"),
        description="Categorical profile features per user.",
    )
)

GOLD_ITEM_EMBEDDINGS = _register(
    TableSpec(
        name="gold.item_embeddings",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("modality", STR, False),  # "text", "image", "behavior" (hisam_core.features.MODALITIES)
                _f("encoder", STR, False),  # encoder name, e.g. "all-MiniLM-L6-v2"
                _f("encoder_version", STR, False),
                _f("item_id", LONG, False),
                _f("dim", INT, False),
                _f("embedding", T.ArrayType(T.FloatType(), containsNull=False), False),
                _f("present", T.BooleanType(), False),  # False: the encoder had no input (fallback row)
                _f("input_hash", STR, False),  # of the input (document, image path + bytes) and settings
                # text, image: digest of the encoder settings the row was computed with
                # (EncoderSpec.fingerprint): readers take the configured one's rows only, so a
                # re-embed under new settings and the same version never mixes two spaces. Null:
                # written before the column (the next embed records it where input_hash proves it),
                # and every behaviour row (one commit per training: never two spaces).
                _f("fingerprint", STR),
            ]
        ),
        partition_by=("dataset", "modality"),
        keys=("dataset", "modality", "encoder", "encoder_version", "item_id"),
        description="Raw item embeddings per modality and encoder version (inputs of DST, Sec. 3.1).",
    )
)

GOLD_BEHAVIOUR_CUTS = _register(
    TableSpec(
        name="gold.behaviour_cuts",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("input_hash", STR, False),  # of the behaviour rows of gold.item_embeddings it produced
                _f("encoder", STR, False),
                _f("encoder_version", STR, False),
                _f(
                    "cut_seconds", LONG, False
                ),  # it saw every interaction before this unix second, none after
                _f("logical_date", DATE, False),  # the embed run that trained it
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "input_hash"),
        description="Where each trained behaviour encoder was cut (App. B.2): tokenizers trained on its "
        "rows never have their samples cut earlier.",
    )
)

GOLD_SEMANTIC_IDS = _register(
    TableSpec(
        name="gold.semantic_ids",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("tokenizer_version", STR, False),
                _f("item_id", LONG, False),
                _f("semantic_ids", T.ArrayType(LONG, containsNull=False), False),
                _f("codebook_size", INT, False),
            ]
        ),
        partition_by=("dataset", "tokenizer_version"),
        keys=("dataset", "tokenizer_version", "item_id"),
        description="hisam_core.semantic_ids.SemanticIds.to_frame() per tokenizer version (Sec. 3.2.2).",
    )
)

GOLD_USER_SEQUENCES = _register(
    TableSpec(
        name="gold.user_sequences",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("user_id", LONG, False),
                _f("item_ids", T.ArrayType(LONG, containsNull=False), False),  # chronological
                _f("labels", T.ArrayType(INT, containsNull=False), False),
                _f("ratings", T.ArrayType(DOUBLE, containsNull=True)),
                _f("timestamps", T.ArrayType(LONG, containsNull=False), False),  # unix seconds, rounded down
                _f("length", INT, False),
            ]
        ),
        partition_by=("dataset",),
        keys=("dataset", "user_id"),
        description="Chronological interaction sequence per user (built by spark_jobs.sequences): every "
        "labelled interaction, also of items the samples' tokenizer version has no IDs for (not per version).",
    )
)

GOLD_SAMPLES = _register(
    TableSpec(
        name="gold.samples",
        schema=T.StructType(
            [
                _f("dataset", STR, False),
                _f("split", STR, False),  # "train" | "test": global chronological 90/10 cut (Sec. 4.1)
                _f("user_id", LONG, False),
                _f("item_id", LONG, False),
                _f("event_ts", TS, False),
                _f("label", INT, False),
                _f("rating", DOUBLE),
                _f(
                    "history_len", INT, False
                ),  # interactions of earlier instants kept, after the token budget
                _f("is_cold_user", T.BooleanType(), False),  # < 10 training interactions (Sec. 4.1)
                _f("tokenizer_version", STR, False),  # the semantic-ID table the arrays come from
                _f("action", INT),  # the target's action token
                # HMAT inputs (Sec. 3.3): history oldest first, 6 semantic codes per item, flattened
                _f("history_item_ids", T.ArrayType(LONG)),
                _f("history_semantic_ids", T.ArrayType(INT)),
                _f("history_actions", T.ArrayType(INT)),
                _f("target_semantic_ids", T.ArrayType(INT)),
            ]
        ),
        partition_by=("dataset", "tokenizer_version", "split"),
        keys=("dataset", "tokenizer_version", "split", "user_id", "item_id", "event_ts"),
        description="Labelled train/test samples ready for HMAT, per tokenizer version (spark_jobs.sequences).",
    )
)

# ---------------------------------------------------------------------------------------------
# id mapping
# ---------------------------------------------------------------------------------------------

#: Hashed ids live in [2**62, 2**63): disjoint from every decimal id of up to 18 digits (< 10**18).
HASHED_ID_BASE = 1 << 62


def stable_id(key: Column) -> Column:
    """Source id (string) -> int64 id, the same on every run and every machine.

    Canonical decimal ids of 1 to 18 digits (MovieLens; no leading zeros, so ``"7"`` and ``"007"``
    cannot meet) keep their value; any other id (an ASIN, a UUID, ``"007"``) maps to
    ``2**62 + (xxhash64(key) mod 2**62)``, a range no decimal id reaches, so the two kinds never
    collide. Two distinct non-decimal keys collide with probability ~n^2 / 2^63 (negligible below
    billions of ids); silver keeps ``*_key`` beside the id so a collision is detectable.
    """
    numeric = key.rlike(r"^(0|[1-9][0-9]{0,17})$")
    hashed = F.lit(HASHED_ID_BASE) + F.pmod(F.xxhash64(key), F.lit(HASHED_ID_BASE))
    return F.when(numeric, key.try_cast(LONG)).otherwise(hashed).cast(LONG)


def check_dataset(name: str) -> str:
    """``name`` if it is a valid dataset name (:data:`NAME_PATTERN`), else ValueError."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"dataset name must be letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {name!r}"
        )
    return name

"""The quality suites of the lake's boundaries, one builder per boundary.

Each builder reads the batch's schema (which rules apply depends on the columns present) and
returns a :class:`~spark_jobs.quality.rules.QualitySuite`. Reasons (stable strings, used in the
quarantine and in alerts), in the order that decides a row's first reason:

* interactions: ``null_<key>``, ``timestamp_invalid``, ``timestamp_before_floor``, ``timestamp_in_future``,
  ``rating_out_of_range``, ``label_not_binary``, ``missing_rating_and_label``, ``unknown_item``,
  then ``duplicate`` on (dataset, user_id, item_id, event_ts);
* embeddings: ``null_<key>``, ``embedding_null``, ``embedding_wrong_dim``,
  ``embedding_not_finite``, ``duplicate``;
* semantic IDs: ``null_<key>``, ``semantic_ids_null``, ``semantic_ids_wrong_length``,
  ``semantic_ids_out_of_codebook``, ``codebook_size_mismatch``, ``duplicate``;
* samples: ``null_<key>``, ``split_invalid``, ``label_not_binary``, ``sequence_over_budget``,
  ``history_misaligned``, ``target_semantic_ids_null``, ``target_semantic_ids_wrong_length``,
  ``semantic_ids_out_of_codebook``, ``duplicate``; plus the batch-level
  GX check that no test row is earlier than a train row of the same dataset.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from spark_jobs.quality.config import QualityConfig
from spark_jobs.quality.rules import DQ_VALID, GxSpec, QualitySuite, RowRule
from spark_jobs.sequences import TEST, TRAIN, unix_seconds

DQ_EVENT_TIME = "dq_event_time_s"
DQ_AFTER_IMPORT = "dq_seconds_after_import_day"  # > 0: the event is later than the day it was imported
DQ_ITEM_KNOWN = "dq_item_known"
DQ_SEQUENCE_TOKENS = "dq_sequence_tokens"


def _epoch_seconds(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp())


def logical_end_seconds(logical_date: dt.datetime | dt.date | None) -> int:
    """Last second that is not "in the future": the instant itself, or the end of a date (UTC).

    ``None`` means now.
    """
    if logical_date is None:
        return _epoch_seconds(dt.datetime.now(dt.UTC))
    if isinstance(logical_date, dt.datetime):
        return _epoch_seconds(logical_date)
    next_day = dt.datetime.combine(logical_date + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return _epoch_seconds(next_day) - 1


def _not_null_rules(df: DataFrame, keys: list[str]) -> list[RowRule]:
    return [
        RowRule(
            f"null_{k}",
            F.col(k).isNull(),
            GxSpec("ExpectColumnValuesToNotBeNull", {"column": k}, f"null_{k}"),
        )
        for k in keys
        if k in df.columns
    ]


def _require(df: DataFrame, suite: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"suite {suite!r}: the batch lacks columns {missing}; has {df.columns}")


def _with_item_lookup(df: DataFrame, items: DataFrame, item_col: str, dataset_col: str) -> DataFrame:
    """``dq_item_known``: the row's item (within its dataset, when both sides have one) exists; null
    for a row without an item, which its own rule rejects (so GX does not count it as unknown too)."""
    keys = [item_col] + ([dataset_col] if dataset_col in df.columns and dataset_col in items.columns else [])
    _require(items, "items", keys)
    known = items.select(*keys).distinct().withColumn(DQ_ITEM_KNOWN, F.lit(True))
    renamed = known.select(*[F.col(k).alias(f"__item_{k}") for k in keys], DQ_ITEM_KNOWN)
    cond = None
    for k in keys:
        lt, rt = df.schema[k].dataType, renamed.schema[f"__item_{k}"].dataType
        left, right = df[k], renamed[f"__item_{k}"]
        if lt.simpleString() != rt.simpleString():
            left, right = left.cast("string"), right.cast("string")
        cond = (left == right) if cond is None else cond & (left == right)
    joined = df.join(renamed, on=cond, how="left")
    return joined.drop(*[f"__item_{k}" for k in keys]).withColumn(
        DQ_ITEM_KNOWN, F.when(F.col(item_col).isNotNull(), F.coalesce(F.col(DQ_ITEM_KNOWN), F.lit(False)))
    )


def interactions_suite(
    df: DataFrame,
    config: QualityConfig | None = None,
    items: DataFrame | None = None,
    logical_date: dt.datetime | dt.date | None = None,
    name: str = "interactions",
) -> QualitySuite:
    """Interactions: non-null keys, sane timestamps, ratings in range, items that resolve, unique
    (dataset, user, item, timestamp) after dedup. ``items``: the catalogue the item ids must
    resolve in (skipped when None); ``logical_date`` overrides the config's (None: now) as the
    future bound of rows without an import date (``interactions.import_date_col``, or a null one)."""
    cfg = config or QualityConfig()
    r = cfg.interactions
    _require(df, name, [r.user_col, r.item_col, r.timestamp_col])
    keys = [c for c in (r.dataset_col, r.user_col, r.item_col, r.timestamp_col) if c in df.columns]
    floor_s = _epoch_seconds(r.timestamp_floor)
    end_s = logical_end_seconds(logical_date if logical_date is not None else cfg.logical_date)
    t = F.col(DQ_EVENT_TIME)
    rules = _not_null_rules(df, keys)
    rules += [
        RowRule(  # NaN, infinite or out of range: a timestamp that names no instant (a null key)
            "timestamp_invalid", F.col(r.timestamp_col).isNotNull() & t.isNull()
        ),
        RowRule(
            "timestamp_before_floor",
            t < F.lit(floor_s),
            GxSpec(
                "ExpectColumnValuesToBeBetween",
                {"column": DQ_EVENT_TIME, "min_value": floor_s},
                "timestamp_before_floor",
            ),
        ),
        RowRule(
            "timestamp_in_future",
            F.col(DQ_AFTER_IMPORT) > 0,
            GxSpec(
                "ExpectColumnValuesToBeBetween",
                {"column": DQ_AFTER_IMPORT, "max_value": 0},
                "timestamp_in_future",
            ),
        ),
    ]
    feedback: list[Column] = []
    if r.rating_col in df.columns:
        rating = F.col(r.rating_col).cast("double")
        feedback.append(rating)
        rules.append(
            RowRule(
                "rating_out_of_range",
                rating.isNotNull() & (F.isnan(rating) | (rating < r.rating_min) | (rating > r.rating_max)),
                GxSpec(
                    "ExpectColumnValuesToBeBetween",
                    {"column": r.rating_col, "min_value": r.rating_min, "max_value": r.rating_max},
                    "rating_out_of_range",
                ),
            )
        )
    if r.label_col in df.columns:
        label = F.col(r.label_col)
        feedback.append(label)
        rules.append(
            RowRule(
                "label_not_binary",
                label.isNotNull() & ~label.isin(0, 1),  # 0.5 is no label, not 0 (a cast truncates)
                GxSpec(
                    "ExpectColumnValuesToBeInSet",
                    {"column": r.label_col, "value_set": [0, 1]},
                    "label_not_binary",
                ),
            )
        )
    if not feedback:
        raise ValueError(f"suite {name!r}: interactions need a {r.rating_col!r} or a {r.label_col!r} column")
    all_null = feedback[0].isNull()
    for c in feedback[1:]:
        all_null = all_null & c.isNull()
    rules.append(RowRule("missing_rating_and_label", all_null))
    if items is not None:
        rules.append(
            RowRule(
                "unknown_item",
                F.col(r.item_col).isNotNull() & ~F.col(DQ_ITEM_KNOWN),
                GxSpec(
                    "ExpectColumnValuesToBeInSet",
                    {"column": DQ_ITEM_KNOWN, "value_set": [True]},
                    "unknown_item",
                ),
            )
        )

    def prepare(batch: DataFrame) -> DataFrame:
        out = batch.withColumn(DQ_EVENT_TIME, unix_seconds(batch, r.timestamp_col))
        bound = F.lit(end_s)
        if r.import_date_col and r.import_date_col in batch.columns:  # end of the row's import day, UTC
            days = F.datediff(F.col(r.import_date_col), F.lit("1970-01-01").cast("date"))
            bound = F.coalesce(days.cast("long") * 86400 + 86399, bound)  # no import day: the run's
        out = out.withColumn(DQ_AFTER_IMPORT, F.col(DQ_EVENT_TIME) - bound)
        if items is not None:
            out = _with_item_lookup(out, items, r.item_col, r.dataset_col)
        return out

    return QualitySuite(name, rules, dedup_keys=keys, dedup_order=list(r.dedup_order), prepare=prepare)


def _finite(arr: Column) -> Column:
    return ~F.exists(arr, lambda x: x.isNull() | F.isnan(x) | (F.abs(x) == F.lit(float("inf"))))


def embeddings_suite(
    df: DataFrame, config: QualityConfig | None = None, name: str = "item_embeddings"
) -> QualitySuite:
    """Item embeddings: non-null keys, a vector of the declared dimension, no NaN or inf."""
    cfg = config or QualityConfig()
    r = cfg.embeddings
    _require(df, name, [r.embedding_col])
    keys = [k for k in r.key_columns if k in df.columns]
    emb = F.col(r.embedding_col)
    size = F.size(emb)
    wrong = F.lit(False)
    if r.dim_col and r.dim_col in df.columns:
        wrong = wrong | (size != F.col(r.dim_col))
    if r.expected_dims:
        _require(df, name, [r.modality_col])
        pairs = [x for m, d in r.expected_dims.items() for x in (F.lit(m), F.lit(d))]
        expected = F.create_map(*pairs)[F.col(r.modality_col)]
        wrong = wrong | (expected.isNotNull() & (size != expected))
    rules = _not_null_rules(df, keys)
    rules += [
        RowRule(
            "embedding_null",
            emb.isNull(),
            GxSpec("ExpectColumnValuesToNotBeNull", {"column": r.embedding_col}, "embedding_null"),
        ),
        RowRule("embedding_wrong_dim", emb.isNotNull() & wrong),
        RowRule("embedding_not_finite", emb.isNotNull() & ~_finite(emb)),
    ]
    return QualitySuite(name, rules, dedup_keys=keys)


def _in_codebook(arr: Column, k: int) -> Column:
    return ~F.exists(arr, lambda c: c.isNull() | (c < F.lit(0)) | (c >= F.lit(k)))


def semantic_ids_suite(
    df: DataFrame, config: QualityConfig | None = None, name: str = "semantic_ids"
) -> QualitySuite:
    """Semantic IDs: non-null keys, ``num_positions`` codes per item, each inside ``[0, K)``."""
    cfg = config or QualityConfig()
    r = cfg.semantic_ids
    _require(df, name, ["item_id", "semantic_ids"])
    keys = [k for k in r.key_columns if k in df.columns]
    sem = F.col("semantic_ids")
    rules = _not_null_rules(df, keys)
    rules += [
        RowRule(
            "semantic_ids_null",
            sem.isNull(),
            GxSpec("ExpectColumnValuesToNotBeNull", {"column": "semantic_ids"}, "semantic_ids_null"),
        ),
        RowRule("semantic_ids_wrong_length", sem.isNotNull() & (F.size(sem) != r.num_positions)),
        RowRule("semantic_ids_out_of_codebook", sem.isNotNull() & ~_in_codebook(sem, r.codebook_size)),
    ]
    if "codebook_size" in df.columns:
        rules.append(
            RowRule(
                "codebook_size_mismatch",
                F.col("codebook_size") != F.lit(r.codebook_size),
                GxSpec(
                    "ExpectColumnValuesToBeInSet",
                    {"column": "codebook_size", "value_set": [r.codebook_size]},
                    "codebook_size_mismatch",
                ),
            )
        )
    return QualitySuite(name, rules, dedup_keys=keys)


def samples_suite(df: DataFrame, config: QualityConfig | None = None, name: str = "samples") -> QualitySuite:
    """HMAT samples: keys, split and label values, sequence length within the token budget,
    aligned history arrays, codes inside the codebooks, and (batch level) no test row earlier
    than a train row."""
    cfg = config or QualityConfig()
    r, s = cfg.samples, cfg.semantic_ids
    required = ["split", "label", "event_ts", "history_len", "history_item_ids", "history_actions"]
    _require(df, name, [*required, "history_semantic_ids", "target_semantic_ids"])
    keys = [k for k in r.key_columns if k in df.columns]
    per_item = s.num_positions + 2
    target_tokens = per_item if r.count_target_in_budget else 0  # the target takes a whole item's room
    n = F.col("history_len")
    tokens = F.lit(r.profile_tokens + target_tokens) + n * F.lit(per_item)
    misaligned = (  # a null array is misaligned too (size(null) is null, which no rule would flag)
        F.col("history_item_ids").isNull()
        | F.col("history_actions").isNull()
        | F.col("history_semantic_ids").isNull()
        | (F.size("history_item_ids") != n)
        | (F.size("history_actions") != n)
        | (F.size("history_semantic_ids") != n * F.lit(s.num_positions))
    )
    target = F.col("target_semantic_ids")
    target_usable = target.isNotNull() & (F.size(target) == s.num_positions)
    codes_ok = _in_codebook(F.col("history_semantic_ids"), s.codebook_size) & (
        ~target_usable | _in_codebook(target, s.codebook_size)
    )
    rules = _not_null_rules(df, [*keys, "label", "history_len"])
    rules += [
        RowRule(
            "split_invalid",
            ~F.col("split").isin(TRAIN, TEST),
            GxSpec(
                "ExpectColumnValuesToBeInSet",
                {"column": "split", "value_set": [TRAIN, TEST]},
                "split_invalid",
            ),
        ),
        RowRule(
            "label_not_binary",
            ~F.col("label").isin(0, 1),
            GxSpec(
                "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [0, 1]}, "label_not_binary"
            ),
        ),
        RowRule(
            "sequence_over_budget",
            F.col(DQ_SEQUENCE_TOKENS) > F.lit(r.token_budget),
            GxSpec(
                "ExpectColumnValuesToBeBetween",
                {"column": DQ_SEQUENCE_TOKENS, "max_value": r.token_budget},  # no floor: as the rule
                "sequence_over_budget",
            ),
        ),
        RowRule("history_misaligned", misaligned),
        RowRule("target_semantic_ids_null", target.isNull()),
        RowRule("target_semantic_ids_wrong_length", target.isNotNull() & ~target_usable),
        RowRule("semantic_ids_out_of_codebook", ~codes_ok),
    ]
    # over the rows that pass the row-level rules (the ones that go downstream)
    has_ds = "dataset" in df.columns
    if has_ds:
        query = (
            "SELECT t.* FROM {batch} t JOIN (SELECT dataset, max(event_ts) AS last_train FROM {batch} "
            f"WHERE split = '{TRAIN}' AND {DQ_VALID} GROUP BY dataset) m ON t.dataset = m.dataset "
            f"WHERE t.split = '{TEST}' AND t.{DQ_VALID} AND t.event_ts <= m.last_train"
        )
    else:
        query = (
            f"SELECT * FROM {{batch}} WHERE split = '{TEST}' AND {DQ_VALID} AND event_ts <= "
            f"(SELECT max(event_ts) FROM {{batch}} WHERE split = '{TRAIN}' AND {DQ_VALID})"
        )
    chronology = GxSpec(
        "UnexpectedRowsExpectation",
        {
            "unexpected_rows_query": query,
            "description": "every test sample is later than every train sample (ties go to test)",
        },
        "test_before_train",
        tolerant=False,
    )

    def prepare(batch: DataFrame) -> DataFrame:
        return batch.withColumn(DQ_SEQUENCE_TOKENS, tokens)

    return QualitySuite(
        name,
        rules,
        dedup_keys=keys,
        prepare=prepare,
        expectations=[chronology],
        extra_columns=["split", "event_ts"] + (["dataset"] if has_ds else []),
    )

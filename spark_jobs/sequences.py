"""Silver interactions -> HMAT training samples (Sec. 3.3 sequence layout, Sec. 4.1 protocol).

Every function here is DataFrame in / DataFrame out; the only values brought to the driver are a
handful of aggregate scalars (counts, the split cut), so the job runs unchanged on a laptop and a
cluster. Column names follow :mod:`spark_jobs.tables` (``silver.interactions`` in,
``gold.user_sequences`` and ``gold.samples`` out).

Protocol, as implemented:

* **Labels (Sec. 4.1).** ``label`` is the explicit label column when present and non-null, else
  ``rating > positive_rating_threshold`` (3: rating > 3 is positive, everything else negative).
  Rows with neither are quarantined (reason ``no_label``) before the split, as are rows without a
  user, item or timestamp (``null_key``); these rows are quarantined with their input values, as
  are rows quarantined later for their item (``unknown_item``).
* **Actions (Sec. 3.3).** The action token of an interaction is its label by default
  (``action_source="label"``: MovieLens and Amazon only have ratings). With
  ``action_source="column"`` it is the ``action`` column: integers as they are, strings through
  ``action_vocab`` (index in the list); unmapped strings are quarantined (``unknown_action``).
* **Global chronological split (Sec. 4.1).** Order all interactions by timestamp. With ``N`` rows
  and ``k = floor(train_fraction * N)``, the *cut* is the timestamp of the row of 0-based rank
  ``k`` in that order, computed exactly and distributed (an approximate quantile brackets it, a
  per-timestamp count inside the bracket pins it, see :func:`compute_cut`). ``train`` is every row
  with ``timestamp < cut``, ``test`` every row with ``timestamp >= cut``.
  **Tie rule:** all interactions sharing the cut timestamp go to *test*. A single instant is never
  split across train and test, every test row is strictly later than every train row, and the
  train part has at most ``k`` rows (exactly ``k`` when no other row shares the cut instant), unless
  the floor raised the cut.
  **Floor:** with ``cut_not_before`` (unix seconds) the cut is never earlier than that instant: the
  behaviour encoder of the tokenizer whose samples these are trained on every interaction before it
  (App. B.2), so none of those may be test rows. The cut only moves backward when older rows arrive
  after the tokenizer was trained (a late historical import); then the cut is raised and
  ``SplitCut.raised_from`` keeps the quantile cut.
* **Cold start (Sec. 4.1).** A user is cold when they have fewer than ``cold_start_threshold`` (10)
  *training* interactions; ``is_cold_user`` is set on all of that user's samples, train and test.
* **Per-user order.** Interactions of a user are ordered by (timestamp, item_id, label, action);
  ``seq_pos`` is the 0-based ``row_number`` in that order.
* **History.** A sample's history is the user's interactions of earlier instants (timestamps
  strictly before its own: events of one instant never see each other, nor each other's labels),
  truncated to the ``max_history_items`` most recent ones (arrays are oldest first). With
  ``test_history="all_earlier"`` (default: the offline protocol) a test sample sees every earlier
  interaction of its user, train *and* earlier test ones, since they happened before the
  prediction instant; with ``"train_only"`` it sees only the user's most recent train items. A
  train sample's history never holds a test row (every test row is later). These arrays are for
  consumers of ``gold.samples``; the HMAT steps build their streams from the rows themselves.
* **Token budget (Sec. 3.3).** ``profile_tokens + items * (6 semantic + anchor + action) <= 300``.
  With ``count_target_in_budget`` (default) the target counts as a whole item too (6 semantic +
  anchor + the action it predicts, as the last item of a training window), so a history holds
  ``floor((budget - profile) / 8) - 1`` items, the context a served candidate gets (the rule of
  ``hisam_core.ranker.sequence.SequenceBuilder.max_items``: 36 items for MovieLens' 4 profile
  tokens); without it the history alone may take ``floor((budget - profile) / 8)`` items.
* **Semantic IDs.** Joined from one named tokenizer version of ``gold.semantic_ids``
  (``item_id``, ``semantic_ids``: 6 codes in ``[0, K)``, ``tokenizer_version``). The split and
  the cold flag are properties of the interactions and are computed *before* this join, so they
  do not depend on the tokenizer's codes (only on its behaviour cut, through the floor).
  Interactions whose item has no semantic IDs in that version are quarantined (``unknown_item``)
  and appear in no sample, neither as target nor in any history.
  Codes stay raw (not position-offset; the model applies ``SemanticIds.tokens`` offsets).
  ``history_semantic_ids`` is flat: 6 codes per history item, oldest item first.

Counts reconcile: ``input rows = samples + quarantined`` (:meth:`SequenceResult.counts`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pydantic import Field, model_validator
from pyspark.sql import Column, DataFrame, Window, WindowSpec
from pyspark.sql import functions as F
from pyspark.sql import types as T

from hisam_core.config import Config
from hisam_core.evaluation.protocol import cut_rank
from spark_jobs.tables import GOLD_SAMPLES, GOLD_USER_SEQUENCES

logger = logging.getLogger(__name__)

TRAIN = "train"
TEST = "test"
#: Quarantine reasons written by this job.
REASON_NULL_KEY = "null_key"
REASON_NO_LABEL = "no_label"
REASON_UNKNOWN_ACTION = "unknown_action"
REASON_UNKNOWN_ITEM = "unknown_item"

_KEY = "_ts_key"  # internal: the timestamp as a sortable long
_RAW = "_raw_"  # internal: the input's label and action, which add_labels replaces, for the quarantine
_SECONDS_PER_KEY = {"s": 1.0, "us": 1e-6, "days": 86_400.0}
_MAX_SECONDS = 9.2e12  # fractional seconds whose micros fit a long


class SequenceConfig(Config):
    """Settings of the sequence job (Sec. 3.3 layout, Sec. 4.1 protocol)."""

    dataset: str | None = Field(
        default=None, description="keep only this dataset (and stamp it on inputs without the column)"
    )
    dataset_col: str = "dataset"
    user_col: str = "user_id"
    item_col: str = "item_id"
    timestamp_col: str = "event_ts"
    rating_col: str = "rating"
    label_col: str = "label"
    action_col: str = "action"
    positive_rating_threshold: float = 3.0
    action_source: Literal["label", "column"] = "label"
    action_vocab: list[str] | None = Field(default=None, description="string actions -> token index")
    train_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    cut_method: Literal["exact", "approx"] = "exact"
    quantile_accuracy: int = Field(default=10_000, ge=100)
    cold_start_threshold: int = Field(default=10, ge=1)
    token_budget: int = Field(default=300, ge=1)
    profile_tokens: int = Field(
        default=4, ge=0, description="gold.user_profiles: age_bucket, gender, occupation, zip_region"
    )
    num_semantic_positions: int = Field(default=6, ge=1)
    count_target_in_budget: bool = True
    test_history: Literal["all_earlier", "train_only"] = "all_earlier"
    cut_not_before: float | None = Field(
        default=None,
        description="unix seconds: the split cut is never earlier (the tokenizer's behaviour encoder "
        "trained on every interaction before it, App. B.2); None: the quantile cut as it is",
    )
    tokenizer_version: str | None = Field(
        default=None, description="version of the semantic-ID table to use; None: the table's only one"
    )

    @property
    def tokens_per_item(self) -> int:
        """Semantic codes + anchor + action (Sec. 3.3)."""
        return self.num_semantic_positions + 2

    @property
    def max_history_items(self) -> int:
        """Whole history items that fit in the token budget beside the profile (and the target).

        Same rule as ``hisam_core.ranker.sequence.SequenceBuilder.max_items``: the target takes a
        whole item's room (its Action is what is predicted), as the last item of a training window.
        """
        room = self.token_budget - self.profile_tokens
        if self.count_target_in_budget:
            room -= self.tokens_per_item
        return max(room // self.tokens_per_item, 0) if room >= 0 else -1

    @model_validator(mode="after")
    def _budget_fits(self) -> SequenceConfig:
        if self.max_history_items < 0:
            raise ValueError(
                f"token_budget {self.token_budget} leaves no room for an item after "
                f"{self.profile_tokens} profile tokens"
            )
        return self


@dataclass(frozen=True)
class SplitCut:
    """Where the global chronological split falls (Sec. 4.1)."""

    cut_key: int  # key of the first test row: micros (timestamps, fractional seconds), seconds, or days
    n_total: int
    rank: int  # k = floor(train_fraction * n_total): 0-based rank of the row that defines the cut
    method: str
    key_unit: str  # "s", "us" or "days"
    raised_from: int | None = None  # the quantile cut, when ``cut_not_before`` raised it

    def cut_seconds(self) -> float:
        """The cut as unix seconds."""
        return self.cut_key * _SECONDS_PER_KEY[self.key_unit]

    def whole_seconds(self) -> int:
        """The cut rounded down to a whole unix second, in integer arithmetic."""
        if self.key_unit == "us":
            return self.cut_key // 1_000_000
        return self.cut_key * (86_400 if self.key_unit == "days" else 1)

    def not_before(self, seconds: float) -> SplitCut:
        """This cut, raised to the first key at or after ``seconds`` when it is earlier."""
        if self.key_unit == "days":
            key = math.ceil(seconds / 86_400)
        else:  # integer seconds times 10**6 stay exact; a division by 1e-6 would not
            key = math.ceil(seconds * (1_000_000 if self.key_unit == "us" else 1))
        if key <= self.cut_key:
            return self
        logger.warning(
            "chronological cut raised from key %s to %s (%s): the tokenizer's behaviour encoder trained "
            "on every interaction before %s",
            self.cut_key,
            key,
            self.key_unit,
            seconds,
        )
        return replace(self, cut_key=key, raised_from=self.cut_key)

    def to_dict(self) -> dict[str, int | str | float]:
        return {**asdict(self), "cut_seconds": self.cut_seconds()}


@dataclass
class SequenceResult:
    """Outputs of :func:`build_sequences`; the DataFrames are lazy."""

    samples: DataFrame  # one HMAT sample per known-item interaction (superset of gold.samples)
    quarantine: DataFrame  # input columns + ``reason``
    interactions: DataFrame  # labelled, split, cold-flagged, positioned (before the semantic-ID join)
    cut: SplitCut
    persisted: DataFrame | None = None  # what ``build_sequences(persist=True)`` keeps in Spark's cache

    def unpersist(self) -> None:
        """Drop what :func:`build_sequences` persisted from Spark's cache."""
        if self.persisted is not None:
            self.persisted.unpersist()


# --------------------------------------------------------------------------- helpers


def timestamp_key(df: DataFrame, column: str) -> tuple[Column, str]:
    """The timestamp as a sortable long and its unit: micros for timestamps and fractional seconds
    (so sub-second order and instants survive; NaN, infinite or out-of-range ones become null, a
    quarantined key), as-is for whole numbers (seconds)."""
    dtype = df.schema[column].dataType
    col = F.col(column)
    if isinstance(dtype, T.TimestampType | T.TimestampNTZType):
        return F.unix_micros(col.cast(T.TimestampType())), "us"
    if isinstance(dtype, T.DateType):
        return F.unix_date(col).cast(T.LongType()), "days"
    if isinstance(dtype, T.FractionalType):
        seconds = col.cast(T.DoubleType())
        fits = ~F.isnan(seconds) & (F.abs(seconds) < F.lit(_MAX_SECONDS))
        return F.when(fits, F.round(seconds * F.lit(1_000_000)).cast(T.LongType())), "us"
    if isinstance(dtype, T.NumericType):
        return col.cast(T.LongType()), "s"
    raise ValueError(f"column {column!r}: timestamp must be numeric, date or timestamp, got {dtype}")


def unix_seconds(df: DataFrame, column: str) -> Column:
    """The timestamp column as unix seconds (long)."""
    key, unit = timestamp_key(df, column)
    if unit == "us":
        return F.floor(key / F.lit(1_000_000)).cast(T.LongType())
    if unit == "days":
        return (key * F.lit(86_400)).cast(T.LongType())
    return key


def _order_cols(cfg: SequenceConfig) -> list[Column]:
    return [F.col(_KEY), F.col(cfg.item_col), F.col("label"), F.col("action")]


def _user_keys(df: DataFrame, cfg: SequenceConfig) -> list[str]:
    return [cfg.dataset_col, cfg.user_col] if cfg.dataset_col in df.columns else [cfg.user_col]


def select_dataset(df: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """Keep ``cfg.dataset`` (or stamp it as a literal column when the input has none)."""
    if cfg.dataset is None:
        return df
    if cfg.dataset_col in df.columns:
        return df.filter(F.col(cfg.dataset_col) == F.lit(cfg.dataset))
    return df.withColumn(cfg.dataset_col, F.lit(cfg.dataset))


# --------------------------------------------------------------------------- labels


def add_labels(df: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """Add int ``label`` and ``action``, the timestamp key, and ``_reason`` for unusable rows; the
    input's own ``label`` and ``action``, when it has them, stay beside them as ``_raw_label`` and
    ``_raw_action`` (what :func:`prepare_interactions` quarantines).

    ``label``: explicit label when present and non-null, else ``rating > threshold`` (Sec. 4.1).
    """
    cols = set(df.columns)
    for required in (cfg.user_col, cfg.item_col, cfg.timestamp_col):
        if required not in cols:
            raise ValueError(f"interactions lack the {required!r} column; have {sorted(cols)}")
    if cfg.label_col not in cols and cfg.rating_col not in cols:
        raise ValueError(f"interactions need a {cfg.rating_col!r} or a {cfg.label_col!r} column")
    if cfg.rating_col in cols:
        rating = F.col(cfg.rating_col)
        known = rating.isNotNull()
        if isinstance(df.schema[cfg.rating_col].dataType, T.FloatType | T.DoubleType):
            known &= ~F.isnan(rating)  # NaN sorts above every number in Spark: it would be positive
        from_rating = F.when(known, (rating > F.lit(cfg.positive_rating_threshold)).cast("int"))
    else:
        from_rating = F.lit(None).cast("int")
    if cfg.label_col in cols:
        explicit = F.col(cfg.label_col)
        if isinstance(df.schema[cfg.label_col].dataType, T.FloatType | T.DoubleType):
            explicit = F.when(~F.isnan(explicit), explicit)  # NaN != 0 would be a positive: no label
        if not isinstance(df.schema[cfg.label_col].dataType, T.BooleanType):
            explicit = explicit != F.lit(0)
        label = F.coalesce(explicit.cast("int"), from_rating)
    else:
        label = from_rating
    raw = {f"{_RAW}{c}": F.col(c) for c in ("label", "action") if c in cols}  # what the quarantine keeps
    out = df.withColumns(raw).withColumn("label", label.cast("int"))

    action_reason = F.lit(None).cast("string")
    if cfg.action_source == "column":
        if cfg.action_col not in cols:
            raise ValueError(f"action_source='column' but interactions lack {cfg.action_col!r}")
        dtype = df.schema[cfg.action_col].dataType
        if isinstance(dtype, T.StringType):
            if not cfg.action_vocab:
                raise ValueError(f"column {cfg.action_col!r} holds strings: set action_vocab to map them")
            pairs = [x for i, name in enumerate(cfg.action_vocab) for x in (F.lit(name), F.lit(i))]
            action = F.create_map(*pairs)[F.col(cfg.action_col)]
            action_reason = F.when(action.isNull(), F.lit(REASON_UNKNOWN_ACTION))
        elif isinstance(dtype, T.IntegralType):
            action = F.col(cfg.action_col)
            action_reason = F.when(action.isNull(), F.lit(REASON_UNKNOWN_ACTION))
        else:
            raise ValueError(f"column {cfg.action_col!r}: action must be integer or string, got {dtype}")
    else:
        action = F.col("label")
    key, _ = timestamp_key(df, cfg.timestamp_col)
    null_key = F.col(cfg.user_col).isNull() | F.col(cfg.item_col).isNull() | key.isNull()
    reason = (
        F.when(null_key, F.lit(REASON_NULL_KEY))
        .when(F.col("label").isNull(), F.lit(REASON_NO_LABEL))
        .otherwise(action_reason)
    )
    # one projection: the reason must see the raw action column, not the mapped one
    return out.withColumns({"action": action.cast("int"), _KEY: key, "_reason": reason})


# --------------------------------------------------------------------------- split


def compute_cut(df: DataFrame, cfg: SequenceConfig) -> SplitCut:
    """The global chronological cut (Sec. 4.1): the timestamp key of the row of rank ``k``.

    ``df`` carries the timestamp key (:func:`add_labels`). The exact method is distributed:

    1. one pass: ``N`` and ``percentile_approx`` at ``train_fraction +- margin`` give ``[lo, hi]``;
    2. one pass: keys below ``lo`` / above ``hi`` collapse into two sentinel buckets, keys inside
       are counted per distinct value; a running sum over that small table (one partition, a few
       thousand rows) gives the first key whose cumulative count exceeds ``k``.

    If the bracket misses (the answer falls in a sentinel bucket; Spark's rank-error bound of
    ``N / quantile_accuracy`` rules that out), step 2 reruns without a bracket. ``cut_method=
    "approx"`` uses the approximate quantile itself (rank error up to ``N / quantile_accuracy``).
    Raises ``ValueError`` for an empty input or one that mixes datasets.
    """
    frac = cfg.train_fraction
    margin = max(5.0 / cfg.quantile_accuracy, 1e-4)
    lo_p, hi_p = max(frac - margin, 0.0), min(frac + margin, 1.0)
    aggs = [
        F.count(F.lit(1)).alias("n"),
        F.percentile_approx(F.col(_KEY), [lo_p, frac, hi_p], cfg.quantile_accuracy).alias("q"),
        F.max(F.col(_KEY)).alias("max_key"),
    ]
    if cfg.dataset_col in df.columns:
        aggs += [F.min(cfg.dataset_col).alias("ds_min"), F.max(cfg.dataset_col).alias("ds_max")]
    row = df.agg(*aggs).first()
    n = int(row["n"])
    if n == 0:
        raise ValueError("cannot split an empty interactions table")
    if cfg.dataset_col in df.columns and row["ds_min"] != row["ds_max"]:
        raise ValueError(
            f"interactions mix datasets ({row['ds_min']!r} .. {row['ds_max']!r}); the split is per "
            "dataset: set SequenceConfig.dataset"
        )
    _, unit = timestamp_key(df, cfg.timestamp_col)
    k = cut_rank(frac, n)
    if k >= n:  # train_fraction == 1: everything is train
        return SplitCut(int(row["max_key"]) + 1, n, k, cfg.cut_method, unit)
    lo, approx, hi = (int(v) for v in row["q"])
    if cfg.cut_method == "approx":
        return SplitCut(approx, n, k, "approx", unit)
    cut = _exact_cut(df, k, lo, hi)
    if cut is None:
        logger.warning("approximate bracket [%s, %s] missed rank %s; recounting without it", lo, hi, k)
        cut = _exact_cut(df, k, None, None)
    if cut is None:  # unreachable: k < n guarantees a key with cumulative count > k
        raise RuntimeError(f"no timestamp reaches rank {k} of {n}")
    logger.info("chronological cut: key %s (%s) at rank %s of %s", cut, unit, k, n)
    return SplitCut(cut, n, k, "exact", unit)


def _exact_cut(df: DataFrame, k: int, lo: int | None, hi: int | None) -> int | None:
    key = F.col(_KEY)
    below = above = None
    bucket = key
    if lo is not None and hi is not None:
        below, above = lo - 1, hi + 1
        bucket = F.when(key < lo, F.lit(below)).when(key > hi, F.lit(above)).otherwise(key)
    counts = df.select(bucket.alias("b")).groupBy("b").count()
    running = Window.orderBy("b").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    hit = (
        counts.withColumn("cum", F.sum("count").over(running))
        .filter(F.col("cum") > F.lit(k))
        .agg(F.min("b").alias("cut"))
        .first()
    )
    cut = None if hit is None else hit["cut"]
    if cut is None or cut in (below, above):
        return None
    return int(cut)


def assign_split(df: DataFrame, cut: SplitCut) -> DataFrame:
    """``split``: train before the cut, test from the cut on (rows at the cut instant -> test)."""
    is_train = F.col(_KEY) < F.lit(cut.cut_key)
    return df.withColumn("split", F.when(is_train, F.lit(TRAIN)).otherwise(F.lit(TEST)))


def add_cold_flag(df: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """``n_train`` per user and ``is_cold_user`` = fewer than ``cold_start_threshold`` train rows.

    The window has the same partitioning and order as :func:`add_positions` (the frame is the
    whole partition), so Spark evaluates both in one shuffle and one sort."""
    per_user = (
        Window.partitionBy(*_user_keys(df, cfg))
        .orderBy(*_order_cols(cfg))
        .rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    )
    n_train = F.sum((F.col("split") == F.lit(TRAIN)).cast("int")).over(per_user)
    return df.withColumn("n_train", n_train.cast("int")).withColumn(
        "is_cold_user", F.col("n_train") < F.lit(cfg.cold_start_threshold)
    )


def add_positions(df: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """``seq_pos``: 0-based chronological position of the interaction within its user."""
    w = Window.partitionBy(*_user_keys(df, cfg)).orderBy(*_order_cols(cfg))
    return df.withColumn("seq_pos", (F.row_number().over(w) - 1).cast("int"))


def as_given(df: DataFrame) -> DataFrame:
    """``df`` with the input's own ``label`` and ``action`` back in place of the derived ones
    (:func:`add_labels` keeps them aside): what a quarantine row records."""
    raw = [c for c in df.columns if c.startswith(_RAW)]
    return df.withColumns({c[len(_RAW) :]: F.col(c) for c in raw}).drop(*raw)


def prepare_interactions(
    df: DataFrame, cfg: SequenceConfig, keep_given: bool = False
) -> tuple[DataFrame, DataFrame, SplitCut]:
    """Labels, split, cold flag and positions: returns (interactions, quarantined, cut).

    The cut is computed over the labelled rows and raised to ``cut_not_before``. ``df`` is scanned
    three times (cut bracket, cut count, then the lazily built outputs), so persist an expensive
    input first. ``keep_given``: the interactions keep the input's label and action aside, for a
    later quarantine (:func:`as_given`).
    """
    labelled = add_labels(select_dataset(df, cfg), cfg)
    raw = [c for c in labelled.columns if c.startswith(_RAW)]
    quarantine = as_given(
        labelled.filter(F.col("_reason").isNotNull()).withColumnRenamed("_reason", "reason")
    )
    valid = labelled.filter(F.col("_reason").isNull()).drop("_reason", *([] if keep_given else raw))
    cut = compute_cut(valid, cfg)
    if cfg.cut_not_before is not None:
        cut = cut.not_before(cfg.cut_not_before)
    out = add_positions(add_cold_flag(assign_split(valid, cut), cfg), cfg)
    return out, quarantine.drop(_KEY), cut


# --------------------------------------------------------------------------- semantic IDs


def select_tokenizer_version(semantic_ids: DataFrame, version: str | None) -> DataFrame:
    """Rows of one tokenizer version; ``None`` requires the table to hold exactly one version."""
    if version is None:
        found = [r[0] for r in semantic_ids.select("tokenizer_version").distinct().limit(2).collect()]
        if not found:
            raise ValueError("the semantic-ID table is empty: tokenize the catalogue first")
        if len(found) != 1:
            raise ValueError(f"semantic-ID table holds versions {found}: set tokenizer_version")
        return semantic_ids.filter(F.col("tokenizer_version") == F.lit(found[0]))
    chosen = semantic_ids.filter(F.col("tokenizer_version") == F.lit(version))
    if chosen.limit(1).count() == 0:
        raise ValueError(f"no semantic IDs for tokenizer_version {version!r}")
    return chosen


def join_semantic_ids(
    interactions: DataFrame, semantic_ids: DataFrame, cfg: SequenceConfig, *, selected: bool = False
) -> tuple[DataFrame, DataFrame]:
    """Attach ``semantic_ids`` (int codes) per interaction; rows of unknown items -> ``unknown``.

    ``selected``: ``semantic_ids`` already holds only the wanted version (see
    :func:`select_tokenizer_version`)."""
    table = semantic_ids if selected else select_tokenizer_version(semantic_ids, cfg.tokenizer_version)
    on = [cfg.item_col]
    cols = [
        F.col("item_id").alias(cfg.item_col),
        F.col("semantic_ids").cast(T.ArrayType(T.IntegerType())).alias("semantic_ids"),
        F.col("tokenizer_version"),
    ]
    if cfg.dataset_col in table.columns and cfg.dataset_col in interactions.columns:
        on.append(cfg.dataset_col)
        cols.append(F.col(cfg.dataset_col))
    joined = interactions.join(table.select(*cols), on=on, how="left")
    known = joined.filter(F.col("semantic_ids").isNotNull())
    unknown = joined.filter(F.col("semantic_ids").isNull()).withColumn("reason", F.lit(REASON_UNKNOWN_ITEM))
    return known, unknown


# --------------------------------------------------------------------------- sequences


def _history_sources(cfg: SequenceConfig) -> dict[str, str]:
    """History list -> the interaction column it collects."""
    return {"_h_item": cfg.item_col, "_h_action": "action", "_h_sem": "semantic_ids"}


def _empty_like(col: Column) -> Column:
    """An empty array whose element type is the type of ``col``."""
    return F.filter(F.array(col), lambda _: F.lit(False))


def _history_lists(cfg: SequenceConfig, frame: WindowSpec | None) -> dict[str, Column]:
    """``collect_list`` of item, action and semantic IDs over ``frame`` (None: empty lists)."""
    return {
        name: F.collect_list(F.col(src)).over(frame) if frame is not None else _empty_like(F.col(src))
        for name, src in _history_sources(cfg).items()
    }


def build_samples(interactions: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """One HMAT sample per interaction with its truncated history (window functions only).

    ``interactions`` are the known-item rows of :func:`join_semantic_ids`. A history is a
    ``rowsBetween(-L, -1)`` frame of the chronological per-user window (``L = max_history_items``)
    at the first event of the sample's instant, which every event of that instant takes: the ``L``
    most recent interactions of earlier instants, oldest first. ``collect_list`` over an ordered
    ROWS frame gathers the frame's rows in window order (Spark evaluates frames over the sorted
    partition; the tests pin this order down), so item, action and semantic-ID lists stay aligned
    without a sort. Columns: those of ``gold.samples`` (``item_id`` is the target) plus ``action``,
    ``seq_pos``, ``n_train``, ``history_item_ids``, ``history_semantic_ids`` (flat, 6 per item),
    ``history_actions``, ``target_semantic_ids``, ``tokenizer_version``.
    """
    L = cfg.max_history_items
    keys = _user_keys(interactions, cfg)
    order = Window.partitionBy(*keys).orderBy(*_order_cols(cfg))
    df = interactions.withColumns(_history_lists(cfg, order.rowsBetween(-L, -1) if L > 0 else None))
    if L > 0:  # every event of an instant takes the history of the instant's first: none sees another
        previous = F.lag(F.col(_KEY)).over(order)
        df = df.withColumn("_first_of_instant", previous.isNull() | (previous != F.col(_KEY)))
        so_far = order.rowsBetween(Window.unboundedPreceding, Window.currentRow)
        df = df.withColumns(
            {
                name: F.last(F.when(F.col("_first_of_instant"), F.col(name)), ignorenulls=True).over(so_far)
                for name in _history_sources(cfg)
            }
        ).drop("_first_of_instant")
    if cfg.test_history == "train_only" and L > 0:
        df = _train_only_history_for_test(df, cfg, L)

    dataset = [F.col(cfg.dataset_col)] if cfg.dataset_col in interactions.columns else []
    rating = F.col(cfg.rating_col) if cfg.rating_col in interactions.columns else F.lit(None)
    return df.select(
        *dataset,
        F.col("split"),
        F.col(cfg.user_col).alias("user_id"),
        F.col(cfg.item_col).alias("item_id"),
        F.col(cfg.timestamp_col).alias("event_ts"),
        F.col("label"),
        rating.cast(T.DoubleType()).alias("rating"),
        F.size("_h_item").cast("int").alias("history_len"),
        F.col("is_cold_user"),
        F.col("action"),
        F.col("seq_pos"),
        F.col("n_train"),
        F.col("_h_item").alias("history_item_ids"),
        F.flatten("_h_sem").alias("history_semantic_ids"),
        F.col("_h_action").alias("history_actions"),
        F.col("semantic_ids").alias("target_semantic_ids"),
        F.col("tokenizer_version"),
    )


def _train_only_history_for_test(df: DataFrame, cfg: SequenceConfig, L: int) -> DataFrame:
    """Replace the history of test rows by the user's last ``L`` train interactions."""
    keys = _user_keys(df, cfg)
    order = Window.partitionBy(*keys).orderBy(*_order_cols(cfg))
    last = Window.partitionBy(*keys).orderBy(F.col("seq_pos").desc())
    lists = _history_lists(cfg, order.rowsBetween(-(L - 1), 0))
    train_hist = (
        df.filter(F.col("split") == F.lit(TRAIN))
        .select(*keys, "seq_pos", *[c.alias(f"{name}_train") for name, c in lists.items()])
        .withColumn("_rk", F.row_number().over(last))
        .filter(F.col("_rk") == 1)
        .drop("_rk", "seq_pos")
    )
    is_test = F.col("split") == F.lit(TEST)
    joined = df.join(train_hist, on=keys, how="left")
    replaced = {
        name: F.when(is_test, F.coalesce(F.col(f"{name}_train"), _empty_like(F.col(src)))).otherwise(
            F.col(name)
        )
        for name, src in _history_sources(cfg).items()
    }
    return joined.withColumns(replaced).drop(*[f"{name}_train" for name in lists])


def build_user_sequences(interactions: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """One row per user: the whole chronological sequence (``gold.user_sequences`` columns, plus
    ``n_train`` and ``is_cold_user``, which :func:`to_gold_user_sequences` leaves out).

    Arrays are aligned and ordered by ``seq_pos`` (``array_sort`` on ``(seq_pos, ...)`` structs,
    so the order does not depend on how ``collect_list`` met the rows); ``timestamps`` are unix
    seconds, rounded down (events within one second show one time; the order is still the exact
    one). Untruncated: the token budget applies to samples, not to the stored sequence. Built from
    :attr:`SequenceResult.interactions` (before the semantic-ID join), so it keeps the interactions
    with items the tokenizer version has no IDs for: the table is not per version.
    """
    keys = _user_keys(interactions, cfg)
    rating = F.col(cfg.rating_col) if cfg.rating_col in interactions.columns else F.lit(None)
    entry = F.struct(
        F.col("seq_pos").alias("pos"),
        F.col(cfg.item_col).cast(T.LongType()).alias("item"),
        F.col("label").alias("label"),
        rating.cast(T.DoubleType()).alias("rating"),
        unix_seconds(interactions, cfg.timestamp_col).alias("ts"),
    )
    grouped = interactions.groupBy(*keys).agg(
        F.array_sort(F.collect_list(entry)).alias("_seq"),
        F.max("n_train").alias("n_train"),
        F.max("is_cold_user").alias("is_cold_user"),
    )
    out = grouped.select(
        *keys,
        F.transform("_seq", lambda e: e["item"]).alias("item_ids"),
        F.transform("_seq", lambda e: e["label"]).alias("labels"),
        F.transform("_seq", lambda e: e["rating"]).alias("ratings"),
        F.transform("_seq", lambda e: e["ts"]).alias("timestamps"),
        F.size("_seq").cast("int").alias("length"),
        F.col("n_train"),
        F.col("is_cold_user"),
    )
    return out.withColumnRenamed(cfg.user_col, "user_id")


def _project(df: DataFrame, fields: list[T.StructField]) -> DataFrame:
    """Declared columns in declared order, cast where the type (not the nullability) differs."""
    missing = [f.name for f in fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"cannot project to the declared table: missing columns {missing}")
    have = {f.name: f.dataType for f in df.schema.fields}
    return df.select(
        *[
            F.col(f.name)
            if have[f.name].simpleString() == f.dataType.simpleString()
            else F.col(f.name).cast(f.dataType).alias(f.name)
            for f in fields
        ]
    )


def to_gold_samples(samples: DataFrame) -> DataFrame:
    """The ``gold.samples`` projection of :func:`build_samples` (declared columns and types)."""
    return _project(samples, GOLD_SAMPLES.schema.fields)


def to_gold_user_sequences(sequences: DataFrame) -> DataFrame:
    """The ``gold.user_sequences`` projection of :func:`build_user_sequences`."""
    return _project(sequences, GOLD_USER_SEQUENCES.schema.fields)


def build_sequences(
    interactions: DataFrame, semantic_ids: DataFrame, cfg: SequenceConfig, persist: bool = False
) -> SequenceResult:
    """The whole job: labels, split, cold flag, semantic-ID join, per-sample histories.

    Returns lazy DataFrames; the split cut is the only value computed eagerly. ``quarantine`` has
    the input columns plus ``reason`` (``null_key``, ``no_label``, ``unknown_action`` or
    ``unknown_item``). The samples, the quarantine's unknown items and the interactions all derive
    from the positioned interactions (a window over each user's events): ``persist`` keeps those in
    Spark's cache, so a caller that computes all three computes the windows once
    (:meth:`SequenceResult.unpersist` drops them)."""
    table = select_tokenizer_version(semantic_ids, cfg.tokenizer_version)  # fail fast on a bad version
    source = select_dataset(interactions, cfg)
    prepared, early_quarantine, cut = prepare_interactions(source, cfg, keep_given=True)
    if persist:
        prepared = prepared.persist()
    given = [c for c in prepared.columns if c.startswith(_RAW)]
    known, unknown = join_semantic_ids(prepared, table, cfg, selected=True)
    samples = build_samples(known.drop(*given), cfg)
    input_cols = source.columns
    quarantine = early_quarantine.select(*input_cols, "reason").unionByName(
        as_given(unknown).select(*input_cols, "reason")
    )
    return SequenceResult(
        samples=samples,
        quarantine=quarantine,
        interactions=prepared.drop(*given),
        cut=cut,
        persisted=prepared if persist else None,
    )

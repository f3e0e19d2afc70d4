"""Row-level rules: split a batch into valid rows and a quarantine with reasons.

A :class:`QualitySuite` is a list of :class:`RowRule` (a named Spark predicate that is true when a
row is bad), optional dedup keys, a ``prepare`` step that adds ``dq_*`` helper columns (lookups,
array checks) and the GX expectations (:class:`GxSpec`) that judge the batch as a whole.

Reasons: every failing rule of a row is listed in ``reasons`` (rule order); ``reason`` is the
first of them, so a rule listed earlier (null keys, then values, then references) names the row.
Duplicates are judged last and only among rows that fail nothing else: within a group of equal
keys the first row in ``dedup_order`` (then every other atomic column ascending, then the row's
JSON) stays valid and the others get ``duplicate``. Every row lands on exactly one side, so
``input = valid + quarantined`` holds by construction, and the gate checks it anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.tables import row_json

REASON_DUPLICATE = "duplicate"
#: Helper columns the gate adds (and removes from its outputs).
DQ_PREFIX = "dq_"
DQ_REASONS = "dq_reasons"
DQ_REASON = "dq_reason"
DQ_VALID = "dq_row_valid"


@dataclass(frozen=True)
class GxSpec:
    """A GX expectation as plain data: a class of ``great_expectations.expectations`` + kwargs.

    ``tolerant`` column-map expectations allow ``max_quarantine_fraction`` of all rows to fail
    (their ``mostly``: :func:`spark_jobs.quality.gate.tolerances`): a few bad rows are quarantined,
    too many fail the batch. Strict ones must hold on every row.
    """

    expectation: str  # e.g. "ExpectColumnValuesToNotBeNull"
    kwargs: dict[str, Any]
    rule: str | None = None
    tolerant: bool = True

    @property
    def columns(self) -> list[str]:
        """Columns the expectation reads (so the gate can hand GX a narrow projection)."""
        cols = list(self.kwargs.get("column_list", []))
        if "column" in self.kwargs:
            cols.append(self.kwargs["column"])
        return cols


@dataclass(frozen=True)
class RowRule:
    """A row is quarantined with ``reason`` when ``fails`` is true (null counts as passing:
    null inputs have rules of their own). ``expectation`` mirrors the rule at batch level;
    ``None`` gives ``ExpectColumnValuesToBeInSet(dq_ok__<reason>, [True])`` on a helper column."""

    reason: str
    fails: Column
    expectation: GxSpec | None = None


@dataclass
class QualitySuite:
    """Rules and expectations of one boundary (interactions, embeddings, semantic IDs, samples)."""

    name: str
    rules: list[RowRule]
    dedup_keys: list[str] = field(default_factory=list)
    dedup_order: list[str] = field(default_factory=list)
    prepare: Callable[[DataFrame], DataFrame] | None = None
    expectations: list[GxSpec] = field(default_factory=list)  # batch-level extras
    extra_columns: list[str] = field(default_factory=list)  # input columns GX reads besides specs'

    def __post_init__(self) -> None:
        reasons = [r.reason for r in self.rules]
        dupes = sorted({r for r in reasons if reasons.count(r) > 1})
        if dupes:
            raise ValueError(f"suite {self.name!r}: rules share reasons {dupes}")
        if REASON_DUPLICATE in reasons:
            raise ValueError(f"suite {self.name!r}: {REASON_DUPLICATE!r} is reserved for dedup")

    def gx_specs(self) -> list[GxSpec]:
        """Per-rule expectations (mirrors), the dedup check, then the batch-level extras."""
        specs = [
            r.expectation
            or GxSpec(
                "ExpectColumnValuesToBeInSet", {"column": ok_column(r.reason), "value_set": [True]}, r.reason
            )
            for r in self.rules
        ]
        if self.dedup_keys:
            from great_expectations.expectations.row_conditions import Column as Condition

            # GX 1.9+'s condition objects (a string with condition_parser goes in GX 2.0)
            kwargs: dict[str, Any] = {"row_condition": Condition(DQ_VALID) == True}  # noqa: E712
            if len(self.dedup_keys) == 1:
                specs.append(
                    GxSpec(
                        "ExpectColumnValuesToBeUnique", {"column": self.dedup_keys[0], **kwargs}, None, False
                    )
                )
            else:
                specs.append(
                    GxSpec(
                        "ExpectCompoundColumnsToBeUnique",
                        {"column_list": list(self.dedup_keys), **kwargs},
                        None,
                        False,
                    )
                )
        return specs + list(self.expectations)


def ok_column(reason: str) -> str:
    """Name of the helper column that is true when a row passes rule ``reason``."""
    safe = "".join(c if c.isalnum() else "_" for c in reason.lower())
    return f"{DQ_PREFIX}ok__{safe}"


def _order_expr(spec: str) -> Column:
    parts = spec.split()
    if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
        col = F.col(parts[0])
        return col.asc_nulls_last() if parts[1].lower() == "asc" else col.desc_nulls_last()
    if len(parts) == 1:
        return F.col(parts[0]).asc_nulls_last()
    raise ValueError(f"dedup order {spec!r}: expected 'column' or 'column asc|desc'")


def _dedup_order(df: DataFrame, keys: list[str], order: list[str], input_cols: list[str]) -> list[Column]:
    named = [s.split()[0] for s in order if s.split()[0] in df.columns]
    exprs = [_order_expr(s) for s in order if s.split()[0] in df.columns]
    nested = (T.ArrayType, T.MapType, T.StructType, T.BinaryType)
    rest = [
        f.name
        for f in df.schema.fields
        if f.name in input_cols
        and f.name not in keys
        and f.name not in named
        and not isinstance(f.dataType, nested)
    ]
    exprs += [F.col(c).asc_nulls_last() for c in rest]
    complex_cols = [c for c in input_cols if c not in keys and c not in named and c not in rest]
    # arrays, structs, binary: ordered as they are, to break the last ties (their JSON, or a hash, would
    # be one more column shuffled with every row, and a hash ties null with []); Spark orders no map,
    # so a column holding one is ordered by its JSON
    types = {f.name: f.dataType for f in df.schema.fields}
    exprs += [(F.to_json(c) if _has_map(types[c]) else F.col(c)).asc_nulls_last() for c in complex_cols]
    return exprs


def _has_map(data_type: T.DataType) -> bool:
    if isinstance(data_type, T.MapType):
        return True
    if isinstance(data_type, T.ArrayType):
        return _has_map(data_type.elementType)
    if isinstance(data_type, T.StructType):
        return any(_has_map(f.dataType) for f in data_type.fields)
    return False


def annotate(df: DataFrame, suite: QualitySuite) -> DataFrame:
    """``df`` plus the suite's ``dq_*`` helpers, ``dq_reasons`` (all), ``dq_reason`` (first) and
    ``dq_row_valid``. Lazy; one window (the dedup) when the suite has dedup keys."""
    input_cols = df.columns
    out = suite.prepare(df) if suite.prepare is not None else df
    for rule in suite.rules:
        out = out.withColumn(ok_column(rule.reason), ~F.coalesce(rule.fails, F.lit(False)))
    flagged = [F.when(~F.col(ok_column(r.reason)), F.lit(r.reason)) for r in suite.rules]
    pre = F.filter(F.array(*flagged), lambda x: x.isNotNull()) if flagged else F.array().cast("array<string>")
    out = out.withColumn(DQ_REASONS, pre)
    if suite.dedup_keys:
        missing = [k for k in suite.dedup_keys if k not in df.columns]
        if missing:
            raise ValueError(f"suite {suite.name!r}: dedup keys {missing} are not columns of the batch")
        clean = F.size(DQ_REASONS) == 0
        order = _dedup_order(df, suite.dedup_keys, suite.dedup_order, input_cols)
        w = Window.partitionBy(*[F.col(k) for k in suite.dedup_keys], clean).orderBy(*order)
        dup = clean & (F.row_number().over(w) > 1)
        out = out.withColumn(
            DQ_REASONS, F.when(dup, F.array(F.lit(REASON_DUPLICATE))).otherwise(F.col(DQ_REASONS))
        )
    return out.withColumn(DQ_REASON, F.try_element_at(F.col(DQ_REASONS), F.lit(1))).withColumn(
        DQ_VALID, F.size(DQ_REASONS) == 0
    )


def split_annotated(annotated: DataFrame, input_cols: list[str], suite: str) -> tuple[DataFrame, DataFrame]:
    """(valid rows with the input columns, quarantine with ``reason``, ``reasons``, ``quality_suite``)."""
    valid = annotated.filter(F.col(DQ_VALID)).select(*input_cols)
    quarantine = annotated.filter(~F.col(DQ_VALID)).select(
        *input_cols,
        F.col(DQ_REASON).alias("reason"),
        F.col(DQ_REASONS).alias("reasons"),
        F.lit(suite).alias("quality_suite"),
    )
    return valid, quarantine


def split_valid_quarantine(df: DataFrame, suite: QualitySuite) -> tuple[DataFrame, DataFrame]:
    """Row-level checks only (no GX, no actions): ``(valid, quarantine)``."""
    return split_annotated(annotate(df, suite), df.columns, suite.name)


def to_bronze_quarantine(
    quarantine: DataFrame, target_table: str, logical_date: Any, dataset: str | None = None
) -> DataFrame:
    """Quarantine rows in the ``bronze.quarantine`` layout: the row as JSON in ``raw``."""
    payload = [c for c in quarantine.columns if c not in ("reason", "reasons", "quality_suite")]
    ds = F.col("dataset") if "dataset" in quarantine.columns and dataset is None else F.lit(dataset)
    src = F.col("source_file") if "source_file" in quarantine.columns else F.lit(None).cast("string")
    return quarantine.select(
        ds.cast("string").alias("dataset"),
        F.lit(target_table).alias("target_table"),
        F.lit(logical_date).cast("date").alias("logical_date"),
        F.concat_ws("; ", F.col("reasons")).alias("reason"),
        row_json(*payload).alias("raw"),
        src.alias("source_file"),
    )

"""The quality gate: row-level quarantine + batch-level GX validation, with counts that reconcile.

``run_quality_gate(df, suite)`` returns ``(valid_df, quarantine_df, report)`` and raises
:class:`~spark_jobs.quality.report.DataQualityError` when the batch fails (an expectation failed,
or the counts do not reconcile). The pipeline step that stops downstream work and alerts wraps it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_jobs.quality import gx
from spark_jobs.quality.config import QualityConfig
from spark_jobs.quality.report import DataQualityError, ExpectationOutcome, QualityReport
from spark_jobs.quality.rules import (
    DQ_REASON,
    DQ_REASONS,
    DQ_VALID,
    GxSpec,
    QualitySuite,
    annotate,
    split_annotated,
)

logger = logging.getLogger(__name__)


def batch_specs(suite: QualitySuite, config: QualityConfig) -> list[GxSpec]:
    """The suite's expectations plus the two every batch gets: enough rows, and at most
    ``max_quarantine_fraction`` of them quarantined."""
    return [
        *suite.gx_specs(),
        GxSpec("ExpectTableRowCountToBeBetween", {"min_value": config.min_rows}, None, tolerant=False),
        GxSpec("ExpectColumnValuesToBeInSet", {"column": DQ_VALID, "value_set": [True]}, "quarantined_share"),
    ]


def _gx_projection(annotated: DataFrame, specs: list[GxSpec], suite: QualitySuite) -> DataFrame:
    wanted = [DQ_VALID, *suite.dedup_keys, *suite.extra_columns]
    for spec in specs:
        wanted += spec.columns
    cols = list(dict.fromkeys(c for c in wanted if c in annotated.columns))
    return annotated.select(*cols)


def allowed_rejects(fraction: float, n_rows: int) -> int:
    """How many of ``n_rows`` rows a budget of ``fraction`` lets fail: ``floor(fraction * n)``,
    with room for the float error of the product (0.29 * 100 is 28.999999999999996)."""
    return math.floor(fraction * n_rows + 1e-9)


#: Column-map expectations that count nulls as unexpected; the others leave nulls out of their share.
NULL_COUNTING = {"ExpectColumnValuesToNotBeNull", "ExpectColumnValuesToBeNull"}


def tolerances(annotated: DataFrame, specs: list[GxSpec], n_rows: int, fraction: float) -> list[float]:
    """GX's ``mostly`` for each of ``specs``, so that each tolerates ``fraction`` of *all* rows.

    GX measures a column-map expectation over the column's non-null values, so ``2`` bad ratings
    among ``50`` rated rows of ``1000`` would be 4 % of a 1 % budget.
    ``mostly = (non-null - floor(fraction * n_rows)) / non-null`` allows the same number of bad
    values, as GX counts them (floored at 0); other specs get ``1 - fraction``."""

    def null_skipping(spec: GxSpec) -> str | None:
        tolerant = spec.tolerant and spec.expectation not in NULL_COUNTING
        return spec.kwargs.get("column") if tolerant else None

    columns = sorted({c for s in specs if (c := null_skipping(s))})
    if not columns or n_rows == 0 or fraction == 0:
        return [1.0 - fraction] * len(specs)
    counts = annotated.agg(*[F.count(F.col(c)).alias(f"n{i}") for i, c in enumerate(columns)]).first()
    non_null = {c: int(counts[f"n{i}"]) for i, c in enumerate(columns)}
    allowed = allowed_rejects(fraction, n_rows)
    return [
        max(0.0, (non_null[c] - allowed) / non_null[c])
        if (c := null_skipping(s)) and non_null[c]
        else 1.0 - fraction
        for s in specs
    ]


def _with_rule_count(
    outcome: ExpectationOutcome, every: dict[str, int], n_quarantined: int
) -> ExpectationOutcome:
    """Fill a rule mirror's unexpected count from the quarantine when GX returned none
    (``result_format="BOOLEAN_ONLY"``): the rows failing that rule, counted by the row-level split. An
    expectation GX could not compute keeps no count: its error is the report, not a count of 0."""
    if outcome.unexpected_count is not None or outcome.rule is None or outcome.exception:
        return outcome
    count = n_quarantined if outcome.rule == "quarantined_share" else every.get(outcome.rule)
    if count is None and outcome.rule != "test_before_train":
        count = 0
    return replace(outcome, unexpected_count=count)


def run_quality_gate(
    df: DataFrame,
    suite: QualitySuite,
    config: QualityConfig | None = None,
    *,
    raise_on_failure: bool = True,
    validate_with_gx: bool = True,
) -> tuple[DataFrame, DataFrame, QualityReport]:
    """Split ``df`` into valid rows and a quarantine, validate the batch with GX, report.

    * ``valid_df``: the input columns of the rows that fail no rule;
    * ``quarantine_df``: the input columns plus ``reason`` (first failing rule), ``reasons`` (all)
      and ``quality_suite``;
    * ``report``: counts (``n_input``, counted on ``df``, must equal ``n_valid + n_quarantined``,
      counted on the annotated batch), quarantine reasons,
      one outcome per GX expectation and the Data Docs index.

    GX validates the annotated *input* batch: each rule's mirror expectation and the quarantined
    share tolerate ``max_quarantine_fraction`` bad rows; uniqueness of the valid rows and the
    batch-level extras are strict. With ``config.persist`` the annotated batch is cached (the
    outputs read from that cache; it is released when the gate raises).
    """
    cfg = config or QualityConfig()
    start = time.perf_counter()
    annotated = annotate(df, suite)
    if cfg.persist:
        annotated = annotated.persist(StorageLevel.MEMORY_AND_DISK)
    n_input = df.count()  # counted on the input itself, so a row the suite's prepare step
    # drops or duplicates (a join, say) makes the counts fail to reconcile instead of passing
    rows = annotated.groupBy(F.col(DQ_REASON).alias("reason")).count().collect()
    n_valid = sum(int(r["count"]) for r in rows if r["reason"] is None)
    first = {str(r["reason"]): int(r["count"]) for r in rows if r["reason"] is not None}
    every = {
        str(r["reason"]): int(r["count"])
        for r in annotated.select(F.explode(DQ_REASONS).alias("reason")).groupBy("reason").count().collect()
    }
    counted = time.perf_counter()
    logger.debug("suite %s: split and counts in %.1fs", suite.name, counted - start)
    outcomes: list[ExpectationOutcome] = []
    docs = None
    if validate_with_gx:
        specs = batch_specs(suite, cfg)
        mostly = tolerances(annotated, specs, n_input, cfg.max_quarantine_fraction)
        outcomes, docs = gx.validate(_gx_projection(annotated, specs, suite), suite.name, specs, cfg, mostly)
        outcomes = [_with_rule_count(o, every, sum(first.values())) for o in outcomes]
        logger.debug("suite %s: GX validation in %.1fs", suite.name, time.perf_counter() - counted)
    valid, quarantine = split_annotated(annotated, df.columns, suite.name)
    report = QualityReport(
        suite=suite.name,
        n_input=n_input,
        n_valid=n_valid,
        n_quarantined=sum(first.values()),
        reason_counts=first,
        all_reason_counts=every,
        expectations=outcomes,
        data_docs_index=docs,
        seconds=round(time.perf_counter() - start, 3),
    )
    log = logger.info if report.success else logger.error
    log("%s", report.summary())
    if not report.success and raise_on_failure:
        if cfg.persist:
            annotated.unpersist()
        raise DataQualityError(report)
    return valid, quarantine, report

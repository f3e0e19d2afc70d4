"""Steps ``ingest``, ``validate`` and ``validate-samples``: raw source -> bronze -> silver, the
interactions gate, and the gate on the samples that training reads.

``source-ready`` says whether the day's source has landed (the daily DAG waits on it).
``ingest`` imports one run of the configured source into bronze (partition = logical date, so a rerun
replaces it) and merges it into silver; bad records go to ``bronze.quarantine`` with their reason and
every input reconciles (records read = imported + quarantined, each side counted on its own). A
table whose import quarantines more than the budget (``quality.max_quarantine_fraction``) fails the
step, with an alert, before anything reaches silver.
``validate`` runs the GX interactions suite over the dataset's silver interactions: failing rows are
quarantined with their reasons, and a batch that fails (too many bad rows, repeated events among
them; empty) raises ``DataQualityError`` after alerting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipelines.context import StepContext

log = logging.getLogger(__name__)


def source_ready(ctx: StepContext) -> dict[str, Any]:
    """Whether the day's source has landed: a generic source's dated drop (and its ``ready_marker``)
    is there; MovieLens's bundle and the synthetic generator always are. The daily DAG waits on it
    before ``ingest``."""
    source = ctx.config.source
    if source.kind != "generic":
        return {"ready": True, "source": source.kind}
    from spark_jobs.importers.generic import pending_inputs

    pending = pending_inputs(ctx.lake.spark, source.generic, ctx.logical_date)
    for name, why in pending.items():
        log.info("%s input of %s not ready: %s", name, ctx.logical_date, why)
    return {"ready": not pending, "source": source.kind, "pending": pending}


def _import_report(ctx: StepContext) -> Any:
    from spark_jobs.importers.generic import GenericImportConfig, import_generic
    from spark_jobs.importers.movielens import MovieLensImportConfig, check_bundle, import_movielens
    from spark_jobs.importers.synthetic import generate

    source = ctx.config.source
    if source.kind == "movielens":
        config = MovieLensImportConfig(data_dir=str(source.movielens_dir), dataset=ctx.dataset)
        check_bundle(config.data_dir, config.include_extra)  # a wrong path fails before Spark starts
        return import_movielens(ctx.lake.spark, ctx.lake, config, ctx.logical_date)
    if source.kind == "synthetic":  # the same seed writes the same files, so reruns stay identical
        out = generate(source.synthetic, ctx.settings.home / "data" / ctx.dataset)
        generic = GenericImportConfig(
            dataset=ctx.dataset,
            interactions=str(out.interactions),
            items=str(out.items),
            users=str(out.users),
        )
    else:
        generic = source.generic  # its dataset is ctx.dataset (PipelineConfig refuses another)
    return import_generic(ctx.lake.spark, ctx.lake, generic, ctx.logical_date)


def ingest(ctx: StepContext) -> dict[str, Any]:
    """Import the source for the logical date into bronze and merge it into silver."""
    from spark_jobs.importers.silver import promote_to_silver

    bronze = _import_report(ctx)  # both writers refuse counts that do not reconcile, before writing
    counts = _per_table(bronze.sources)
    _check_import_budget(ctx, counts)
    silver = promote_to_silver(ctx.lake, ctx.dataset, ctx.logical_date, ctx.config.silver)
    return {
        "dataset": ctx.dataset,
        "logical_date": ctx.logical_date.isoformat(),
        "bronze": counts,
        "silver_rows": {s.table: s.imported for s in silver.sources},  # offered to the merge
        "silver_written": silver.written,  # of them, inserted or updated: a later date holds the rest
        "silver_retracted": silver.retracted,
        "versions": {**bronze.versions, **silver.versions},
    }


def _check_import_budget(ctx: StepContext, counts: dict[str, dict[str, int]]) -> None:
    """Hold each bronze table's import to the quarantine budget (``quality.max_quarantine_fraction``),
    before anything reaches silver. ``validate`` judges the rows an import kept, so a day whose
    records were mostly rejected here (a changed timestamp format) would pass it: all rejected, it
    looks like a day without an import. Repeated records (a duplicate with the kept row's values) do
    not count: nothing of theirs is lost; a duplicate id with other values does. Every table over
    budget alerts; the rejects stay in ``bronze.quarantine``, and a rerun of the day with a repaired
    source replaces them."""
    from pyspark.sql import functions as F

    from pipelines.notify import alerted
    from spark_jobs.importers.common import OTHER_VALUES
    from spark_jobs.quality import DataQualityError
    from spark_jobs.quality.gate import allowed_rejects
    from spark_jobs.quality.report import ExpectationOutcome, QualityReport
    from spark_jobs.tables import BRONZE_QUARANTINE

    limit = ctx.config.quality.max_quarantine_fraction
    failed: list[tuple[QualityReport, bool]] = []
    for table, n in counts.items():
        allowed = allowed_rejects(limit, n["in"])  # as the quality gates count their budget
        if n["quarantined"] <= allowed:  # a cheap bound first: most days stop here
            continue
        part = {"dataset": ctx.dataset, "target_table": table, "logical_date": ctx.logical_date}
        rejected = ctx.lake.read(BRONZE_QUARANTINE, partitions=part)
        repeated = F.col("reason").startswith("duplicate ") & ~F.col("reason").endswith(OTHER_VALUES)
        reasons = rejected.filter(~repeated).groupBy("reason").count()
        if (lost := reasons.agg(F.sum("count")).first()[0] or 0) <= allowed:
            continue
        top = {
            r["reason"]: int(r["count"])
            for r in reasons.orderBy(F.desc("count"), "reason").limit(5).collect()
        }
        if (rest := n["quarantined"] - sum(top.values())) > 0:
            top["(other reasons, repeated records among them)"] = rest
        log.info("%s: %d repeated records not counted against the budget", table, n["quarantined"] - lost)
        share = ExpectationOutcome(
            "import_quarantine_share_at_most",
            {"table": table, "max_fraction": limit, "repeated_records_excluded": True},
            success=False,
            unexpected_count=lost,
            unexpected_percent=100.0 * lost / n["in"],
        )
        kept = n["imported"] + n.get("merged", 0)
        report = QualityReport(f"import:{table}", n["in"], kept, n["quarantined"], top, top, [share])
        failed.append((report, _alert_failure(ctx, report, f"ingest:{table}", report.to_dict())))
    if failed:  # the first table's report; each alerted with its own
        raise alerted(DataQualityError(failed[0][0]), all(delivered for _, delivered in failed))


def _per_table(sources: list[Any]) -> dict[str, dict[str, int]]:
    """Import counts summed per bronze table: ``in = imported + merged + quarantined``. Two sources
    may feed one table: MovieLens item_extra.tsv's good records are ``merged`` into u.item's rows
    of bronze.items, so ``imported`` is what the table received."""
    out: dict[str, dict[str, int]] = {}
    for s in sources:
        counts = out.setdefault(s.table, {"in": 0, "imported": 0, "quarantined": 0})
        counts["in"] += s.records_in
        kept = "merged" if s.merged else "imported"
        counts[kept] = counts.get(kept, 0) + s.imported
        counts["quarantined"] += s.quarantined
    return out


def quality_config(
    ctx: StepContext, codebook_size: int | None = None, num_positions: int | None = None
) -> Any:
    """The configured quality rules with this run's logical date, Data Docs under ``HISAM_HOME``, and
    the semantic-ID and sample rules taken from the tokenizer and sequence sections (one source of
    truth for K, the code count and the token budget). ``codebook_size``, ``num_positions``: those of
    the tokenizer version whose codes a gate judges (the config's are the next tokenizer's)."""
    from spark_jobs.quality import QualityConfig

    cfg, defaults = ctx.config.quality, QualityConfig()
    update: dict[str, Any] = {"logical_date": ctx.logical_date}
    for section, rules in ctx.config.derived_quality_rules().items():
        values = {name: value for name, (value, _) in rules.items()}
        if section == "semantic_ids":
            version = {"codebook_size": codebook_size, "num_positions": num_positions}
            values |= {name: value for name, value in version.items() if value is not None}
        update[section] = getattr(cfg, section).model_copy(update=values)
    if cfg.docs_dir == defaults.docs_dir:
        update["docs_dir"] = str(ctx.settings.data_docs)
    if cfg.gx_project_dir == defaults.gx_project_dir:
        update["gx_project_dir"] = str(ctx.settings.home / "quality")
    return cfg.model_copy(update=update)


def run_gate(
    ctx: StepContext,
    df: Any,
    suite: Any,
    label: str,
    keep_earlier: Sequence[str] = (),
    record: dict[str, str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run one quality gate: quarantine the failing rows under ``target_table = label`` (replacing
    this run's partition of that label), alert and raise ``DataQualityError`` when the batch fails.

    Returns the valid rows (write these, never ``df``) and the report as a dict. Each gate has its own
    label (:func:`gate_label`), so it never replaces the rejects an importer or a sequence build
    wrote for the same table and day. ``keep_earlier`` (the key columns of ``df``): the caller removes
    the rejected rows from their table, so a rerun of the day cannot find them again; the partition
    then also keeps the rows of earlier runs whose key is no longer in ``df`` (removed), and drops
    those whose key is (an earlier run that failed before removing them, or a rebuild that brought
    them back: this run's verdict on them replaces the earlier one). ``record`` goes into the
    quarantine commit's metadata with the verdict (``passed``, ``quarantined``).
    """
    from pyspark.sql import functions as F

    from spark_jobs.quality import run_quality_gate, to_bronze_quarantine
    from spark_jobs.tables import BRONZE_QUARANTINE, JSON_OPTIONS, row_json

    qcfg = quality_config(ctx)
    try:
        valid, quarantine, report = run_quality_gate(df, suite, qcfg, raise_on_failure=False)
        rows = to_bronze_quarantine(quarantine, label, ctx.logical_date, ctx.dataset)
        partition = {"dataset": ctx.dataset, "target_table": label, "logical_date": ctx.logical_date}
        if keep_earlier:  # earlier rows whose key this run no longer reads: removed, so kept
            earlier = ctx.lake.read(BRONZE_QUARANTINE, partitions=partition)
            schema = df.select(*keep_earlier).schema
            # keys as ``raw`` writes them, on both sides; only the input's keys among the earlier
            # rows' are looked up (no broadcast hint: after a failed run they may be many)
            earlier = earlier.select("*", F.to_json(F.from_json("raw", schema), JSON_OPTIONS).alias("_key"))
            present = df.select(row_json(*keep_earlier).alias("_key"))
            again = present.join(earlier.select("_key"), "_key", "left_semi").distinct()
            rows = earlier.join(again, "_key", "left_anti").drop("_key").unionByName(rows)
        verdict = {"passed": str(report.success).lower(), "quarantined": str(report.n_quarantined)}
        version = ctx.lake.write(
            rows,
            BRONZE_QUARANTINE,
            mode="replace_partition",
            partition_values=partition,
            metadata={**record, **verdict} if record else None,
        )
    finally:
        if qcfg.persist:
            ctx.lake.spark.catalog.clearCache()
    summary = {**report.to_dict(), "quarantine_version": version}
    _stop_on_failure(ctx, report, f"validate:{label}", summary)
    return valid, summary


def _stop_on_failure(ctx: StepContext, report: Any, source: str, summary: dict[str, Any]) -> None:
    """For a failed gate ``report``: alert (with ``summary``) and raise ``DataQualityError``."""
    from pipelines.notify import alerted
    from spark_jobs.quality import DataQualityError

    if not report.success:
        raise alerted(DataQualityError(report), _alert_failure(ctx, report, source, summary))


def _alert_failure(ctx: StepContext, report: Any, source: str, summary: dict[str, Any]) -> bool:
    """Alert about the failed quality ``report`` (with ``summary``); whether it was delivered."""
    from pipelines.notify import Alert

    alert = Alert.from_quality_report(report.to_dict(), source=source)
    return ctx.alert(alert.title, alert.text, "error", report=summary)


def gate_label(table: str) -> str:
    """The ``bronze.quarantine`` label of the gate on ``table``: ``silver.interactions.gate``."""
    return f"{table}.gate"


def versioned_label(table: str, tokenizer_version: str, gate: bool = False) -> str:
    """The ``bronze.quarantine`` label of ``table``'s rows of one tokenizer version
    (``gold.samples@dst-20261101``, ``gold.samples.gate@...``): on the 1st of a month the monthly
    and the daily sequence builds run for different versions, and ``tokenize-new-items`` serves two
    while ``@champion`` is on an older one; neither may replace the other's rejects."""
    return f"{table}{'.gate' if gate else ''}@{tokenizer_version}"


def samples_gate_record(ctx: StepContext, tokenizer_version: str) -> dict[str, str]:
    """What the commits of ``validate-samples`` record: its quarantine commit adds the version it
    read and its verdict, the rewrite of ``gold.samples`` the version it was cut from."""
    return {"step": "validate-samples", "dataset": ctx.dataset, "tokenizer_version": tokenizer_version}


def validated_samples_version(ctx: StepContext, tokenizer_version: str) -> int | None:
    """The newest ``gold.samples`` version that ``validate-samples`` passed for ``tokenizer_version``:
    what it read when it quarantined nothing, else its rewrite; None when it passed none."""
    from spark_jobs.tables import BRONZE_QUARANTINE, GOLD_SAMPLES

    ours = samples_gate_record(ctx, tokenizer_version)
    for whole_history in (False, True):  # the newest markers may all lack their rewrite
        gates = ctx.commits(BRONZE_QUARANTINE.name, {**ours, "passed": "true"}, whole_history)
        for entry in gates:  # newest first
            read = entry["metadata"]["samples_read"]
            if entry["metadata"]["quarantined"] == "0":
                return int(read)
            rewrite = ctx.commits(GOLD_SAMPLES.name, {**ours, "validated_from": read}, whole_history)
            if rewrite:  # absent when the rewrite was refused: the retry's gate is newer
                return rewrite[0]["version"]
        if not gates:
            break
    return None


def validate(ctx: StepContext) -> dict[str, Any]:
    """GX gate on the dataset's silver interactions (keys, timestamps, ratings, known items, duplicates).

    Silver holds every day merged so far, so the gate checks that whole snapshot: the partition of
    this logical date under ``silver.interactions.gate`` lists the rows of the snapshot that fail.
    Downstream steps leave the same rows out (:func:`valid_interactions`). The day's own rows (its
    ``logical_date``) are also judged alone, without writing anything: over the snapshot only, the
    history would dilute the quarantine budget, and a day whose import is all bad would pass once
    the history is a hundred times larger.
    """
    from spark_jobs.quality import run_quality_gate
    from spark_jobs.tables import SILVER_INTERACTIONS, SILVER_ITEMS

    label = gate_label(SILVER_INTERACTIONS.name)
    interactions, suite = _silver_interactions(ctx)
    if (
        ctx.lake.read(SILVER_ITEMS, partitions={"dataset": ctx.dataset}).isEmpty()
        and not interactions.isEmpty()
    ):
        raise ValueError(
            f"silver.items has no rows for dataset {ctx.dataset!r}, so every interaction would be quarantined "
            "as unknown_item: configure source.generic.items (or import the catalogue) and rerun ingest"
        )
    summary = run_gate(ctx, interactions, suite, label)[1]
    day, day_suite = _silver_interactions(ctx, day=True)
    if day.isEmpty():  # no import today: nothing of its own to judge
        return summary
    qcfg = quality_config(ctx)
    try:
        report = run_quality_gate(day, day_suite, qcfg, raise_on_failure=False)[2]
    finally:
        if qcfg.persist:
            ctx.lake.spark.catalog.clearCache()
    summary["day"] = {"success": report.success, "rows": report.n_input, "quarantined": report.n_quarantined}
    _stop_on_failure(ctx, report, f"validate:{label}:day", summary)
    return summary


def _silver_interactions(ctx: StepContext, day: bool = False) -> tuple[Any, Any]:
    """The dataset's silver interactions (``day``: only those of the run's logical date) and the
    interactions suite over them (items must resolve)."""
    from pyspark.sql import functions as F

    from spark_jobs.quality import interactions_suite
    from spark_jobs.tables import SILVER_INTERACTIONS, SILVER_ITEMS

    part = {"dataset": ctx.dataset}
    interactions = ctx.lake.read(SILVER_INTERACTIONS, partitions=part)
    if day:
        interactions = interactions.filter(F.col("logical_date") == F.lit(ctx.logical_date))
    items = ctx.lake.read(SILVER_ITEMS, partitions=part)
    name = "interactions_of_the_day" if day else "interactions"
    return interactions, interactions_suite(interactions, quality_config(ctx), items=items, name=name)


def _id_shape_of(ctx: StepContext, version: str) -> tuple[int | None, int | None]:
    """K and the code count of tokenizer ``version``, as its ``gold.semantic_ids`` rows record them
    (None: no rows, or rows of several)."""
    from pyspark.sql import functions as F

    from spark_jobs.tables import GOLD_SEMANTIC_IDS

    part = {"dataset": ctx.dataset, "tokenizer_version": version}
    ids = ctx.lake.read(GOLD_SEMANTIC_IDS, partitions=part)
    shapes = ids.select("codebook_size", F.size("semantic_ids")).distinct().collect()
    return (int(shapes[0][0]), int(shapes[0][1])) if len(shapes) == 1 else (None, None)


def valid_interactions(ctx: StepContext) -> tuple[Any, int]:
    """The dataset's silver interactions that pass the row rules of ``validate`` (no GX, no writes),
    and how many rows failed them: what the behaviour encoder and the sequence build both read, so
    their chronological cuts agree."""
    from spark_jobs.quality import split_valid_quarantine

    valid, rejected = split_valid_quarantine(*_silver_interactions(ctx))
    return valid, rejected.count()


def validate_samples(ctx: StepContext) -> dict[str, Any]:
    """GX gate on ``gold.samples`` of the current tokenizer (``params.tokenizer_version`` to choose
    another): the training DAGs stop here on bad data.

    When the batch passes with some rows quarantined, the partition is rewritten without them (rows
    in = rows kept + quarantined), and a rerun of the day keeps them in the quarantine partition
    although it no longer finds them; a sample it reads again (a failed run never removed it, or a
    rebuild brought it back) gets this run's verdict instead. The rewrite is refused
    (:class:`~spark_jobs.lake.ConcurrentWriteError`, retried) when the samples were rebuilt after
    they were read, so a newer build is never replaced by an older one. ``samples_version`` of the
    result is the version that passed: the training DAGs hand it to training and evaluation (param
    ``samples_version``), so they never read a quarantined sample or a build no gate has seen.
    """
    from pyspark.sql import functions as F

    from pipelines.tokenizer import current_tokenizer_version
    from spark_jobs.quality import samples_suite
    from spark_jobs.tables import GOLD_SAMPLES

    version = ctx.params.get("tokenizer_version") or current_tokenizer_version(ctx)
    part = {"dataset": ctx.dataset, "tokenizer_version": version}
    read = ctx.lake.version(GOLD_SAMPLES)
    samples = ctx.lake.read(GOLD_SAMPLES, read, partitions=part).filter(F.col("tokenizer_version") == version)
    suite = samples_suite(samples, quality_config(ctx, *_id_shape_of(ctx, version)))
    record = samples_gate_record(ctx, version)
    valid, summary = run_gate(
        ctx,
        samples,
        suite,
        versioned_label(GOLD_SAMPLES.name, version, gate=True),
        keep_earlier=[k for k in GOLD_SAMPLES.keys if k != "split"],  # a rebuild may move the cut
        record={**record, "samples_read": str(read)},
    )
    summary["samples_version"] = read
    if summary["n_quarantined"]:
        summary["samples_version"] = ctx.lake.write(
            valid,
            GOLD_SAMPLES,
            mode="replace_partition",
            partition_values=part,
            read_version=read,
            metadata={**record, "validated_from": str(read)},
        )
        log.warning("removed %d quarantined rows from %s", summary["n_quarantined"], GOLD_SAMPLES.name)
    return {"tokenizer_version": version, **summary}

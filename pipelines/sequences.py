"""Step ``build-sequences``: silver interactions + semantic IDs -> ``gold.samples`` and
``gold.user_sequences`` for one tokenizer version (Sec. 3.3 layout, Sec. 4.1 protocol).

Rows the interactions gate quarantines are left out (the same row rules ``validate`` applies, whose
partition ``silver.interactions.gate`` lists them), so samples only ever hold validated events; rows
the build itself rejects (``null_key``, ``no_label``, ``unknown_action``, ``unknown_item``) go to
``bronze.quarantine`` under ``gold.samples@<version>``, replacing every earlier build's (stamped
with the build's logical date). Silver rows = gate-rejected + samples + quarantined, checked
before anything is written.
The version is ``params.tokenizer_version``, else the tokenizer at ``@current``; before any tokenizer
exists the daily run skips the step and says so. The split is never cut before the version's
behaviour cut (``hisam.behaviour_cut``: its behaviour codes saw every interaction before it), which
only binds when older interactions arrived after the tokenizer was trained. The samples commit
records the build (step, logical date, tokenizer version, the ``bronze.quarantine`` version it saw
before reading silver), which ``samples-ready`` looks for: training waits for samples that hold the
day.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pipelines.context import StepContext

log = logging.getLogger(__name__)


BUILD = "build-sequences"


def build_record(
    ctx: StepContext, version: str, read_at: dt.datetime, seen: int | None, table_id: str | None
) -> dict[str, str]:
    """What a ``gold.samples`` commit of ``build-sequences`` records: the build, its logical date,
    when it read silver, and the ``bronze.quarantine`` version it saw just before (``seen``, -1
    when none) and that table's id: every import promoted by then is in the silver it read."""
    return {
        "step": BUILD,
        "dataset": ctx.dataset,
        "tokenizer_version": version,
        "logical_date": ctx.logical_date.isoformat(),
        "read_at": read_at.isoformat(),
        "quarantine_seen": str(-1 if seen is None else seen),
        "quarantine_table": table_id or "",
    }


def read_after(build: dict[str, str], promotion: dict[str, Any], table_id: str | None) -> bool:
    """Whether a build (its :func:`build_record`) read silver after an import's promotion (its
    commit to ``bronze.quarantine``, whose id is ``table_id``, written after the silver tables): by
    Delta version, so no two workers' clocks are compared. A build that saw another table of that
    name (since recreated: versions restart) or that was recorded before versions were compares
    times."""
    if build.get("quarantine_seen") == "-1":  # no such table yet when it read silver: no promotion either
        return False
    same_table = build.get("quarantine_table", table_id) == table_id
    if "quarantine_seen" in build and same_table:
        return int(build["quarantine_seen"]) >= promotion["version"]
    return dt.datetime.fromisoformat(build["read_at"]) > promotion["timestamp"]


def samples_ready(ctx: StepContext) -> dict[str, Any]:
    """Whether ``gold.samples`` of the current tokenizer holds the run's day (``ready``): once the
    day's import was promoted to silver, a build that read silver after it (the day's own build, the
    catalogue build of a tokenizer that ran that day, or a rerun of an older date); before any import
    of the day, a build for a later day. The build date alone is not enough: the monthly catalogue
    build of the 1st may read silver before that day's import. The training DAGs wait on it, so a
    late ``hisam_features`` delays fine-tuning instead of letting it train on the day before's
    samples."""
    from pipelines.tokenizer import current_tokenizer_version_or_skip
    from spark_jobs.importers.silver import promotion_record
    from spark_jobs.tables import BRONZE_QUARANTINE, GOLD_SAMPLES

    version = ctx.params.get("tokenizer_version") or current_tokenizer_version_or_skip(
        ctx, "samples-ready", "there are no samples to train on"
    )
    wanted = {"step": BUILD, "dataset": ctx.dataset, "tokenizer_version": version}  # whose builds
    builds = [entry["metadata"] for entry in ctx.commits(GOLD_SAMPLES.name, wanted)]
    day = ctx.logical_date.isoformat()
    built = max((b["logical_date"] for b in builds), default=None)
    promoted = promotion_record(ctx.dataset, ctx.logical_date)
    imports = ctx.commits(BRONZE_QUARANTINE.name, promoted) if builds else []
    # newest first: the day's last promotion (a rerun of its import) is the one to have read
    state = ctx.table_state(BRONZE_QUARANTINE.name) if imports else None
    table_id = None if state is None else state[1]
    ready = (
        any(read_after(b, imports[0], table_id) for b in builds)
        if imports
        else built is not None and built > day
    )
    if not ready:
        log.info(
            "%s of %s built for %s: waiting for a build that holds %s", GOLD_SAMPLES.name, version, built, day
        )
    return {"ready": ready, "tokenizer_version": version, "built_for": built}


def build_sequences(ctx: StepContext) -> dict[str, Any]:
    """Build and write the samples and user sequences of the dataset for one tokenizer version; rejects
    over the quarantine budget (``quality.max_quarantine_fraction`` of the valid interactions) are
    written as well, with a warning alert that names their reasons."""
    from pyspark.sql import functions as F

    from pipelines.ingest import valid_interactions, versioned_label
    from pipelines.tokenizer import behaviour_cut_floor, current_tokenizer_version_or_skip
    from spark_jobs.quality import to_bronze_quarantine
    from spark_jobs.quality.gate import allowed_rejects
    from spark_jobs.sequences import build_sequences as build
    from spark_jobs.sequences import build_user_sequences, to_gold_samples, to_gold_user_sequences
    from spark_jobs.tables import BRONZE_QUARANTINE, GOLD_SAMPLES, GOLD_SEMANTIC_IDS, GOLD_USER_SEQUENCES

    version = ctx.params.get("tokenizer_version") or current_tokenizer_version_or_skip(
        ctx, "build-sequences", "there is nothing to build samples for"
    )
    lake, part = ctx.lake, {"dataset": ctx.dataset}
    # before silver is read: see read_after
    seen, seen_table = ctx.table_state(BRONZE_QUARANTINE.name) or (None, None)
    read_at = dt.datetime.now(dt.UTC)
    valid, rejected = valid_interactions(ctx)
    valid = valid.cache()
    semantic_ids = lake.read(GOLD_SEMANTIC_IDS, partitions={**part, "tokenizer_version": version})
    floors = [
        f for f in (ctx.config.sequences.cut_not_before, behaviour_cut_floor(ctx, version)) if f is not None
    ]
    cfg = ctx.config.sequences.model_copy(
        update={
            "dataset": ctx.dataset,
            "tokenizer_version": version,
            "cut_not_before": max(floors, default=None),
        }
    )
    try:
        result = build(valid, semantic_ids, cfg, persist=True)  # unpersisted by clearCache below
        samples = to_gold_samples(result.samples).cache()
        stats = samples.agg(
            F.count(F.lit(1)).alias("samples"),
            F.sum((F.col("split") == "test").cast("int")).alias("test_samples"),
            F.countDistinct(F.when(F.col("split") == "test", F.col("user_id"))).alias("test_users"),
            F.countDistinct(
                F.when((F.col("split") == "test") & F.col("is_cold_user"), F.col("user_id"))
            ).alias("cold_test_users"),
        ).first()
        quarantine = result.quarantine.withColumn("reasons", F.array("reason")).cache()
        quarantined = quarantine.count()
        n_valid = valid.count()
        counts = {k: int(v or 0) for k, v in stats.asDict().items()}  # a sum over no rows is null
        if counts["samples"] + quarantined != n_valid:
            raise RuntimeError(
                f"sequence counts do not reconcile: {counts['samples']} + {quarantined} != {n_valid}; "
                "nothing written"
            )
        if not counts["samples"]:
            reasons = {r.reason: r["count"] for r in quarantine.groupBy("reason").count().collect()}
            raise ValueError(
                f"no samples for tokenizer {version!r}: all {n_valid} valid interactions fail ({reasons}); "
                "nothing written (are its semantic IDs of this dataset's catalogue?)"
            )
        # validate-samples judges the samples written, so it cannot see what this build left out (an
        # item tokenize-new-items never gave IDs, for days): over the quarantine budget, a warning
        # (the day's training goes on, on the rest: a failure would hold up the fine-tune as well)
        limit = ctx.config.quality.max_quarantine_fraction
        over = quarantined > allowed_rejects(limit, n_valid)
        reasons = (
            {r.reason: r["count"] for r in quarantine.groupBy("reason").count().collect()} if over else {}
        )
        label = versioned_label(GOLD_SAMPLES.name, version)
        versions = {  # gold.samples last: its commit carries the build record samples-ready waits for
            GOLD_USER_SEQUENCES.name: lake.write(
                to_gold_user_sequences(build_user_sequences(result.interactions, cfg)),
                GOLD_USER_SEQUENCES,
                mode="replace_partition",
                partition_values=part,
            ),
            BRONZE_QUARANTINE.name: lake.write(
                to_bronze_quarantine(quarantine, label, ctx.logical_date, ctx.dataset),
                BRONZE_QUARANTINE,
                mode="replace_partition",  # every date's: the samples are rebuilt whole, so are their rejects
                partition_values={**part, "target_table": label},
            ),
            GOLD_SAMPLES.name: lake.write(
                samples,
                GOLD_SAMPLES,
                mode="replace_partition",
                partition_values={**part, "tokenizer_version": version},
                metadata=build_record(ctx, version, read_at, seen, seen_table),
            ),
        }
    finally:
        lake.spark.catalog.clearCache()
    if over:  # once the build is visible: an attempt that fails to write it (and is retried) alerts nothing
        ctx.alert(
            f"samples of {version} leave out {quarantined / n_valid:.1%} of the valid interactions",
            f"{quarantined} of {n_valid} quarantined, over the budget of {limit:.1%}: {reasons}",
            "warning",
            reasons=reasons,
        )
    return {
        "tokenizer_version": version,
        "interactions": n_valid + rejected,
        "gate_rejected": rejected,
        "quarantined": quarantined,
        "over_budget": over,
        "cut": result.cut.to_dict(),
        **counts,
        "versions": versions,
    }

"""Step ``embed``: item documents and user profiles, then one embedding per item and modality, then
the embeddings gate (dimension and finite values, ``spark_jobs.quality.embeddings_suite``).

Text and image go through the Spark embedding job (resumable: an item already embedded by the same
encoder version with the same input is skipped). Behaviour is SASRec trained only on interactions
before the global chronological cut (App. B.2: the behaviour encoder must not see the ranking test
period), computed on the gate-valid interactions exactly as ``build-sequences`` computes it; its
rows are keyed by a hash of the cut, of the events before it (their count and a digest of their
user, item and second: a corrected event that keeps the cut retrains it), of the catalogue (the
encoder's item table spans it) and of the encoder settings, so a rerun with the same data and
config finds them and trains nothing.
``gold.behaviour_cuts`` keeps that hash's cut, written before the rows: a tokenizer trained on them
is tagged with it (:func:`behaviour_cut_of`), and its samples are never cut earlier
(``SequenceConfig.cut_not_before``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
from typing import Any

from pipelines.context import StepContext

log = logging.getLogger(__name__)

BEHAVIOR_ENCODER = "sasrec"


def behaviour_cut_of(ctx: StepContext, input_hashes: set[str]) -> int | None:
    """The latest ``gold.behaviour_cuts`` cut of the behaviour rows with these input hashes (unix
    seconds), or None when one has none (rows written before the table existed)."""
    from spark_jobs.tables import GOLD_BEHAVIOUR_CUTS

    if not input_hashes or ctx.table_version(GOLD_BEHAVIOUR_CUTS.name) is None:
        return None
    frame, _ = ctx.read_table(
        GOLD_BEHAVIOUR_CUTS.name, {"dataset": ctx.dataset}, ["input_hash", "cut_seconds"]
    )
    cuts = frame.set_index("input_hash")["cut_seconds"]
    if not input_hashes <= set(cuts.index):
        return None
    return int(cuts.loc[sorted(input_hashes)].max())


def _behavior_embeddings(ctx: StepContext) -> dict[str, Any]:
    from pipelines.ingest import valid_interactions

    interactions, _ = valid_interactions(ctx)  # the rows build-sequences reads: the same cut
    interactions = interactions.cache()  # read four times: twice for the cut, its hash, the events
    try:
        return _train_behavior(ctx, interactions)
    finally:
        interactions.unpersist()


def _train_behavior(ctx: StepContext, interactions: Any) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    from pyspark.sql import functions as F

    from hisam_core.encoders.behavior import BehaviorEncoder
    from spark_jobs.sequences import prepare_interactions
    from spark_jobs.tables import GOLD_BEHAVIOUR_CUTS, GOLD_ITEM_DOCUMENTS, GOLD_ITEM_EMBEDDINGS

    lake, cfg = ctx.lake, ctx.config
    part = {"dataset": ctx.dataset}
    seq_cfg = cfg.sequences.model_copy(update={"dataset": ctx.dataset})
    _, _, cut = prepare_interactions(interactions, seq_cfg)
    settings = json.dumps(cfg.embeddings.behavior.model_dump(mode="json"), sort_keys=True)
    cutoff = cut.whole_seconds()
    seconds = F.unix_timestamp("event_ts")
    trained_on = (  # which events the encoder learns from, not only how many: a corrected time or id
        interactions.filter(seconds < F.lit(cutoff))  # that keeps the cut and the count retrains it
        .agg(F.count(F.lit(1)).alias("n"), F.bit_xor(F.xxhash64("user_id", "item_id", seconds)).alias("x"))
        .first()
    )
    digest = f"{trained_on['n']}:{trained_on['x']}"
    items = lake.read(GOLD_ITEM_DOCUMENTS, partitions=part).select("item_id")
    item_ids = np.sort(items.toPandas()["item_id"].to_numpy())
    # the catalogue too: the encoder's softmax and item table span it, so one space per hash
    catalogue = hashlib.sha256(item_ids.astype(np.int64).tobytes()).hexdigest()
    input_hash = hashlib.sha256(f"{cut.to_dict()}|{digest}|{catalogue}|{settings}".encode()).hexdigest()
    version = cfg.embeddings.behavior_version
    done = (
        lake.read(GOLD_ITEM_EMBEDDINGS, partitions={**part, "modality": "behavior"})
        .filter(
            (F.col("encoder") == BEHAVIOR_ENCODER)
            & (F.col("encoder_version") == version)
            & (F.col("input_hash") == input_hash)
        )
        .select("item_id")
    )
    missing = items.join(done, "item_id", "left_anti").count()
    if behaviour_cut_of(ctx, {input_hash}) is None:  # recorded before the rows, and for rows without
        record = [(ctx.dataset, input_hash, BEHAVIOR_ENCODER, version, cutoff, ctx.logical_date)]
        df = lake.spark.createDataFrame(record, schema=GOLD_BEHAVIOUR_CUTS.schema)
        lake.write(df, GOLD_BEHAVIOUR_CUTS, mode="merge")
    if missing == 0:
        log.info("behaviour embeddings up to date (cut %s)", cut.to_dict())
        return {"encoder": BEHAVIOR_ENCODER, "embedded": 0, "skipped": items.count()}
    events = (  # only what the encoder trains on reaches the driver
        interactions.select("user_id", "item_id", F.unix_timestamp("event_ts").alias("timestamp"))
        .filter(F.col("timestamp") < F.lit(cutoff))
        .toPandas()
    )
    known = events[events["item_id"].isin(item_ids)]
    if len(known) < len(events):  # the gate keeps only catalogue items: the catalogue changed since
        log.warning(
            "%d of %d training events are of items not in %s: the behaviour encoder leaves them out",
            len(events) - len(known),
            len(events),
            GOLD_ITEM_DOCUMENTS.name,
        )
    encoder = BehaviorEncoder(cfg.embeddings.behavior, device="cpu").fit(known, cutoff, item_ids)
    batch = encoder.encode(item_ids)
    rows = pd.DataFrame(
        {
            "dataset": ctx.dataset,
            "modality": "behavior",
            "encoder": BEHAVIOR_ENCODER,
            "encoder_version": version,
            "item_id": item_ids,
            "dim": encoder.dim,
            "embedding": [r.astype(np.float32) for r in batch.embeddings],
            "present": batch.present,
            "input_hash": input_hash,
            "fingerprint": None,  # one commit per training: no two spaces (encoder_fingerprints)
        }
    )
    df = lake.spark.createDataFrame(rows, schema=GOLD_ITEM_EMBEDDINGS.schema)
    written = lake.write(
        df,
        GOLD_ITEM_EMBEDDINGS,
        mode="merge",
        partition_values={**part, "modality": "behavior"},
    )
    return {
        "encoder": BEHAVIOR_ENCODER,
        "embedded": len(rows),
        "cold": int((~batch.present).sum()),
        "cut": cut.to_dict(),
        "version": written,
    }


def embed(ctx: StepContext) -> dict[str, Any]:
    """Gold content tables, then text, image and behaviour embeddings of every item."""
    from spark_jobs.content import build_content
    from spark_jobs.embeddings import embed_items

    content = build_content(ctx.lake, ctx.dataset, ctx.config.content)
    emb = ctx.config.embeddings
    summary: dict[str, Any] = {
        "items": content.items,
        "users": content.users,
        "content_versions": content.versions,
    }
    for spec in (emb.text, emb.image):
        report = embed_items(ctx.lake, ctx.dataset, spec, emb.job)
        summary[spec.modality] = {
            "encoder": report.encoder,
            "embedded": report.embedded,
            "skipped": report.skipped,
            "absent": report.absent,
        }
    summary["behavior"] = _behavior_embeddings(ctx)
    summary["gate"] = _gate_embeddings(ctx)
    return summary


def _gate_embeddings(ctx: StepContext) -> dict[str, Any]:
    """GX gate on the dataset's embeddings of the configured encoders (keys, dimension, finite
    values): failing rows are quarantined under ``gold.item_embeddings.gate`` and left out by the
    tokenizer steps. Rows of earlier encoders stay in the table (encoder and version are part of its
    key) but nothing reads them, so they are not judged: with ``expected_dims`` set for a new
    encoder, the old one's rows of another dimension would fail the gate every day."""
    from pyspark.sql import functions as F

    from pipelines.ingest import gate_label, quality_config, run_gate
    from pipelines.tokenizer import encoder_specs
    from spark_jobs.quality import embeddings_suite
    from spark_jobs.tables import GOLD_ITEM_EMBEDDINGS

    configured = [
        (F.col("modality") == modality) & (F.col("encoder") == name) & (F.col("encoder_version") == version)
        for modality, (name, version) in encoder_specs(ctx).items()
    ]
    rows = ctx.lake.read(GOLD_ITEM_EMBEDDINGS, partitions={"dataset": ctx.dataset}).filter(
        functools.reduce(operator.or_, configured)
    )
    suite = embeddings_suite(rows, quality_config(ctx))
    _, report = run_gate(ctx, rows, suite, gate_label(GOLD_ITEM_EMBEDDINGS.name))
    return {k: report[k] for k in ("n_input", "n_valid", "n_quarantined")}

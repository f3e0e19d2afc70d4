"""The data steps on a source with defects: every row accounted for, each reject in its own
quarantine partition, and the behaviour encoder cut where the samples are cut.

Real local Spark and Delta, GX, one generic JSONL source: 300 clean events, 1 without rating or
label (bronze rejects it), 2 repeated events (silver rejects them), 2 events of an item the catalogue lacks, at the very
end of the log (the interactions gate rejects them), and one catalogue item without semantic IDs.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

DAY = dt.date(2026, 11, 1)
START = int(dt.datetime(2026, 10, 1, tzinfo=dt.UTC).timestamp())
VERSION = "dst-test"


def _source(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    events = [
        {
            "user_id": f"u{rng.integers(12)}",
            "item_id": f"i{rng.integers(20)}",
            "timestamp": START + 3600 * k,
            "rating": int(rng.integers(1, 6)),
        }
        for k in range(300)
    ]
    events += [events[10], events[20]]  # repeated: same user, item and time
    events.append({"user_id": "u1", "item_id": "i1", "timestamp": START + 7, "action": "view"})  # no label
    events += [
        {"user_id": "u2", "item_id": "ghost", "timestamp": START + 3600 * (300 + k), "rating": 5}
        for k in range(2)
    ]
    items = [
        {"item_id": f"i{i}", "title": f"Film {i}", "genres": "Drama|Comedy"[: 5 + i % 2]} for i in range(20)
    ]
    users = [
        {"user_id": f"u{u}", "age": 20 + u, "gender": "FM"[u % 2], "occupation": "writer"} for u in range(12)
    ]
    paths = {}
    for name, rows in {"interactions": events, "items": items, "users": users}.items():
        paths[name] = str(root / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def ctx_of(spark, tmp_path_factory, write_config, pipeline_home):
    """``ctx_of(**params)``: a StepContext on the defective source, its home under a temp folder."""
    from pipelines.context import StepContext
    from pipelines.steps import load_config

    home = tmp_path_factory.mktemp("data-steps")
    source = {"kind": "generic", "generic": {"dataset": "dq", **_source(home)}}
    path = write_config(home / "pipeline.yaml", top={"dataset": "dq", "source": source})
    config = yaml.safe_load(path.read_text())
    config["sequences"]["profile_tokens"] = 0
    config["ranker"]["profile_fields"] = []
    config["tokenizer"]["health"]["min_utilisation"] = 0.1  # 20 items need not fill 16 codes a position
    path.write_text(yaml.safe_dump(config))
    with pipeline_home(home, path):
        yield lambda **params: StepContext(load_config(path), DAY, params=params)


def _behaviour_fits(monkeypatch) -> list:
    """Records, per training of the behaviour encoder from here on, the events it learns from: those
    before the cut it is given."""
    from hisam_core.encoders.behavior import BehaviorEncoder

    trained_on, fit = [], BehaviorEncoder.fit

    def spy(self, interactions, cutoff, *args, **kwargs):
        trained_on.append(interactions[interactions["timestamp"] < cutoff])
        return fit(self, interactions, cutoff, *args, **kwargs)

    monkeypatch.setattr(BehaviorEncoder, "fit", spy)
    return trained_on


def _quarantine(ctx, label: str) -> list[str]:
    frame, _ = ctx.read_table("bronze.quarantine", {"dataset": "dq", "target_table": label}, ["reason"])
    return sorted(frame["reason"])


def test_ingest_and_gate_keep_their_own_rejects_and_every_row_is_accounted_for(ctx_of) -> None:
    from pipelines.steps import run_step

    ingest = run_step("ingest", DAY, ctx_of().config)
    assert ingest["bronze"]["bronze.interactions"] == {"in": 305, "imported": 302, "quarantined": 3}
    assert ingest["silver_rows"]["silver.interactions"] == 302
    gate = run_step("validate", DAY, ctx_of().config)
    assert (gate["n_input"], gate["n_valid"], gate["n_quarantined"]) == (302, 300, 2)
    ctx = ctx_of()
    bronze = _quarantine(ctx, "bronze.interactions")  # the two repeated events, first kept: 305 = 302 + 3
    assert len(bronze) == 3 and all(r.startswith("duplicate event") for r in bronze[:2])
    assert bronze[2] == "neither rating nor label" and _quarantine(ctx, "silver.interactions") == []
    assert len(_quarantine(ctx, "silver.interactions.gate")) == 2  # the gate's rows
    run_step("ingest", DAY, ctx_of().config)  # a rerun of ingest does not erase the gate's rows
    assert len(_quarantine(ctx, "silver.interactions.gate")) == 2


def test_samples_reconcile_with_silver_and_the_behaviour_cut_is_the_samples_cut(
    ctx_of, spark, monkeypatch
) -> None:
    from deltalake import DeltaTable

    from pipelines.steps import run_step
    from spark_jobs.tables import GOLD_SEMANTIC_IDS

    trained_on = _behaviour_fits(monkeypatch)
    ctx = ctx_of()
    assert run_step("embeddings-ready", DAY, ctx.config) == {"ready": False, "items": 0, "missing": {}}
    embed = run_step("embed", DAY, ctx.config)
    covered = {"ready": True, "items": 20, "missing": {"behavior": 0, "image": 0, "text": 0}}
    assert run_step("embeddings-ready", DAY, ctx.config) == covered
    cuts, _ = ctx.read_table("gold.behaviour_cuts", {"dataset": "dq"}, ["input_hash", "cut_seconds"])
    assert cuts["cut_seconds"].tolist() == [embed["behavior"]["cut"]["cut_seconds"]]
    DeltaTable(ctx.table_path("gold.behaviour_cuts")).delete()  # rows embedded before the table existed
    again = run_step("embed", DAY, ctx.config)
    assert again["behavior"]["embedded"] == 0  # nothing retrained, the cut recorded all the same
    assert ctx.read_table("gold.behaviour_cuts", {"dataset": "dq"}, ["input_hash", "cut_seconds"])[0].equals(
        cuts
    )
    known = [i for i in range(20) if i != 7]  # item i7 has no semantic IDs: its events are quarantined
    item_ids, _ = ctx.read_table("silver.items", {"dataset": "dq"}, ["item_id", "item_key"])
    ids = item_ids[item_ids["item_key"].isin([f"i{i}" for i in known])]["item_id"].tolist()
    rows = [("dq", VERSION, int(i), [k % 16 for k in range(int(i) % 97, int(i) % 97 + 6)], 16) for i in ids]
    ctx.lake.write(
        spark.createDataFrame(rows, schema=GOLD_SEMANTIC_IDS.schema),
        GOLD_SEMANTIC_IDS,
        mode="replace_partition",
        partition_values={"dataset": "dq", "tokenizer_version": VERSION},
    )
    out = run_step("build-sequences", DAY, ctx.config, {"tokenizer_version": VERSION})
    assert out["interactions"] == 302 and out["gate_rejected"] == 2
    assert out["samples"] + out["quarantined"] + out["gate_rejected"] == 302
    reasons = _quarantine(ctx, f"gold.samples@{VERSION}")
    assert len(reasons) == out["quarantined"] > 0 and set(reasons) == {"unknown_item"}
    rerun = run_step(
        "build-sequences", DAY - dt.timedelta(days=1), ctx.config, {"tokenizer_version": VERSION}
    )
    assert rerun["quarantined"] == out["quarantined"]  # a build of another date replaces the rejects:
    assert _quarantine(ctx, f"gold.samples@{VERSION}") == reasons  # each rejected event held once
    assert embed["behavior"]["cut"] == out["cut"]  # the ghost events at the end move neither
    (events,) = trained_on  # the rerun trained nothing
    samples, _ = ctx.read_table(
        "gold.samples", {"dataset": "dq", "tokenizer_version": VERSION}, ["split", "event_ts"]
    )
    test = samples.loc[samples["split"] == "test", "event_ts"]
    assert len(events) > 0 and len(test) > 0
    assert events["timestamp"].max() < test.min().timestamp()  # no test event reached the encoder


@pytest.mark.parametrize("fault", ["drops", "repeats"])
def test_a_build_that_loses_or_repeats_a_sample_writes_nothing(ctx_of, monkeypatch, fault) -> None:
    """Runs after the samples test. The step's own count check, not the transform's: a sample lost or
    repeated between the transform and the write fails the build before any table is written."""
    import dataclasses

    from deltalake import DeltaTable

    import spark_jobs.sequences
    from pipelines.steps import run_step

    ctx = ctx_of()
    build = spark_jobs.sequences.build_sequences

    def faulty(*args, **kwargs):
        result = build(*args, **kwargs)
        samples = result.samples
        changed = (
            samples.limit(samples.count() - 1) if fault == "drops" else samples.unionByName(samples.limit(1))
        )
        return dataclasses.replace(result, samples=changed)

    monkeypatch.setattr(spark_jobs.sequences, "build_sequences", faulty)
    tables = ["gold.samples", "gold.user_sequences", "bronze.quarantine"]
    before = [DeltaTable(ctx.table_path(t)).version() for t in tables]
    with pytest.raises(
        RuntimeError, match=r"sequence counts do not reconcile: \d+ \+ \d+ != 300; nothing written"
    ):
        run_step("build-sequences", DAY, ctx.config, {"tokenizer_version": VERSION})
    assert [DeltaTable(ctx.table_path(t)).version() for t in tables] == before


def test_training_waits_for_the_days_build_and_skips_before_any_tokenizer(ctx_of) -> None:
    """Builds on the samples of DAY: ``samples-ready`` finds the build's commit record. A build of
    the day that read silver before the day's import (the monthly catalogue build of the 1st, racing
    that day's features run) does not hold it."""
    from pipelines.steps import StepSkipped, run_step

    config, version = ctx_of().config, {"tokenizer_version": VERSION}
    ready = run_step("samples-ready", DAY, config, version)
    assert ready["ready"] and ready["built_for"] == DAY.isoformat()
    later = run_step("samples-ready", DAY + dt.timedelta(days=1), config, version)
    assert later == {"ready": False, "tokenizer_version": VERSION, "built_for": DAY.isoformat()}
    run_step("ingest", DAY, config)  # the day's import lands after its build
    assert run_step("samples-ready", DAY, config, version)["ready"] is False
    run_step("build-sequences", DAY, config, version)
    assert run_step("samples-ready", DAY, config, version)["ready"] is True
    for skip in ("true", "yes", "1"):
        for step in ("samples-ready", "tokenize-new-items", "build-sequences"):  # skipped, not done
            with pytest.raises(StepSkipped, match="no tokenizer activated yet"):
                run_step(step, DAY, config, {"skip_without_tokenizer": skip})
    with pytest.raises(ValueError, match="skip_without_tokenizer must be true or false, got 'ture'"):
        run_step("samples-ready", DAY, config, {"skip_without_tokenizer": "ture"})
    with pytest.raises(ValueError, match="no hisam-tokenizer@current yet"):
        run_step("samples-ready", DAY, config)


def test_a_tokenizer_without_ids_of_this_catalogue_builds_nothing(ctx_of, spark) -> None:
    from pipelines.steps import run_step
    from spark_jobs.tables import GOLD_SEMANTIC_IDS

    ctx = ctx_of()
    rows = [("dq", "other", 10_000 + i, [i] * 6, 16) for i in range(3)]  # items of no catalogue
    ctx.lake.write(
        spark.createDataFrame(rows, schema=GOLD_SEMANTIC_IDS.schema),
        GOLD_SEMANTIC_IDS,
        mode="replace_partition",
        partition_values={"dataset": "dq", "tokenizer_version": "other"},
    )
    before = ctx.lake.version("gold.samples")
    with pytest.raises(ValueError, match=r"no samples for tokenizer 'other': all 300 valid .*unknown_item"):
        run_step("build-sequences", DAY, ctx.config, {"tokenizer_version": "other"})
    assert ctx.lake.version("gold.samples") == before


def test_a_rerun_of_the_samples_gate_keeps_the_rows_it_removed(ctx_of) -> None:
    """Builds on the samples: two identical ones with out-of-codebook targets pass the gate within
    its tolerance and are removed from gold.samples. A rerun of the day finds none, yet the
    quarantine still lists both, and the build's own rejects of that version are untouched
    (kept + quarantined = in).
    Training without a named version reads the newest one the gate passed, never a newer unchecked one."""
    from pyspark.sql import functions as F

    from pipelines.ingest import validated_samples_version
    from pipelines.ranker import samples_version
    from pipelines.steps import run_step

    ctx, params = ctx_of(), {"tokenizer_version": VERSION}
    part = {"dataset": "dq", "tokenizer_version": VERSION}
    samples = ctx.lake.read("gold.samples", partitions=part)
    clean, built = samples.count(), _quarantine(ctx, f"gold.samples@{VERSION}")
    bad = samples.limit(1).withColumn("target_semantic_ids", F.array(*[F.lit(99)] * 6))
    bad = bad.withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL 1 SECOND"))
    ctx.lake.write(bad.unionByName(bad), "gold.samples", mode="append")
    with pytest.raises(ValueError, match="run `hisam run validate-samples` first"):
        samples_version(ctx, VERSION)  # what training reads: no gate has seen these samples
    first = run_step("validate-samples", DAY, ctx.config, params)
    assert first["success"] and (first["n_input"], first["n_quarantined"]) == (clean + 2, 2)
    assert len(_quarantine(ctx, f"gold.samples.gate@{VERSION}")) == 2  # identical rows, each counted
    assert ctx.lake.read("gold.samples", partitions=part).count() == clean
    assert samples_version(ctx, VERSION) == first["samples_version"]  # the rewrite, never the bad rows
    assert samples_version(ctx_of(samples_version="3", **params), VERSION) == 3  # a named version wins
    again = run_step("validate-samples", DAY, ctx.config, params)
    assert again["success"] and (again["n_input"], again["n_quarantined"]) == (clean, 0)
    assert validated_samples_version(ctx, VERSION) == again["samples_version"] == first["samples_version"]
    assert validated_samples_version(ctx, "other") is None
    later = samples.limit(1).withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL 2 SECOND"))
    unchecked = ctx.lake.write(later, "gold.samples", mode="append")  # a newer build, not yet gated
    assert samples_version(ctx, VERSION) == first["samples_version"] < unchecked
    assert len(_quarantine(ctx, f"gold.samples.gate@{VERSION}")) == 2
    assert _quarantine(ctx, f"gold.samples@{VERSION}") == built

    # a run that fails removes nothing; once its rejects are rebuilt right, the next run reads them
    # as valid and takes them out of the quarantine, which keeps the two removed earlier
    from spark_jobs.quality import DataQualityError

    pinned = ctx.lake.version("gold.samples")
    right = samples.orderBy("user_id", "item_id").limit(10)
    right = right.withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL 3 SECOND"))
    wrong = right.withColumn("target_semantic_ids", F.array(*[F.lit(99)] * 6))
    ctx.lake.write(wrong, "gold.samples", mode="append")
    with pytest.raises(DataQualityError):  # 10 of ~300: over the tolerance
        run_step("validate-samples", DAY, ctx.config, params)
    assert len(_quarantine(ctx, f"gold.samples.gate@{VERSION}")) == 12
    before = ctx.lake.read("gold.samples", version=pinned, partitions=part)
    ctx.lake.write(before.unionByName(right), "gold.samples", mode="replace_partition", partition_values=part)
    fixed = run_step("validate-samples", DAY, ctx.config, params)
    assert fixed["success"] and (fixed["n_input"], fixed["n_quarantined"]) == (before.count() + 10, 0)
    assert len(_quarantine(ctx, f"gold.samples.gate@{VERSION}")) == 2
    ctx.lake.write(before, "gold.samples", mode="replace_partition", partition_values=part)  # as it was
    # the config's K is the next tokenizer's: the gate judges this version's codes by its own K
    model = ctx.config.tokenizer.train.model
    assert (
        model.codebook_size == 16
        and max(max(r[0]) for r in before.select("target_semantic_ids").collect()) >= 8
    )
    train = ctx.config.tokenizer.train.model_copy(
        update={"model": model.model_copy(update={"codebook_size": 8})}
    )
    smaller = ctx.config.model_copy(
        update={"tokenizer": ctx.config.tokenizer.model_copy(update={"train": train})}
    )
    assert run_step("validate-samples", DAY, smaller, params)["n_quarantined"] == 0


def test_a_rerun_of_the_samples_gate_keeps_a_removed_sample_a_millisecond_from_a_kept_one(ctx_of) -> None:
    """Two samples of one user and item 800 microseconds apart, the earlier out of the codebook: the
    gate removes it, and a rerun, which reads only the later, still lists it. Keys and ``raw`` were
    JSON with milliseconds, so the rerun took the kept sample for the removed one and dropped its
    quarantine row: the sample was in neither table."""
    from pyspark.sql import functions as F

    from pipelines.steps import run_step

    ctx, params = ctx_of(), {"tokenizer_version": VERSION}
    part = {"dataset": "dq", "tokenizer_version": VERSION}
    pinned = ctx.lake.version("gold.samples")
    one = ctx.lake.read("gold.samples", partitions=part).orderBy("user_id", "item_id").limit(1)
    removed = one.withColumn("target_semantic_ids", F.array(*[F.lit(99)] * 6)).withColumn(
        "event_ts", F.col("event_ts") + F.expr("INTERVAL '4.0001' SECOND")
    )
    kept = one.withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL '4.0009' SECOND"))
    ctx.lake.write(removed.unionByName(kept), "gold.samples", mode="append")
    gate = f"gold.samples.gate@{VERSION}"
    earlier = len(_quarantine(ctx, gate))
    first = run_step("validate-samples", DAY, ctx.config, params)
    assert first["success"] and first["n_quarantined"] == 1
    assert len(_quarantine(ctx, gate)) == earlier + 1
    again = run_step("validate-samples", DAY, ctx.config, params)
    assert again["success"] and again["n_quarantined"] == 0
    assert len(_quarantine(ctx, gate)) == earlier + 1
    rows = ctx.lake.read("bronze.quarantine", partitions={"dataset": "dq", "target_table": gate}).collect()
    stamps = [json.loads(r.raw)["event_ts"] for r in rows]
    assert sum(t.endswith(".000100Z") for t in stamps) == 1, stamps  # the exact time, not .000Z
    before = ctx.lake.read("gold.samples", version=pinned, partitions=part)
    ctx.lake.write(before, "gold.samples", mode="replace_partition", partition_values=part)  # as it was


def test_a_non_finite_embedding_is_quarantined_and_its_item_left_out_of_the_tokenizer(ctx_of, spark) -> None:
    """Runs after the samples tests (it corrupts one text embedding)."""
    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    from pipelines.context import StepContext
    from pipelines.steps import run_step
    from pipelines.tokenizer import load_item_features, load_new_item_features
    from spark_jobs.quality import DataQualityError

    ctx = ctx_of()
    text = ctx.lake.read("gold.item_embeddings", partitions={"dataset": "dq", "modality": "text"})
    victim = text.orderBy("item_id").limit(1)
    item = victim.first()["item_id"]
    nan = F.transform("embedding", lambda x: F.lit(float("nan")).cast("float"))
    ctx.lake.write(victim.withColumn("embedding", nan), "gold.item_embeddings", mode="merge")
    with pytest.raises(DataQualityError):  # 1 of 60 rows: above the 1% the gate tolerates
        run_step("embed", DAY, ctx.config)  # resumable: the bad row has the same input, it is kept
    assert _quarantine(ctx, "gold.item_embeddings.gate") == ["embedding_not_finite"]
    features, _, incomplete = load_item_features(ctx)
    assert incomplete == {item: "invalid_embedding:text"} and item not in features.item_ids
    assert len(features) == 19
    for modality, flags in features.present.items():  # the embed step's fallback flags reach DST
        rows = ctx.lake.read("gold.item_embeddings", partitions={"dataset": "dq", "modality": modality})
        table = {r.item_id: r.present for r in rows.select("item_id", "present").collect()}
        assert flags.tolist() == [table[i] for i in features.item_ids], modality
    # the gate's configured dimension holds here too: a text encoder of another width is refused
    dim = len(features.modalities["text"][0])
    for expected, usable in ((dim, 19), (dim + 1, 0)):
        quality = ctx.config.quality.model_copy(deep=True)
        quality.embeddings.expected_dims = {"text": expected}
        strict = StepContext(ctx.config.model_copy(update={"quality": quality}), DAY)
        if usable:
            assert len(load_item_features(strict)[0]) == usable
        else:
            with pytest.raises(ValueError, match=f"no usable text rows .*20 fail .*expected_dims {expected}"):
                load_item_features(strict)
    # an embed in progress (one text row not written yet): the tokenizer DAG keeps waiting
    DeltaTable(ctx.table_path("gold.item_embeddings")).delete(f"modality = 'text' AND item_id = {item}")
    waiting = run_step("embeddings-ready", DAY, ctx.config)
    assert waiting == {"ready": False, "items": 20, "missing": {"behavior": 0, "image": 0, "text": 1}}
    # the catalogue decides: an item retracted from gold.item_documents is left out (the embed step's
    # merge keeps its rows), and a catalogue item with no embedding yet is reported missing all three
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    documents = ctx.table_path("gold.item_documents")
    listed = DeltaTable(documents).to_pyarrow_table()
    gone, newcomer = int(features.item_ids[0]), 10**6
    row = listed.filter(pc.equal(listed["item_id"], gone))
    added = row.set_column(row.schema.get_field_index("item_id"), "item_id", pa.array([newcomer], pa.int64()))
    DeltaTable(documents).delete(f"item_id = {gone}")
    write_deltalake(documents, added.cast(listed.schema), mode="append")
    try:
        after, snapshot, incomplete = load_item_features(ctx)
        pinned = load_item_features(ctx, version=snapshot)[2]  # as tokenize-catalogue reads
        # the daily step reads only some items: exactly what the whole read gives for them
        complete = [int(i) for i in after.item_ids[:3]]
        for items in ([], [item, newcomer], [gone, 10**7], [*complete, item, newcomer, gone]):
            some, version, why = load_new_item_features(ctx, items)
            assert version == snapshot and why == {i: r for i, r in incomplete.items() if i in items}
            keep = np.flatnonzero(np.isin(after.item_ids, items))
            if not len(keep):
                assert some is None, items
                continue
            expected = after.subset(keep)
            assert some.item_ids.tolist() == expected.item_ids.tolist() == complete
            for modality in expected.names:
                assert np.array_equal(some.modalities[modality], expected.modalities[modality])
                assert np.array_equal(some.present[modality], expected.present[modality])
    finally:
        DeltaTable(documents).delete(f"item_id = {newcomer}")
        write_deltalake(documents, row, mode="append")
    assert gone not in after.item_ids and len(after) == 18
    everything = ",".join(features.modalities)
    assert incomplete == {item: "missing_embedding:text", newcomer: f"missing_embedding:{everything}"}
    assert pinned == {item: "missing_embedding:text"}  # a pinned snapshot predates the newcomer


def test_a_tokenizer_failing_codebook_health_is_not_registered_and_alerts(ctx_of) -> None:
    """64 codes per position for 19 items: no position can use more than 19 / 64 of its codes, under
    the floor of 0.5. The run is tagged and logs its health, one alert names the failing positions,
    and nothing is registered or made current; the next test's train-tokenizer of the same version
    then registers it (a failure blocks no retry)."""
    import json

    import mlflow

    from pipelines.config import PipelineConfig
    from pipelines.registry import CURRENT, alias_version, find_versions
    from pipelines.steps import run_step
    from pipelines.tokenizer import TokenizerHealthError

    ctx = ctx_of()
    raw = ctx.config.model_dump()
    raw["tokenizer"]["train"]["model"]["codebook_size"] = 64
    raw["ranker"]["sequence"]["codebook_size"] = 64
    raw["tokenizer"]["health"] = {"min_utilisation": 0.5, "min_unique_id_rate": 0.0}
    config = PipelineConfig.model_validate(raw)
    alerts = ctx.settings.home / "alerts.jsonl"
    before = alerts.read_text().splitlines() if alerts.exists() else []
    with pytest.raises(
        TokenizerHealthError, match=rf"tokenizer {VERSION} failed codebook health: utilisation_"
    ):
        run_step("train-tokenizer", DAY, config, {"tokenizer_version": VERSION})
    assert find_versions(ctx.mlflow, "hisam-tokenizer") == []
    assert alias_version(ctx.mlflow, "hisam-tokenizer", CURRENT) is None
    (run,) = mlflow.search_runs(
        experiment_names=[ctx.settings.experiment],
        filter_string=f"tags.`hisam.step` = 'train-tokenizer' and tags.tokenizer_version = '{VERSION}'",
        output_format="list",
    )
    assert run.data.tags["health"] == "failed"
    used = {k: v for k, v in run.data.metrics.items() if k.startswith("utilisation_")}
    assert len(used) == 6 and max(used.values()) <= 19 / 64
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines()[len(before) :]]
    assert alert["title"] == f"tokenizer {VERSION} failed codebook health"
    assert alert["text"].count("below 0.500") == 6
    # a rerun would continue that run from its last epoch, to the same model; force trains anew
    with pytest.raises(TokenizerHealthError):
        run_step("train-tokenizer", DAY, config, {"tokenizer_version": VERSION, "force": "true"})
    forced, failed = mlflow.search_runs(
        experiment_names=[ctx.settings.experiment],
        filter_string=f"tags.`hisam.step` = 'train-tokenizer' and tags.tokenizer_version = '{VERSION}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    assert failed.info.run_id == run.info.run_id != forced.info.run_id
    epochs = [m.step for m in ctx.mlflow.get_metric_history(forced.info.run_id, "dst/alignment")]
    assert epochs == [m.step for m in ctx.mlflow.get_metric_history(run.info.run_id, "dst/alignment")]
    assert epochs[0] == 0 and forced.data.tags["health"] == "failed"
    # a forced run is continued only while it has not reached its health check
    with pytest.raises(TokenizerHealthError):
        run_step("train-tokenizer", DAY, config, {"tokenizer_version": VERSION, "force": "true"})
    runs = ctx.step_runs("train-tokenizer", tokenizer_version=VERSION)
    assert len(runs) == 3 and runs[0].info.run_id not in (forced.info.run_id, run.info.run_id)


def test_older_interactions_arriving_later_never_put_what_the_behaviour_codes_saw_in_test(ctx_of) -> None:
    """A tokenizer records the cut before which its behaviour encoder saw every interaction; when a
    late historical import moves the quantile cut earlier, that tokenizer's samples stay cut there,
    and every row still lands in the samples or the quarantine."""
    from pyspark.sql import functions as F

    from pipelines.registry import find_versions
    from pipelines.steps import run_step
    from pipelines.tokenizer import BEHAVIOUR_CUT

    ctx, params, part = ctx_of(), {"tokenizer_version": VERSION}, {"dataset": "dq"}
    trained = run_step("train-tokenizer", DAY, ctx.config, params)
    registered = find_versions(ctx.mlflow, "hisam-tokenizer", tokenizer_version=VERSION)
    assert [str(v.version) for v in registered] == [trained["model_version"]]
    floor = int(registered[0].tags[BEHAVIOUR_CUT])
    cuts, _ = ctx.read_table("gold.behaviour_cuts", part, ["input_hash", "cut_seconds"])
    assert cuts["cut_seconds"].tolist() == [floor]  # one behaviour encoder trained so far
    before = run_step("build-sequences", DAY, ctx.config, params)
    assert before["cut"]["cut_seconds"] == floor and before["cut"]["raised_from"] is None

    events = ctx.lake.read("silver.interactions", partitions=part)
    older = (
        events.orderBy("event_ts")
        .limit(200)
        .withColumn("event_ts", F.col("event_ts") - F.expr("INTERVAL 30 DAYS"))
    )
    ctx.lake.write(older, "silver.interactions", mode="merge")
    after = run_step("build-sequences", DAY, ctx.config, params)
    assert after["interactions"] == before["interactions"] + 200
    assert after["samples"] + after["quarantined"] + after["gate_rejected"] == after["interactions"]
    assert after["cut"]["cut_seconds"] == floor and after["cut"]["raised_from"] < floor * 1_000_000
    samples = ctx.lake.read("gold.samples", partitions={**part, "tokenizer_version": VERSION})
    seconds = samples.select("split", F.unix_timestamp("event_ts").alias("s"))
    bounds = {
        r["split"]: (r["lo"], r["hi"])
        for r in seconds.groupBy("split").agg(F.min("s").alias("lo"), F.max("s").alias("hi")).collect()
    }
    assert bounds["train"][1] < floor <= bounds["test"][0]
    moved = seconds.filter((F.col("s") >= after["cut"]["raised_from"] // 1_000_000) & (F.col("s") < floor))
    assert moved.count() > 0  # the quantile cut alone would have put these rows, seen by SASRec, in test


def test_a_build_leaving_out_more_than_the_budget_warns_and_still_writes(ctx_of) -> None:
    """validate-samples judges the samples written, not what the build left out: the build holds its
    own rejects (here the events of items without IDs) to the quarantine budget, and over it warns
    with their reasons; the day's samples are written all the same (training goes on, on the rest)."""
    import json

    from pipelines.config import PipelineConfig
    from pipelines.steps import run_step

    ctx, params = ctx_of(), {"tokenizer_version": VERSION}
    alerts = ctx.settings.home / "alerts.jsonl"

    def build(budget: float) -> dict:
        raw = ctx.config.model_dump()
        raw["quality"]["max_quarantine_fraction"] = budget
        return run_step("build-sequences", DAY, PipelineConfig.model_validate(raw), params)

    before = alerts.read_text().splitlines()
    within = build(0.5)
    share = within["quarantined"] / (within["interactions"] - within["gate_rejected"])
    assert 0 < share < 0.5 and not within["over_budget"] and alerts.read_text().splitlines() == before
    over = build(share / 2)
    assert over["over_budget"] and over["samples"] == within["samples"]
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines()[len(before) :]]
    assert alert["severity"] == "warning" and f"leave out {share:.1%}" in alert["title"]
    assert "{'unknown_item': " in alert["text"]


def test_a_version_registered_by_another_run_while_this_one_trained_is_not_registered_twice(
    ctx_of, monkeypatch
) -> None:
    """Two runs of one month overlap (a CLI run beside the DAG's): the one that finishes second does
    not register the version again, so the steps after find one model per version."""
    import hisam_core.tokenizer
    from pipelines.registry import find_versions
    from pipelines.steps import run_step

    ctx, race = ctx_of(), "dst-race"
    fit = hisam_core.tokenizer.train_tokenizer
    other = []

    def overtaken(*args, **kwargs):
        model = fit(*args, **kwargs)
        version = ctx.mlflow.create_model_version(
            "hisam-tokenizer", str(ctx.settings.home), tags={"tokenizer_version": race}
        )
        other.append(version.version)
        return model

    monkeypatch.setattr(hisam_core.tokenizer, "train_tokenizer", overtaken)
    try:
        summary = run_step("train-tokenizer", DAY, ctx.config, {"tokenizer_version": race})
        registered = find_versions(ctx.mlflow, "hisam-tokenizer", tokenizer_version=race)
        assert (summary["skipped"], summary["model_version"]) == (True, other[0])
        assert [v.version for v in registered] == other
    finally:
        for version in other:
            ctx.mlflow.delete_model_version("hisam-tokenizer", version)


def test_a_killed_tokenizer_training_continues_its_run_and_registers_once(ctx_of, monkeypatch) -> None:
    """A worker killed in epoch 3 leaves its MLflow run RUNNING and the state of epoch 2. A rerun under
    other tokenizer settings cannot continue it: it trains in a new run and marks the old one KILLED.
    Killed in epoch 4 too, that run is not continued by a forced rerun (``force=true`` trains anew,
    and marks it KILLED); the forced run, killed in epoch 2, is continued by the next forced rerun
    from there (nothing trained again), which plots every epoch once, registers the version once
    and deletes the state."""
    import pipelines.tracking
    from pipelines.config import PipelineConfig
    from pipelines.registry import find_versions
    from pipelines.steps import run_step
    from pipelines.tokenizer import TRAINING_STATE, _training_dir

    class Killed(Exception):
        pass

    class Dying(pipelines.tracking.MetricsCallback):
        def __call__(self, step: int, metrics) -> None:
            if killed_at and step == killed_at[0]:
                raise Killed
            trained.append(step)
            super().__call__(step, metrics)

    ctx, params, killed_at, trained, plotted = ctx_of(), {"tokenizer_version": "dst-resume"}, [3], [], {}
    raw = ctx.config.model_dump()
    raw["tokenizer"]["train"]["lr"] /= 2
    config = PipelineConfig.model_validate(raw)
    epochs = config.tokenizer.train.epochs
    monkeypatch.setattr(pipelines.tracking, "mlflow_callback", lambda prefix="": Dying(prefix=prefix))
    plot = pipelines.tracking.log_training_curves
    monkeypatch.setattr(
        pipelines.tracking,
        "log_training_curves",
        lambda history, name: plotted.update(history) or plot(history, name),
    )

    def killed(config: PipelineConfig, epoch: int, step_params: dict[str, str]) -> str:
        killed_at[:], trained[:] = [epoch], []
        with pytest.raises(Killed):
            run_step("train-tokenizer", DAY, config, step_params)
        assert trained == list(range(epoch))
        newest = ctx.step_runs("train-tokenizer", **params)[0]
        ctx.mlflow.update_run(newest.info.run_id, "RUNNING")  # as SIGKILL leaves it
        return newest.info.run_id

    try:
        forced = {**params, "force": "true"}
        first = killed(ctx.config, 3, params)
        second = killed(config, 4, params)
        third = killed(config, 2, forced)
        killed_at.clear()
        trained.clear()
        summary = run_step("train-tokenizer", DAY, config, forced)
        assert trained == list(range(2, epochs))
        runs = {run.info.run_id: run for run in ctx.step_runs("train-tokenizer", **params)}
        assert runs.keys() == {first, second, third} and summary["mlflow_run_id"] == third
        assert runs[first].info.status == runs[second].info.status == "KILLED"
        assert runs[third].info.status == "FINISHED" and runs[third].data.tags["health"] == "passed"
        logged = [m.step for m in ctx.mlflow.get_metric_history(third, "dst/temperature")]
        assert sorted(logged) == [step for step, _ in plotted["dst/temperature"]] == list(range(epochs))
        registered = find_versions(ctx.mlflow, "hisam-tokenizer", **params)
        assert [str(v.version) for v in registered] == [summary["model_version"]]
        assert not (_training_dir(ctx, params["tokenizer_version"], third) / TRAINING_STATE).exists()
    finally:
        for registered in find_versions(ctx.mlflow, "hisam-tokenizer", **params):
            ctx.mlflow.delete_model_version("hisam-tokenizer", registered.version)


def test_tokenize_catalogue_quarantines_the_items_it_cannot_encode_and_a_rerun_changes_nothing(
    ctx_of,
) -> None:
    """Builds on the non-finite embedding (one item's text row deleted since) and the tokenizer the
    previous test registered: the catalogue's 20 items are 19 semantic IDs plus one quarantine row
    with its reason, and a rerun writes nothing more."""
    from pipelines.steps import run_step

    ctx, params = ctx_of(), {"tokenizer_version": VERSION}
    part = {"dataset": "dq", "tokenizer_version": VERSION}
    written = run_step("tokenize-catalogue", DAY, ctx.config, params)
    assert (written["items"], written["quarantined"]) == (19, 1)
    ids = ctx.lake.read("gold.semantic_ids", partitions=part)
    assert ids.count() == ids.select("item_id").distinct().count() == written["items"]
    assert _quarantine(ctx, f"gold.semantic_ids@{VERSION}") == ["missing_embedding:text"]
    version = ctx.lake.version("gold.semantic_ids")
    again = run_step("tokenize-catalogue", DAY, ctx.config, params)
    assert again["skipped"] and again["embeddings_version"] == written["embeddings_version"]
    assert ctx.lake.version("gold.semantic_ids") == version
    assert _quarantine(ctx, f"gold.semantic_ids@{VERSION}") == ["missing_embedding:text"]


def test_a_tokenizer_whose_samples_no_gate_passed_is_not_activated(ctx_of) -> None:
    """A registered version whose samples exist but never passed validate-samples stays off
    ``@current``: activating it would move pre-training and fine-tuning onto samples no gate lets
    through (the tokenizer DAG runs the gate before activating)."""
    from pyspark.sql import functions as F

    from pipelines.registry import CURRENT, alias_version
    from pipelines.steps import run_step

    ctx, ungated = ctx_of(), "dst-ungated"
    part = {"dataset": "dq", "tokenizer_version": ungated}
    samples = ctx.lake.read("gold.samples", partitions={"dataset": "dq", "tokenizer_version": VERSION})
    copy = samples.withColumn("tokenizer_version", F.lit(ungated))
    version = ctx.mlflow.create_model_version(
        "hisam-tokenizer", str(ctx.settings.home), tags={"tokenizer_version": ungated}
    )
    ctx.lake.write(copy, "gold.samples", mode="replace_partition", partition_values=part)
    try:
        with pytest.raises(ValueError, match=f"no gold.samples of {ungated} .* passed validate-samples"):
            run_step("activate-tokenizer", DAY, ctx.config, {"tokenizer_version": ungated})
        assert alias_version(ctx.mlflow, "hisam-tokenizer", CURRENT) is None
    finally:
        ctx.lake.write(copy.limit(0), "gold.samples", mode="replace_partition", partition_values=part)
        ctx.mlflow.delete_model_version("hisam-tokenizer", version.version)
    assert ctx.lake.read("gold.samples", partitions=part).count() == 0


def test_lake_maintenance_changes_no_table_and_no_steps_answer(ctx_of) -> None:
    """Builds on every table the tests above wrote: ``maintain-lake`` compacts each one and deletes
    nothing a version younger than ``lake.retention_days`` reads; afterwards every table reads the
    same rows, ``samples-ready`` finds the same build, and a rerun commits nothing."""
    from pipelines.steps import run_step
    from spark_jobs.tables import TABLES

    ctx, version = ctx_of(), {"tokenizer_version": VERSION}
    existing = [name for name in sorted(TABLES) if ctx.lake.exists(name)]

    def rows() -> dict[str, list[str]]:
        return {
            name: sorted(json.dumps(r.asDict(recursive=True), default=str, sort_keys=True)
                         for r in ctx.lake.read(name).collect())
            for name in existing
        }  # fmt: skip

    before, ready = rows(), run_step("samples-ready", DAY, ctx.config, version)
    done = run_step("maintain-lake", DAY, ctx.config)
    assert done["retention_days"] == 30 and sorted(done["tables"]) == existing
    assert sum(t["files_compacted"] for t in done["tables"].values()) > 0
    assert {t["files_deleted"] for t in done["tables"].values()} == {0}  # every file is days, not weeks, old
    assert rows() == before and run_step("samples-ready", DAY, ctx.config, version) == ready
    again = run_step("maintain-lake", DAY, ctx.config)["tables"]
    assert again == {
        name: {**t, "files_compacted": 0, "files_written": 0} for name, t in done["tables"].items()
    }


def test_maintenance_keeps_the_embeddings_a_serving_tokenizer_still_reads(ctx_of, monkeypatch) -> None:
    """A tokenizer registered before the model carried its cold behaviour row reads its embeddings
    snapshot every day it serves: while one is ``@current`` (or ``@champion``'s or ``@previous``'s),
    ``maintain-lake`` does not vacuum ``gold.item_embeddings``; one that carries it holds nothing
    back."""
    from pipelines.maintenance import snapshot_readers
    from pipelines.registry import find_versions
    from pipelines.steps import run_step
    from pipelines.tokenizer import COLD_BEHAVIOUR
    from spark_jobs.lake import Lake

    ctx = ctx_of()
    client = ctx.mlflow
    (registered,) = find_versions(client, "hisam-tokenizer", tokenizer_version=VERSION)
    assert registered.tags[COLD_BEHAVIOUR] == "carried"  # what train-tokenizer registers now
    vacuumed: dict[str, bool] = {}
    maintain = Lake.maintain

    def spy(self, table, retention, *, vacuum=True):
        vacuumed[table] = vacuum
        return maintain(self, table, retention, vacuum=vacuum)

    monkeypatch.setattr(Lake, "maintain", spy)
    client.set_registered_model_alias("hisam-tokenizer", "current", registered.version)
    try:
        assert run_step("maintain-lake", DAY, ctx.config)["snapshot_readers"] == []
        assert all(vacuumed.values())
        client.delete_model_version_tag("hisam-tokenizer", registered.version, COLD_BEHAVIOUR)  # as before
        assert run_step("maintain-lake", DAY, ctx.config)["snapshot_readers"] == [VERSION]
        assert [t for t, v in vacuumed.items() if not v] == ["gold.item_embeddings"]
        # a ranker on it that a rollback would restore holds its snapshot too
        client.delete_registered_model_alias("hisam-tokenizer", "current")
        assert snapshot_readers(ctx) == []
        client.create_registered_model("hisam-ranker")
        ranker = client.create_model_version(
            "hisam-ranker", str(ctx.settings.home), tags={"tokenizer_version": VERSION}
        )
        client.set_registered_model_alias("hisam-ranker", "previous", ranker.version)
        assert snapshot_readers(ctx) == [VERSION]
    finally:
        client.set_model_version_tag("hisam-tokenizer", registered.version, COLD_BEHAVIOUR, "carried")
        client.delete_registered_model_alias("hisam-tokenizer", "current")
        if client.search_registered_models("name = 'hisam-ranker'"):
            client.delete_registered_model("hisam-ranker")


def test_the_embeddings_gate_judges_only_the_configured_encoders_rows(ctx_of) -> None:
    """Rows an earlier encoder wrote stay in gold.item_embeddings (encoder and version are part of its
    key), and nothing reads them: with ``expected_dims`` set for today's text encoder, a retired
    encoder's rows of another width are not judged (they failed the gate every day, 20 of 80 rows)."""
    from pyspark.sql import functions as F

    from pipelines.steps import run_step

    ctx = ctx_of()
    before = run_step("embed", DAY, ctx.config)["gate"]
    text = ctx.lake.read("gold.item_embeddings", partitions={"dataset": "dq", "modality": "text"})
    dim = text.first()["dim"]
    retired = text.withColumns(
        {
            "encoder": F.lit("retired-text"),
            "dim": F.lit(3),
            "embedding": F.array(*[F.lit(0.5).cast("float")] * 3),
        }
    )
    ctx.lake.write(retired, "gold.item_embeddings", mode="merge")
    quality = ctx.config.quality.model_copy(deep=True)
    quality.embeddings.expected_dims = {"text": dim}
    after = run_step("embed", DAY, ctx.config.model_copy(update={"quality": quality}))["gate"]
    assert after == before and before["n_quarantined"] == 0


def test_a_corrected_training_event_that_keeps_the_cut_retrains_the_behaviour_encoder(
    ctx_of, monkeypatch
) -> None:
    """The behaviour rows' hash covers which events lie before the cut, not only the cut and their
    count: a source's correction (the first event a second later) retrains the encoder on the events
    as they are now, under the same cut; a rerun after it trains nothing. It covers the catalogue
    too (the encoder's softmax spans it): an item retracted upstream retrains, and restored, retrains
    into the space it had."""
    from deltalake import DeltaTable

    from pipelines.steps import run_step

    ctx, part = ctx_of(), {"dataset": "dq"}
    run_step("embed", DAY, ctx.config)
    rows, _ = ctx.read_table("gold.item_embeddings", {**part, "modality": "behavior"}, ["input_hash"])
    cuts = ctx.read_table("gold.behaviour_cuts", part, ["input_hash", "cut_seconds"])[0]
    (before,) = set(rows["input_hash"])
    silver, _ = ctx.read_table("silver.interactions", part, ["user_id", "item_id", "event_ts"])
    once = silver.groupby(["user_id", "item_id"])["event_ts"].transform("size") == 1
    first = silver[once].sort_values("event_ts").iloc[0]  # long before the 90 % cut
    trained_on = _behaviour_fits(monkeypatch)
    DeltaTable(ctx.table_path("silver.interactions")).update(
        predicate=f"user_id = {first['user_id']} AND item_id = {first['item_id']}",
        updates={"event_ts": "event_ts + INTERVAL '1' SECOND"},
    )
    corrected = run_step("embed", DAY, ctx.config)["behavior"]
    (events,) = trained_on
    moved = events[(events["user_id"] == first["user_id"]) & (events["item_id"] == first["item_id"])]
    assert moved["timestamp"].tolist() == [int(first["event_ts"].timestamp()) + 1]
    assert corrected["embedded"] == 20
    rows, _ = ctx.read_table("gold.item_embeddings", {**part, "modality": "behavior"}, ["input_hash"])
    (after,) = set(rows["input_hash"])
    table, _ = ctx.read_table("gold.behaviour_cuts", part, ["input_hash", "cut_seconds"])
    cut_of = dict(zip(table["input_hash"], table["cut_seconds"], strict=True))
    assert after != before and cut_of[after] == cut_of[before] == corrected["cut"]["cut_seconds"]
    assert len(cut_of) == len(cuts) + 1
    assert run_step("embed", DAY, ctx.config)["behavior"]["embedded"] == 0 and len(trained_on) == 1
    behaviour = {**part, "modality": "behavior"}
    space = ctx.read_table("gold.item_embeddings", behaviour, ["item_id", "input_hash", "embedding"])[0]
    items = DeltaTable(ctx.table_path("silver.items"))  # embed builds the catalogue from it
    catalogue, gone = items.version(), int(first["item_id"])
    items.delete(f"item_id = {gone}")
    assert run_step("embed", DAY, ctx.config)["behavior"]["embedded"] == 19 and len(trained_on) == 2
    shrunk = ctx.read_table("gold.item_embeddings", behaviour, ["item_id", "input_hash"])[0]
    hashes = dict(zip(shrunk["item_id"], shrunk["input_hash"], strict=True))
    assert hashes.pop(gone) == after and after not in set(hashes.values()) and len(set(hashes.values())) == 1
    DeltaTable(ctx.table_path("silver.items")).restore(catalogue)  # the next test reads it whole
    assert run_step("embed", DAY, ctx.config)["behavior"]["embedded"] == 20 and len(trained_on) == 3
    again = ctx.read_table("gold.item_embeddings", behaviour, ["item_id", "input_hash", "embedding"])[0]
    space, again = (f.sort_values("item_id").reset_index(drop=True) for f in (space, again))
    assert (again["input_hash"] == after).all() and again["item_id"].equals(space["item_id"])
    assert all(np.array_equal(a, b) for a, b in zip(again["embedding"], space["embedding"], strict=True))


def test_a_re_embed_under_new_settings_is_waited_for_and_never_read_half_done(ctx_of, monkeypatch) -> None:
    """Image settings change under the same encoder name and version, and the embed crashes after
    its first slice: the table then holds two spaces under one name and version. The tokenizer DAG
    keeps waiting, and DST's loader reads only the new settings' rows (the rest are missing until
    the embed resumes), never a mix. Rows from before the ``fingerprint`` column (all null) are read
    as before, but are waited for until an embed records their settings. Last of the module's
    ``ctx_of`` tests: it leaves the new settings' rows behind."""
    from deltalake import DeltaTable

    from pipelines.context import StepContext
    from pipelines.steps import run_step
    from pipelines.tokenizer import load_item_features
    from spark_jobs.lake import Lake

    ctx = ctx_of()
    run_step("embed", DAY, ctx.config)
    ready = {"ready": True, "items": 20, "missing": {"behavior": 0, "image": 0, "text": 0}}
    assert run_step("embeddings-ready", DAY, ctx.config) == ready
    old = load_item_features(ctx)[0]

    # a table written before the column: read as it was, but the tokenizer DAG waits for the embed
    path = ctx.table_path("gold.item_embeddings")
    DeltaTable(path).update(updates={"fingerprint": "NULL"}, predicate="modality = 'image'")
    legacy = load_item_features(ctx)[0]
    assert np.array_equal(legacy.modalities["image"], old.modalities["image"])
    assert run_step("embeddings-ready", DAY, ctx.config)["missing"]["image"] == 20
    assert run_step("embed", DAY, ctx.config)["image"] == {
        "encoder": "descriptor", "embedded": 0, "skipped": 20, "absent": 0,
    }  # fmt: skip
    assert run_step("embeddings-ready", DAY, ctx.config) == ready

    emb = ctx.config.embeddings
    image = emb.image.model_copy(update={"config": {"descriptor": {"thumb_size": 8}}})
    job = emb.job.model_copy(update={"commit_every": 5})
    update = {"embeddings": emb.model_copy(update={"image": image, "job": job})}
    changed = StepContext(ctx.config.model_copy(update=update), DAY)
    write, merges = Lake.write, []

    def crash_after_one_slice(self, df, table, **kwargs):
        if kwargs.get("partition_values", {}).get("modality") == "image":
            merges.append(table)
            if len(merges) > 1:
                raise RuntimeError("executor lost")
        return write(self, df, table, **kwargs)

    monkeypatch.setattr(Lake, "write", crash_after_one_slice)
    with pytest.raises(RuntimeError, match="executor lost"):
        run_step("embed", DAY, changed.config)
    monkeypatch.setattr(Lake, "write", write)
    waiting = run_step("embeddings-ready", DAY, changed.config)
    redone = 20 - waiting["missing"]["image"]
    assert not waiting["ready"] and 0 < redone < 20
    assert run_step("embeddings-ready", DAY, ctx.config)["missing"]["image"] == redone  # the old view too
    half, _, incomplete = load_item_features(changed)
    assert len(half) == redone and set(incomplete.values()) == {"missing_embedding:image"}
    run_step("embed", DAY, changed.config)  # resumes
    assert run_step("embeddings-ready", DAY, changed.config) == ready
    new = load_item_features(changed)[0]
    assert new.modalities["image"].shape[1] != old.modalities["image"].shape[1]  # another space
    rows = {i: v for i, v in zip(new.item_ids, new.modalities["image"], strict=True)}
    assert all(
        np.array_equal(rows[i], v) for i, v in zip(half.item_ids, half.modalities["image"], strict=True)
    )


def test_the_days_import_is_judged_alone_as_well(spark, tmp_path, monkeypatch) -> None:
    """2,000 clean rows from earlier days and a day whose 10 rows are all out of range: 0.5 % of the
    snapshot passes the 1 % budget, so the day's own verdict is what stops it, with an alert. A day
    with no import of its own is judged on the snapshot alone."""
    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext
    from pipelines.steps import run_step
    from spark_jobs.quality import DataQualityError
    from spark_jobs.tables import SILVER_INTERACTIONS, SILVER_ITEMS

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    config = PipelineConfig(dataset="daily")
    ctx = StepContext(config, DAY)
    before, t0 = DAY - dt.timedelta(days=30), dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    rows = [
        ("daily", u, 1, t0 + dt.timedelta(minutes=u), f"u{u}", "i1", 4.0, 1, None, before)
        for u in range(2000)
    ]
    rows += [("daily", u, 1, t0 + dt.timedelta(days=30, minutes=u), f"u{u}", "i1", 9.0, 1, None, DAY)
             for u in range(10)]  # fmt: skip
    ctx.lake.write(spark.createDataFrame(rows, SILVER_INTERACTIONS.schema), SILVER_INTERACTIONS, mode="merge")
    items = [("daily", 1, "i1", "Film", [], {}, None, None, before)]
    ctx.lake.write(spark.createDataFrame(items, SILVER_ITEMS.schema), SILVER_ITEMS, mode="merge")
    with pytest.raises(DataQualityError, match="interactions_of_the_day"):
        run_step("validate", DAY, config)
    (alert,) = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alert["severity"] == "error" and "10 rows in = 0 valid + 10 quarantined" in alert["text"]
    part = {"dataset": "daily", "target_table": "silver.interactions.gate"}
    reasons, _ = ctx.read_table("bronze.quarantine", part, ["reason"])  # the snapshot gate's rows
    assert reasons["reason"].tolist() == ["rating_out_of_range"] * 10
    quiet = run_step("validate", DAY + dt.timedelta(days=1), config)  # no rows of its own
    assert quiet["success"] and "day" not in quiet


def test_a_day_mostly_rejected_at_import_fails_ingest_before_silver(spark, tmp_path, monkeypatch) -> None:
    """8 of 10 events with a timestamp format the importer does not read: 80 % of the import is
    quarantined, over the 1 % budget. ``validate`` could not see it (it judges the rows kept), so
    ingest stops before silver and alerts with the reasons; the repaired rerun replaces the rejects.
    Repeated records do not count: two more copies of the one item lose nothing. Two more records of
    it with another title do: they conflict with the kept one. So do two records of one event with
    other ratings; the record kept is the first in the source."""
    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext
    from pipelines.steps import run_step
    from spark_jobs.quality import DataQualityError

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    events = tmp_path / "events.jsonl"

    def write_events(bad: int) -> None:
        rows = [
            {"user_id": f"u{k}", "item_id": "i1", "rating": 4,
             "timestamp": "2026/10/01 10:00" if k < bad else START + k}
            for k in range(10)
        ]  # fmt: skip
        events.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write_events(bad=8)
    (tmp_path / "items.jsonl").write_text(json.dumps({"item_id": "i1", "title": "Film"}) + "\n")
    source = {"dataset": "imp", "interactions": str(events), "items": str(tmp_path / "items.jsonl")}
    config = PipelineConfig(dataset="imp", source={"kind": "generic", "generic": source})
    with pytest.raises(DataQualityError, match=r"'import:bronze.interactions': FAILED; 10 rows in = 2 valid"):
        run_step("ingest", DAY, config)
    (alert,) = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alert["severity"] == "error" and "8 quarantined" in alert["text"]
    ctx = StepContext(config, DAY)
    rejects = {"dataset": "imp", "target_table": "bronze.interactions"}
    assert len(ctx.read_table("bronze.quarantine", rejects, ["reason"])[0]) == 8
    assert ctx.lake.read("silver.interactions").count() == 0  # nothing of the day reached silver
    write_events(bad=0)
    (tmp_path / "items.jsonl").write_text((json.dumps({"item_id": "i1", "title": "Film"}) + "\n") * 3)
    repaired = run_step("ingest", DAY, config)["bronze"]
    assert repaired["bronze.interactions"] == {"in": 10, "imported": 10, "quarantined": 0}
    assert repaired["bronze.items"] == {"in": 3, "imported": 1, "quarantined": 2}
    assert ctx.read_table("bronze.quarantine", rejects, ["reason"])[0].empty
    assert ctx.lake.read("silver.interactions").count() == 10
    conflicting = [{"item_id": "i1", "title": title} for title in ("Film", "Film II", "Film III")]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conflicting))
    with pytest.raises(DataQualityError, match=r"'import:bronze.items': FAILED; 3 rows in = 1 valid"):
        run_step("ingest", DAY, config)
    (tmp_path / "items.jsonl").write_text(json.dumps(conflicting[0]) + "\n")
    with events.open("a") as out:  # the first event twice more as recorded, twice with another rating
        for rating in (4, 4, 2, 5):
            out.write(
                json.dumps({"user_id": "u0", "item_id": "i1", "rating": rating, "timestamp": START}) + "\n"
            )
    with pytest.raises(
        DataQualityError, match=r"'import:bronze.interactions': FAILED; 14 rows in = 10 valid"
    ):
        run_step("ingest", DAY, config)
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert "14 rows in = 10 valid + 4 quarantined" in alerts[-1]["text"]
    reasons = sorted(ctx.read_table("bronze.quarantine", rejects, ["reason"])[0]["reason"])
    assert [r.endswith(" with other values") for r in reasons] == [False, False, True, True]
    kept = ctx.read_table("bronze.interactions", {"dataset": "imp", "user_id": "u0"}, ["rating"])[0]
    assert kept["rating"].tolist() == [4.0]  # the first in the source, not the lowest rating


def test_ingest_refuses_a_drop_that_has_not_landed(spark, tmp_path, monkeypatch) -> None:
    """``source-ready`` (the daily DAG's sensor) and ``ingest`` agree on when a generic drop has
    landed: its dated path and its ``ready_marker``. Until then ``ingest`` fails at once (no retry)
    and writes nothing; MovieLens and the synthetic source are always ready."""
    from pipelines.config import PipelineConfig
    from pipelines.steps import run_step, step_errors

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    drop = tmp_path / "drops" / DAY.isoformat()
    source = {"dataset": "daily", "interactions": str(tmp_path / "drops" / "{logical_date}" / "events.jsonl"),
              "ready_marker": "_SUCCESS"}  # fmt: skip
    config = PipelineConfig(dataset="daily", source={"kind": "generic", "generic": source})
    missing = {"interactions": f"nothing at {drop / 'events.jsonl'}"}
    assert run_step("source-ready", DAY, config) == {"ready": False, "source": "generic", "pending": missing}
    with pytest.raises(
        FileNotFoundError, match=r"daily's drop for 2026-11-01 has not landed: interactions: nothing"
    ) as err:
        run_step("ingest", DAY, config)
    assert isinstance(err.value, step_errors())
    drop.mkdir(parents=True)
    (drop / "events.jsonl").write_text("".join(json.dumps({"user_id": "u1", "item_id": f"i{k}", "timestamp": START + k,
                                                           "rating": 4}) + "\n" for k in range(5)))  # fmt: skip
    assert run_step("source-ready", DAY, config)["pending"] == {
        "interactions": f"no _SUCCESS in {drop} (the drop is still being written)"
    }
    with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
        run_step("ingest", DAY, config)
    assert not (tmp_path / "lake" / "bronze").exists()  # nothing imported while the drop was pending
    (drop / "_SUCCESS").touch()
    assert run_step("source-ready", DAY, config) == {"ready": True, "source": "generic", "pending": {}}
    assert run_step("ingest", DAY, config)["bronze"]["bronze.interactions"] == {
        "in": 5,
        "imported": 5,
        "quarantined": 0,
    }
    assert (tmp_path / "lake" / "bronze" / "interactions" / "_delta_log").is_dir()  # where it would have been
    assert run_step("source-ready", DAY, PipelineConfig()) == {"ready": True, "source": "synthetic"}


def test_validate_without_a_catalogue_says_to_configure_the_items(spark, tmp_path, monkeypatch) -> None:
    """A generic source without ``items`` (optional for the importer) leaves silver.items empty:
    validate says so instead of quarantining every interaction as ``unknown_item``."""
    from pipelines.config import PipelineConfig
    from pipelines.steps import run_step

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"user_id": "u1", "item_id": f"i{k}", "timestamp": START + k,
                                          "rating": 4}) + "\n" for k in range(5)))  # fmt: skip
    source = {"dataset": "bare", "interactions": str(events)}
    config = PipelineConfig(dataset="bare", source={"kind": "generic", "generic": source})
    assert run_step("ingest", DAY, config)["silver_rows"]["silver.interactions"] == 5
    with pytest.raises(
        ValueError, match=r"silver\.items has no rows for dataset 'bare'.*source\.generic\.items"
    ):
        run_step("validate", DAY, config)

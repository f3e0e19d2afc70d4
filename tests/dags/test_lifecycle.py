"""The whole lifecycle through the real DAGs (``dag.test()``) on tiny synthetic data.

One module-scoped run plays the calendar: day 1 runs the four DAGs; the tests then rerun, degrade,
roll back and break it, in file order (each test states what it builds on; run alone, or with -k,
a test fails on the state it expected). The tests marked "Closing section" come after every test of
the November chain, because they change state that chain reads (gold.samples, @current, the
champion, the encoder version). Everything is real: local Spark and Delta, GX, the MLflow SQLite
registry, Airflow's SQLite metadata.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

DAY1, DAY2, DAY3, DAY4, DAY5 = (dt.date(2026, 11, d) for d in (1, 2, 3, 4, 5))
VERSION = "dst-20261101"


@pytest.fixture(scope="module")
def world(airflow_db, tmp_path_factory, write_config, pipeline_home):
    """Day 1 of the lifecycle: features, tokenizer, pre-training, fine-tuning (first champion)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))
    import hisam_lifecycle

    home = tmp_path_factory.mktemp("lifecycle")
    config = write_config(home / "pipeline.yaml")
    with pipeline_home(home, config) as env:
        day1 = {d: hisam_lifecycle.run_dag(d, DAY1) for d in hisam_lifecycle.LIFECYCLE}
        yield {
            "write_config": write_config,
            "home": home,
            "config": config,
            "run": hisam_lifecycle.run_dag,
            "day1": day1,
            "env": env,
        }


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _ctx(world, day=DAY1):
    from pipelines.context import StepContext
    from pipelines.steps import load_config

    return StepContext(load_config(world["config"]), day)


def _asset_events(name: str, column: str) -> list:
    """``column`` (e.g. ``source_task_id``, ``extra``) of every event of asset ``name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = (
        select(getattr(AssetEvent, column))
        .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
        .where(AssetModel.name == name)
        .order_by(AssetEvent.id)
    )
    with create_session() as session:
        return list(session.scalars(query))


def _champion_events() -> list[str]:
    """The source task of every ``hisam-ranker@champion`` asset event, oldest first."""
    return _asset_events("hisam-ranker@champion", "source_task_id")


def _alerts(world) -> list[dict]:
    path = world["home"] / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _new_items_arrive(world, day: dt.date, count: int) -> set[int]:
    """``count`` new items (copies of catalogue items under new ids) land in silver before ``day``'s
    runs, with one positive interaction from each of 8 users an hour after the last event; returns
    their ids. Items and interactions carry the day before as their import date: ``day``'s own
    ingest, whose source does not contain them, would retract rows stamped with its date."""
    from pyspark.sql import functions as F

    lake, part = _ctx(world, day).lake, {"dataset": "tiny"}
    items = lake.read("silver.items", partitions=part)
    top = items.agg(F.max("item_id")).first()[0]
    source = items.orderBy("item_id").limit(count).withColumn("source_id", F.col("item_id"))
    source = source.withColumn("item_id", F.col("item_id") + F.lit(top + 1))
    new_items = source.withColumn("item_key", F.concat(F.lit("new-"), F.col("item_id").cast("string")))
    new_items = new_items.withColumn("logical_date", F.lit(day - dt.timedelta(days=1)))
    lake.write(new_items.drop("source_id"), "silver.items", mode="merge")
    events = lake.read("silver.interactions", partitions=part)
    last = events.agg(F.max("event_ts")).first()[0]
    users = events.select("user_id", "user_key").distinct().orderBy("user_id").limit(8)
    arrivals = (
        users.crossJoin(new_items.select("item_id", "item_key"))
        .withColumn("dataset", F.lit("tiny"))
        .withColumn("event_ts", F.lit(last) + F.expr("INTERVAL 1 HOUR"))
        .withColumn("rating", F.lit(5.0))
        .withColumn("label", F.lit(1))
        .withColumn("action", F.lit(None).cast("string"))
        .withColumn("logical_date", F.lit(day - dt.timedelta(days=1)))
    )
    lake.write(arrivals.select(*events.columns), "silver.interactions", mode="merge")
    return {r["item_id"] for r in new_items.select("item_id").collect()}


def _lake_contents(world) -> dict[str, list]:
    """Every lake table's rows, order-independent (a rewrite with equal rows counts as unchanged)."""
    from deltalake import DeltaTable

    out = {}
    for log_dir in sorted((world["home"] / "lake").glob("*/*/_delta_log")):
        frame = DeltaTable(str(log_dir.parent)).to_pandas()
        out[log_dir.parent.name] = sorted(
            json.dumps(r, default=str, sort_keys=True) for r in frame.to_dict("records")
        )
    return out


def _vectors_read(monkeypatch) -> list[int]:
    """Records the rows of every read of ``gold.item_embeddings`` vectors by a step from here on."""
    from pipelines.context import StepContext

    counts, read = [], StepContext.read_table

    def spy(self, table, partitions, columns=None, *args, **kwargs):
        frame, version = read(self, table, partitions, columns, *args, **kwargs)
        if table == "gold.item_embeddings" and "embedding" in (columns or ["embedding"]):
            counts.append(len(frame))
        return frame, version

    monkeypatch.setattr(StepContext, "read_table", spy)
    return counts


def test_day_one_writes_tables_runs_models_aliases_and_lineage(world) -> None:
    from deltalake import DeltaTable

    assert {d: r.state for d, r in world["day1"].items()} == dict.fromkeys(world["day1"], "success")
    lake = world["home"] / "lake"
    samples = DeltaTable(str(lake / "gold" / "samples")).to_pandas()
    silver = DeltaTable(str(lake / "silver" / "interactions")).to_pandas()
    bronze = DeltaTable(str(lake / "bronze" / "interactions")).to_pandas()
    assert len(bronze) == len(silver) == 3000  # generator rows in = bronze = silver (no bad rows)
    assert len(samples) == len(silver) and set(samples["tokenizer_version"]) == {VERSION}
    test = samples[samples["split"] == "test"]
    assert test["event_ts"].min() >= samples.loc[samples["split"] == "train", "event_ts"].max()
    assert len(test) == 3000 - int(0.9 * 3000)
    ids = DeltaTable(str(lake / "gold" / "semantic_ids")).to_pandas()
    assert len(ids) == 120 and all(len(c) == 6 and max(c) < 16 for c in ids["semantic_ids"])
    embeddings = DeltaTable(str(lake / "gold" / "item_embeddings")).to_pandas()
    assert embeddings.groupby("modality").size().to_dict() == {"behavior": 120, "image": 120, "text": 120}

    client = _client()
    tokenizer = client.get_model_version_by_alias("hisam-tokenizer", "current")
    pretrained = client.get_latest_versions("hisam-pretrained")[0]
    champion = client.get_model_version_by_alias("hisam-ranker", "champion")
    assert tokenizer.tags["tokenizer_version"] == VERSION
    cut = dt.datetime.fromtimestamp(int(tokenizer.tags["hisam.behaviour_cut"]), dt.UTC)
    assert test["event_ts"].min() == cut  # the behaviour codes saw exactly the training period
    assert pretrained.tags["tokenizer_version"] == champion.tags["tokenizer_version"] == VERSION
    last_train = pd.to_datetime(samples.loc[samples["split"] == "train", "event_ts"], utc=True).max()
    until = last_train.value // 1000  # unix microseconds
    assert int(pretrained.tags["hisam.trained_until"]) == int(champion.tags["hisam.trained_until"]) == until
    assert champion.tags["pretrained_version"] == str(pretrained.version)
    assert champion.tags["gate"] == "promoted" and float(champion.tags["eval.auc"]) >= 0.55
    assert _champion_events() == ["promote"]  # refresh-champion had no new item: @champion stayed
    run = client.get_run(champion.tags["training_run_id"])
    assert run.data.tags["eval.seen_test_rows"] == "0"  # the split never moved before what was trained on
    tags = [{t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs]
    inputs = {(t["mlflow.data.context"], t["delta.path"].rsplit("/", 1)[-1]): t for t in tags}
    assert set(inputs) == {("training", "samples"), ("training", "user_profiles"), ("evaluation", "samples"),
                           ("evaluation", "user_profiles")}  # fmt: skip
    assert inputs[("evaluation", "samples")]["delta.version"] == champion.tags["eval.snapshot"]
    # evaluated on the profiles it trained on
    assert (
        inputs[("evaluation", "user_profiles")]["delta.version"]
        == inputs[("training", "user_profiles")]["delta.version"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/sft_training.png" in artifacts
    dst_run = client.get_run(tokenizer.run_id)
    assert dst_run.data.metrics["unique_id_rate"] >= 0.5
    from pipelines.tracking import code_version

    assert dst_run.data.tags["hisam.code_version"] == run.data.tags["hisam.code_version"] == code_version()
    dst_inputs = {  # what DST trained on: the embeddings snapshot and the catalogue it was cut to
        t["delta.path"].rsplit("/", 1)[-1]: t["delta.version"]
        for t in ({t.key: t.value for t in i.tags} for i in dst_run.inputs.dataset_inputs)
    }
    documents = DeltaTable(str(lake / "gold" / "item_documents"))  # nothing wrote it after the features DAG
    assert dst_inputs == {
        "item_embeddings": tokenizer.tags["delta.version"],
        "item_documents": str(documents.version()),
    }
    assert {a.path for a in client.list_artifacts(dst_run.info.run_id, "plots")} >= {
        "plots/codebook_utilisation.png", "plots/figure3.png", "plots/dst_training.png"}  # fmt: skip


def test_the_demo_summary_reports_what_day_one_wrote(world) -> None:
    """Builds on day 1: ``hisam demo``'s closing summary (the DAG runs are the ones above) names
    every lake table with its latest version and row count, the current tokenizer and the champion."""
    from deltalake import DeltaTable

    from pipelines.demo import summarize
    from pipelines.settings import Settings
    from pipelines.steps import load_config

    runs = [{"dag": d, "state": r.state, "seconds": 1.0} for d, r in world["day1"].items()]
    summary = summarize(load_config(world["config"]), Settings.from_env(), runs, 4.0)
    lake = world["home"] / "lake"
    tables = {f"{p.parent.parent.name}.{p.parent.name}": p.parent for p in lake.glob("*/*/_delta_log")}
    assert summary["lake"]["root"] == str(lake)
    assert summary["lake"]["tables"] == {
        name: {"version": DeltaTable(str(path)).version(), "rows": len(DeltaTable(str(path)).to_pandas())}
        for name, path in tables.items()
    }
    assert {"bronze.interactions", "silver.interactions", "gold.samples", "gold.semantic_ids"} <= set(tables)
    assert (
        str(summary["tokenizer"]["version"]) == "1" and summary["tokenizer"]["tokenizer_version"] == VERSION
    )
    assert str(summary["champion"]["version"]) == "1" and summary["champion"]["gate"] == "promoted"
    assert (summary["dag_runs"], summary["total_seconds"], summary["dataset"]) == (runs, 4.0, "tiny")


def test_rerunning_a_day_changes_nothing(world) -> None:
    """Builds on day 1: the same logical date again leaves every table's rows, the registry and the
    tracking runs as they were."""
    client = _client()
    before_lake = _lake_contents(world)
    before_models = {m: len(client.search_model_versions(f"name = '{m}'"))
                     for m in ("hisam-tokenizer", "hisam-pretrained", "hisam-ranker")}  # fmt: skip
    before_runs = len(client.search_runs([r.experiment_id for r in client.search_experiments()]))
    for dag_id in ("hisam_features", "hisam_tokenizer", "hisam_pretrain", "hisam_finetune"):
        assert world["run"](dag_id, DAY1).state == "success"
    assert _lake_contents(world) == before_lake
    after_models = {m: len(client.search_model_versions(f"name = '{m}'")) for m in before_models}
    assert after_models == before_models
    assert len(client.search_runs([r.experiment_id for r in client.search_experiments()])) == before_runs
    assert str(client.get_model_version_by_alias("hisam-ranker", "champion").version) == "1"


def test_training_waits_until_the_days_samples_are_built(world) -> None:
    """Builds on day 1: the training DAGs' ``samples-ready`` sensor is not ready on day 2 until a
    features run of day 2 or later has rebuilt the samples (here day 3's, which also serves the day-2
    and day-3 fine-tunes below). A build of an older date that read silver after a day's import
    holds that day too, and rebuilds the same rows: gold tables are current-state."""
    from pipelines.steps import run_step

    waiting = run_step("samples-ready", DAY2, world["config"])
    assert waiting == {"ready": False, "tokenizer_version": VERSION, "built_for": DAY1.isoformat()}
    assert world["run"]("hisam_features", DAY3).state == "success"
    for day in (DAY2, DAY3):
        ready = run_step("samples-ready", day, world["config"])
        assert ready["ready"] and ready["built_for"] == DAY3.isoformat()
    run_step("ingest", DAY4, world["config"])  # day 4's import is in silver, its samples are not
    assert not run_step("samples-ready", DAY4, world["config"])["ready"]
    before = _lake_contents(world)
    run_step("build-sequences", DAY1, world["config"])  # a rerun of an older date, after it
    assert _lake_contents(world) == before
    assert run_step("samples-ready", DAY4, world["config"]) == {
        "ready": True, "tokenizer_version": VERSION, "built_for": DAY3.isoformat()}  # fmt: skip
    assert not run_step("samples-ready", DAY5, world["config"])["ready"]


def test_a_promote_retried_after_the_aliases_moved_completes(world) -> None:
    """Builds on day 1: promote died between moving @champion to v1 and tagging it; the retry tags it
    instead of refusing a champion it did not evaluate against."""
    from pipelines.steps import run_step

    client = _client()
    client.delete_model_version_tag("hisam-ranker", "1", "gate")
    out = run_step("promote", DAY1, world["config"])
    assert out == {"model_version": "1", "gate": "promoted", "champion_moved": True, "skipped": True}
    assert client.get_model_version("hisam-ranker", "1").tags["gate"] == "promoted"
    assert str(client.get_model_version_by_alias("hisam-ranker", "champion").version) == "1"


def test_evaluate_on_another_worker_reads_the_checkpoint_logged_to_the_finetune_run(world) -> None:
    """Builds on day 1: with another checkpoint in the local SFT folder (what a crashed attempt leaves
    when its retry finishes on another worker), and then without one (a GPU pod that did not train
    it), evaluate reads the finetune run's copy and reproduces the candidate's metrics."""
    import shutil

    from pipelines.steps import run_step

    run = _client().get_run(_client().get_model_version("hisam-ranker", "1").run_id)
    sft = world["home"] / "checkpoints" / "sft"
    (local,) = sft.glob(f"tiny/{VERSION}/{DAY1.isoformat()}/pt-1/checkpoint.pt")
    (pretrained,) = (world["home"] / "checkpoints" / "pt").glob("tiny/*/*/checkpoint.pt")
    shutil.copy(pretrained, local)
    again = run_step("evaluate", DAY1, world["config"])
    assert again["eval.auc"] == pytest.approx(run.data.metrics["eval.auc"], abs=1e-4)
    shutil.rmtree(sft)
    again = run_step("evaluate", DAY1, world["config"])
    assert again["eval.auc"] == pytest.approx(run.data.metrics["eval.auc"], abs=1e-4)
    # each evaluation one step past the last: the newest is MLflow's latest value, whatever the clocks
    steps = [m.step for m in _client().get_metric_history(run.info.run_id, "eval.auc")]
    assert steps == list(range(len(steps))) and len(steps) >= 3
    # an artifact that is not the file the run's hash records (overlapping attempts) is refused
    from pipelines.ranker import SFT_CHECKPOINT_SHA256, sft_checkpoint_dir

    recorded = run.data.tags[SFT_CHECKPOINT_SHA256]
    _client().set_tag(run.info.run_id, SFT_CHECKPOINT_SHA256, "0" * 64)
    try:
        with pytest.raises(ValueError, match=r"is not the one its sft\.checkpoint_sha256 tag records"):
            sft_checkpoint_dir(_ctx(world), VERSION, _client().get_run(run.info.run_id))
    finally:
        _client().set_tag(run.info.run_id, SFT_CHECKPOINT_SHA256, recorded)


def test_a_model_giving_non_finite_scores_fails_evaluate_naming_it_and_logs_nothing(
    world, monkeypatch
) -> None:
    """Builds on day 1: NaN weights (a diverged or damaged model) make evaluate fail naming the
    model, the candidate or the champion, and the way out; no metric is logged."""
    import importlib
    import math

    import torch

    import pipelines.ranker_model as ranker_model
    from pipelines.steps import run_step

    train = importlib.import_module("hisam_core.ranker.train")  # the package exports a train function
    load_model, load_ranker = train.load_model, ranker_model.load_ranker

    def damaged(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for weight in model.parameters():
                weight.fill_(math.nan)

    def damaged_candidate(*args, **kwargs):
        config, model = load_model(*args, **kwargs)
        damaged(model)
        return config, model

    def damaged_champion(uri):
        loaded = load_ranker(uri)
        damaged(loaded.unwrap_python_model().ranker.model)
        return loaded

    run = _client().get_run(_client().get_model_version("hisam-ranker", "1").run_id)
    before = _client().get_run(run.info.run_id).data
    logged = len(_client().get_metric_history(run.info.run_id, "eval.auc"))
    with monkeypatch.context() as patch:
        patch.setattr(train, "load_model", damaged_candidate)
        with pytest.raises(ValueError, match=r"the candidate \(finetune run \w+\) gives non-finite scores"):
            run_step("evaluate", DAY1, world["config"])
    with monkeypatch.context() as patch:
        patch.setattr(ranker_model, "load_ranker", damaged_champion)
        with pytest.raises(
            ValueError, match=r"the champion, hisam-ranker v\d+, gives non-finite .* rollback"
        ):
            run_step("evaluate", DAY1, world["config"])
    after = _client().get_run(run.info.run_id).data
    assert (after.metrics, after.tags) == (before.metrics, before.tags)
    assert len(_client().get_metric_history(run.info.run_id, "eval.auc")) == logged


def _drift(tags: dict[str, str]) -> dict[str, float]:
    """A promoted version's ``gate.drift.*`` tags, as the gate reads them."""
    from pipelines.ranker import metrics_of
    from pipelines.registry import DRIFT_PREFIX, GATE_METRICS

    return metrics_of(tags, DRIFT_PREFIX, GATE_METRICS)


def test_a_worse_candidate_is_rejected_with_reasons_and_an_alert(world) -> None:
    """Builds on day 1: day 2 fine-tunes with a learning rate that wrecks the model."""
    world["write_config"](world["config"], finetune={"learning_rate": 5.0, "max_steps": 5, "warmup_steps": 0})
    events = _champion_events()
    result = world["run"]("hisam_finetune", DAY2)
    world["write_config"](world["config"])
    assert result.state == "success"
    assert _champion_events() == events  # nothing scheduled on @champion runs for a rejection
    client = _client()
    candidate = client.get_model_version("hisam-ranker", "2")
    assert (
        candidate.tags["gate"] == "rejected" and "regresses from champion" in candidate.tags["gate_reasons"]
    )
    assert float(candidate.tags["eval.auc"]) < float(candidate.tags["champion.auc"]) - 0.01
    assert str(client.get_model_version_by_alias("hisam-ranker", "champion").version) == "1"
    rejected = [a for a in _alerts(world) if a["title"] == "hisam-ranker v2 not promoted"]
    assert len(rejected) == 1 and rejected[0]["details"]["champion_version"] == "1"


def test_promote_then_rollback_restores_the_previous_champion(world) -> None:
    """Builds on day 2: day 3 trains normally (same data and seed as day 1, so equal metrics: no
    regression) and is promoted; rollback then brings version 1 back."""
    from pipelines.steps import run_step

    events = _champion_events()
    assert world["run"]("hisam_finetune", DAY3).state == "success"
    client = _client()
    assert str(client.get_model_version_by_alias("hisam-ranker", "champion").version) == "3"
    assert _champion_events() == [*events, "promote"]
    assert str(client.get_model_version_by_alias("hisam-ranker", "previous").version) == "1"
    day1, day3 = client.get_model_version("hisam-ranker", "1"), client.get_model_version("hisam-ranker", "3")
    assert day3.tags["eval.auc"] == day1.tags["eval.auc"]  # deterministic training
    assert _drift(day1.tags) == _drift(day3.tags) == {"auc": 0.0, "gauc": 0.0}  # no loss, no drift
    summary = run_step("rollback", DAY3, world["config"])
    assert summary == {"champion": "1", "restored": "1", "demoted": "3", "new_items": 0, "refreshed": True}
    assert str(client.get_model_version_by_alias("hisam-ranker", "champion").version) == "1"
    assert client.get_model_version("hisam-ranker", "3").tags["gate"] == "rolled_back"
    with pytest.raises(ValueError, match="no @previous"):
        run_step("rollback", DAY3, world["config"])


def test_the_champion_reads_profiles_and_refuses_another_tokenizer_version(world) -> None:
    """Builds on day 1: every stream opens with the user's profile tokens, bucketed by the vocabulary
    PT fitted on gold.user_profiles and SFT kept; serving takes the buckets as request columns; a
    semantic-ID table of another version is refused."""
    from deltalake import DeltaTable

    from pipelines.ranker_model import load_ranker

    fields = ("age_bucket", "gender", "occupation")
    model = load_ranker("models:/hisam-ranker@champion", expected_tokenizer_version=VERSION)
    served = model.unwrap_python_model()
    vocab = served.profile_vocabulary
    profiles = DeltaTable(str(world["home"] / "lake" / "gold" / "user_profiles")).to_pandas()
    assert vocab.fields == fields
    assert vocab.values == {f: tuple(sorted(profiles[f].dropna().unique())) for f in fields}
    assert dict(served.ranker.builder.config.profile_fields) == vocab.bucket_counts
    assert all(n > 1 for n in vocab.bucket_counts.values())  # the synthetic users have profiles
    pretrained = load_ranker("models:/hisam-pretrained/1").unwrap_python_model()
    assert pretrained.profile_vocabulary == vocab

    frame = served.semantic_ids
    user = profiles.iloc[0]
    buckets = vocab.encode(user.to_dict())
    assert min(buckets.values()) > 0  # a known user's values are all in the vocabulary
    request = {"user_id": [int(user["user_id"])], "history_item_ids": [list(frame.item_ids[:3])],
               "history_actions": [[1, 0, 1]], "candidate_item_ids": [list(frame.item_ids[3:6])],
               **{f"profile_{f}": [b] for f, b in buckets.items()}}  # fmt: skip
    scores = np.asarray(model.predict(pd.DataFrame(request))["scores"].iloc[0])
    assert len(scores) == 3 and np.all((scores > 0) & (scores < 1))
    unknown = {**request, **{f"profile_{f}": [0] for f in fields}}
    assert not np.allclose(np.asarray(model.predict(pd.DataFrame(unknown))["scores"].iloc[0]), scores)
    with pytest.raises(ValueError, match="dst-20261201"):
        load_ranker("models:/hisam-ranker@champion", expected_tokenizer_version="dst-20261201")


def test_items_arriving_mid_month_get_ids_the_same_day(world, monkeypatch) -> None:
    """Builds on day 1: five new items (copies of catalogue items under new ids) and 40 interactions
    with them land in silver on day 5. The daily features DAG gives them @current semantic IDs, so
    their interactions reach the samples instead of the ``unknown_item`` quarantine; the 120 IDs
    written by the monthly run stay exactly as they were, a rerun (of this step or of the catalogue
    step) writes nothing, and a DST is never fed another encoder's embeddings. The behaviour row of
    a new item comes with the registered tokenizer: the day never reads the embeddings snapshot it
    was trained on (``maintain-lake`` vacuums it once it is older than the retention)."""
    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    import pipelines.tokenizer
    from pipelines.steps import load_config, run_step

    lake, part = _ctx(world, DAY5).lake, {"dataset": "tiny"}
    ids_path = str(world["home"] / "lake" / "gold" / "semantic_ids")
    before = DeltaTable(ids_path).to_pandas()
    new_ids = _new_items_arrive(world, DAY5, 5)

    def snapshot_read(*args):
        raise AssertionError("tokenize-new-items read the embeddings snapshot")

    monkeypatch.setattr(pipelines.tokenizer, "cold_behavior_embedding", snapshot_read)
    vectors_read = _vectors_read(monkeypatch)
    result = world["run"]("hisam_features", DAY5)
    monkeypatch.undo()
    assert sum(vectors_read) == 3 * len(new_ids)  # the new items' vectors, not the catalogue's
    assert result.state == "success" and result.tasks["tokenize_new_items"] == "success", result.tasks
    after = DeltaTable(ids_path).to_pandas()
    old = after[~after["item_id"].isin(new_ids)]
    key = ["tokenizer_version", "item_id"]
    assert old.sort_values(key)["semantic_ids"].map(list).tolist() == (
        before.sort_values(key)["semantic_ids"].map(list).tolist()
    )
    fresh = after[after["item_id"].isin(new_ids)]
    assert len(after) == 125 and set(fresh["tokenizer_version"]) == {VERSION}
    assert all(len(c) == 6 and min(c) >= 0 and max(c) < 16 for c in fresh["semantic_ids"])
    # the IDs themselves: today's rows of the fixed encoders, and for behaviour the cold row (mean of
    # the warm rows) of the space DST was trained and the catalogue encoded in, not today's retrained one
    from hisam_core.features import ItemFeatures
    from pipelines.registry import find_versions
    from pipelines.tokenizer import CATALOGUE_SNAPSHOT
    from pipelines.tokenizer_model import load_tokenizer

    (registered,) = find_versions(_client(), "hisam-tokenizer", tokenizer_version=VERSION)
    snapshot = int(registered.tags.get(CATALOGUE_SNAPSHOT) or registered.tags["delta.version"])
    embeddings = str(world["home"] / "lake" / "gold" / "item_embeddings")
    then, now = DeltaTable(embeddings, version=snapshot).to_pandas(), DeltaTable(embeddings).to_pandas()

    def warm_mean(frame: pd.DataFrame) -> np.ndarray:
        warm = frame[(frame["modality"] == "behavior") & frame["present"]]
        return np.stack(warm["embedding"].to_numpy()).mean(0, dtype=np.float64).astype(np.float32)

    cold = warm_mean(then)
    assert not np.allclose(cold, warm_mean(now), atol=1e-4)  # the behaviour space moved: the choice matters
    tokenizer = load_tokenizer(f"models:/hisam-tokenizer/{registered.version}")
    assert tokenizer.cold_behaviour.tobytes() == cold.tobytes()  # what the model carries, to the bit
    dst = tokenizer.dst
    order = np.array(sorted(new_ids))
    today = now[now["item_id"].isin(order)].set_index(["modality", "item_id"])
    fixed = [m for m in dst.modalities if m != "behavior"]
    features = ItemFeatures(
        order,
        {m: np.stack([today.loc[(m, i), "embedding"] for i in order]).astype(np.float32) for m in fixed}
        | {"behavior": np.repeat(cold[None], len(order), axis=0)},
        {m: np.array([bool(today.loc[(m, i), "present"]) for i in order]) for m in fixed}
        | {"behavior": np.zeros(len(order), dtype=bool)},
    )
    expected = dst.encode(features, version=VERSION)
    assert fresh.set_index("item_id").loc[order, "semantic_ids"].map(list).tolist() == expected.codes.tolist()
    samples = lake.read("gold.samples", partitions={**part, "tokenizer_version": VERSION})
    assert samples.filter(F.col("item_id").isin(list(new_ids))).count() == 40
    assert samples.count() == 3000 + 40  # every valid interaction is a sample: none quarantined

    version = DeltaTable(ids_path).version()
    vectors_read = _vectors_read(monkeypatch)
    again = run_step("tokenize-new-items", DAY5, world["config"])
    monkeypatch.undo()
    assert (again["new_items"], again["tokenized"], again["known_items"]) == (0, 0, 125)
    assert sum(vectors_read) == 0  # every item has its IDs: no vector is read
    assert DeltaTable(ids_path).version() == version
    # a rerun of the monthly catalogue step would drop the merged items: it does nothing instead
    catalogue = run_step("tokenize-catalogue", DAY5, world["config"], {"tokenizer_version": VERSION})
    assert catalogue["skipped"] and DeltaTable(ids_path).version() == version
    # another text encoder in the config: its embeddings are not the space this DST was trained on
    changed = load_config(world["config"], {"embeddings": {"text": {"version": "2"}}})
    with pytest.raises(ValueError, match="was trained on encoders"):
        run_step("tokenize-new-items", DAY5, changed)


def test_a_rerun_of_a_past_fine_tune_continues_on_the_snapshots_it_started_on(world) -> None:
    """Builds on the mid-month items: gold.samples has moved on since day 1. Day 1's fine-tune was
    judged, so its rerun skips. Had its training stopped midway, the rerun would continue its run on
    the samples snapshot that run logged (its checkpoint's batches index into it), not on the latest."""
    from deltalake import DeltaTable

    from pipelines.ranker import SFT_CHECKPOINT_SHA256, _find_run
    from pipelines.steps import StepSkipped, run_step
    from pipelines.tracking import input_versions

    run = _find_run(_ctx(world, DAY1), "finetune")
    with pytest.raises(StepSkipped, match=r"already fine-tuned hisam-pretrained v\d+ .* hisam-ranker v1 and"):
        run_step("finetune", DAY1, world["config"])
    _client().delete_tag(run.info.run_id, SFT_CHECKPOINT_SHA256)  # as if its training had stopped
    pinned = input_versions(_client().get_run(run.info.run_id))["samples"]
    assert pinned < DeltaTable(str(world["home"] / "lake" / "gold" / "samples")).version()
    again = run_step("finetune", DAY1, world["config"])
    assert (again["mlflow_run_id"], again["samples_version"]) == (run.info.run_id, pinned)
    # the version validate-samples passed, as the training DAGs hand it on, is the one evaluated
    judged = run_step("evaluate", DAY1, world["config"], {"samples_version": str(pinned)})
    assert judged["snapshot"] == pinned


def test_the_champion_is_refreshed_to_serve_items_that_arrived_after_it(world, monkeypatch) -> None:
    """Builds on the rollback (@champion is v1) and the mid-month items (day 5): v1 packaged its IDs
    before the five items arrived, so it refuses them. refresh-champion registers v1's weights again
    with the lake's IDs of that version: the new version scores every item as v1's own ranker scores
    its lake codes, keeps v1's lineage and metrics, becomes @champion (@previous stays), and a rerun
    registers nothing. A lake table disagreeing with the packaged IDs is refused, and so is a refresh
    while a promote or rollback stopped midway (both aliases on one version)."""
    from hisam_core.ranker.sequence import UserHistory
    from hisam_core.semantic_ids import SemanticIds
    from pipelines import tokenizer
    from pipelines.ranker_model import load_ranker
    from pipelines.registry import alias_version
    from pipelines.steps import StepSkipped, run_step

    client = _client()
    old = client.get_model_version_by_alias("hisam-ranker", "champion")
    previous = alias_version(client, "hisam-ranker", "previous")
    versions = len(client.search_model_versions("name = 'hisam-ranker'"))
    v1 = load_ranker("models:/hisam-ranker/1").unwrap_python_model()
    lake = tokenizer.semantic_ids_of(_ctx(world, DAY5), VERSION)
    new_ids = np.setdiff1d(lake.item_ids, v1.semantic_ids.item_ids)
    assert str(old.version) == "1" and len(new_ids) == 5 and len(v1.semantic_ids.item_ids) == 120
    history = v1.semantic_ids.item_ids[:4]
    candidates = np.concatenate([v1.semantic_ids.item_ids[4:9], new_ids])
    profile = dict.fromkeys(v1.config.sequence.profile_fields, 1)
    request = {"user_id": 7, "history_item_ids": history, "history_actions": [1, 0, 1, 1],
               "candidate_item_ids": candidates, **{f"profile_{f}": b for f, b in profile.items()}}  # fmt: skip
    with pytest.raises(ValueError, match="without semantic IDs"):
        v1.score(request)

    tampered = SemanticIds(lake.item_ids, (lake.codes + 1) % lake.codebook_size, lake.codebook_size, VERSION)
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "semantic_ids_of", lambda ctx, version: tampered)
        with pytest.raises(ValueError, match="must never change"):
            run_step("refresh-champion", DAY5, world["config"])
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions
    client.set_registered_model_alias("hisam-ranker", "previous", "1")  # a promote stopped midway
    try:
        with pytest.raises(StepSkipped, match="a promote or rollback stopped midway"):
            run_step("refresh-champion", DAY5, world["config"])
    finally:
        if previous is None:
            client.delete_registered_model_alias("hisam-ranker", "previous")
        else:
            client.set_registered_model_alias("hisam-ranker", "previous", str(previous.version))
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions

    summary = run_step("refresh-champion", DAY5, world["config"])
    assert (summary["refreshed_from"], summary["packaged_items"], summary["new_items"]) == ("1", 120, 5)
    assert summary["champion_moved"]  # the DAG emits the champion asset for it
    refreshed = client.get_model_version_by_alias("hisam-ranker", "champion")
    assert str(refreshed.version) == summary["champion"] == str(versions + 1)
    assert refreshed.tags["refreshed_from"] == "1" and refreshed.tags["gate"] == "refreshed"
    for tag in ("tokenizer_version", "training_run_id", "pretrained_version", "eval.snapshot", "eval.auc"):
        assert refreshed.tags[tag] == old.tags[tag], tag
    assert _drift(refreshed.tags) == _drift(old.tags) != {}  # the gate chains on from it
    assert alias_version(client, "hisam-ranker", "previous") == previous

    served = load_ranker("models:/hisam-ranker@champion", VERSION).unwrap_python_model()
    assert np.array_equal(served.semantic_ids.lookup(lake.item_ids), lake.codes)
    reference = v1.ranker.rank(
        UserHistory(7, lake.lookup(history), np.array([1, 0, 1, 1]), profile), lake.lookup(candidates)
    )
    np.testing.assert_allclose(served.score(request), reference.float().numpy(), rtol=0, atol=1e-6)

    again = run_step("refresh-champion", DAY5, world["config"])
    assert (again["champion"], again["refreshed_from"], again["new_items"]) == (summary["champion"],) * 2 + (
        0,
    )
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions + 1
    later = run_step("refresh-champion", DAY5 + dt.timedelta(days=1), world["config"])
    assert later["new_items"] == 0 and later["champion"] == summary["champion"]
    assert again["champion_moved"]  # a retry of the day announces the move again: at least once
    assert not later["champion_moved"]


def test_recommend_ranks_every_unseen_item_with_the_champion(world, capsys, caplog) -> None:
    """Builds on the refreshed champion: ``hisam recommend`` gives a user's top K among the items they
    never interacted with, scored as the per-candidate reference scores the user's whole stream in
    gold.samples (oldest first with its times, mid-month items included) with their profile buckets;
    ``--include-seen`` ranks the whole catalogue, and an unknown user is an error. A user with a
    profile and no interaction yet is ranked from the profile alone."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    from hisam_core.ranker.sequence import UserHistory
    from hisam_core.ranker.serving import rank_reference
    from pipelines.cli import main
    from pipelines.ranker import event_micros
    from pipelines.ranker_model import load_ranker

    lake = world["home"] / "lake"
    events = DeltaTable(str(lake / "silver" / "interactions")).to_pandas()
    user = events.sort_values("user_id").iloc[0]  # one of the 8 users who met the mid-month items
    capsys.readouterr()
    assert main(["recommend", str(user["user_key"]), "--top-k", "5"]) == 0
    got = json.loads(capsys.readouterr().out)

    served = load_ranker("models:/hisam-ranker@champion").unwrap_python_model()
    table = served.semantic_ids
    samples = DeltaTable(str(lake / "gold" / "samples")).to_pandas(
        partitions=[("tokenizer_version", "=", VERSION)]
    )
    mine = samples[samples["user_id"] == user["user_id"]].sort_values(["event_ts", "item_id"], kind="stable")
    profiles = DeltaTable(str(lake / "gold" / "user_profiles")).to_pandas()
    profile = served.profile_vocabulary.encode(
        profiles[profiles["user_id"] == user["user_id"]].iloc[0].to_dict()
    )
    history = UserHistory(
        int(user["user_id"]),
        table.lookup(mine["item_id"].to_numpy()),
        mine["action"].to_numpy(),
        profile,
        instants=event_micros(mine["event_ts"]),
    )
    seen = set(events.loc[events["user_id"] == user["user_id"], "item_id"])  # all of silver, valid or not
    unseen = np.array([i for i in table.item_ids if i not in seen])
    expected = rank_reference(served.ranker.model, served.config.sequence, history, table.lookup(unseen))
    best = np.lexsort((unseen, -expected.numpy()))[:5]
    mine_events = events[events["user_id"] == user["user_id"]]
    assert set(mine["item_id"]) <= seen and mine_events["item_key"].str.startswith("new-").any()
    assert (got["model_version"], got["history_items"], got["history_left_out"]) == (
        str(_client().get_model_version_by_alias("hisam-ranker", "champion").version),
        len(mine),
        0,
    )
    assert got["newer_interactions_not_in_history"] == 0 and got["personalised"] is True
    assert got["candidates"] == len(unseen) and len(unseen) < len(table.item_ids)
    assert [r["item_id"] for r in got["recommendations"]] == unseen[best].tolist()
    np.testing.assert_allclose(
        [r["score"] for r in got["recommendations"]], expected.numpy()[best], atol=1e-5
    )
    items = DeltaTable(str(lake / "silver" / "items")).to_pandas().set_index("item_id")
    assert [r["title"] for r in got["recommendations"]] == items.loc[unseen[best], "title"].tolist()
    assert main(["recommend", str(user["user_key"]), "--top-k", "5", "--include-seen"]) == 0
    every = json.loads(capsys.readouterr().out)  # the items the user has seen compete too
    assert every["candidates"] == len(table.item_ids) and every["history_items"] == len(mine)
    assert got["not_in_catalogue"] == 0
    retracted = int(unseen[best][0])  # the top item leaves the catalogue (a corrected import, say)
    listed = DeltaTable(str(lake / "silver" / "items")).to_pyarrow_table()
    DeltaTable(str(lake / "silver" / "items")).delete(f"item_id = {retracted}")
    try:
        assert main(["recommend", str(user["user_key"]), "--top-k", "5"]) == 0
        after = json.loads(capsys.readouterr().out)
    finally:
        write_back = listed.filter(pc.equal(listed["item_id"], retracted))
        write_deltalake(str(lake / "silver" / "items"), write_back, mode="append")
    assert (after["candidates"], after["not_in_catalogue"]) == (len(unseen) - 1, 1)
    moved_up = unseen[np.lexsort((unseen, -expected.numpy()))[1:6]]  # the next five, one place up
    assert [r["item_id"] for r in after["recommendations"]] == moved_up.tolist()
    assert main(["recommend", "no-such-user"]) == 2  # a clear error, no traceback
    assert "user 'no-such-user' is in neither silver.interactions nor silver.users" in caplog.text

    newcomer = 10**9  # in silver.users and gold.user_profiles (the user's profile), no interaction
    for path in ("silver/users", "gold/user_profiles"):
        rows = DeltaTable(str(lake / path)).to_pyarrow_table()
        row = rows.filter(pc.equal(rows["user_id"], int(user["user_id"])))
        row = row.set_column(
            row.schema.get_field_index("user_id"), "user_id", pa.array([newcomer], pa.int64())
        )
        if "user_key" in row.column_names:
            row = row.set_column(row.schema.get_field_index("user_key"), "user_key", pa.array(["newcomer"]))
        write_deltalake(str(lake / path), row.cast(rows.schema), mode="append")
    try:
        assert main(["recommend", "newcomer", "--top-k", "3"]) == 0
        fresh = json.loads(capsys.readouterr().out)
        alone = UserHistory(newcomer, table.lookup(np.array([], np.int64)), np.array([], np.int64), profile)
        expected = rank_reference(
            served.ranker.model, served.config.sequence, alone, table.lookup(table.item_ids)
        )
        top = np.lexsort((table.item_ids, -expected.numpy()))[:3]
        assert (fresh["user_id"], fresh["history_items"], fresh["candidates"]) == (
            newcomer,
            0,
            len(table.item_ids),
        )
        assert fresh["personalised"] is True  # by the profile alone
        assert [r["item_id"] for r in fresh["recommendations"]] == table.item_ids[top].tolist()
    finally:
        for path in ("silver/users", "gold/user_profiles"):
            DeltaTable(str(lake / path)).delete(f"user_id = {newcomer}")


def test_a_data_quality_failure_stops_fine_tuning_and_alerts(world) -> None:
    """Closing section (it corrupts gold.samples). A few out-of-codebook rows pass the samples gate within
    its tolerance and are removed from the table; 100 more make it fail, so fine-tuning never starts,
    the gate alerts (once: the failed task adds no second alert), and the quarantine of the day holds
    all 105."""
    from pyspark.sql import functions as F

    from pipelines.steps import run_step

    ctx = _ctx(world, DAY4)
    lake = ctx.lake
    part = {"dataset": "tiny", "tokenizer_version": VERSION}
    samples = lake.read("gold.samples", partitions=part)
    clean = samples.count()
    few = samples.limit(5).withColumn("target_semantic_ids", F.array(*[F.lit(99)] * 6))
    lake.write(
        few.withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL 1 SECOND")),
        "gold.samples",
        mode="append",
    )
    passed = run_step("validate-samples", DAY4, world["config"])  # 5 bad rows: within the tolerance
    assert passed["success"] and passed["n_quarantined"] == 5
    assert lake.read("gold.samples", partitions=part).count() == clean  # removed: training never sees them
    broken = samples.limit(100).withColumn("target_semantic_ids", F.array(*[F.lit(99)] * 6))
    broken = broken.withColumn("event_ts", F.col("event_ts") + F.expr("INTERVAL 2 SECONDS"))  # not the 5
    lake.write(broken, "gold.samples", mode="append")
    client = _client()
    versions_before = len(client.search_model_versions("name = 'hisam-ranker'"))
    result = world["run"]("hisam_finetune", DAY4)
    assert result.state == "failed"
    assert result.tasks["validate_samples"] == "failed"
    assert result.tasks["finetune"] == result.tasks["promote"] == "upstream_failed"
    assert (result.tasks["refresh_champion"], result.tasks["watcher"]) == ("success", "failed")
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions_before  # no new items
    titles = [a["title"] for a in _alerts(world)]
    assert "quality gate 'samples' failed" in titles
    assert "hisam_finetune.validate_samples failed" not in titles
    assert "hisam_finetune.watcher failed" not in titles  # one alert per failure
    quarantine = lake.read(
        "bronze.quarantine", partitions={"dataset": "tiny", "target_table": f"gold.samples.gate@{VERSION}"}
    )
    # the failed run's 100, and the 5 the passing run removed from gold.samples earlier that day
    assert quarantine.filter(F.col("logical_date") == F.lit(DAY4)).count() == 105


def test_after_a_new_tokenizer_fine_tuning_waits_for_its_pretraining_and_compares_on_shared_rows(
    world, capsys
) -> None:
    """Closing section (it moves @current). December's tokenizer is activated; fine-tuning that day finds no
    PT on it, so it skips (no training, no alert, the champion stays). PT on it is registered (which
    triggers hisam_finetune) and three new items arrive: the daily run gives them IDs of the new
    version and of the champion's, so the refreshed champion serves them. Two more arrive while the
    champion's DST is tagged with other encoders: only the new version can place them, and the daily
    run still succeeds, with a warning alert. Fine-tuning trains on the new version, and it and the old champion are
    evaluated on the rows both can score, leaving out the 16 interactions with those two items."""
    from deltalake import DeltaTable

    from pipelines.ranker_model import load_ranker
    from pipelines.registry import find_versions
    from pipelines.steps import run_step
    from pipelines.tokenizer import ENCODERS

    dec1, version = dt.date(2026, 12, 1), "dst-20261201"
    client = _client()
    champion = client.get_model_version_by_alias("hisam-ranker", "champion").version
    # the day's import first, as at 00:00 in production: samples-ready takes the monthly build as
    # holding the day only when it read silver after that import
    assert world["run"]("hisam_features", dec1).state == "success"
    assert world["run"]("hisam_tokenizer", dec1).state == "success"
    # the activation hands its day on: an asset-triggered hisam_pretrain waits for that day's samples
    assert _asset_events("hisam-tokenizer@current", "extra")[-1] == {"logical_date": dec1.isoformat()}
    alerts = len(_alerts(world))
    waiting = world["run"]("hisam_finetune", dec1)
    assert waiting.state == "success" and waiting.tasks["validate_samples"] == "success", waiting.tasks
    assert {waiting.tasks[t] for t in ("finetune", "evaluate", "register", "promote")} == {"skipped"}
    assert waiting.tasks["refresh_champion"] == "success"  # the old champion has every item of its version
    assert len(_alerts(world)) == alerts
    assert client.get_model_version_by_alias("hisam-ranker", "champion").version == champion
    new_version = f"name = 'hisam-ranker' and tags.tokenizer_version = '{version}'"
    assert not client.search_model_versions(new_version)
    from pipelines.cli import main

    capsys.readouterr()
    assert main(["run", "finetune", "--logical-date", dec1.isoformat()]) == 0  # the CLI skips too
    assert json.loads(capsys.readouterr().out)["skipped"] is True

    assert world["run"]("hisam_pretrain", dec1).state == "success"
    ids_path = str(world["home"] / "lake" / "gold" / "semantic_ids")
    before = DeltaTable(ids_path).to_pandas()
    servable = _new_items_arrive(world, dec1, 3)
    assert world["run"]("hisam_features", dec1).tasks["tokenize_new_items"] == "success"
    ids = DeltaTable(ids_path).to_pandas()
    assert len(ids) == len(before) + 2 * len(servable)  # each new item once per serving version
    assert ids.groupby("tokenizer_version")["item_id"].apply(lambda i: servable <= set(i)).all()
    refreshed = run_step("refresh-champion", dec1, world["config"])
    assert (refreshed["refreshed_from"], refreshed["new_items"]) == (str(champion), len(servable))
    served = load_ranker("models:/hisam-ranker@champion", VERSION).unwrap_python_model()
    assert servable <= set(served.semantic_ids.item_ids.tolist())
    champion = refreshed["champion"]

    old = find_versions(client, "hisam-tokenizer", tokenizer_version=VERSION)[0]
    client.set_model_version_tag("hisam-tokenizer", old.version, ENCODERS, "{}")
    try:
        unservable = _new_items_arrive(world, dec1, 2)
        assert world["run"]("hisam_features", dec1).tasks["tokenize_new_items"] == "success"
    finally:
        client.set_model_version_tag("hisam-tokenizer", old.version, ENCODERS, old.tags[ENCODERS])
    alert = _alerts(world)[-1]  # the on-call hears that the champion cannot serve them
    assert (alert["title"], alert["severity"]) == (f"no new {VERSION} IDs for @champion", "warning")
    assert alert["text"].endswith(f"until a model on {version} is promoted")
    ids = DeltaTable(ids_path).to_pandas()
    placed = ids[ids["item_id"].isin(unservable)]
    assert len(placed) == len(unservable) and set(placed["tokenizer_version"]) == {version}

    trained = world["run"]("hisam_finetune", dec1)
    assert {trained.tasks[t] for t in ("finetune", "evaluate", "register")} == {"success"}, trained.tasks
    (candidate,) = client.search_model_versions(new_version)
    run = client.get_run(candidate.run_id)
    assert run.data.tags["eval.champion_version"] == str(champion)
    assert run.data.tags["eval.champion_unknown_rows"] == str(8 * len(unservable))
    assert {"eval.auc", "champion.auc"} <= set(run.data.metrics)


def test_a_pretraining_that_lands_after_the_days_fine_tune_is_fine_tuned_that_day(world) -> None:
    """Builds on December 1st (closing section): its fine-tune started from PT of that day. A PT registered
    later (here by the next day's run) triggers hisam_finetune for December 1st again: it trains a new
    finetune run from the new PT, instead of finding the morning's run done, and registers it as its
    own candidate, evaluated by that run."""
    from pipelines.steps import run_step

    dec1, dec2, version = dt.date(2026, 12, 1), dt.date(2026, 12, 2), "dst-20261201"
    client = _client()
    query = f"tags.`hisam.step` = 'finetune' and tags.`hisam.run_key` = 'tiny/{dec1.isoformat()}'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    (morning,) = client.search_runs(experiments, query)
    run_step("pretrain", dec2, world["config"])  # the DAG would wait for dec2's samples first
    newest = client.search_model_versions(
        f"name = 'hisam-pretrained' and tags.tokenizer_version = '{version}'"
    )
    latest_pt = str(max(int(v.version) for v in newest))
    assert latest_pt != morning.data.tags["pretrained_version"]

    result = world["run"]("hisam_finetune", dec1)
    assert {result.tasks[t] for t in ("finetune", "evaluate", "register", "promote")} == {"success"}, (
        result.tasks
    )
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[1].info.run_id == morning.info.run_id
    evening = runs[0]
    assert evening.data.tags["pretrained_version"] == latest_pt and "eval.auc" in evening.data.metrics
    (candidate,) = client.search_model_versions(
        f"name = 'hisam-ranker' and tags.training_run_id = '{evening.info.run_id}'"
    )
    assert (
        candidate.tags["pretrained_version"] == latest_pt
        and candidate.tags["run_key"] == f"tiny/{dec1.isoformat()}"
    )
    assert candidate.tags["eval.auc"] == f"{evening.data.metrics['eval.auc']:.6f}"  # judged on that run
    # the verdict is the gate's on the tagged metrics, against the champion it was evaluated with
    from pipelines.ranker import CHAMPION_PREFIX, EVAL_PREFIX, UNMEASURED, metrics_of
    from pipelines.registry import DRIFT_PREFIX, GATE_METRICS, decide
    from pipelines.steps import load_config

    against = candidate.tags.get("eval.champion_version")
    judged = client.get_model_version("hisam-ranker", against) if against else None
    decision = decide(
        metrics_of(candidate.tags, EVAL_PREFIX, GATE_METRICS),
        metrics_of(candidate.tags, CHAMPION_PREFIX, GATE_METRICS) if judged else None,
        load_config(world["config"]).gate,
        metrics_of(judged.tags, DRIFT_PREFIX, GATE_METRICS) if judged else {},
        [m for m in candidate.tags.get(UNMEASURED, "").split(",") if m],
    )
    assert candidate.tags["gate"] == ("promoted" if decision.promote else "rejected")


def test_a_snapshot_without_cold_start_users_is_judged_on_the_other_metrics(world) -> None:
    """Builds on December 1st (closing section). When no test user is cold, cold_auc and cold_gauc are
    undefined for every model: evaluate records them as unmeasured instead of crashing or logging
    them, register tags only what this evaluation measured (not the earlier run's cold values), and
    the gate skips their floor instead of rejecting every candidate."""
    from deltalake import DeltaTable

    from pipelines.steps import run_step

    dec3, version = dt.date(2026, 12, 3), "dst-20261201"
    samples = DeltaTable(str(world["home"] / "lake" / "gold" / "samples"))
    samples.update(updates={"is_cold_user": "false"}, predicate=f"tokenizer_version = '{version}'")
    # only the cold metrics' floor and drift are under test: auc's are loose, whatever the tiny model's score
    gated = {
        "floors": {"auc": 0.0, "cold_gauc": 0.5},
        "max_regression": {"auc": 1.0, "gauc": 1.0, "cold_gauc": 0.01},
        "max_drift": {"auc": 1.0, "cold_gauc": 0.03},
    }
    world["write_config"](world["config"], top={"gate": gated})
    try:  # the steps of hisam_finetune (whose sensor would wait for a features run of dec3)
        for step in ("validate-samples", "finetune", "evaluate", "register", "promote"):
            run_step(step, dec3, world["config"])
    finally:
        world["write_config"](world["config"])
    client = _client()
    (candidate,) = client.search_model_versions(f"name = 'hisam-ranker' and tags.run_key = 'tiny/{dec3}'")
    run = client.get_run(candidate.run_id)
    assert run.data.tags["eval.unmeasured"] == candidate.tags["eval.unmeasured"] == "cold_auc,cold_gauc"
    assert not {k for k in candidate.tags if k.endswith(("cold_auc", "cold_gauc"))}
    assert candidate.tags["gate"] == "promoted", candidate.tags.get("gate_reasons")
    assert candidate.tags["gate_unmeasured"] == "cold_auc,cold_gauc"


def test_a_day_whose_samples_never_arrive_fails_the_wait_with_an_alert(world) -> None:
    """Closing section. On December 9th two items arrive and get their IDs, but the features run stops
    there: fine-tuning does not train on older samples; its sensor gives up after the timeout
    (shortened for the tests) and alerts. The champion is still refreshed, so the two items are
    servable that day, and the run is failed (by the watcher, which does not alert again)."""
    from pipelines.ranker_model import TOKENIZER_VERSION, load_ranker
    from pipelines.steps import run_step

    dec9 = dt.date(2026, 12, 9)
    client = _client()
    versions_before = len(client.search_model_versions("name = 'hisam-ranker'"))
    arrived = _new_items_arrive(world, dec9, 2)
    for step in ("ingest", "validate", "embed"):  # hisam_features, up to its failed build-sequences
        run_step(step, dec9, world["config"])
    assert run_step("tokenize-new-items", dec9, world["config"])["new_items"] == len(arrived)
    result = world["run"]("hisam_finetune", dec9)
    assert result.state == "failed" and result.tasks["samples_ready"] == "failed"
    assert result.tasks["finetune"] == result.tasks["promote"] == "upstream_failed"
    assert (result.tasks["refresh_champion"], result.tasks["watcher"]) == ("success", "failed")
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions_before + 1
    champion = client.get_model_version_by_alias("hisam-ranker", "champion")
    assert (int(champion.version), champion.tags["gate"]) == (versions_before + 1, "refreshed")
    served = load_ranker("models:/hisam-ranker@champion", champion.tags[TOKENIZER_VERSION])
    assert arrived <= set(served.unwrap_python_model().semantic_ids.item_ids.tolist())
    titles = [a["title"] for a in _alerts(world)]
    assert "hisam_finetune.samples_ready failed" in titles and "hisam_finetune.watcher failed" not in titles


def test_an_older_months_activation_leaves_the_newer_tokenizer_current(world) -> None:
    """Closing section. Rerunning November's activate-tokenizer after December's would switch training and
    serving back to November's tokenizer: it skips, and @current stays; a backfill of October trains
    nothing. A fine-tune handed the
    samples the gate passed for November skips too, instead of training December's, which no gate
    saw. force=true moves @current back on purpose; December's rerun moves it forward again."""
    from pipelines.steps import StepSkipped, run_step

    dec1, december = dt.date(2026, 12, 1), "dst-20261201"
    client, name = _client(), _ctx(world).config.models.tokenizer

    def current() -> str:
        return client.get_model_version_by_alias(name, "current").tags["tokenizer_version"]

    versions = len(client.search_model_versions(f"name = '{name}'"))
    assert current() == december
    with pytest.raises(StepSkipped, match=f"is {december}, newer than the tokenizer of {DAY1}"):
        run_step("activate-tokenizer", DAY1, world["config"])
    with pytest.raises(StepSkipped, match=f"is {december}, newer than the tokenizer of 2026-10-01"):
        run_step("train-tokenizer", dt.date(2026, 10, 1), world["config"])  # a backfill trains nothing
    with pytest.raises(StepSkipped, match=f"is {december}, newer than the tokenizer of {DAY1}"):
        run_step("train-tokenizer", DAY1, world["config"])  # registered: skipped, its samples not rebuilt
    assert current() == december and len(client.search_model_versions(f"name = '{name}'")) == versions
    with pytest.raises(StepSkipped, match=f"passed the samples of tokenizer {VERSION}, but @current is now"):
        run_step("finetune", dec1, world["config"], {"tokenizer_version": VERSION})
    forced = run_step("activate-tokenizer", DAY1, world["config"], {"force": "true"})
    assert forced["tokenizer_version"] == current() == VERSION
    run_step("activate-tokenizer", dec1, world["config"])
    assert current() == december
    with pytest.raises(
        StepSkipped, match=r"already v\d+ \(dst-20261201\), pre-trained as hisam-pretrained v"
    ):
        run_step("activate-tokenizer", dec1, world["config"])  # its event would pre-train it again
    with pytest.raises(ValueError, match="param force must be true or false, got 'ture'"):
        # @current is not newer, so force is not needed: a typo in it is refused all the same
        run_step("activate-tokenizer", dec1, world["config"], {"force": "ture"})
    assert current() == december


def test_a_rollback_to_an_older_tokenizers_champion_serves_the_items_that_arrived_since(world) -> None:
    """Closing section. December's candidate is the champion, and @previous is v1, November's first
    champion, which packaged its IDs before items arrived (day 5 and December). Items arriving now
    get IDs under November's version as well, as @previous's. A rollback restores v1 and registers
    it again with every ID the lake holds for its tokenizer version, so the restored champion serves
    them at once. A retry of the day's refresh registers nothing more."""
    from hisam_core.ranker.attention import MASK_RULE
    from pipelines import tokenizer
    from pipelines.ranker_model import load_ranker
    from pipelines.registry import find_versions
    from pipelines.steps import run_step

    dec10 = dt.date(2026, 12, 10)
    client = _client()
    december = find_versions(client, "hisam-ranker", tokenizer_version="dst-20261201")[-1]
    client.set_registered_model_alias("hisam-ranker", "champion", december.version)  # promoted, say
    client.set_registered_model_alias("hisam-ranker", "previous", "1")  # what the on-call rolls back to
    arrived = _new_items_arrive(world, dec10, 2)
    for step in ("ingest", "validate", "embed"):
        run_step(step, dec10, world["config"])
    daily = run_step("tokenize-new-items", dec10, world["config"])
    assert "champion" not in daily and daily["previous"]["tokenizer_version"] == VERSION
    versions = len(client.search_model_versions("name = 'hisam-ranker'"))
    ids = tokenizer.semantic_ids_of(_ctx(world, dec10), VERSION)
    assert arrived <= set(ids.item_ids.tolist())
    summary = run_step("rollback", dec10, world["config"])
    assert summary["restored"] == "1" and summary["new_items"] == len(ids.item_ids) - 120 > 0
    champion = client.get_model_version_by_alias("hisam-ranker", "champion")
    assert str(champion.version) == summary["champion"] == str(versions + 1)
    assert champion.tags["refreshed_from"] == "1"
    served = load_ranker("models:/hisam-ranker@champion", VERSION).unwrap_python_model()
    assert np.array_equal(served.semantic_ids.lookup(ids.item_ids), ids.codes)
    assert served.mask_rule == MASK_RULE  # the refreshed package keeps the rule v1 was trained under
    alert = _alerts(world)[-1]  # sent before the refresh: an interrupted one still reaches the on-call
    assert (alert["title"], alert["text"]) == (
        "hisam-ranker rolled back",
        f"@champion v{summary['demoted']} -> v1",
    )
    assert run_step("refresh-champion", dec10, world["config"])["new_items"] == 0
    assert len(client.search_model_versions("name = 'hisam-ranker'")) == versions + 1
    demoted = f"a rollback demoted v{december.version} for the weights @champion v{champion.version} serves"
    done = rf"no @previous .*\({demoted}: if it stopped before its refresh"
    with pytest.raises(ValueError, match=done):
        run_step("rollback", dec10, world["config"])  # a rerun names the rollback that already happened


def test_a_forced_fine_tune_trains_a_new_run_from_step_zero(world) -> None:
    """Builds on December 1st, whose fine-tune of the newest PT was judged: a rerun skips, and
    ``force=true`` trains it again from step 0 in a new MLflow run (not from the finished
    checkpoint), which a forced rerun continues had it stopped (a run not forced it does not; nor one
    whose checkpoint refuses the settings, nor one without a checkpoint that logged other settings),
    and which evaluation and registration then take as the day's candidate."""
    from mlflow.entities import Param

    from pipelines.ranker import FORCED, PROFILE_VOCABULARY, SFT_CHECKPOINT_SHA256
    from pipelines.steps import StepSkipped, run_step
    from pipelines.tracking import input_versions

    dec1 = dt.date(2026, 12, 1)
    client = _client()
    query = f"tags.`hisam.step` = 'finetune' and tags.`hisam.run_key` = 'tiny/{dec1.isoformat()}'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"])
    with pytest.raises(StepSkipped, match="already fine-tuned"):
        run_step("finetune", dec1, world["config"])
    forced = run_step("finetune", dec1, world["config"], {"force": "true"})
    assert forced["mlflow_run_id"] not in {r.info.run_id for r in before}
    assert forced["pretrained_version"] == before[0].data.tags["pretrained_version"]
    runs = (before[0].info.run_id, forced["mlflow_run_id"])
    steps = [[m.step for m in client.get_metric_history(run, "sft/loss")] for run in runs]
    assert steps[1] == steps[0] and steps[1]  # every logged step again, not a resumed finished run
    client.delete_tag(forced["mlflow_run_id"], SFT_CHECKPOINT_SHA256)  # as if it had stopped midway
    resumed = run_step("finetune", dec1, world["config"], {"force": "true"})
    assert resumed["mlflow_run_id"] == forced["mlflow_run_id"]  # continued, not a third run from step 0
    assert SFT_CHECKPOINT_SHA256 in client.get_run(forced["mlflow_run_id"]).data.tags
    client.delete_tag(forced["mlflow_run_id"], SFT_CHECKPOINT_SHA256)  # it stopped again, and then
    fix = {"learning_rate": 5e-4, "max_steps": 60}  # a second fix its checkpoint refuses (the rate)
    world["write_config"](world["config"], finetune=fix)
    try:
        refixed = run_step("finetune", dec1, world["config"], {"force": "true"})
    finally:
        world["write_config"](world["config"])
    assert refixed["mlflow_run_id"] != forced["mlflow_run_id"]  # a new forced run from step 0
    assert client.get_run(refixed["mlflow_run_id"]).data.tags[FORCED] == "true"
    logged = [m.step for m in client.get_metric_history(refixed["mlflow_run_id"], "sft/loss")]
    assert (logged[0], logged[-1]) == (steps[0][0], 60)  # from the first logged step, not resumed
    forced = refixed
    for tag in (SFT_CHECKPOINT_SHA256, FORCED):  # as if a run not forced had stopped midway
        client.delete_tag(forced["mlflow_run_id"], tag)
    again = run_step("finetune", dec1, world["config"], {"force": "true"})
    assert again["mlflow_run_id"] != forced["mlflow_run_id"]  # force means from step 0, not a resume
    # a first attempt that died once its run was tagged, before it logged its lineage: the retry
    # continues that run and logs the config, the inputs and the vocabulary it lacks
    finished = client.get_run(again["mlflow_run_id"])
    tags = {
        k: v
        for k, v in finished.data.tags.items()
        if k != SFT_CHECKPOINT_SHA256 and not k.startswith("mlflow.")
    }
    crashed = client.create_run(finished.info.experiment_id, tags=tags).info.run_id
    client.set_terminated(crashed, "FAILED")
    Path(again["checkpoint"]).unlink()  # it died before its first checkpoint: it trains from step 0
    forced = run_step("finetune", dec1, world["config"], {"force": "true"})
    assert forced["mlflow_run_id"] == crashed
    continued = client.get_run(crashed)
    assert input_versions(continued) == input_versions(finished) and input_versions(continued)
    assert continued.data.params == finished.data.params and continued.data.params
    artifacts = {a.path for a in client.list_artifacts(crashed)}
    assert {"config", PROFILE_VOCABULARY} <= artifacts, artifacts
    # one that died before its first checkpoint but after logging its config, retried with other
    # settings: MLflow params cannot change, so a new run trains and records them; the stopped one,
    # left RUNNING by its killed worker, is marked KILLED
    stale = client.create_run(finished.info.experiment_id, tags={**tags, FORCED: "true"}).info.run_id
    client.log_batch(stale, params=[Param(k, v) for k, v in continued.data.params.items()])
    Path(forced["checkpoint"]).unlink()
    world["write_config"](world["config"], finetune=fix)
    try:
        forced = run_step("finetune", dec1, world["config"], {"force": "true"})
    finally:
        world["write_config"](world["config"])
    assert forced["mlflow_run_id"] not in (stale, crashed) and client.get_run(stale).info.status == "KILLED"
    retrained = client.get_run(forced["mlflow_run_id"])
    rates = (continued.data.params["train.learning_rate"], retrained.data.params["train.learning_rate"])
    assert float(rates[0]) != 5e-4 == float(rates[1]) and retrained.data.tags[FORCED] == "true"
    run_step("evaluate", dec1, world["config"])
    registered = run_step("register", dec1, world["config"])
    version = client.get_model_version("hisam-ranker", registered["model_version"])
    assert not registered.get("skipped") and version.tags["training_run_id"] == forced["mlflow_run_id"]


def test_new_items_without_ids_do_not_hold_up_the_days_samples(world) -> None:
    """Closing section. The text encoder's version changes before a tokenizer is trained for it: the day's
    ``tokenize-new-items`` cannot feed @current's DST the new embeddings and fails (with its alert),
    but ``build-sequences`` still builds the day's samples, so fine-tuning is not held up for a day;
    the watcher fails the run without a second alert."""
    import yaml

    dec11 = dt.date(2026, 12, 11)
    embeddings = yaml.safe_load(world["config"].read_text())["embeddings"]
    embeddings["text"]["version"] = "2"
    world["write_config"](world["config"], top={"embeddings": embeddings})
    try:
        result = world["run"]("hisam_features", dec11)
    finally:
        world["write_config"](world["config"])
    assert result.state == "failed"
    assert (result.tasks["embed"], result.tasks["tokenize_new_items"]) == ("success", "failed")
    assert (result.tasks["build_sequences"], result.tasks["watcher"]) == ("success", "failed")
    titles = [a["title"] for a in _alerts(world)]
    assert "hisam_features.tokenize_new_items failed" in titles
    assert (
        "hisam_features.watcher failed" not in titles
        and "hisam_features.build_sequences failed" not in titles
    )


def test_a_forced_pretraining_trains_a_new_run_and_registers_a_new_version(world) -> None:
    """Closing section. December 2nd's PT is being fine-tuned (above), so a rerun skips. ``force=true``
    trains again from step 0 in a new MLflow run tagged ``hisam.forced`` (a stopped run's checkpoint
    would refuse other settings; a bad version is replaced) and registers a new version from that run,
    the newest PT the next fine-tune starts from."""
    from pipelines.ranker import FORCED, _newest_pretrained
    from pipelines.registry import find_versions
    from pipelines.steps import StepSkipped, run_step

    dec2 = dt.date(2026, 12, 2)
    client = _client()
    with pytest.raises(StepSkipped, match="being fine-tuned"):
        run_step("pretrain", dec2, world["config"])
    (before,) = find_versions(client, "hisam-pretrained", run_key=f"tiny/{dec2.isoformat()}")
    forced = run_step("pretrain", dec2, world["config"], {"force": "true"})
    assert int(forced["model_version"]) > int(before.version)
    version = client.get_model_version("hisam-pretrained", forced["model_version"])
    assert version.run_id == forced["mlflow_run_id"] != before.run_id
    assert client.get_run(version.run_id).data.tags[FORCED] == "true"
    steps = [
        [m.step for m in client.get_metric_history(run, "pt/loss")] for run in (before.run_id, version.run_id)
    ]
    assert steps[1] == steps[0] and steps[1]  # every step again, from step 0
    assert _newest_pretrained(_ctx(world, dec2), version.tags["tokenizer_version"]) == forced["model_version"]


def test_an_overlapping_pretraining_attempt_does_not_register_its_run_twice(world, monkeypatch) -> None:
    """Two attempts of one pre-training overlap (a retry beside a worker still alive) and continue one
    MLflow run: the one that finishes second finds the version the first registered from that run
    and registers none, so fine-tuning sees one model per run."""
    import pipelines.ranker as ranker
    from pipelines.registry import find_versions
    from pipelines.steps import run_step

    dec2, client = dt.date(2026, 12, 2), _client()
    train_stage, first = ranker._train_stage, []

    def overtaken(ctx, stage, version, *args, **kwargs):
        result = train_stage(ctx, stage, version, *args, **kwargs)
        tags = {"tokenizer_version": version, ranker.RUN_KEY: ctx.run_key}
        first.append(
            client.create_model_version("hisam-pretrained", "overlap", result["mlflow_run_id"], tags)
        )
        return result

    monkeypatch.setattr(ranker, "_train_stage", overtaken)
    try:
        second = run_step("pretrain", dec2, world["config"], {"force": "true"})
        assert (second["skipped"], second["model_version"]) == (True, str(first[0].version))
        mine = find_versions(client, "hisam-pretrained", run_key=f"tiny/{dec2.isoformat()}")
        assert [v.version for v in mine if v.run_id == second["mlflow_run_id"]] == [first[0].version]
    finally:
        for version in first:
            client.delete_model_version("hisam-pretrained", version.version)

"""Pure parts of the lifecycle steps: stream windows, per-user histories, config consistency."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hisam_core.ranker.profile import ProfileVocabulary
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, TokenType, UserHistory
from hisam_core.semantic_ids import SemanticIds
from pipelines.config import PipelineConfig
from pipelines.ranker import encode_profiles, histories, windows
from pipelines.steps import FLAGS, STEPS, load_config, run_step


def _history(n: int, targets: np.ndarray | None = None) -> UserHistory:
    items = np.arange(n * 6).reshape(n, 6)  # unique rows: a window is located by its items
    return UserHistory(7, items, np.arange(n) % 2, {}, targets, np.arange(n) // 3)  # three per instant


@pytest.mark.parametrize(
    ("n", "max_items", "targets"),
    [(1, 4, None), (5, 4, None), (37, 10, None), (100, 37, None), (9, 1, None),
     (8, 4, [0, 6, 7]), (40, 6, [1, 2, 9, 20, 21, 22, 23, 39]), (12, 5, [0, 4, 5, 11])],
)  # fmt: skip
def test_windows_label_every_target_once_behind_its_own_context(n: int, max_items: int, targets) -> None:
    """Adjacent targets (a stream's training rows) and scattered ones: each labelled exactly once."""
    is_target = None if targets is None else np.isin(np.arange(n), targets)
    history = _history(n, is_target)
    out = windows(history, max_items)
    labelled = []
    for w in out:
        assert 1 <= len(w) <= max_items and w.targets[-1]  # a window ends on its last target
        # where the window sits in the stream: its items are a contiguous slice (StopIteration if not)
        at = next(s for s in range(n - len(w) + 1) if np.array_equal(history.items[s : s + len(w)], w.items))
        np.testing.assert_array_equal(w.instants, history.instants[at : at + len(w)])
        assert len(w) == min(max_items, at + len(w))  # the whole context the budget allows
        labelled.extend(at + np.flatnonzero(w.targets))
        assert w.targets.sum() <= max(max_items // 2, 1)
    assert sorted(labelled) == (list(range(n)) if targets is None else targets)  # each exactly once


@pytest.mark.parametrize(("n", "max_tokens"), [(5, 33), (37, 81), (100, 297)])
def test_pretraining_over_a_streams_windows_predicts_each_item_token_once(n: int, max_tokens: int) -> None:
    """The windows overlap (each one's first items are context), yet PT predicts every token of the
    stream's items exactly once: the tokens of its target items."""
    from hisam_core.ranker.objectives import target_item_tokens

    config = SequenceConfig(codebook_size=256, profile_fields={"age": 3}, max_tokens=max_tokens)
    builder = SequenceBuilder(config)
    history = UserHistory(7, np.arange(n * 6).reshape(n, 6) % 256, np.arange(n) % 2, {"age": 1})
    batch = builder.batch(windows(history, builder.max_items()))
    predicted = target_item_tokens(batch)
    items_seen = int(batch.valid.sum()) - len(batch.tokens) * config.profile_length  # less the profiles
    assert items_seen > n * config.item_length  # the overlap: item tokens seen more than once
    assert int(predicted.sum()) == n * config.item_length
    firsts = predicted & (batch.intra_index == 0) & (batch.token_type == TokenType.SEMANTIC)
    assert sorted(int(t) for t in batch.tokens[firsts]) == sorted(
        int(t) for t in builder.vocab.semantic(history.items, "")[:, 0]
    )


def test_test_windows_keep_training_context_and_label_only_test_rows() -> None:
    history = _history(30, np.r_[np.zeros(25, bool), np.ones(5, bool)])
    (only,) = windows(history, 12)
    assert len(only) == 12 and only.targets.sum() == 5 and not only.targets[:7].any()
    np.testing.assert_array_equal(only.items, history.items[18:])


def test_a_step_context_holds_a_plain_date_whatever_the_orchestrator_hands_it(spark) -> None:
    """Airflow's logical dates are pendulum objects; Spark refuses them as DateType row values."""
    import pendulum

    from pipelines.context import StepContext

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "pipeline.yaml")
    ctx = StepContext(config, pendulum.datetime(2026, 11, 1, tz="Europe/Paris").date())
    assert type(ctx.logical_date) is dt.date and ctx.logical_date == dt.date(2026, 11, 1)
    assert spark.createDataFrame([(ctx.logical_date,)], "d date").first()["d"] == dt.date(2026, 11, 1)


def test_no_model_is_scored_on_an_event_it_trained_on() -> None:
    """A late historical import moved the split before events a model trained on: those test rows
    become context; the others, and the row count, stay as they were."""
    from pipelines.ranker import trained_until, unseen_test

    times = pd.to_datetime([1, 2, 3, 4, 5, 6], unit="s", utc=True)
    frame = pd.DataFrame({"event_ts": times, "split": ["train", "train", "test", "test", "test", "test"]})
    until = trained_until(frame)
    assert until == 2_000_000 and trained_until(frame, earlier=4_000_000) == 4_000_000  # its PT saw more
    assert trained_until(frame.assign(split="test")) is None and unseen_test(frame, None)[0] is frame
    same, turned = unseen_test(frame, until)
    assert turned == 0 and same is frame
    later, turned = unseen_test(frame, 4_000_000)
    assert turned == 2 and later["split"].tolist() == ["train"] * 4 + ["test"] * 2
    assert frame["split"].tolist().count("test") == 4  # the caller's frame is not changed
    with pytest.raises(ValueError, match=r"all 4 test rows are at or before 6000000 .*nothing to score"):
        unseen_test(frame, 6_000_000)


def test_histories_map_items_through_the_semantic_id_table() -> None:
    ids = SemanticIds(np.array([10, 20, 30]), np.array([[1] * 6, [2] * 6, [3] * 6]), 16, "v")
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2],
            "item_id": [10, 20, 30, 30, 10],
            "split": ["train", "train", "test", "train", "train"],
            "action": [1, 0, 1, 0, 1],
            "event_ts": pd.to_datetime([1, 1, 2, 5, 6], unit="s", utc=True),  # user 1 rated two at once
        }
    )
    config = SequenceConfig(codebook_size=16, max_tokens=80)
    train = histories(frame, ids, config, "train")
    assert [(h.user_id, len(h), int(h.targets.sum())) for h in train] == [(1, 2, 2), (2, 2, 2)]
    np.testing.assert_array_equal(train[1].items[:, 0], [3, 1])
    (test,) = histories(frame, ids, config, "test")
    assert test.user_id == 1 and test.targets.tolist() == [False, False, True]
    assert test.instants.tolist() == [1_000_000, 1_000_000, 2_000_000]  # microseconds, ties kept
    assert test.instant_index().tolist() == [1, 1, 3]
    with pytest.raises(KeyError):
        histories(frame.assign(item_id=[10, 20, 99, 30, 10]), ids, config, "test")


def test_histories_open_with_the_users_profile_buckets_and_zero_for_users_without_one() -> None:
    ids = SemanticIds(np.array([10, 20]), np.array([[1] * 6, [2] * 6]), 16, "v")
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 2],
            "item_id": [10, 20, 10],
            "split": ["train"] * 3,
            "action": [1, 0, 1],
            "event_ts": pd.to_datetime([1, 2, 3], unit="s", utc=True),
        }
    )
    vocab = ProfileVocabulary.fit({"gender": ["f", "m"], "age_bucket": ["18-24"]})
    config = SequenceConfig(codebook_size=16, max_tokens=80, profile_fields=vocab.bucket_counts)
    profiles = encode_profiles(pd.DataFrame({"user_id": [1], "gender": ["m"], "age_bucket": [None]}), vocab)
    one, two = histories(frame, ids, config, "train", profiles)
    assert one.profile == {"gender": 2, "age_bucket": 0} and two.profile == {"gender": 0, "age_bucket": 0}
    tokens = SequenceBuilder(config).build(one).tokens  # the stream opens with the profile tokens
    assert tokens[:2].tolist() == SequenceBuilder(config).vocab.profile(one.profile).tolist()


def test_pipeline_config_refuses_inconsistent_sections(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="DST writes"):
        PipelineConfig.model_validate({"ranker": {"sequence": {"codebook_size": 32}}})
    with pytest.raises(ValueError, match="extra"):
        PipelineConfig.model_validate({"tokenizr": {}})
    with pytest.raises(ValueError, match="profile_tokens"):
        PipelineConfig.model_validate({"ranker": {"profile_fields": ["gender"]}})
    with pytest.raises(ValueError, match=r"not gold\.user_profiles columns"):
        PipelineConfig.model_validate(
            {"ranker": {"profile_fields": ["zip"]}, "sequences": {"profile_tokens": 1}}
        )
    with pytest.raises(ValueError, match="dedup_suffix is for hisam_core"):  # 7 codes, request-relative
        PipelineConfig.model_validate({"tokenizer": {"train": {"model": {"dedup_suffix": True}}}})
    generic = {"dataset": "d", "interactions": "i.csv", "items": "it.csv"}
    with pytest.raises(ValueError, match=r"source\.generic is given but source\.kind is synthetic"):
        PipelineConfig.model_validate({"source": {"generic": generic}})  # would ingest synthetic data
    with pytest.raises(ValueError, match=r"source\.movielens_dir is given but source\.kind is generic"):
        PipelineConfig.model_validate(
            {"source": {"kind": "generic", "generic": generic, "movielens_dir": "ml"}}
        )
    with pytest.raises(ValueError, match=r"source\.generic\.dataset 'd' differs from dataset 'shop'"):
        PipelineConfig.model_validate({"dataset": "shop", "source": {"kind": "generic", "generic": generic}})
    assert PipelineConfig.model_validate({"dataset": "d", "source": {"kind": "generic", "generic": generic}})
    with pytest.raises(
        ValueError, match=r"rating_range \(0\.5, 10\.0\) is wider than the interactions gate's"
    ):
        PipelineConfig.model_validate(
            {"dataset": "d", "source": {"kind": "generic", "generic": {**generic, "rating_range": [0.5, 10]}}}
        )
    stricter = {"dataset": "d", "source": {"kind": "generic", "generic": {**generic, "rating_range": [2, 5]}}}
    assert PipelineConfig.model_validate(stricter).source.generic.rating_range == (2.0, 5.0)
    with pytest.raises(
        ValueError, match=r"quality\.samples\.token_budget=50 \(it is sequences\.token_budget: 300\)"
    ):
        PipelineConfig.model_validate({"quality": {"samples": {"token_budget": 50}}})
    agreeing = {
        "sequences": {"token_budget": 200, "profile_tokens": 0},
        "quality": {"samples": {"token_budget": 200}},
    }
    assert PipelineConfig.model_validate(agreeing).quality.samples.token_budget == 200
    with pytest.raises(ValueError, match=r"quality\.logical_date=.*the run's logical date"):
        PipelineConfig.model_validate({"quality": {"logical_date": "2026-01-01"}})
    with pytest.raises(ValueError, match=r"positive_rating_threshold=4\.0 would be ignored"):
        PipelineConfig.model_validate({"sequences": {"positive_rating_threshold": 4.0}})
    for section, key, value, name in (
        ("sequences", "dataset", "other", "sequences.dataset='other'"),
        ("sequences", "tokenizer_version", "dst-1", "sequences.tokenizer_version='dst-1'"),
        ("ranker", "finetune", {"init_from": "/x.pt"}, "ranker.finetune.init_from='/x.pt'"),
    ):
        with pytest.raises(ValueError, match=re.escape(name) + " would be ignored: the pipeline sets it"):
            PipelineConfig.model_validate({section: {key: value}})
    with pytest.raises(ValueError, match="list it second"):  # P(positive) would be P(negative)
        PipelineConfig.model_validate({"ranker": {"sequence": {"action_names": ["positive", "negative"]}}})
    with pytest.raises(ValueError, match="must have as many actions"):
        PipelineConfig.model_validate(
            {"sequences": {"action_source": "column", "action_vocab": ["a", "b", "c"]}}
        )
    with pytest.raises(ValueError, match="names must differ"):  # pretrain would find the ranker's versions
        PipelineConfig.model_validate({"models": {"pretrained": "hisam-ranker"}})
    for name in ("o'brien", "x' and tags.`k` != '", ""):  # MLflow filter strings: broken or retargeted
        with pytest.raises(ValueError, match=r"models\.ranker"):
            PipelineConfig.model_validate({"models": {"ranker": name}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranker:\n  modle: 1\n")
    with pytest.raises(
        ValueError, match=rf"^pipeline config {bad}: ranker\.modle: Extra inputs are not permitted$"
    ):
        load_config(bad)  # one line naming the file and the key
    shipped = load_config()
    assert shipped.ranker.sequence.codebook_size == shipped.tokenizer.train.model.codebook_size
    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", str(tmp_path / "gone.yaml"))  # a stale variable, named
    with pytest.raises(
        FileNotFoundError, match=r"gone\.yaml \(from \$HISAM_PIPELINE_CONFIG\) does not exist"
    ):
        load_config()


def test_the_lake_root_is_a_local_path_or_an_object_store_uri_kept_whole(tmp_path, monkeypatch) -> None:

    from pipelines.context import StepContext
    from pipelines.settings import Settings

    day = dt.date(2026, 11, 1)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.delenv("HISAM_LAKE_ROOT", raising=False)
    assert StepContext(PipelineConfig(), day).lake_root == str(tmp_path / "lake")
    monkeypatch.setenv("HISAM_LAKE_ROOT", "s3://bucket/lake/")
    assert Settings.from_env().lake_root == "s3://bucket/lake/"
    ctx = StepContext(PipelineConfig(), day)
    assert ctx.lake_root == "s3://bucket/lake"  # not folded into a local "s3:/bucket/lake"
    assert ctx.table_path("gold.samples") == "s3://bucket/lake/gold/samples"


def test_every_step_resolves_to_its_function_taking_one_context() -> None:
    import inspect

    for step in STEPS.values():
        fn = step.resolve()
        assert (fn.__module__, fn.__name__) == (step.module, step.function), step.name
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params] == ["ctx"], step.name


def test_cli_lists_steps_and_refuses_unknown_ones(capsys) -> None:
    from pipelines.cli import main

    assert main(["steps"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(STEPS)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "no-such-step"])
    assert exit_info.value.code == 2
    from pipelines.cli import _parser

    for argv, threads in ((["run", "ingest", "--threads", "3"], 3), (["--threads", "2", "run", "ingest"], 2)):
        assert _parser().parse_args(argv).threads == threads  # before or after the command
    for argv, level in (
        (["steps", "--log-level", "DEBUG"], "DEBUG"),
        (["--log-level", "ERROR", "recommend", "1"], "ERROR"),
        (["--log-level", "ERROR", "run", "ingest", "--log-level", "WARNING"], "WARNING"),  # the later wins
        (["rollback"], "INFO"),
    ):
        assert _parser().parse_args(argv).log_level == level
    for bad in (
        ["--threads", "0", "steps"],
        ["run", "ingest", "--threads", "0"],
        ["recommend", "1", "--top-k", "-3"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
        assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "0", "-2", ""])
def test_a_bad_thread_count_in_the_environment_names_the_variable(value, monkeypatch) -> None:
    """Airflow tasks take the thread count from the environment, not from --threads."""
    from pipelines.steps import THREADS_ENV, apply_torch_threads

    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(
        ValueError, match=rf"^\$HISAM_TORCH_THREADS must be a positive integer, got '{value}'$"
    ):
        apply_torch_threads()


def test_every_param_a_step_reads_is_declared_and_others_are_refused(tmp_path, monkeypatch, caplog) -> None:
    """A misspelt ``--param`` (``tokenizer_verison``) would otherwise be ignored, and the step would
    quietly use its default. Refused before any work: no lake, no registry under HISAM_HOME."""
    import re

    from pipelines.cli import main

    declared = {p for step in STEPS.values() for p in step.params}
    sources = [f.read_text() for f in (Path(__file__).resolve().parents[2] / "pipelines").glob("*.py")]
    read = {m for text in sources for m in re.findall(r'ctx\.params\.get\("(\w+)"', text)}
    assert read == declared
    flags = {m for text in sources for m in re.findall(r'flag\(ctx\.params\.get\("(\w+)"\)', text)}
    assert flags == FLAGS  # each checked before its step runs
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"step build-sequences has no param tokenizer_verison \(its params: "
                       r"tokenizer_version, skip_without_tokenizer\)"):  # fmt: skip
        run_step("build-sequences", "2026-11-01", PipelineConfig(), {"tokenizer_verison": "dst-20261101"})
    for version in ("dst-2026'11", "..", ".hidden"):  # MLflow filter strings and folder names
        with pytest.raises(ValueError, match=rf"param tokenizer_version must be letters, .* got {version!r}"):
            run_step("build-sequences", "2026-11-01", PipelineConfig(), {"tokenizer_version": version})
    for step, key in (("finetune", "force"), ("tokenize-new-items", "skip_without_tokenizer")):
        with pytest.raises(ValueError, match=f"step {step}: param {key} must be true or false, got 'ture'"):
            run_step(step, "2026-11-01", tmp_path / "absent.yaml", {key: "ture"})  # before the config is read
    assert main(["run", "rollback", "--param", "force=true"]) == 2
    assert "step rollback has no param force (its params: none)" in caplog.text
    from pipelines import steps
    from spark_jobs.quality.report import DataQualityError, QualityReport

    def failing_gate(*_args):  # what a step whose data fails its gate raises
        raise DataQualityError(QualityReport("import:bronze.items", 3, 1, 2, {}, {}, []))

    with monkeypatch.context() as patched:
        patched.setattr(steps, "run_step", failing_gate)
        assert main(["run", "ingest"]) == 4  # not 2: the command was right, the data was not
    assert list(tmp_path.iterdir()) == []
    assert main(["run", "ingest", "--config", str(tmp_path)]) == 2  # a folder, not a YAML file
    assert f"pipeline config {tmp_path} is not a file" in caplog.text
    assert main(["run", "ingest", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert f"pipeline config {tmp_path / 'absent.yaml'} does not exist" in caplog.text
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "a-file"))
    for argv in (["rollback"], ["evaluate", "--render"], ["run", "ingest"]):
        assert main(argv) == 2
    assert caplog.text.count(f"HISAM_HOME {tmp_path / 'a-file'} is a file, not a folder") == 3
    with pytest.raises(SystemExit) as shown:
        main(["evaluate", "--help"])  # help needs no home
    assert shown.value.code == 0
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "a-file" / "below"))
    assert main(["rollback"]) == 2 and f"{tmp_path / 'a-file'} is not a writable folder" in caplog.text
    (tmp_path / "a-file").unlink()
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match=rf"no MLflow store at {store} .*run `hisam demo`"):  # any user id
        run_step("recommend", "2026-11-01", PipelineConfig(), {"user": "jane@example.com"})
    assert list(tmp_path.iterdir()) == []  # reading only: a mistyped home does not become a store
    # the production image's config alerts to a webhook: a read-only step runs without its URL
    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "log,webhook")
    monkeypatch.delenv("HISAM_NOTIFY_WEBHOOK_URL", raising=False)
    with pytest.raises(ValueError, match="no MLflow store"):
        run_step("recommend", "2026-11-01", PipelineConfig(), {"user": "1"})
    (tmp_path / "mlflow.db").touch()  # a store without the model
    with pytest.raises(ValueError, match="champion does not exist in the MLflow store sqlite:"):
        run_step("recommend", "2026-11-01", PipelineConfig(), {"user": "1"})
    with pytest.raises(ValueError, match="webhook"):  # a step that alerts still needs it, up front
        run_step("rollback", "2026-11-01", PipelineConfig())


def test_cli_forwards_only_what_follows_the_evaluate_command() -> None:
    from pipelines.cli import split_evaluate

    step = ["run", "evaluate", "--logical-date", "2026-01-05", "--config", "x.yaml"]
    assert split_evaluate(step) == (step, [])  # the step named evaluate keeps its options
    assert split_evaluate(["--log-level", "DEBUG", "evaluate", "--seeds", "0", "1"]) == (
        ["--log-level", "DEBUG", "evaluate"],
        ["--seeds", "0", "1"],
    )
    assert split_evaluate(["--threads=2", "evaluate", "--help"]) == (["--threads=2", "evaluate"], ["--help"])


def test_cli_takes_a_step_by_its_airflow_task_id_too() -> None:
    from pipelines.cli import _parser

    for name in ("build_sequences", "build-sequences"):
        assert _parser().parse_args(["run", name]).step == "build-sequences"


def test_commit_markers_are_found_beyond_the_newest_200_commits(tmp_path, monkeypatch) -> None:
    """``StepContext.commits`` widens its search until a marker appears: one 250 commits old is
    found, and a record no commit holds reads the whole history and finds nothing. The samples gate
    passed twice: 248 commits ago on version 5 as it was, and lately with a rewrite that was never
    committed; training falls back to version 5."""

    import pyarrow as pa
    from deltalake import CommitProperties, write_deltalake

    from pipelines.context import StepContext
    from pipelines.ingest import validated_samples_version
    from spark_jobs.lake import METADATA_PREFIX

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.delenv("HISAM_LAKE_ROOT", raising=False)
    ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 1))
    path = ctx.table_path("bronze.quarantine")
    gate = {
        "step": "validate-samples",
        "dataset": "synthetic",
        "tokenizer_version": "dst-x",
        "passed": "true",
    }
    gates = {
        2: {**gate, "samples_read": "5", "quarantined": "0"},
        250: {**gate, "samples_read": "9", "quarantined": "2"},
    }
    write_deltalake(ctx.table_path("gold.samples"), pa.table({"k": [0]}))  # holds no rewrite of version 9
    for k in range(251):
        marker = {"step": "import", "day": str(k)} if k < 2 else gates.get(k, {})
        marker = {f"{METADATA_PREFIX}{key}": value for key, value in marker.items()}
        write_deltalake(
            path,
            pa.table({"k": [k]}),
            mode="append",
            commit_properties=CommitProperties(custom_metadata=marker),
        )
    found = ctx.commits("bronze.quarantine", {"step": "import"})
    assert [(e["version"], e["metadata"]["day"]) for e in found] == [(1, "1"), (0, "0")]  # newest first
    assert ctx.commits("bronze.quarantine", {"step": "import", "day": "2"}) == []
    assert ctx.commits("gold.samples", {"step": "import"}) == []
    assert validated_samples_version(ctx, "dst-x") == 5 and validated_samples_version(ctx, "dst-y") is None


def test_a_tokenizer_request_round_trips_and_names_what_is_malformed() -> None:
    import numpy as np

    from hisam_core.features import ItemFeatures
    from pipelines.tokenizer_model import features_frame, request_embeddings

    dims = {"image": 3, "text": 2}
    rng = np.random.default_rng(0)
    features = ItemFeatures(np.array([7, 9]), {m: rng.normal(size=(2, d)) for m, d in dims.items()})
    request = features_frame(features)
    parsed = request_embeddings(request, dims)
    for m in dims:  # what features_frame sends is what the model reads, as float32
        assert np.array_equal(parsed[m], features.modalities[m].astype(np.float32))
    with pytest.raises(ValueError, match=r"no column \['text'\]"):
        request_embeddings(request.drop(columns="text"), dims)
    with pytest.raises(ValueError, match="no rows"):
        request_embeddings(request.iloc[:0], dims)
    for bad in ([1.0, 2.0], None):
        ragged = request.copy()
        ragged.at[1, "image"] = bad
        with pytest.raises(ValueError, match=r"image of item 9 has shape \(\d?,?\), expected \(3,\)"):
            request_embeddings(ragged, dims)


def test_a_missing_movielens_bundle_fails_before_spark_starts(tmp_path, monkeypatch) -> None:
    import spark_jobs.session

    def no_spark(*_: object, **__: object) -> None:
        raise AssertionError("Spark started before the bundle was checked")

    monkeypatch.setattr(spark_jobs.session, "get_spark", no_spark)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    config = PipelineConfig.model_validate(
        {"dataset": "ml", "source": {"kind": "movielens", "movielens_dir": str(tmp_path / "nowhere")}}
    )
    with pytest.raises(ValueError, match=r"MovieLens bundle at .*nowhere: missing raw/u\.data"):
        run_step("ingest", "2026-11-01", config)


def test_the_production_image_runs_the_paper_sized_config() -> None:
    """The image's HISAM_PIPELINE_CONFIG is configs/production.yaml (not the demo's 2-core sizes):
    it validates, and its ranker is Hi-SAM-Small of configs/ranker.yaml."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    dockerfile = (root / "infra" / "docker" / "Dockerfile").read_text()
    (path,) = re.findall(r"HISAM_PIPELINE_CONFIG=/opt/hisam/(\S+)", dockerfile)
    (pip,) = re.findall(r"ARG PIP_VERSION=(\S+)", dockerfile)  # the image resolves the lock as make does
    assert f"PIP_VERSION ?= {pip}\n" in (root / "Makefile").read_text()
    production = load_config(root / path)
    small = yaml.safe_load((root / "configs" / "ranker.yaml").read_text())["model"]
    chosen = production.ranker.model.model_dump()
    assert {k: chosen[k] for k in small} == small
    assert production.tokenizer.train.model.codebook_size == production.ranker.sequence.codebook_size == 256
    assert production.source.kind == "generic" and "webhook" in production.notify.sinks
    devices = (  # train-tokenizer handed "auto" to torch: test_dst holds that it now trains on it
        production.tokenizer.train.device,
        production.ranker.pretrain.device,
        production.ranker.finetune.device,
    )
    assert devices == ("auto", "auto", "auto")


def test_every_kubernetes_task_pod_runs_the_deployments_config() -> None:
    """On the KubernetesExecutor, tasks that name no template get airflow.cfg.production's, GPU tasks
    the image's HISAM_GPU_POD_TEMPLATE: both exist in the image, run their task in the container
    ``base``, and read HISAM_PIPELINE_CONFIG from the ConfigMap hisam-pipeline-config with the same
    environment objects, so a CPU task does not run the image's copy of production.yaml."""
    import configparser
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(root / "infra" / "airflow" / "airflow.cfg.production")
    dockerfile = (root / "infra" / "docker" / "Dockerfile").read_text()
    paths = {
        "cpu": cfg["kubernetes_executor"]["pod_template_file"],
        "gpu": re.findall(r"HISAM_GPU_POD_TEMPLATE=(\S+)", dockerfile)[0],
    }
    assert "COPY infra ./infra" in dockerfile and "WORKDIR /opt/hisam" in dockerfile
    seen = {}
    for kind, path in paths.items():
        assert path.startswith("/opt/hisam/infra/k8s/")
        pod = yaml.safe_load((root / path.removeprefix("/opt/hisam/")).read_text())["spec"]
        (base,) = [c for c in pod["containers"] if c["name"] == "base"]
        env = {e["name"]: e["value"] for e in base["env"]}
        config = Path(env["HISAM_PIPELINE_CONFIG"])
        (mount,) = [m for m in base["volumeMounts"] if m["mountPath"] == str(config.parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert mount["readOnly"] and volume["configMap"]["name"] == "hisam-pipeline-config"
        seen[kind] = (env, base["envFrom"], config.name)
    assert seen["cpu"] == seen["gpu"]


def test_the_demo_config_is_the_embedded_default_whatever_the_environment(tmp_path, monkeypatch) -> None:
    """In the production image $HISAM_PIPELINE_CONFIG is the paper-sized config with a generic
    source; `hisam demo` still runs configs/pipeline.yaml, and --dataset synthetic means it."""
    from pipelines.demo import demo_overrides
    from pipelines.steps import DEFAULT_CONFIG

    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", str(DEFAULT_CONFIG.parent / "production.yaml"))
    assert load_config().source.kind == "generic"  # what the steps of the image read
    demo = load_config(DEFAULT_CONFIG, demo_overrides("synthetic", None))
    assert (demo.source.kind, demo.ranker.model.hidden_size) == ("synthetic", 64)
    production = load_config(None, demo_overrides("synthetic", tmp_path / "no-bundle"))
    assert production.source.kind == "synthetic"  # explicit, even over another config's source
    with pytest.raises(FileNotFoundError, match=r"no MovieLens-100K bundle at .*typo"):  # not synthetic
        demo_overrides("auto", tmp_path / "typo")


def test_the_demo_keeps_no_store_of_a_production_config(tmp_path) -> None:
    """``hisam demo --config <a copy of production.yaml>`` must not write into its lake or page its
    on-call: the lake is under $HISAM_HOME and alerts go to the log and the home's file."""
    import yaml

    from pipelines.demo import demo_config

    prod = {"lake": {"root": "s3://prod/lake", "storage_options": {"region": "eu"}},
            "notify": {"sinks": ["webhook"], "webhook_url": "https://pager.example/x"}}  # fmt: skip
    (tmp_path / "prod.yaml").write_text(yaml.safe_dump(prod))
    demo = demo_config(tmp_path / "prod.yaml", "synthetic", None)
    assert (demo.lake.root, demo.lake.storage_options) == (None, {})
    assert (demo.notify.sinks, demo.notify.webhook_url, demo.notify.file_path) == (
        ["log", "file"],
        None,
        None,
    )


def test_the_demo_never_writes_to_the_stores_the_environment_names(tmp_path, monkeypatch, caplog) -> None:
    """In the production image MLFLOW_TRACKING_URI, HISAM_LAKE_ROOT, AIRFLOW_HOME... name production:
    the demo's DAGs still see only stores under $HISAM_HOME (Airflow's metadata database included,
    set by the real ``airflow_env``; only the migration and the DAG runs are left out), and the log
    names what was ignored (never the values: a connection string may hold a password)."""
    import types

    import pipelines.demo as demo
    from pipelines.settings import Settings

    airflow_env = demo._lifecycle().airflow_env
    for name in airflow_env(tmp_path):  # restored after the test, whatever the demo set
        monkeypatch.delenv(name, raising=False)
    seen: dict[str, str | None] = {}

    def run_dag(dag_id: str, day: dt.date) -> types.SimpleNamespace:
        settings = Settings.from_env()
        seen.update({"mlflow": settings.mlflow_tracking_uri, "lake": settings.lake_root})
        seen.update({name: os.environ.get(name) for name in demo.SHARED_STORES})
        raise demo.DemoFailed("stop after the first DAG")

    lifecycle = types.SimpleNamespace(
        LIFECYCLE=("hisam_features",),
        prepare_airflow=lambda home: os.environ.update(airflow_env(Path(home))),
        run_dag=run_dag,
    )
    monkeypatch.setattr(demo, "_lifecycle", lambda: lifecycle)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", "restored after the test")
    for name in demo.SHARED_STORES:  # restored after the test, whatever the demo did
        monkeypatch.setenv(name, "postgresql://prod:s3cret@db/prod")
    with pytest.raises(demo.DemoFailed):
        demo.run_demo(dataset="synthetic")
    assert seen["mlflow"] == f"sqlite:///{tmp_path / 'mlflow.db'}" and seen["lake"] == str(tmp_path / "lake")
    airflow = tmp_path / "airflow"
    assert seen.pop("AIRFLOW_HOME") == str(airflow)
    assert seen.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") == f"sqlite:///{airflow / 'airflow.db'}"
    assert all(seen[name] is None for name in demo.SHARED_STORES if name in seen)
    assert (
        f"hisam demo ignores {', '.join(demo.SHARED_STORES)}" in caplog.text and "s3cret" not in caplog.text
    )


def test_a_demo_of_another_dataset_in_the_same_home_is_refused_before_any_dag(tmp_path, monkeypatch) -> None:
    """After a MovieLens demo, ``hisam demo --dataset synthetic`` in the same ``HISAM_HOME`` would
    find MovieLens's tokenizer under the same model name and skip or judge on it: refused at once,
    the earlier demo's config kept for its ``hisam recommend``."""
    from mlflow import MlflowClient

    import pipelines.demo as demo
    from pipelines.cli import main as cli
    from pipelines.settings import Settings

    monkeypatch.setattr(demo, "_lifecycle", lambda: pytest.fail("no DAG may run"))
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    for name in demo.SHARED_STORES:
        monkeypatch.delenv(name, raising=False)
    uri = Settings.from_env().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("hisam-tokenizer")
    run_key = {"hisam.run_key": "movielens-100k/2026-12-01"}  # what the MovieLens demo registered
    client.create_model_version("hisam-tokenizer", str(tmp_path / "artifacts"), tags=run_key)
    (tmp_path / "demo_pipeline.yaml").write_text("dataset: movielens-100k\n")
    with pytest.raises(
        ValueError, match=r"'hisam-tokenizer' holds dataset 'movielens-100k'.*another HISAM_HOME"
    ):
        demo.run_demo(dataset="synthetic")
    assert cli(["demo", "--dataset", "synthetic"]) == 2  # a config error, not a failed DAG (exit 1)
    assert (tmp_path / "demo_pipeline.yaml").read_text() == "dataset: movielens-100k\n"
    demo_config = tmp_path / "demo_pipeline.yaml"  # and `hisam recommend` without it says to pass it
    with pytest.raises(ValueError, match=rf"holds dataset 'movielens-100k'.*pass --config {demo_config}"):
        run_step("recommend", "2026-12-02", PipelineConfig(), {"user": "196"})


def test_a_failed_demo_dag_is_a_message_and_exit_code_1(tmp_path, monkeypatch, caplog) -> None:
    """The failing task's traceback is already in the log: the CLI adds which DAG and tasks failed,
    not a second traceback of its own."""
    import types

    import pipelines.demo as demo
    from pipelines.cli import main as cli

    ran = []

    def run_dag(dag_id: str, day: dt.date) -> types.SimpleNamespace:
        ran.append(dag_id)
        failed = dag_id == "hisam_tokenizer"
        tasks = {"train_tokenizer": "failed" if failed else "success", "register": "upstream_failed"}
        return types.SimpleNamespace(ok=not failed, state="failed" if failed else "success", tasks=tasks)

    lifecycle = types.SimpleNamespace(
        LIFECYCLE=("hisam_features", "hisam_tokenizer", "hisam_pretrain"),
        prepare_airflow=lambda home: None,
        run_dag=run_dag,
    )
    monkeypatch.setattr(demo, "_lifecycle", lambda: lifecycle)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", "restored after the test")  # the demo sets its own
    for name in demo.SHARED_STORES:  # the demo drops them from os.environ: restored after the test
        monkeypatch.delenv(name, raising=False)
    assert cli(["demo", "--dataset", "synthetic"]) == 1
    assert ran == ["hisam_features", "hisam_tokenizer"]  # stops at the failed DAG
    assert (
        "hisam_tokenizer ended failed; tasks not successful: ['train_tokenizer', 'register']" in caplog.text
    )


def test_read_table_filters_rows_in_arrow_also_on_string_view_files(tmp_path, monkeypatch) -> None:
    """Files written from Spark's Arrow hold ``string_view`` columns, which Arrow cannot compare with
    a ``string`` literal: ``where`` still selects by text, by number and by a list, within the
    partition, and an empty list selects nothing."""
    import deltalake
    import pyarrow as pa

    from pipelines.context import StepContext

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 2))
    rows = {
        "dataset": pa.array(["a", "a", "a", "b"]),
        "user_key": pa.array(["u1", "u2", "u1", "u1"], pa.string_view()),
        "item_id": pa.array([1, 2, 3, 1], pa.int64()),
    }
    deltalake.write_deltalake(ctx.table_path("silver.interactions"), pa.table(rows), partition_by=["dataset"])
    part = {"dataset": "a"}

    def items(**where) -> list[int]:
        frame, version = ctx.read_table("silver.interactions", part, ["item_id"], where=where)
        assert version == 0
        return sorted(frame["item_id"].tolist())

    assert items() == [1, 2, 3]
    assert items(user_key="u1") == [1, 3] and items(user_key=["u2", "u9"]) == [2]
    assert items(item_id=1) == [1] and items(item_id=[2, 3]) == [2, 3] and items(item_id=[]) == []
    assert items(user_key="u1", item_id=[2, 3]) == [3]
    with pytest.raises(
        ValueError, match=r"lake table silver\.interactions has no version 999; its latest is 0"
    ):
        ctx.read_table("silver.interactions", part, version=999)  # e.g. --param samples_version=999
    assert ctx.read_table("silver.interactions", part, ["item_id"], version=0)[0]["item_id"].tolist() == [
        1,
        2,
        3,
    ]


def test_an_unreachable_store_is_one_line_with_the_uri_masked(monkeypatch, caplog) -> None:
    """A mistyped tracking URI gave 225 lines of traceback: the CLI gives the cause in one line, the
    password masked; an error that is no failed connection (a missing table, a bug) still raises."""
    import sqlite3

    import requests
    import sqlalchemy.exc
    from mlflow import MlflowClient

    import pipelines.steps as steps
    from pipelines.cli import main, unreachable
    from pipelines.settings import masked

    def refused(*args, **kwargs):
        cause = ConnectionRefusedError('connection to server at "db", port 5432 failed: Connection refused')
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, cause) from cause

    monkeypatch.setattr(steps, "run_step", refused)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://mlflow:s3/cr@t@db:5432/mlflow")
    assert main(["rollback"]) == 1
    assert "port 5432 failed: Connection refused" in caplog.text and "s3/cr" not in caplog.text
    assert (
        masked("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
        and masked("sqlite:///a.db") == "sqlite:///a.db"
    )
    assert masked("postgresql://h/db?user=u&password=pw") == "postgresql://h/db?user=u&password=***"
    assert unreachable(sqlite3.OperationalError("unable to open database file"))
    assert not unreachable(
        sqlite3.OperationalError("no such table: registered_models")
    )  # a schema, not a link
    assert not unreachable(ConnectionResetError("Answer from Java side is empty"))  # py4j: Spark died
    assert not unreachable(RuntimeError("a bug"))
    # an HTTP tracking server that is down: MLflow raises its own error while handling requests'
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(  # whose message quotes the URI, password included
        steps, "run_step", lambda *a, **k: MlflowClient("http://svc:t0ken@127.0.0.1:1").search_experiments()
    )
    assert main(["rollback"]) == 1 and "API request to http://svc:***@127.0.0.1:1/" in caplog.text
    assert "t0ken" not in caplog.text
    try:  # another error raised while handling one (a bug in a handler) keeps its traceback
        try:
            raise requests.exceptions.ConnectionError("refused")
        except requests.exceptions.ConnectionError:
            raise RuntimeError("a bug in the handler")  # noqa: B904
    except RuntimeError as err:
        assert not unreachable(err)
    monkeypatch.setattr(steps, "run_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["rollback"])

    def skipped(*args, **kwargs):
        raise steps.StepSkipped("nothing to do yet")

    monkeypatch.setattr(steps, "run_step", skipped)  # still a skip (exit 0), not an error
    assert main(["rollback"]) == 0 and "skipped: nothing to do yet" in caplog.text


def test_alerts_carry_no_password_an_error_quotes(tmp_path, monkeypatch, capsys) -> None:
    """An alert's title, text and details have every URI in them masked: a failed task's alert
    quotes its error, and MLflow's REST errors quote the tracking URI, ``user:password@`` included."""
    import json

    from pipelines.context import StepContext
    from pipelines.settings import redacted, uri_secrets

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    ctx = StepContext(PipelineConfig.model_validate({"notify": {"sinks": ["file"]}}), dt.date(2026, 11, 2))
    error = "MlflowException: API request to https://svc:t0ken@mlflow.internal/api/2.0/x failed"
    assert ctx.alert("finetune failed at postgresql://u:pw@db/x", error, reason=error, tries=2)
    (alert,) = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert "t0ken" not in json.dumps(alert) and "pw@" not in json.dumps(alert)
    assert alert["text"] == "MlflowException: API request to https://svc:***@mlflow.internal/api/2.0/x failed"
    assert alert["title"] == "finetune failed at postgresql://u:***@db/x"
    assert alert["details"]["reason"] == alert["text"] and alert["details"]["tries"] == 2
    from pipelines.cli import RedactingFormatter, redacting_excepthook

    try:
        raise ConnectionError(error)
    except ConnectionError:
        record = logging.LogRecord(
            "hisam", logging.ERROR, __file__, 1, "failed: %s", (error,), sys.exc_info()
        )
    line = RedactingFormatter("%(message)s").format(record)  # the CLI's log lines, traceback included
    assert "t0ken" not in line and line.count("https://svc:***@mlflow.internal") == 2
    redacting_excepthook(*record.exc_info)  # and what Python prints of a bug, past logging
    printed = capsys.readouterr().err
    assert "ConnectionError: MlflowException" in printed and "t0ken" not in printed
    assert uri_secrets("https://u:p4ss@host/path?email=x@y")[0] == "p4ss"  # an '@' past the host
    text = "no URI: a:b@c, sqlite:///a.db and 'file:///x?password=p' end"
    assert redacted(text) == "no URI: a:b@c, sqlite:///a.db and 'file:///x?password=***' end"


def test_a_tokenizer_trained_on_other_encoder_settings_is_refused(tmp_path, monkeypatch) -> None:
    """The encoders tag carries the text and image settings' fingerprints: a DST trained on vectors
    of other settings (same names and versions) is refused; a tag from before the fingerprints is
    compared on names and versions, as it was."""
    import json
    import types

    from pipelines.context import StepContext
    from pipelines.tokenizer import ENCODERS, encoder_mismatch, encoders_tag

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 2))
    registered = types.SimpleNamespace(
        name="hisam-tokenizer", version="3", tags={ENCODERS: encoders_tag(ctx)}
    )
    assert encoder_mismatch(ctx, registered) is None
    legacy = {m: spec[:2] for m, spec in json.loads(encoders_tag(ctx)).items()}
    registered.tags[ENCODERS] = json.dumps(legacy, sort_keys=True)
    assert encoder_mismatch(ctx, registered) is None
    image = ctx.config.embeddings.image.model_copy(update={"config": {"descriptor": {"thumb_size": 8}}})
    other = PipelineConfig().model_copy(
        update={"embeddings": ctx.config.embeddings.model_copy(update={"image": image})}
    )
    registered.tags[ENCODERS] = encoders_tag(ctx)
    assert "was trained on encoders" in encoder_mismatch(StepContext(other, dt.date(2026, 11, 2)), registered)
    text = ctx.config.embeddings.text  # batch size and a default written out shape no vector
    same = text.model_copy(update={"config": {**text.config, "batch_size": 7, "max_length": 256}})
    assert same.fingerprint() == text.fingerprint()
    quicker = PipelineConfig().model_copy(
        update={"embeddings": ctx.config.embeddings.model_copy(update={"text": same})}
    )
    assert encoder_mismatch(StepContext(quicker, dt.date(2026, 11, 2)), registered) is None
    # the settings of the image encoder not in use shape nothing (and the defaults' digests stay)
    base = ctx.config.embeddings.image
    assert (base.fingerprint(), text.fingerprint()) == ("c40571b4178330b7", "cbbf142c31dc79bc")
    # a setting added since (text pooling) keeps them at its old behaviour, and counts otherwise
    mean = text.model_copy(update={"config": {**text.config, "pooling": "mean"}})
    assert mean.fingerprint() == text.fingerprint()
    assert text.model_copy(update={"config": {"pooling": "cls"}}).fingerprint() != text.fingerprint()
    assert base.model_copy(update={"config": {"pooling": "cls"}}).fingerprint() == base.fingerprint()
    model = base.model_copy(update={"config": {"model_path": "/models/vit", "pooling": "cls"}})
    assert model.fingerprint() == "330cce246a7785e4"
    tuned = model.model_copy(update={"config": {**model.config, "descriptor": {"thumb_size": 8}}})
    assert tuned.fingerprint() == model.fingerprint() != base.fingerprint()


def test_read_table_gives_columns_declared_since_a_version_as_null(tmp_path) -> None:
    """Schema evolution (spark_jobs/tables.py) for the pandas reader: a version written before a
    nullable column was declared reads it as null, as Lake.read does; an undeclared name is an error."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipelines.context import StepContext
    from spark_jobs.lake import _arrow_schema
    from spark_jobs.tables import get_table

    ctx = StepContext(PipelineConfig(lake={"root": str(tmp_path / "lake")}), dt.date(2026, 11, 2))
    declared = _arrow_schema(get_table("gold.user_profiles"))
    older = pa.schema([f for f in declared if f.name != "occupation"])  # as if declared later
    row = {
        "dataset": "ds",
        "user_id": 7,
        "age_bucket": "25-34",
        "gender": "F",
        "profile_tokens": ["gender=F"],
    }
    table = pa.Table.from_pylist([{k: row.get(k) for k in older.names}], schema=older)
    write_deltalake(ctx.table_path("gold.user_profiles"), table, partition_by=["dataset"])
    frame, version = ctx.read_table(
        "gold.user_profiles", {"dataset": "ds"}, ["user_id", "occupation", "gender"]
    )
    assert version == 0 and list(frame.columns) == ["user_id", "occupation", "gender"]
    assert frame.to_dict("records") == [{"user_id": 7, "occupation": None, "gender": "F"}]
    with pytest.raises(ValueError, match=r"has no columns \['zip'\]"):
        ctx.read_table("gold.user_profiles", {"dataset": "ds"}, ["user_id", "zip"])
    everything, _ = ctx.read_table("gold.user_profiles", {"dataset": "ds"})
    assert everything["occupation"].tolist() == [None] and everything["gender"].tolist() == ["F"]
    older = pa.schema([f for f in declared if f.name != "user_id"])  # a NOT NULL column declared later
    table = pa.Table.from_pylist([{k: row.get(k) for k in older.names}], schema=older)
    write_deltalake(ctx.table_path("gold.user_profiles"), table, mode="overwrite", schema_mode="overwrite")
    with pytest.raises(ValueError, match=r"lacks the declared NOT NULL columns \['user_id'\]"):
        ctx.read_table("gold.user_profiles", {"dataset": "ds"}, ["user_id", "gender"])
    retyped = pa.schema([f.with_type(pa.int32()) if f.name == "age_bucket" else f for f in declared])
    table = pa.Table.from_pylist([{**row, "age_bucket": 25}], schema=retyped)
    write_deltalake(ctx.table_path("gold.user_profiles"), table, mode="overwrite", schema_mode="overwrite")
    with pytest.raises(ValueError, match=r"age_bucket \(stored int, declared string\): migrate it"):
        ctx.read_table("gold.user_profiles", {"dataset": "ds"}, ["user_id", "age_bucket"])
    frame, _ = ctx.read_table("gold.user_profiles", {"dataset": "ds"}, ["user_id", "gender"])  # not read
    assert frame.to_dict("records") == [{"user_id": 7, "gender": "F"}]


def test_ingest_counts_per_table_reconcile_and_merged_records_are_not_imported_twice() -> None:
    """MovieLens item_extra.tsv's good records are merged into u.item's rows: bronze.items receives
    1,682 rows, not 3,079, and in = imported + merged + quarantined per table."""
    from pipelines.ingest import _per_table
    from spark_jobs.importers.common import SourceCount

    sources = [
        SourceCount("u.data", "bronze.interactions", 100_000, 99_990, 10),
        SourceCount("u.item", "bronze.items", 1_682, 1_682, 0),
        SourceCount("item_extra.tsv", "bronze.items", 1_400, 1_397, 3, merged=True),
    ]
    assert _per_table(sources) == {
        "bronze.interactions": {"in": 100_000, "imported": 99_990, "quarantined": 10},
        "bronze.items": {"in": 3_082, "imported": 1_682, "merged": 1_397, "quarantined": 3},
    }


def test_a_build_holds_an_import_by_the_versions_it_saw_not_by_clocks() -> None:
    """``samples-ready``: a build holds the day's import when it saw the import's ``bronze.quarantine``
    commit before reading silver, whatever its worker's clock said (here an hour slow, or fast). A
    build that saw no such table saw no import. Builds recorded before versions were, or that saw a
    table since recreated (its versions restarted), compare times."""
    from pipelines.sequences import read_after

    noon = dt.datetime(2026, 12, 5, 12, tzinfo=dt.UTC)
    promotion = {"version": 41, "timestamp": noon}
    slow, fast = ((noon + dt.timedelta(hours=h)).isoformat() for h in (-1, 1))

    def build(read_at: str, seen: str, table: str = "t1") -> dict[str, str]:
        return {"read_at": read_at, "quarantine_seen": seen, "quarantine_table": table}

    assert read_after(build(slow, "41"), promotion, "t1") and read_after(build(slow, "57"), promotion, "t1")
    assert not read_after(build(fast, "40"), promotion, "t1")
    assert not read_after(build(fast, "-1", ""), promotion, "t1")
    assert not read_after(build(slow, "900", "t0"), promotion, "t1")  # the old table's versions: by time
    assert read_after(build(fast, "3", "t0"), promotion, "t1")
    assert read_after({"read_at": fast}, promotion, "t1") and not read_after(
        {"read_at": slow}, promotion, "t1"
    )
    assert read_after({"read_at": slow, "quarantine_seen": "41"}, promotion, "t1")  # recorded without the id


def test_recommend_points_at_the_demo_config_when_the_demo_ran_another_dataset(tmp_path, monkeypatch) -> None:
    """After a MovieLens `hisam demo`, `hisam recommend 196` without --config reads configs/pipeline.yaml
    (synthetic): the unknown-user error says which config the demo wrote, and only then."""
    from pipelines.context import StepContext
    from pipelines.recommend import _demo_hint

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    ctx = StepContext(PipelineConfig(dataset="synthetic"), dt.date(2026, 11, 1))
    assert _demo_hint(ctx) == ""  # no demo ran here
    demo = tmp_path / "demo_pipeline.yaml"
    PipelineConfig(dataset="synthetic").to_yaml(demo)
    assert _demo_hint(ctx) == ""  # the demo ran this dataset
    PipelineConfig(dataset="movielens-100k").to_yaml(demo)
    assert _demo_hint(ctx) == f" (hisam demo ran 'movielens-100k' here: pass --config {demo})"


def test_a_stopped_runs_logged_config_is_compared_setting_by_setting(
    tmp_path, mlflow_store, monkeypatch, isolated_mlflow
) -> None:
    """A training run with no checkpoint here is continued only under the config it logged (MLflow
    params cannot change): its YAML compared by ``differences`` (key order too), else, when it died
    between the two, its params (fields added or dropped count); the PT's download path never counts,
    and a YAML this code cannot read differs."""
    import mlflow
    import yaml

    from hisam_core.ranker.sequence import SequenceConfig
    from hisam_core.ranker.train import RankerConfig
    from pipelines.context import StepContext
    from pipelines.ranker import _logged_config_changes
    from pipelines.tracking import flatten_config, log_config

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    base = RankerConfig(sequence=SequenceConfig(profile_fields={"age": 4, "gender": 3}))

    def variant(section: str, **update: object) -> RankerConfig:
        return base.model_copy(update={section: getattr(base, section).model_copy(update=update)})

    with isolated_mlflow():
        ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 1))
        client = ctx.mlflow
        with mlflow.start_run() as run:
            log_config(base, name="finetune")
        with mlflow.start_run() as died:  # between its params and its YAML
            mlflow.log_params(flatten_config(base))
        with mlflow.start_run() as early:  # before either
            pass
        with mlflow.start_run() as older:  # by code that had a setting this one no longer reads
            stale = tmp_path / "config" / "finetune.yaml"
            stale.parent.mkdir()
            stale.write_text(yaml.safe_dump({**base.model_dump(mode="json"), "retired": 1}))
            mlflow.log_artifact(str(stale), "config")
        logged, params_only, nothing = (client.get_run(r.info.run_id) for r in (run, died, early))
        cases = {
            "same": (base, [], []),
            "moved": (variant("train", init_from="/tmp/elsewhere/hmat.pt"), [], []),
            "rate": (variant("train", learning_rate=5e-4), ["train.learning_rate"], ["train.learning_rate"]),
            "dropped": (
                variant("sequence", profile_fields={"age": 4}),
                ["sequence.profile_fields", "sequence.profile_fields.gender"],
                ["sequence.profile_fields.gender"],
            ),
            "reordered": (
                variant("sequence", profile_fields={"gender": 3, "age": 4}),
                ["sequence.profile_fields"],
                None,
            ),
        }
        for name, (today, from_yaml, from_params) in cases.items():
            assert _logged_config_changes(ctx, logged, "finetune", today) == from_yaml, name
            if from_params is not None:  # params cannot tell an order
                assert _logged_config_changes(ctx, params_only, "finetune", today) == from_params, name
            assert _logged_config_changes(ctx, nothing, "finetune", today) == [], name
        assert _logged_config_changes(ctx, client.get_run(older.info.run_id), "finetune", base) == [
            "config/finetune.yaml"
        ]

"""Experiment tracking against a real MLflow SQLite store: what is logged is what is read back."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from hisam_core.ranker.sequence import SequenceConfig
from hisam_core.ranker.train import RankerConfig
from pipelines.settings import Settings
from pipelines.tracking import (
    DELTA_PATH_TAG,
    DELTA_VERSION_TAG,
    configure_mlflow,
    log_config,
    log_delta_input,
    log_training_curves,
    mlflow_callback,
    plot_training_curves,
    reopened,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, mlflow_store) -> Settings:
    home = tmp_path_factory.mktemp("hisam")
    return Settings(home=home, mlflow_tracking_uri=mlflow_store(home), experiment="tests")


@pytest.fixture(scope="module")
def experiment_id(settings: Settings, isolated_mlflow):
    with isolated_mlflow():
        yield configure_mlflow(settings)


@pytest.fixture
def run(experiment_id: str):
    with mlflow.start_run(experiment_id=experiment_id) as active:
        yield active


def test_configure_creates_experiment_under_artifact_root_once(
    settings: Settings, experiment_id: str
) -> None:
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "tests"
    assert Path(experiment.artifact_location.removeprefix("file://")) == settings.artifact_root / "tests"
    assert configure_mlflow(settings) == experiment_id  # idempotent


def test_callback_history_is_what_was_sent_minus_non_finite(run, caplog) -> None:
    callback = mlflow_callback(prefix="sft/")
    sent = [(1, {"loss": 2.5, "lr": 1e-3}), (2, {"loss": math.nan, "lr": 9e-4}), (3, {"loss": 1.25})]
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        for step, metrics in sent:
            callback(step, metrics)
    assert "sft/loss" in caplog.text and "nan" in caplog.text
    client = MlflowClient()
    for name in ("sft/loss", "sft/lr"):
        expected = [
            (step, metrics[name[4:]])
            for step, metrics in sent
            if name[4:] in metrics and math.isfinite(metrics[name[4:]])
        ]
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert logged == expected == callback.history[name]


def test_callback_refuses_to_start_a_run_implicitly(experiment_id: str) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        mlflow_callback()(1, {"loss": 1.0})


def test_training_curves_png_is_logged(run) -> None:
    history = {"loss": [(s, 1.0 / s) for s in range(1, 30)], "lr": [(s, 1e-3 * 0.9**s) for s in range(1, 30)]}
    path = log_training_curves(history, "sft")
    assert path == "plots/sft.png"
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the logged image is that history's figure: two panels of 4.2 x 3 inches at 110 dpi, same pixels
    expected = io.BytesIO()
    plot_training_curves(history, "sft").savefig(expected, dpi=110)
    logged, drawn = Image.open(local), Image.open(expected)
    assert logged.size == drawn.size == (round(2 * 4.2 * 110), round(3.0 * 110))
    assert np.array_equal(np.asarray(logged), np.asarray(drawn))
    with pytest.raises(ValueError, match="empty"):
        log_training_curves({"loss": []}, "none")


def test_training_curves_plot_each_metric_by_step_log_scaled_only_across_decades() -> None:
    history = {"loss": [(3, 0.01), (1, 10.0), (2, 1.0)], "empty": [], "auc": [(2, 0.7), (1, 0.6)]}
    figure = plot_training_curves(history, "sft")
    shown = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["loss", "auc"] and figure.get_suptitle() == "sft"
    (loss,), (auc,) = shown[0].get_lines(), shown[1].get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3] and list(loss.get_ydata()) == [10.0, 1.0, 0.01]
    assert list(auc.get_xdata()) == [1, 2] and list(auc.get_ydata()) == [0.6, 0.7]
    assert (shown[0].get_yscale(), shown[1].get_yscale()) == ("log", "linear")


def test_delta_input_records_path_and_version(run, tmp_path: Path) -> None:
    from deltalake import write_deltalake

    table = tmp_path / "sequences"
    write_deltalake(table, pd.DataFrame({"user_id": [1, 2]}))  # version 0
    write_deltalake(table, pd.DataFrame({"user_id": [3]}), mode="append")  # version 1
    log_delta_input(table, 0, context="training", name="sequences")
    log_delta_input(table, None, context="evaluation", name="sequences_latest")  # pins version 1
    for missing in (7, -1):
        with pytest.raises(ValueError, match=f"cannot open version {missing} .*latest 1"):
            log_delta_input(table, missing, context="training")
    with pytest.raises(FileNotFoundError, match="no Delta table"):
        log_delta_input(tmp_path / "missing", None, context="training")

    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    recorded = {}
    for item in inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        recorded[item.dataset.name] = (item.dataset.source_type, json.loads(item.dataset.source), tags)
    assert set(recorded) == {"sequences", "sequences_latest"}
    for name, version, context in [("sequences", "0", "training"), ("sequences_latest", "1", "evaluation")]:
        source_type, source, tags = recorded[name]
        assert source_type == "delta_table" and source["path"] == str(table.resolve())
        assert tags[DELTA_PATH_TAG] == str(table.resolve()) and tags[DELTA_VERSION_TAG] == version
        assert tags["mlflow.data.context"] == context
    assert recorded["sequences_latest"][1]["delta_table_version"] == 1
    # MLflow's source drops a falsy version 0, which is why the tags are the field to read
    assert recorded["sequences"][1].get("delta_table_version") in (None, 0)


def test_a_storage_error_while_recording_an_input_is_raised_as_it_came(run, tmp_path, monkeypatch) -> None:
    """A step fails at once on a ``ValueError`` (bad input), so a passing network error must not
    become one: it reaches Airflow as itself and the task is retried."""
    import deltalake
    from deltalake import write_deltalake

    write_deltalake(tmp_path / "samples", pd.DataFrame({"user_id": [1]}))

    class Unreachable(deltalake.DeltaTable):
        def __init__(self, *args, **kwargs) -> None:
            raise OSError("connection reset by peer")

    monkeypatch.setattr(deltalake, "DeltaTable", Unreachable)
    for version in (None, 0):
        with pytest.raises(OSError, match="connection reset"):
            log_delta_input(tmp_path / "samples", version, context="training")
    assert not MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs


def test_a_file_uri_lake_is_recorded_as_the_uri(run, tmp_path: Path) -> None:
    """``HISAM_LAKE_ROOT=file:///...`` (a URI, kept as such by the lake) is opened by delta-rs as
    given, not resolved as a relative path named ``file:``."""
    from deltalake import write_deltalake

    write_deltalake(tmp_path / "samples", pd.DataFrame({"user_id": [1]}))
    uri = (tmp_path / "samples").as_uri()
    log_delta_input(uri, None, context="training", name="samples")
    (item,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(item.dataset.source)["path"] == uri
    assert {tag.key: tag.value for tag in item.tags}[DELTA_PATH_TAG] == uri


def test_config_params_and_yaml_round_trip(run) -> None:
    config = RankerConfig(sequence=SequenceConfig(codebook_size=16, profile_fields={"age": 4}, max_tokens=64))
    assert log_config(config, name="ranker") == "config/ranker.yaml"
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params["sequence.codebook_size"] == "16"
    assert params["sequence.profile_fields.age"] == "4"
    assert json.loads(params["sequence.action_names"]) == ["negative", "positive"]
    assert params["train.init_from"] == "None"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config/ranker.yaml")
    assert RankerConfig.from_yaml(local) == config


def test_a_shared_database_store_needs_an_artifact_root(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, mlflow_tracking_uri="postgresql+psycopg2://u@nowhere/db", experiment="x"
    )
    with pytest.raises(ValueError, match="HISAM_ARTIFACT_ROOT"):
        configure_mlflow(settings)


def test_an_unreachable_database_store_is_reported_at_once(tmp_path: Path) -> None:
    """Nothing listens on port 1: the error names the store without its password, and is ours, raised
    before MLflow's ~100 s of engine retries would have started (they end in an MlflowException)."""
    settings = Settings(
        home=tmp_path,
        mlflow_tracking_uri="postgresql+psycopg2://u:secret@127.0.0.1:1/db",
        artifact_location=str(tmp_path / "artifacts"),
        experiment="x",
    )
    with pytest.raises(ConnectionError, match=r"u:\*\*\*@127\.0\.0\.1:1/db is unreachable") as err:
        configure_mlflow(settings)
    assert "secret" not in str(err.value)
    # a host that never answers (TEST-NET-1, RFC 5737: packets to it go nowhere) fails at the timeout
    from pipelines.tracking import check_database_reachable

    with pytest.raises(ConnectionError, match=r"192\.0\.2\.1:5432/db is unreachable"):
        check_database_reachable("postgresql+psycopg2://u@192.0.2.1:5432/db", timeout_s=2)
    check_database_reachable("databricks-uc")  # not a database URL: left to MLflow
    check_database_reachable("postgresql+nosuchdriver://u@127.0.0.1:1/db")  # an unknown driver: too


def test_a_reopened_run_stays_finished_when_the_step_that_reopened_it_fails(experiment_id: str) -> None:
    """``evaluate`` failing after it reopened the fine-tune's run must not mark that training FAILED;
    what it logged before failing is kept on that run, and so is its end time (its duration is the
    training's), whether the step fails or not."""
    with mlflow.start_run(experiment_id=experiment_id) as trained:
        mlflow.log_metric("sft/loss", 0.5)
    ended = MlflowClient().get_run(trained.info.run_id).info.end_time
    with reopened(trained.info.run_id):
        time.sleep(0.01)  # a later end time would show
    assert MlflowClient().get_run(trained.info.run_id).info.end_time == ended
    with pytest.raises(RuntimeError, match="champion unreadable"), reopened(trained.info.run_id) as active:
        assert active.info.run_id == trained.info.run_id
        mlflow.log_metric("eval.auc", 0.7)
        raise RuntimeError("champion unreadable")
    after = MlflowClient().get_run(trained.info.run_id)
    assert after.info.status == "FINISHED" and after.data.metrics == {"sft/loss": 0.5, "eval.auc": 0.7}
    assert after.info.end_time == ended
    assert mlflow.active_run() is None


def test_code_version_names_the_build_else_the_checkouts_commit(monkeypatch) -> None:
    """What each run's ``hisam.code_version`` says: the image's build argument, else the commit of
    this checkout (``-dirty`` when tracked files changed), as git itself names it."""
    import subprocess

    from pipelines.tracking import CODE_VERSION_ENV, code_version

    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"]).returncode != 0
    try:
        code_version.cache_clear()
        monkeypatch.setenv(CODE_VERSION_ENV, "4f2a9c1")
        assert code_version() == "4f2a9c1"
        code_version.cache_clear()
        monkeypatch.delenv(CODE_VERSION_ENV)
        if head.returncode == 0:  # a checkout (CI clones one)
            assert code_version() == f"git:{head.stdout.strip()}" + ("-dirty" if dirty else "")
    finally:
        code_version.cache_clear()

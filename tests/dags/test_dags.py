"""The DAG files: they load, schedule the lifecycle of App. A.4, and parse without heavy imports."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"

EXPECTED = {
    "hisam_features": {
        "source_ready": [],
        "ingest": ["source_ready"],
        "validate": ["ingest"],
        "embed": ["validate"],
        "tokenize_new_items": ["embed"],
        "build_sequences": ["embed", "tokenize_new_items"],
        "watcher": ["build_sequences", "embed", "ingest", "source_ready", "tokenize_new_items", "validate"],
    },
    "hisam_tokenizer": {
        "embeddings_ready": [],
        "train_tokenizer": ["embeddings_ready"],
        "tokenize_catalogue": ["train_tokenizer"],
        "build_sequences": ["tokenize_catalogue"],
        "validate_samples": ["build_sequences"],
        "activate_tokenizer": ["validate_samples"],
    },
    "hisam_pretrain": {
        "samples_ready": [],
        "validate_samples": ["samples_ready"],
        "pretrain": ["validate_samples"],
    },
    "hisam_finetune": {
        "samples_ready": [],
        "validate_samples": ["samples_ready"],
        "finetune": ["validate_samples"],
        "evaluate": ["finetune"],
        "register": ["evaluate"],
        "promote": ["register"],
        "refresh_champion": ["promote"],
        "watcher": [
            "evaluate",
            "finetune",
            "promote",
            "refresh_champion",
            "register",
            "samples_ready",
            "validate_samples",
        ],
    },
    "hisam_maintenance": {"maintain_lake": []},
}
GPU_TASKS = {("hisam_tokenizer", "train_tokenizer"), ("hisam_pretrain", "pretrain"),
             ("hisam_finetune", "finetune"), ("hisam_finetune", "evaluate")}  # fmt: skip


@pytest.fixture(scope="module")
def dags() -> dict:
    if str(DAGS) not in sys.path:
        sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags


def test_every_dag_loads_with_its_tasks_and_dependencies(dags) -> None:
    assert set(dags) == set(EXPECTED)
    for dag_id, tasks in EXPECTED.items():
        dag = dags[dag_id]
        assert {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} == tasks, dag_id
        assert dag.catchup is False and dag.max_active_runs == 1
    # the champion refresh runs also when fine-tuning skipped (no PT yet) or failed, and the samples
    # are built also when new items got no IDs; the watcher, downstream of every task, then fails
    # the run (Airflow judges a run by its leaves)
    rules = {(d.dag_id, t.task_id): t.trigger_rule.value for d in dags.values() for t in d.tasks}
    assert rules.pop(("hisam_finetune", "refresh_champion")) == "all_done"
    assert rules.pop(("hisam_features", "build_sequences")) == "all_done_min_one_success"
    assert (
        rules.pop(("hisam_finetune", "watcher")) == rules.pop(("hisam_features", "watcher")) == "one_failed"
    )
    assert set(rules.values()) == {"all_success"}
    for dag_id in ("hisam_features", "hisam_finetune"):
        assert [t.task_id for t in dags[dag_id].tasks if not t.downstream_list] == ["watcher"]
    # the waits release their worker slot between pokes, and fail (with the alert) after a timeout
    from hisam_common import SENSOR_POKE, SENSOR_POKE_LIMIT, SENSOR_TIMEOUT

    sensors = {
        (d.dag_id, t.task_id): t for d in dags.values() for t in d.tasks if hasattr(t, "poke_interval")
    }
    assert set(sensors) == {("hisam_features", "source_ready"), ("hisam_tokenizer", "embeddings_ready"),
                            ("hisam_pretrain", "samples_ready"), ("hisam_finetune", "samples_ready")}  # fmt: skip
    for sensor in sensors.values():
        assert sensor.mode == "reschedule" and sensor.execution_timeout == SENSOR_POKE_LIMIT  # per poke
        assert (sensor.poke_interval, sensor.timeout) == (
            SENSOR_POKE.total_seconds(),
            SENSOR_TIMEOUT.total_seconds(),
        )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import hisam_common as c; "
        "print(c.SENSOR_POKE, c.SENSOR_TIMEOUT, c.DEFAULT_ARGS['retry_delay'])"
    )
    shortened = ("HISAM_SENSOR_", "HISAM_RETRY_")  # by tests/conftest.py
    env = {k: v for k, v in os.environ.items() if not k.startswith(shortened)}
    defaults = subprocess.run(
        [sys.executable, "-c", code, str(DAGS)], capture_output=True, text=True, env=env
    )
    production = ["0:10:00", "20:00:00", "0:02:00"]
    assert defaults.stdout.split() == production, defaults.stderr[-2000:]


def test_schedules_follow_the_decoupled_lifecycle(dags) -> None:
    """Features daily, DST monthly, PT weekly or as soon as a new tokenizer is activated, SFT daily
    or as soon as a new PT is registered."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    crons = {d: dags[d].timetable for d in ("hisam_features", "hisam_tokenizer", "hisam_maintenance")}
    assert all(isinstance(t, CronTriggerTimetable) for t in crons.values())
    assert crons["hisam_features"].expression == "0 0 * * *"
    assert crons["hisam_tokenizer"].expression == "0 0 1 * *"
    assert crons["hisam_maintenance"].expression == "0 12 * * 6"  # Saturday noon: no other DAG starts then
    for dag_id, cron, asset in [
        ("hisam_pretrain", "0 3 * * 0", "hisam-tokenizer@current"),
        ("hisam_finetune", "0 4 * * *", "hisam-pretrained"),
    ]:
        timetable = dags[dag_id].timetable
        assert isinstance(timetable, AssetOrTimeSchedule), dag_id
        assert timetable.timetable.expression == cron
        assert timetable.asset_condition.name == asset
    produced = {o.name for d in dags.values() for t in d.tasks for o in t.outlets}
    assert {"hisam-tokenizer@current", "hisam-pretrained"} <= produced  # each triggers the next


def test_schedules_do_not_depend_on_the_cron_data_intervals_setting() -> None:
    """``"@daily"`` means a data-interval timetable (a run at the interval's end, one day later)
    where ``[scheduler] create_cron_data_intervals`` is on: every DAG names its timetable."""
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import CronTriggerTimetable

    before = conf.get("scheduler", "create_cron_data_intervals")
    conf.set("scheduler", "create_cron_data_intervals", "True")
    try:
        bag = DagBag(dag_folder=str(DAGS))
    finally:
        conf.set("scheduler", "create_cron_data_intervals", before)
    assert bag.import_errors == {}
    for dag_id in ("hisam_features", "hisam_tokenizer"):
        assert isinstance(bag.dags[dag_id].timetable, CronTriggerTimetable), dag_id


def test_gpu_tasks_take_the_gpu_pool_and_every_task_retries_and_alerts(dags) -> None:
    from hisam_common import GPU_TASK_TIMEOUT, RETRY_DELAY, SENSOR_POKE_LIMIT, TASK_TIMEOUT, alert_on_failure

    for dag in dags.values():
        for task in dag.tasks:
            if task.task_id == "watcher":  # it fails the run for a task that already retried and alerted
                assert task.retries == 0 and not task.on_failure_callback
                continue
            gpu = (dag.dag_id, task.task_id) in GPU_TASKS
            assert task.pool == ("gpu" if gpu else "default_pool"), task.task_id
            assert bool(task.executor_config) == gpu
            assert task.retries == 2 and task.retry_exponential_backoff
            assert task.retry_delay == RETRY_DELAY
            sensor = hasattr(task, "poke_interval")  # each poke; the wait has its own timeout
            assert task.execution_timeout == (
                SENSOR_POKE_LIMIT if sensor else GPU_TASK_TIMEOUT if gpu else TASK_TIMEOUT
            )
            callbacks = task.on_failure_callback
            assert alert_on_failure in (callbacks if isinstance(callbacks, list) else [callbacks])


def test_a_bad_duration_variable_names_itself(monkeypatch) -> None:
    """They are read when the DAG files are parsed: a bad one is an import error that says which."""
    from hisam_common import _seconds

    assert _seconds("HISAM_TEST_SECONDS", 5) == dt.timedelta(seconds=5)
    monkeypatch.setenv("HISAM_TEST_SECONDS", "90.5")
    assert _seconds("HISAM_TEST_SECONDS", 5) == dt.timedelta(seconds=90.5)
    for bad in ("10m", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("HISAM_TEST_SECONDS", bad)
        with pytest.raises(
            ValueError, match=f"HISAM_TEST_SECONDS must be a positive number of seconds, got '{bad}'"
        ):
            _seconds("HISAM_TEST_SECONDS", 5)


def test_a_broken_config_still_sends_the_failure_alert(dags, tmp_path, monkeypatch) -> None:
    """The task failed because the config does not parse: the callback must still alert about it
    (through the defaults and ``HISAM_NOTIFY_*``), not fail silently on the same config."""
    import json
    from types import SimpleNamespace

    from hisam_common import alert_on_failure

    (tmp_path / "bad.yaml").write_text("gate: [unclosed\n")
    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", str(tmp_path / "bad.yaml"))
    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    error = ValueError(f"{tmp_path / 'bad.yaml'}: not valid YAML")
    ti = SimpleNamespace(dag_id="hisam_finetune", task_id="finetune", try_number=1)
    alert_on_failure({"ti": ti, "exception": error, "logical_date": dt.datetime(2026, 11, 2, tzinfo=dt.UTC)})
    (alert,) = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alert["title"] == "hisam_finetune.finetune failed" and "not valid YAML" in alert["text"]


def test_a_step_that_alerted_before_failing_gets_no_second_alert(dags, tmp_path, monkeypatch) -> None:
    """A failed quality gate alerts with its report, then raises: the task's failure callback, which
    sees Airflow's exception raised from it, sends nothing more, unless the step's alert was lost.
    Any other failure alerts once."""
    import json
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException
    from hisam_common import alert_on_failure

    from pipelines.notify import alerted

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    ti = SimpleNamespace(dag_id="hisam_finetune", task_id="validate_samples", try_number=1)
    day = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
    causes = (alerted(ValueError("gate failed")), alerted(ValueError("gate failed, webhook down"), False),
              ValueError("lake unreachable"))  # fmt: skip
    for cause in causes:
        try:
            raise AirflowFailException(f"validate-samples: {cause}") from cause
        except AirflowFailException as error:
            alert_on_failure({"ti": ti, "exception": error, "logical_date": day})
    lost, other = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert "webhook down" in lost["text"] and "lake unreachable" in other["text"]


def test_a_task_tells_airflow_its_secrets_and_fails_without_them(
    dags, monkeypatch, tmp_path, write_config
) -> None:
    """Airflow masks in task logs (tracebacks too) only what it is told: the tracking URI's password
    and the webhook URL come from the environment or the config, so each task tells its masker
    before the step runs; the failure's own message has its URIs masked too."""
    import airflow.sdk.log
    import hisam_common
    from airflow.sdk.exceptions import AirflowFailException

    import pipelines.steps
    from pipelines.settings import uri_secrets

    told = []
    monkeypatch.setattr(airflow.sdk.log, "mask_secret", lambda secret, name=None: told.append(secret))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://svc:t%40ken@mlflow.internal")
    monkeypatch.setenv("HISAM_NOTIFY_WEBHOOK_URL", "https://chat.example/hooks/s3cret")

    def failing(step, day, config=None, params=None):
        raise ValueError(f"cannot reach {os.environ['MLFLOW_TRACKING_URI']}/api")

    monkeypatch.setattr(pipelines.steps, "run_step", failing)
    context = {"logical_date": dt.datetime(2026, 11, 2, tzinfo=dt.UTC)}
    with pytest.raises(AirflowFailException) as err:
        hisam_common.execute("finetune", context)
    assert sorted(told) == ["https://chat.example/hooks/s3cret", "t%40ken", "t@ken"]
    assert "t%40ken" not in str(err.value) and "https://svc:***@mlflow.internal/api" in str(err.value)
    # a webhook URL given in the config is as secret
    monkeypatch.delenv("HISAM_NOTIFY_WEBHOOK_URL")
    webhook = {"sinks": ["log", "webhook"], "webhook_url": "https://chat.example/hooks/in-yaml"}
    monkeypatch.setenv(
        "HISAM_PIPELINE_CONFIG", str(write_config(tmp_path / "p.yaml", top={"notify": webhook}))
    )
    told.clear()
    with pytest.raises(AirflowFailException):
        hisam_common.execute("finetune", context)
    assert sorted(told) == ["https://chat.example/hooks/in-yaml", "t%40ken", "t@ken"]
    (tmp_path / "bad.yaml").write_text("gate: [unclosed\n")  # a bad param is still named first
    monkeypatch.setenv("HISAM_PIPELINE_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(AirflowFailException, match="step finetune: param force must be true or false"):
        hisam_common.execute("finetune", context, {"force": "ture"})
    assert uri_secrets("postgresql+psycopg2://mlflow:s3/cr@t@db/x?password=p2") == ["p2", "s3/cr@t"]
    assert uri_secrets("sqlite:///a.db") == uri_secrets("http://mlflow:5000") == []


def test_an_asset_triggered_run_takes_the_day_its_events_carry_else_the_day_it_was_due(dags) -> None:
    """Runs triggered by an asset (hisam_pretrain after @current moves) have no logical date: their
    steps run for the newest day their events carry (the activating tokenizer run's, a day before when
    it activated after midnight), else for the day of ``run_after`` (Airflow gives both in UTC)."""
    from types import SimpleNamespace

    from hisam_common import logical_day

    due = dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC)
    scheduled = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
    assert logical_day({"logical_date": None, "dag_run": SimpleNamespace(run_after=due)}) == dt.date(
        2026, 11, 30
    )
    assert (
        logical_day({"logical_date": scheduled, "dag_run": SimpleNamespace(run_after=due)})
        == scheduled.date()
    )
    event = lambda **extra: SimpleNamespace(extra=extra)  # noqa: E731
    triggered = {
        "logical_date": None,
        "dag_run": SimpleNamespace(run_after=due),
        "triggering_asset_events": {
            "hisam-tokenizer@current": [event(logical_date="2026-11-01"), event(logical_date="2026-11-29")],
            "other": [event(), SimpleNamespace(extra=None)],
        },
    }
    assert logical_day(triggered) == dt.date(2026, 11, 29)
    triggered["triggering_asset_events"] = {"other": [event()]}
    assert logical_day(triggered) == dt.date(2026, 11, 30)


def test_parsing_imports_nothing_heavy() -> None:
    """The scheduler parses DAG files constantly: no torch, Spark, MLflow or pipelines at import."""
    code = (
        "import runpy, sys; sys.path.insert(0, sys.argv[1]);"
        "[runpy.run_path(f'{sys.argv[1]}/{n}.py') for n in "
        "('hisam_features', 'hisam_tokenizer', 'hisam_pretrain', 'hisam_finetune', 'hisam_maintenance')];"
        "heavy = [m for m in ('torch', 'pyspark', 'mlflow', 'pipelines', 'hisam_core') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(DAGS)], capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]

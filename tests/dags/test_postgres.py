"""The production profile: Airflow metadata and the MLflow backend on a real PostgreSQL server.

``.ci/run`` starts one (``infra/postgres/pg.sh start``) and exports ``HISAM_TEST_POSTGRES_URL``; without
it the test skips. Airflow reads its database once per process, so the DAG runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

URL = os.environ.get("HISAM_TEST_POSTGRES_URL")
DAGS = Path(__file__).resolve().parents[2] / "dags"
SCRIPT = """
import datetime as dt, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import hisam_lifecycle
hisam_lifecycle.prepare_airflow(Path(sys.argv[2]))
result = hisam_lifecycle.run_dag("hisam_features", dt.date(2026, 11, 1))
print("RESULT " + json.dumps({"state": result.state, "tasks": result.tasks}))
"""


@pytest.mark.skipif(
    not URL, reason="no PostgreSQL server (HISAM_TEST_POSTGRES_URL; infra/postgres/pg.sh start)"
)
def test_features_dag_runs_on_postgres(tmp_path, write_config) -> None:
    import sqlalchemy
    from mlflow import MlflowClient

    env = {
        **{
            k: v for k, v in os.environ.items() if not k.startswith("PYTEST")
        },  # a plain process, as in production
        "HISAM_HOME": str(tmp_path),
        "HISAM_PIPELINE_CONFIG": str(write_config(tmp_path / "pipeline.yaml")),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{URL}/airflow",
        "MLFLOW_TRACKING_URI": f"{URL}/mlflow",
        "HISAM_EXPERIMENT": f"hisam-pg-{tmp_path.name}",
        "HISAM_ARTIFACT_ROOT": (tmp_path / "shared-artifacts").as_uri(),  # object storage in production
    }
    script = tmp_path / "run_features.py"  # a script file: under `python -c` a task exited early
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(DAGS), str(tmp_path)], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    # no tokenizer yet: no item to tokenize, no samples to build; nothing failed, so the watcher skips
    skipped = {"tokenize_new_items": "skipped", "build_sequences": "skipped", "watcher": "skipped"}
    assert result["state"] == "success", done.stdout[-6000:]
    assert result["tasks"] == {**dict.fromkeys(result["tasks"], "success"), **skipped}, done.stdout[-6000:]
    with sqlalchemy.create_engine(f"{URL}/airflow").connect() as db:
        newest = "(select run_id from dag_run where dag_id = 'hisam_features' order by id desc limit 1)"
        where = f"where dag_id = 'hisam_features' and run_id = {newest}"
        (state,) = db.execute(sqlalchemy.text(f"select state from dag_run {where}")).one()
        tasks = db.execute(sqlalchemy.text(f"select task_id, state from task_instance {where}")).all()
    assert state == "success"
    assert dict(tasks) == result["tasks"] and len(tasks) == len(result["tasks"])  # every task, in Postgres
    assert not list(tmp_path.rglob("*.db"))  # neither Airflow nor MLflow fell back to a SQLite file
    # tokenize_new_items asked the registry for @current (none yet) through the Postgres MLflow backend
    experiment = MlflowClient(tracking_uri=f"{URL}/mlflow").get_experiment_by_name(env["HISAM_EXPERIMENT"])
    assert experiment.artifact_location == f"{env['HISAM_ARTIFACT_ROOT']}/{env['HISAM_EXPERIMENT']}"
    assert (tmp_path / "lake" / "silver" / "interactions" / "_delta_log").is_dir()

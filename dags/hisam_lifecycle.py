"""Run the Hi-SAM DAGs in-process with ``dag.test()``: the embedded Airflow behind ``hisam demo``.

:func:`prepare_airflow` points Airflow at ``$HISAM_HOME/airflow`` (SQLite metadata unless
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` says otherwise, e.g. Postgres), this folder as the DAGs folder,
migrates the metadata database and creates the pools of ``infra/airflow/pools.json``. It must run
before anything imports Airflow in the process. :func:`run_dag` then runs one DAG for one logical date
exactly as the scheduler would order its tasks, and returns the run's and each task's state.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DAGS_FOLDER = Path(__file__).resolve().parent
POOLS = DAGS_FOLDER.parent / "infra" / "airflow" / "pools.json"
#: The lifecycle in dependency order (App. A.4): features, then DST, then PT, then SFT.
LIFECYCLE = ("hisam_features", "hisam_tokenizer", "hisam_pretrain", "hisam_finetune")


@dataclass(frozen=True)
class DagResult:
    dag_id: str
    logical_date: str
    state: str
    tasks: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.state == "success"


def airflow_env(home: Path) -> dict[str, str]:
    """Environment of the embedded Airflow under ``home`` (existing ``AIRFLOW__*`` settings win)."""
    airflow_home = home / "airflow"
    env = {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
    }
    return {k: os.environ.get(k, v) for k, v in env.items()}


def prepare_airflow(home: Path) -> dict[str, str]:
    """Set the Airflow environment, migrate its database and import the pools (idempotent)."""
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home / "airflow"):
        log.warning("Airflow was imported before prepare_airflow(): its settings may not apply")
    env = airflow_env(home)
    os.environ.update(env)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    for args in (["db", "migrate"], ["pools", "import", str(POOLS)]):
        done = subprocess.run([airflow, *args], env=os.environ.copy(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    log.info("Airflow metadata at %s", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split("@")[-1])
    return env


def load_dags() -> dict[str, Any]:
    """Every DAG of this folder; any import error is raised, naming the file."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {json.dumps(bag.import_errors, indent=2)}")
    return dict(bag.dags)


def run_dag(dag_id: str, logical_date: dt.date) -> DagResult:
    """``dag.test()`` one DAG for ``logical_date`` (midnight UTC) in this process."""
    dag = load_dags()[dag_id]
    when = dt.datetime.combine(logical_date, dt.time(), tzinfo=dt.UTC)
    run = dag.test(logical_date=when)
    tasks = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    result = DagResult(dag_id, logical_date.isoformat(), str(run.state), tasks)
    log.info("%s @ %s: %s %s", dag_id, logical_date, result.state, tasks)
    return result

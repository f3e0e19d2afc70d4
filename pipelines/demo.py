"""``hisam demo``: the whole lifecycle through the real Airflow DAGs, on the embedded default.

Runs ``hisam_features``, ``hisam_tokenizer``, ``hisam_pretrain`` and ``hisam_finetune`` in that order
with ``dag.test()`` (SQLite Airflow metadata, local Spark, Delta on local disk, MLflow ``sqlite:///``,
all under ``$HISAM_HOME``), on MovieLens-100K when the bundle is present and on the config's own
source otherwise (the default config's: the synthetic dataset), then reports what was written: lake
tables and versions, the champion and its metrics, the command that opens the MLflow UI and the path
of the GX Data Docs. This is the one module that reaches into ``dags/`` (by path): the demo drives
the DAGs exactly as a scheduler would.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.settings import Settings, movielens_dir
from pipelines.steps import DEFAULT_CONFIG, load_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Variables that point the steps and Airflow at shared stores, compute and alert sinks. In the
#: production image they name production's lake, registry, metadata database, Spark cluster and
#: on-call channel; the demo is the embedded default, so it drops them (in its own process) rather
#: than write a synthetic dataset and demo models there, send its jobs to a cluster that cannot read
#: its local lake, or page anyone.
SHARED_STORES = (
    "MLFLOW_TRACKING_URI",
    "HISAM_ARTIFACT_ROOT",
    "HISAM_LAKE_ROOT",
    "HISAM_SPARK_MASTER",
    "HISAM_SPARK_CONF",
    "AIRFLOW_HOME",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "HISAM_NOTIFY_SINKS",
    "HISAM_NOTIFY_WEBHOOK_URL",
    "HISAM_NOTIFY_FILE",
)


class DemoFailed(RuntimeError):
    """A DAG of the demo ended in failure (its task logs say why)."""


def _lifecycle() -> Any:
    """``dags/hisam_lifecycle.py``, imported the way Airflow imports DAG-folder modules."""
    dags = str(REPO / "dags")
    if not (REPO / "dags" / "hisam_lifecycle.py").is_file():
        raise FileNotFoundError(
            f"hisam demo runs the DAGs of a repository checkout, and {dags} has none: install the "
            "project editable from its clone (pip install -e .; the README's make demo does)"
        )
    if dags not in sys.path:
        sys.path.insert(0, dags)
    return importlib.import_module("hisam_lifecycle")


def demo_overrides(dataset: str, bundle: Path | None) -> dict[str, Any]:
    """Config overrides for the chosen dataset (``auto``: MovieLens when its bundle is present, else
    the config's own source; a ``bundle`` named explicitly must be one, so a mistyped path is not a
    silent run of another source)."""
    ml = Path(bundle) if bundle else movielens_dir()
    if dataset == "movielens" or (dataset == "auto" and (bundle or (ml / "raw" / "u.data").is_file())):
        if not (ml / "raw" / "u.data").is_file():
            raise FileNotFoundError(f"no MovieLens-100K bundle at {ml} (expected raw/u.data)")
        return {
            "dataset": "movielens-100k",
            "source": {"kind": "movielens", "movielens_dir": str(ml.resolve()), "generic": None},
        }
    synthetic = {"kind": "synthetic", "movielens_dir": None, "generic": None}  # whatever the base config had
    return {"source": synthetic} if dataset == "synthetic" else {}


def demo_config(config: Path | None, dataset: str, bundle: Path | None) -> Any:
    """``config`` (default configs/pipeline.yaml) for the chosen dataset, keeping none of its stores:
    the lake is under ``$HISAM_HOME`` and alerts go to the log and ``$HISAM_HOME/alerts.jsonl``, so a
    copy of the production config never writes demo data into its lake or pages its on-call."""
    from pipelines.config import LakeConfig
    from pipelines.notify import NotifyConfig

    pipeline = load_config(config or DEFAULT_CONFIG, demo_overrides(dataset, bundle))
    return pipeline.model_copy(update={"lake": LakeConfig(), "notify": NotifyConfig(sinks=["log", "file"])})


def lake_summary(root: str) -> dict[str, dict[str, int]]:
    """Every Delta table under the lake root: its latest version and row count."""
    from deltalake import DeltaTable

    out = {}
    for log_dir in sorted(Path(root).glob("*/*/_delta_log")):
        table = DeltaTable(str(log_dir.parent))
        out[f"{log_dir.parent.parent.name}.{log_dir.parent.name}"] = {
            "version": int(table.version()),
            "rows": int(table.to_pyarrow_dataset().count_rows()),
        }
    return out


def run_demo(config: Path | None = None, dataset: str = "auto", bundle: Path | None = None) -> dict[str, Any]:
    """Run the four DAGs for today's date and summarise what they wrote. The config is ``config``,
    else configs/pipeline.yaml, never ``$HISAM_PIPELINE_CONFIG``: in the production image that is
    the paper-sized one, and the demo is the embedded default (nor the stores of
    :data:`SHARED_STORES`)."""
    ignored = [name for name in SHARED_STORES if os.environ.pop(name, None) is not None]
    if ignored:  # names only: a connection string may hold a password
        log.warning(
            "hisam demo ignores %s: it runs on the embedded default under $HISAM_HOME", ", ".join(ignored)
        )
    settings = Settings.from_env()
    pipeline = demo_config(config, dataset, bundle)
    day = dt.datetime.now(dt.UTC).date()
    settings.home.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    from pipelines.registry import check_dataset

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    # before any DAG runs: a home holding another dataset's models is refused (a config error, exit 2)
    check_dataset(client, pipeline.models.names, pipeline.dataset)
    config_file = settings.home / "demo_pipeline.yaml"
    pipeline.to_yaml(config_file)
    os.environ["HISAM_PIPELINE_CONFIG"] = str(config_file)  # what every task loads
    lifecycle = _lifecycle()
    lifecycle.prepare_airflow(settings.home)
    runs, start = [], time.perf_counter()
    for dag_id in lifecycle.LIFECYCLE:
        began = time.perf_counter()
        result = lifecycle.run_dag(dag_id, day)
        runs.append({"dag": dag_id, "state": result.state, "seconds": round(time.perf_counter() - began, 1)})
        if not result.ok:
            failed = [t for t, s in result.tasks.items() if s != "success"]
            raise DemoFailed(
                f"{dag_id} ended {result.state}; tasks not successful: {failed} (see the log above)"
            )
    return summarize(pipeline, settings, runs, round(time.perf_counter() - start, 1))


def summarize(
    pipeline: Any, settings: Settings, runs: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    from mlflow import MlflowClient

    from pipelines.registry import CHAMPION, CURRENT, alias_version
    from pipelines.tracking import configure_mlflow

    configure_mlflow(settings)
    client = MlflowClient()
    champion = alias_version(client, pipeline.models.ranker, CHAMPION)
    tokenizer = alias_version(client, pipeline.models.tokenizer, CURRENT)
    lake_root = pipeline.lake.root or settings.lake_root
    return {
        "dataset": pipeline.dataset,
        "dag_runs": runs,
        "total_seconds": seconds,
        "lake": {"root": lake_root, "tables": lake_summary(lake_root)},
        "tokenizer": None if tokenizer is None else {"version": tokenizer.version, **tokenizer.tags},
        "champion": None if champion is None else {"version": champion.version, **champion.tags},
        "next": {
            "mlflow_ui": f"mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}",
            "data_docs": str(settings.data_docs / "index.html"),
            "alerts": str(settings.alerts_file),
            "airflow_home": str(settings.home / "airflow"),
            "recommend": f"hisam recommend <user> --config {settings.home / 'demo_pipeline.yaml'}",
        },
    }

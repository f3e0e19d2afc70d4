"""Shared fixtures: one local Spark session per test run, the MovieLens bundle when present, an
Airflow home of its own for the whole run (set before anything imports Airflow), and a small
interaction log with planted preferences for the evaluation tests, and the tiny pipeline config the
DAG and step tests run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

#: PySpark hands collected timestamps to Python in the process's local time zone: the tests write and
#: compare UTC wall-clock times, so they pin it (the pipeline itself keys time on UTC microseconds).
os.environ["TZ"] = "UTC"
time.tzset()

#: Airflow reads its settings once, at import: point it at a private home now. The DAG and lifecycle
#: tests migrate its SQLite database with ``dags/hisam_lifecycle.prepare_airflow``.
AIRFLOW_TEST_HOME = Path(tempfile.mkdtemp(prefix="hisam-airflow-"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_TEST_HOME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
#: A sensor left waiting fails its test after 6 seconds: dag.test() runs one task at a time, so
#: nothing can land while it waits, and waiting longer changes nothing (each poke runs its step).
os.environ["HISAM_SENSOR_POKE_SECONDS"] = "2"
os.environ["HISAM_SENSOR_TIMEOUT_SECONDS"] = "6"
#: A step failing with an unexpected error is retried within 2 and then 4 seconds, not 4 and 8
#: minutes (dag.test() waits out the delay): a broken lifecycle test fails in seconds.
os.environ["HISAM_RETRY_DELAY_SECONDS"] = "1"
#: The tests' tables are tiny and their queries many and different: generating and compiling Java
#: code for each query and re-planning it adaptively cost Spark more than they save (seven data-step
#: tests: 117 s with Spark's defaults, 92 s with all three off). They change how a plan runs, not what
#: it returns (row order and file counts aside); `make demo` and the benchmarks run Spark's defaults,
#: and so do the tests with HISAM_SPARK_CONF= (empty). One test holds the sequence job's outputs under
#: Spark's defaults equal to its outputs under these (tests/spark/test_sequences.py). Subprocesses
#: (the Postgres DAG test, the result-cap script of test_lake.py) inherit it.
os.environ.setdefault(
    "HISAM_SPARK_CONF",
    "spark.sql.adaptive.enabled=false,spark.sql.codegen.wholeStage=false,"
    "spark.sql.codegen.factoryMode=NO_CODEGEN",
)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = (
    f"sqlite:///{AIRFLOW_TEST_HOME / 'airflow' / 'airflow.db'}"
)
os.environ["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] = str(AIRFLOW_TEST_HOME / "airflow" / "logs")
#: Of the shared stores ``pipeline_home`` clears, those this module sets for the whole run: it keeps them.
SET_FOR_THE_RUN = {"AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "HISAM_SPARK_CONF"}


def pytest_unconfigure(config: pytest.Config) -> None:
    """The private Airflow home goes with the run (each pytest process made its own)."""
    shutil.rmtree(AIRFLOW_TEST_HOME, ignore_errors=True)


MOVIELENS = Path(
    os.environ.get(
        "HISAM_MOVIELENS_DIR", Path(__file__).resolve().parents[1] / "../shared/data/movielens-100k"
    )
)


@pytest.fixture(scope="session", autouse=True)
def no_store_in_the_working_directory():
    """No test may fall back to MLflow's default store (``./mlflow.db``): that would be a test
    reading or writing outside its own home, as a leaked ``MLFLOW_TRACKING_URI`` once made one."""
    store = Path.cwd() / "mlflow.db"
    existed = store.exists()
    yield
    assert existed or not store.exists(), f"a test created {store}: MLflow fell back to its default store"


@pytest.fixture(autouse=True)
def single_thread():
    """One torch intra-op thread per test: tiny models run faster and deterministically on a shared
    2-core machine (the CLI and steps set their own thread count; this restores it afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def spark():
    from spark_jobs.session import get_spark

    session = get_spark("hisam-tests", master="local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """The MovieLens-100K bundle (never committed: its licence forbids redistribution)."""
    if not (MOVIELENS / "raw" / "u.data").exists():
        pytest.skip(f"MovieLens-100K bundle not found at {MOVIELENS.resolve()}")
    return MOVIELENS.resolve()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The run's Airflow metadata database, migrated, with the pools of infra/airflow/pools.json."""
    import sys

    dags = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    if dags not in sys.path:
        sys.path.insert(0, dags)
    import hisam_lifecycle

    hisam_lifecycle.prepare_airflow(AIRFLOW_TEST_HOME)
    return AIRFLOW_TEST_HOME


@pytest.fixture
def planted_interactions() -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """80 users x 60 items: an item quality and item taste vectors drive both the labels
    (user . taste + 2 quality > 0) and two item feature modalities (noisy linear views of both).
    Returns (interactions, features by modality, item ids)."""
    rng = np.random.default_rng(0)
    users, items, dim = 80, 60, 4
    taste = rng.normal(size=(items, dim))
    quality = rng.normal(size=items)
    preference = rng.normal(size=(users, dim))
    rows = []
    clock = 0
    for user in range(users):
        for item in rng.choice(items, size=int(rng.integers(8, 30)), replace=False):
            clock += int(rng.integers(1, 5))
            rows.append(
                (user + 1, item + 1, int(preference[user] @ taste[item] + 2 * quality[item] > 0), clock)
            )
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp"])
    frame = frame.sample(frac=1.0, random_state=0)  # file order must not matter
    features = {
        name: (
            np.column_stack([taste, 2 * quality]) @ rng.normal(size=(dim + 1, 8))
            + 0.1 * rng.normal(size=(items, 8))
        ).astype(np.float32)
        for name in ("behavior", "text")
    }
    return frame, features, np.arange(1, items + 1)


#: The tiny pipeline config the DAG and step tests run (seconds per step on 2 cores).
TINY = {
    "dataset": "tiny",
    "source": {"kind": "synthetic", "synthetic": {"num_users": 80, "num_items": 120, "num_events": 3000,
                                                  "num_clusters": 4, "seed": 1, "image_size": 8}},
    "quality": {"result_format": "BOOLEAN_ONLY", "build_data_docs": False},
    "embeddings": {"text": {"modality": "text", "kind": "hashing", "config": {"dim": 32}},
                   "behavior": {"dim": 16, "epochs": 2, "max_len": 20}},
    "tokenizer": {
        "train": {"model": {"dim": 16, "hidden_dim": 32, "codebook_size": 16, "vclub_hidden_dim": 16},
                  "epochs": 6, "alignment_warmup_epochs": 2, "batch_size": 64},
        "health": {"min_utilisation": 0.2, "min_unique_id_rate": 0.5},
    },
    "sequences": {"token_budget": 120, "profile_tokens": 3},
    "ranker": {
        "sequence": {"codebook_size": 16, "max_tokens": 120},
        "profile_fields": ["age_bucket", "gender", "occupation"],
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "ffn_size": 64},
        "pretrain": {"objective": "pt", "learning_rate": 3.0e-3, "warmup_steps": 5, "max_steps": 60,
                     "batch_size": 16, "log_every": 5, "checkpoint_every": 10},
        "finetune": {"objective": "sft", "learning_rate": 1.0e-3, "warmup_steps": 5, "max_steps": 500,
                     "batch_size": 16, "log_every": 25, "checkpoint_every": 100},
    },
    "gate": {
        "floors": {"auc": 0.55},
        "max_regression": {"auc": 0.01, "gauc": 0.02},
        "max_drift": {"auc": 0.02, "gauc": 0.04},
    },
    "notify": {"sinks": ["log", "file"]},
}  # fmt: skip


def _write(path: Path, top: dict | None = None, **section_updates: dict) -> Path:
    config = json.loads(json.dumps(TINY))
    config.update(top or {})
    for section, update in section_updates.items():
        config["ranker"][section].update(update)
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def _pipeline_home(home: Path, config: Path) -> Iterator[pytest.MonkeyPatch]:
    """The environment of DAG runs of their own: ``$HISAM_HOME`` (their lake, MLflow store and
    ``alerts.jsonl``) and config, without the shared stores, Spark master and alert sinks the demo
    also drops (``pipelines.demo.SHARED_STORES``) but those this module sets. MLflow's fluent
    tracking URI and active experiment, which it caches, are reset afterwards."""
    import mlflow

    from pipelines.demo import SHARED_STORES

    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")  # None: unset again after (not the default)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("HISAM_HOME", str(home))
            env.setenv("HISAM_PIPELINE_CONFIG", str(config))
            for name in set(SHARED_STORES) - SET_FOR_THE_RUN:
                env.delenv(name, raising=False)
            env.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
            yield env
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="session")
def pipeline_home():
    """``with pipeline_home(home, config) as env:`` (a ``MonkeyPatch``): see :func:`_pipeline_home`."""
    return _pipeline_home


@pytest.fixture(scope="session")
def write_config():
    """``write(path, top={...}, pretrain={...}, finetune={...}) -> path``: the tiny config, with
    top-level sections replaced by ``top`` and ranker sections updated."""
    return _write

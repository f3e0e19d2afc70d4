"""MLflow experiment tracking for the pipeline steps: setup, step metrics, curves, inputs, configs.

* :func:`configure_mlflow` points MLflow at ``Settings.mlflow_tracking_uri`` and creates the
  experiment with its artifacts under ``$HISAM_ARTIFACT_ROOT`` when set; otherwise a local store
  (SQLite or file) keeps them under ``Settings.artifact_root`` and an MLflow server under its own
  default. A database shared by many workers (Postgres) without ``$HISAM_ARTIFACT_ROOT`` is refused:
  MLflow would write each worker's models to its own ``./mlruns``; an unreachable one is reported
  within seconds (:func:`check_database_reachable`).
* :func:`mlflow_callback` is the ``callback(step, metrics)`` that ``hisam_core.ranker.train.train``
  and ``hisam_core.tokenizer.train.train_tokenizer`` accept; it also keeps the history it logged,
  ready for :func:`log_training_curves`.
* :func:`log_delta_input` records the exact Delta table version a run read. MLflow's
  ``DeltaDatasetSource`` (wrapped in a ``MetaDataset``) stores the path and version, but drops the
  version when it is 0 (``if self._delta_table_version:``), so path and version are also written as
  input tags (``delta.path``, ``delta.version``): the tags are the field to read back.
* :func:`log_config` logs a pydantic config as flattened params plus its YAML as an artifact.

Every logging function writes to the active run (``run_id`` to pick another) and never starts one
implicitly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.data.delta_dataset_source import DeltaDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from hisam_core.config import Config
from pipelines.settings import Settings

log = logging.getLogger(__name__)

#: Input tags holding the Delta table read by a run (authoritative; see the module docstring).
DELTA_PATH_TAG = "delta.path"
DELTA_VERSION_TAG = "delta.version"
#: Where :func:`log_training_curves` and :func:`log_config` put their artifacts.
PLOTS_DIR = "plots"
CONFIG_DIR = "config"
#: MLflow's limit on a param value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``).
MAX_PARAM_LENGTH = 6000

_LOCAL_SCHEMES = {"", "file", "sqlite"}
_SERVER_SCHEMES = {"http", "https", "databricks"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _is_local_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in _LOCAL_SCHEMES or len(scheme) == 1  # a Windows drive letter is a path too


def configure_mlflow(settings: Settings) -> str:
    """Set the tracking (and registry) URI and the active experiment, creating it when missing;
    returns the experiment id. A new experiment keeps its artifacts under ``$HISAM_ARTIFACT_ROOT``, else
    (local store) ``artifact_root / experiment``; a database store without it, or a deleted experiment
    of that name, is an error."""
    uri = settings.tracking_uri
    scheme = urlparse(uri).scheme
    if not (settings.artifact_location or _is_local_store(uri) or scheme in _SERVER_SCHEMES):
        raise ValueError(
            f"MLflow tracking store {scheme}:// has no artifact store of its own: set HISAM_ARTIFACT_ROOT "
            "(e.g. s3://bucket/mlflow) so every worker reads the models the others wrote"
        )
    if scheme not in _SERVER_SCHEMES and not _is_local_store(uri):
        check_database_reachable(uri)
    if urlparse(uri).password:  # MLflow prints each finished run's URL to stdout, the password in it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        location = None
        if settings.artifact_location:
            location = f"{settings.artifact_location.rstrip('/')}/{settings.experiment}"
        elif _is_local_store(uri):
            root = Path(settings.artifact_root).resolve() / settings.experiment
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_uri()

        try:
            experiment_id = client.create_experiment(settings.experiment, artifact_location=location)
            log.info("created MLflow experiment %r (artifacts: %s)", settings.experiment, location)
        except MlflowException as err:  # created concurrently by another process
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment_id = client.get_experiment_by_name(settings.experiment).experiment_id
    elif experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {settings.experiment!r} is deleted; restore it or set HISAM_EXPERIMENT"
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


#: The connect-timeout argument of each database driver a tracking store may name.
_CONNECT_TIMEOUT = {
    "psycopg2": "connect_timeout",
    "psycopg": "connect_timeout",
    "pg8000": "timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
}


def check_database_reachable(uri: str, timeout_s: int = 10) -> None:
    """Connect once to a Postgres or MySQL tracking store, waiting at most ``timeout_s`` seconds
    (where its driver takes a timeout), and raise ``ConnectionError`` naming it (password hidden) when
    that fails: MLflow itself retries for about 100 s before it reports the same. A task's own
    retries cover a short outage. Other stores are left to MLflow."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        return  # not a database URL: MLflow reports what it is
    if url.get_backend_name() not in ("postgresql", "mysql"):
        return
    try:
        option = _CONNECT_TIMEOUT.get(url.get_dialect().driver)
        engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args={option: timeout_s} if option else {}
        )
    except (ImportError, sqlalchemy.exc.ArgumentError):
        return  # an unknown or uninstalled driver: MLflow says so
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split()[:40]) or type(err).__name__
        raise ConnectionError(
            f"MLflow tracking database {url.render_as_string(hide_password=True)} is unreachable "
            f"({reason}): check MLFLOW_TRACKING_URI and that the server is up"
        ) from err
    finally:
        engine.dispose()


def _run_id(run_id: str | None) -> str:
    if run_id is not None:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call inside `mlflow.start_run()` or pass run_id")
    return run.info.run_id


@dataclass
class MetricsCallback:
    """``callback(step, metrics)`` logging step metrics to MLflow (names prefixed by ``prefix``);
    non-finite values are skipped with a warning. ``history`` keeps what was logged, by name, one
    value per step (a step logged again, by a training resumed before it, replaces its value)."""

    prefix: str = ""
    run_id: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        finite: dict[str, float] = {}
        for name, value in metrics.items():
            value = float(value)
            key = f"{self.prefix}{name}"
            if not math.isfinite(value):
                log.warning("step %d: metric %r is %s, not logged", step, key, value)
                continue
            finite[key] = value
        if not finite:
            return
        mlflow.log_metrics(finite, step=int(step), run_id=_run_id(self.run_id))
        for key, value in finite.items():
            points = self.history.setdefault(key, [])
            if points and points[-1][0] == step:
                points.pop()
            points.append((int(step), value))

    def resume(self, run_id: str) -> None:
        """Start ``history`` from what ``run_id`` logged under ``prefix``: a training resumed in an
        earlier attempt's run then plots its whole curve."""
        client = MlflowClient()
        for key in client.get_run(run_id).data.metrics:
            if key.startswith(self.prefix):
                points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
                self.history[key] = sorted(points.items())


def input_versions(run: Run) -> dict[str, int]:
    """The Delta versions of the inputs ``run`` logged (:meth:`StepContext.log_input`), by name."""
    out = {}
    for item in run.inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        if DELTA_VERSION_TAG in tags:
            out[item.dataset.name] = int(tags[DELTA_VERSION_TAG])
    return out


@contextmanager
def reopened(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Log more to a finished run (a fine-tune's, from ``evaluate`` or ``register``); it keeps its
    status and end time whatever happens here (the run's duration is the training's), and a failure
    is the reopening step's, not the training the run records."""
    client = MlflowClient()
    before = client.get_run(run_id).info
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    finally:
        mlflow.end_run()
        if before.end_time is not None:
            client.set_terminated(run_id, before.status, end_time=before.end_time)


#: Run tag: the code that produced the run (:func:`code_version`).
CODE_VERSION_TAG = "hisam.code_version"
#: Set at image build (``--build-arg HISAM_CODE_VERSION=$(git rev-parse HEAD)``): an image has no .git.
CODE_VERSION_ENV = "HISAM_CODE_VERSION"


@functools.cache
def code_version() -> str:
    """What code this process runs, for a run's lineage: ``$HISAM_CODE_VERSION`` when set (the
    image's build), else the git commit of the checkout the package runs from (``-dirty`` with
    uncommitted changes to tracked files), else the installed package's version."""
    if given := os.environ.get(CODE_VERSION_ENV, "").strip():
        return given
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        git = ["git", "-C", str(root)]
        try:
            head = subprocess.run(
                [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            )
            changed = subprocess.run(
                [*git, "diff", "--quiet", "HEAD"], capture_output=True, timeout=10
            ).returncode
            return f"git:{head.stdout.strip()}" + ("-dirty" if changed == 1 else "")  # 1: differences
        except (OSError, subprocess.SubprocessError):
            log.debug("git failed", exc_info=True)
    try:
        return f"hisam=={importlib.metadata.version('hisam')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def mlflow_callback(prefix: str = "", run_id: str | None = None) -> MetricsCallback:
    """A metrics callback for the training loops (``callback(epoch_or_step, metrics)``); it logs to
    ``run_id`` or, by default, to the run active at each call."""
    return MetricsCallback(prefix=prefix, run_id=run_id)


def _check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ValueError(f"artifact name {name!r} must be letters, digits, '_', '.', '-'")
    return name


def plot_training_curves(history: Mapping[str, list[tuple[int, float]]], title: str = "") -> Figure:
    """One panel per metric (value against step), a log scale where all values are positive and
    span more than two decades (loss, learning rate). Agg canvas, no pyplot state."""
    names = [name for name, points in history.items() if points]
    if not names:
        raise ValueError("training history is empty: nothing to plot")
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        steps, values = zip(*sorted(history[name]), strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        if min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    return figure


def log_training_curves(
    history: Mapping[str, list[tuple[int, float]]], name: str, run_id: str | None = None
) -> str:
    """Plot ``history`` (metric -> ``[(step, value)]``, e.g. ``MetricsCallback.history``) and log
    the PNG as ``plots/<name>.png``; returns that artifact path."""
    figure = plot_training_curves(history, title=_check_name(name))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.png"
        figure.savefig(path, dpi=110)
        MlflowClient().log_artifact(_run_id(run_id), str(path), PLOTS_DIR)
    return f"{PLOTS_DIR}/{name}.png"


def _delta_version(path: str, version: int | None, storage_options: Mapping[str, str] | None = None) -> int:
    """The table version to record: ``version`` checked to exist, or the latest one.

    A storage error (``OSError``: the store unreachable) is raised as it came, to be retried; no table
    there is a ``FileNotFoundError``, and a version it cannot open (past the latest, negative, or its
    log cleaned up) a ``ValueError``: a step fails at once on either.
    """
    from deltalake import DeltaTable

    options = dict(storage_options or {}) or None
    try:
        table = DeltaTable(path, version=version, storage_options=options)
    except OSError:
        raise
    except Exception as err:  # delta-rs' DeltaError (TableNotFoundError, ...), or OverflowError for -1
        if not DeltaTable.is_deltatable(str(path), storage_options=options):
            raise FileNotFoundError(f"no Delta table at {path!r}") from err
        latest = DeltaTable(path, storage_options=options).version()
        raise ValueError(
            f"cannot open version {version} of Delta table {path!r} (latest {latest}): {err}"
        ) from err
    return int(table.version())


def log_delta_input(
    path: str | Path,
    version: int | None = None,
    context: str = "training",
    name: str | None = None,
    run_id: str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> MetaDataset:
    """Record a Delta table read by the run as an MLflow dataset input (``DeltaDatasetSource`` with
    path and version, context tag ``mlflow.data.context``, plus ``delta.path``/``delta.version``
    tags). ``version=None`` pins the table's current version (errors: :func:`_delta_version`).
    ``storage_options``: the lake's object-store options (``lake.storage_options``)."""
    location = str(path)
    scheme = urlparse(location).scheme
    if scheme == "" or len(scheme) == 1:  # a plain path (a drive letter too); a file:// URI stays as is
        location = str(Path(location).resolve())
    resolved = _delta_version(location, version, storage_options)
    source = DeltaDatasetSource(path=location, delta_table_version=resolved)
    digest = hashlib.sha256(f"{location}@{resolved}".encode()).hexdigest()[:8]
    dataset = MetaDataset(source, name=name or Path(location).name, digest=digest)
    tags = {DELTA_PATH_TAG: location, DELTA_VERSION_TAG: str(resolved)}
    _log_dataset(dataset, context, tags, _run_id(run_id))
    log.info("input %s: Delta %s @ v%d (%s)", dataset.name, location, resolved, context)
    return dataset


def _log_dataset(dataset: MetaDataset, context: str, tags: dict[str, str], run_id: str) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    input_tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    input_tags += [InputTag(key=key, value=value) for key, value in tags.items()]
    entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=input_tags)
    MlflowClient().log_inputs(run_id, datasets=[entity])


def flatten_config(config: Config | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted ``section.field -> value`` strings of a (nested) config; lists and empty mappings
    become JSON, ``None`` becomes ``"None"``."""
    data = config.model_dump(mode="json") if isinstance(config, Config) else dict(config)
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, list | Mapping):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def config_params(config: Config, prefix: str = "") -> dict[str, str]:
    """The MLflow params :func:`log_config` logs for ``config``: its flattened settings, less the
    values longer than MLflow's limit (those are only in the YAML)."""
    return {k: v for k, v in flatten_config(config, prefix).items() if len(v) <= MAX_PARAM_LENGTH}


def log_config(config: Config, name: str = "config", prefix: str = "", run_id: str | None = None) -> str:
    """Log ``config`` as flattened params (``prefix`` + dotted path; values longer than MLflow's
    limit are left to the YAML) and as ``config/<name>.yaml``; returns the artifact path."""
    run = _run_id(run_id)
    params = config_params(config, prefix)
    for key, value in flatten_config(config, prefix).items():
        if key not in params:
            log.warning("param %r is %d characters, only in the YAML artifact", key, len(value))
    mlflow.log_params(params, run_id=run)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{_check_name(name)}.yaml"
        config.to_yaml(path)
        MlflowClient().log_artifact(run, str(path), CONFIG_DIR)
    return f"{CONFIG_DIR}/{name}.yaml"

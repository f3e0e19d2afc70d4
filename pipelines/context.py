"""What a step runs with: the config, the logical date, and lazily the Spark lake, MLflow and alerts.

Nothing heavy happens on construction: the Spark session starts on first use of :attr:`lake`, so the
GPU training steps, which read gold tables with delta-rs (:meth:`read_table`), never start a JVM.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pipelines.config import PipelineConfig
from pipelines.notify import Alert, Notifier, notifier_from_config
from pipelines.settings import Settings

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from spark_jobs.lake import Lake

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """One step invocation: ``config`` for ``logical_date`` under ``settings``."""

    config: PipelineConfig
    logical_date: dt.date
    settings: Settings = field(default_factory=Settings.from_env)
    #: Step-specific overrides (``hisam run --param key=value``), e.g. ``tokenizer_version``.
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a plain date: Airflow hands a pendulum Date, which Spark's DateType refuses in row data
        day = self.logical_date
        self.logical_date = dt.date(day.year, day.month, day.day)

    @property
    def dataset(self) -> str:
        return self.config.dataset

    @property
    def run_key(self) -> str:
        """Identifies the logical run; steps tag what they register with it to stay idempotent."""
        return f"{self.dataset}/{self.logical_date.isoformat()}"

    def run_tags(self, step: str) -> dict[str, str]:
        """The tags of an MLflow run a step starts: the step, the logical run (how a rerun finds it)
        and the code that ran (:func:`pipelines.tracking.code_version`)."""
        from pipelines.tracking import CODE_VERSION_TAG, code_version

        return {"hisam.step": step, "hisam.run_key": self.run_key, CODE_VERSION_TAG: code_version()}

    def step_runs(self, step: str, **tags: str) -> list[Run]:
        """This logical run's MLflow runs of ``step`` carrying every ``tags`` value, newest first: how
        a rerun finds what an earlier attempt started."""
        wanted = {"hisam.step": step, "hisam.run_key": self.run_key, **tags}
        return self.mlflow.search_runs(
            [self.experiment_id],
            filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items()),
            order_by=["attributes.start_time DESC"],
        )

    @cached_property
    def lake_root(self) -> str:
        from spark_jobs.lake import resolve_root

        return resolve_root(self.config.lake.root or self.settings.lake_root)

    @cached_property
    def lake(self) -> Lake:
        from spark_jobs.lake import Lake
        from spark_jobs.session import get_spark

        cfg = self.config.lake
        return Lake(
            get_spark("hisam"), self.lake_root, backend=cfg.backend, storage_options=cfg.storage_options
        )

    def table_path(self, table: str) -> str:
        from spark_jobs.tables import get_table

        return f"{self.lake_root}/{get_table(table).relative_path}"

    def log_input(self, table: str, version: int, context: str, name: str) -> None:
        """Record ``table`` at ``version`` as an input of the active MLflow run (object-store options
        included)."""
        from pipelines.tracking import log_delta_input

        log_delta_input(
            self.table_path(table), version, context, name, storage_options=self.config.lake.storage_options
        )

    def table_version(self, table: str) -> int | None:
        """Latest version of a lake table read with delta-rs (no Spark); None when it does not exist."""
        found = self._delta_table(table)
        return None if found is None else int(found.version())

    def table_state(self, table: str) -> tuple[int, str] | None:
        """Latest version and id of a lake table (the id is its metadata's, new when the table is
        recreated and its versions restart), read from one snapshot; None when it does not exist."""
        found = self._delta_table(table)
        return None if found is None else (int(found.version()), str(found.metadata().id))

    def _delta_table(self, table: str) -> Any:
        from deltalake import DeltaTable

        path, options = self.table_path(table), self.config.lake.storage_options or None
        return (
            DeltaTable(path, storage_options=options)
            if DeltaTable.is_deltatable(path, storage_options=options)
            else None
        )

    def table_history(self, table: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` commits of a lake table, newest first, as :meth:`Lake.history` gives
        them (delta-rs, no Spark); empty when it does not exist."""
        from spark_jobs.lake import delta_history

        if self.table_version(table) is None:
            return []
        return delta_history(self.table_path(table), limit, self.config.lake.storage_options)

    def commits(
        self, table: str, record: Mapping[str, str], whole_history: bool = False
    ) -> list[dict[str, Any]]:
        """The commits of a lake table whose metadata holds every key and value of ``record``, newest
        first: those of the first of :func:`~spark_jobs.lake.history_pages` (the newest 200 commits,
        then ten times as many; the whole history at once with ``whole_history``) that holds any, so
        a busy table's markers stay found without reading its whole history every time."""
        from spark_jobs.lake import history_pages

        found: list[dict[str, Any]] = []
        for page in history_pages(lambda n: self.table_history(table, n), None if whole_history else 200):
            found += [e for e in page if all(e["metadata"].get(k) == v for k, v in record.items())]
            if found:
                break
        return found

    def read_table(
        self,
        table: str,
        partitions: dict[str, Any],
        columns: list[str] | None = None,
        version: int | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> tuple[pd.DataFrame, int]:
        """A partition of a lake table as pandas, with the Delta version read (delta-rs, no Spark).
        ``where``: ``column -> value`` (a list: any of them) that rows must match, applied in Arrow
        before pandas (one user's rows of a large table, not the whole partition). Columns declared
        since ``version`` was written read as null, as :meth:`spark_jobs.lake.Lake.read` does."""
        from deltalake import DeltaTable

        from spark_jobs.lake import stored_schema
        from spark_jobs.tables import get_table

        path = self.table_path(table)
        if not DeltaTable.is_deltatable(path, storage_options=self.config.lake.storage_options or None):
            raise FileNotFoundError(
                f"lake table {table} does not exist at {path}: run the upstream step first"
            )
        options = self.config.lake.storage_options or None
        try:
            delta = DeltaTable(path, version=version, storage_options=options)
        except Exception as err:  # delta-rs' DeltaError: a version past the latest one, or a lost log
            latest = DeltaTable(path, storage_options=options).version()
            if version is None or version <= latest:
                raise
            raise ValueError(f"lake table {table} has no version {version}; its latest is {latest}") from err
        spec, stored = get_table(table), stored_schema(delta)
        names = stored.fieldNames()
        undeclared = [c for c in columns or [] if c not in names and c not in spec.columns]
        if undeclared:
            raise ValueError(f"lake table {table} has no columns {undeclared}")
        missing = spec.added_since(stored, columns)
        read = None if columns is None else [c for c in columns if c in names]
        frame = delta.to_pandas(columns=read, filters=_matching(partitions, where or {}))
        if missing:  # declared since this version was written (spark_jobs.tables): null, as Lake.read
            frame = frame.assign(**dict.fromkeys(missing))
            frame = frame if columns is None else frame.loc[:, columns]
        return frame, int(delta.version())

    @cached_property
    def notifier(self) -> Notifier:
        cfg = self.config.notify
        if cfg.file_path is None:  # the embedded default keeps an outbox next to the other state
            cfg = cfg.model_copy(update={"file_path": str(self.settings.alerts_file)})
        return notifier_from_config(cfg)

    def alert(self, title: str, text: str, severity: str = "error", **details: Any) -> bool:
        """Send an alert, URIs :func:`~pipelines.settings.redacted` (an error's text may quote a
        password); whether it was delivered. A sink failure is logged, never raised over the step's
        own outcome."""
        from pipelines.settings import redacted

        title, text = redacted(title), redacted(text)
        details = {k: redacted(v) if isinstance(v, str) else v for k, v in details.items()}
        try:
            self.notifier.send(Alert(title, text, severity, "hisam", {"run_key": self.run_key, **details}))
        except Exception:
            log.exception("could not deliver alert %r (%s): %s", title, severity, text)  # still in the log
            return False
        return True

    @cached_property
    def experiment_id(self) -> str:
        """The pipeline's MLflow experiment, made active (created on first use)."""
        from pipelines.tracking import configure_mlflow

        return configure_mlflow(self.settings)

    @cached_property
    def mlflow(self) -> MlflowClient:
        """The client of the configured tracking store, with the experiment active and the configured
        registered models checked to be this dataset's (:func:`pipelines.registry.check_dataset`)."""
        from mlflow import MlflowClient

        from pipelines.registry import check_dataset

        _ = self.experiment_id
        client = MlflowClient()
        check_dataset(client, self.config.models.names, self.dataset)
        return client


def _matching(partitions: Mapping[str, Any], rows: Mapping[str, Any]) -> Any:
    """The Arrow filter of :meth:`StepContext.read_table` (None: every row). Text columns are compared
    as ``string``: files written from Spark's Arrow hold ``string_view``, which Arrow cannot compare
    with a ``string`` literal (partition values come from the log, typed as the table declares)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    terms = [ds.field(column) == value for column, value in partitions.items()]
    for column, value in rows.items():
        values = list(value) if isinstance(value, list | tuple | set) else [value]
        field = ds.field(column)
        terms.append(
            (field.cast(pa.string()) if values and isinstance(values[0], str) else field).isin(values)
        )
    return functools.reduce(operator.and_, terms) if terms else None

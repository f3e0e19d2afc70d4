"""Shared MLflow fixtures: one migrated SQLite template per run, global MLflow state isolated."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], str]:
    """``make(home) -> sqlite URI`` of a fresh store under ``home``. MLflow's schema migrations take
    seconds, so they run once on a template that each store copies."""
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def make(home: Path) -> str:
        shutil.copyfile(template, home / "mlflow.db")
        return f"sqlite:///{home / 'mlflow.db'}"

    return make


@contextmanager
def _isolated() -> Iterator[None]:
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: restoring the default URI (a ./mlflow.db)
    # that way would point every later test's Settings at the working directory; None unsets it
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def isolated_mlflow() -> Callable[[], AbstractContextManager[None]]:
    """A context manager undoing what configure_mlflow sets globally (URI, active experiment)."""
    return _isolated

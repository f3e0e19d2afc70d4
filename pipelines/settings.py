"""Where the pipeline keeps its state: the embedded default under one project-local folder.

Everything (Delta lake, MLflow SQLite store and artifacts, Airflow home, GX data docs, alerts,
checkpoints) lives under ``HISAM_HOME`` (default ``.hisam``). The production profile overrides
the URIs (Postgres for MLflow and Airflow metadata, object storage for the lake) by environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hisam_core.config import Config


class Settings(Config):
    """Resolved locations; build with :meth:`from_env`."""

    home: Path = Path(".hisam")
    mlflow_tracking_uri: str = ""
    experiment: str = "hisam"
    #: Where a new experiment keeps its artifacts (``s3://bucket/mlflow``); needed when the tracking
    #: URI is a database shared by many workers, empty for the embedded default or an MLflow server.
    artifact_location: str = ""

    @classmethod
    def from_env(cls) -> Settings:
        settings = cls(
            home=Path(os.environ.get("HISAM_HOME", ".hisam")).expanduser().resolve(),
            mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", ""),
            experiment=os.environ.get("HISAM_EXPERIMENT", "hisam"),
            artifact_location=os.environ.get("HISAM_ARTIFACT_ROOT", ""),
        )
        return settings.model_copy(update={"mlflow_tracking_uri": settings.tracking_uri})

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: ``mlflow_tracking_uri``, else the embedded default, SQLite under ``home``."""
        return self.mlflow_tracking_uri or f"sqlite:///{Path(self.home).resolve() / 'mlflow.db'}"

    def check_home(self) -> None:
        """Refuse a ``HISAM_HOME`` that is not a writable folder, nor can become one, naming it (the
        first write under it would fail later with a bare OS error)."""
        if self.home.exists() and not self.home.is_dir():
            raise ValueError(f"HISAM_HOME {self.home} is a file, not a folder")
        nearest = next(p for p in (self.home, *self.home.parents) if p.exists())
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            raise ValueError(f"HISAM_HOME {self.home}: {nearest} is not a writable folder")

    @property
    def lake_root(self) -> str:
        """``$HISAM_LAKE_ROOT`` as given (a local path or a URI such as ``s3://bucket/lake``: a
        ``Path`` would fold its ``//``), else ``<home>/lake``."""
        return os.environ.get("HISAM_LAKE_ROOT") or str(self.home / "lake")

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def data_docs(self) -> Path:
        return self.home / "gx_docs"

    @property
    def alerts_file(self) -> Path:
        return self.home / "alerts.jsonl"


#: Where the MovieLens-100K bundle lives beside a clone (read in place: its licence forbids copies).
DEFAULT_MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"


def movielens_dir() -> Path:
    """``$HISAM_MOVIELENS_DIR``, else :data:`DEFAULT_MOVIELENS`: what ``hisam demo`` and ``hisam
    evaluate`` read when given no path, wherever they are run from."""
    return Path(os.environ.get("HISAM_MOVIELENS_DIR") or DEFAULT_MOVIELENS).expanduser()


def masked(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ``***`` (in the user info, which ends at the
    last ``@``, and in a ``password=`` query parameter)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else rest
    return scheme + sep + re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)


def uri_secrets(uri: str) -> list[str]:
    """The passwords :func:`masked` hides in ``uri`` (its user info's, ``password=`` values), as written
    and percent-decoded: for a log masker that hides them wherever they appear (a traceback)."""
    _, sep, rest = uri.partition("://")
    userinfo = rest.rsplit("@", 1)[0] if sep and "@" in rest else ""
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []  # a raw '@' in the password too
    with contextlib.suppress(ValueError):  # an '@' in the path or query instead: the standard parse
        found.append(urlsplit(uri).password or "")  # (both, then: masking more is safe)
    found += re.findall(r"(?i)password=([^&]*)", rest)
    return sorted({v for s in found for v in (s, unquote(s)) if v})


def redacted(text: str) -> str:
    """``text`` with every URI in it :func:`masked`: error messages quote the URIs they failed on, as
    MLflow's REST client does with a tracking server's (``user:password@`` included)."""
    return re.sub(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", lambda m: masked(m.group(0)), text)


#: The levels ``--log-level`` takes (``hisam`` and ``hisam evaluate``).
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def flag(value: str | None, name: str) -> bool:
    """A true/false step param (``true``, ``1``, ``yes`` or ``false``, ``0``, ``no``; absent is false)."""
    if value is None or value.lower() in ("", "false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise ValueError(f"param {name} must be true or false, got {value!r}")


def positive_int(text: str, name: str) -> int:
    """``text`` as an integer of at least 1 (an option, a step param or an environment value)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def positive_int_arg(text: str) -> int:
    """:func:`positive_int` as an ``argparse`` type (the CLI's and the benchmarks' options)."""
    try:
        return positive_int(text, "the value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

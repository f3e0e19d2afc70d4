"""The registry of pipeline steps and :func:`run_step`, the one way to run them.

A step is ``fn(ctx: StepContext) -> dict`` (a JSON-able summary of what it wrote). The CLI
(``hisam run <step> --config configs/pipeline.yaml --logical-date YYYY-MM-DD``) and the Airflow tasks
both call :func:`run_step`; modules are imported lazily so ``hisam --help`` and DAG parsing stay fast.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.settings import flag, positive_int

log = logging.getLogger(__name__)

#: Where the pipeline config is looked for when none is given.
CONFIG_ENV = "HISAM_PIPELINE_CONFIG"
#: Step params that are true/false (:func:`pipelines.settings.flag`), checked before the step runs.
FLAGS = frozenset({"force", "skip_without_tokenizer", "include_seen"})
#: torch intra-op threads of a step (default 1: the models are small; raise it on large CPU nodes).
THREADS_ENV = "HISAM_TORCH_THREADS"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml"


class StepSkipped(Exception):
    """A step with nothing to do yet, because an upstream output is still on its way (fine-tuning
    before pre-training on a newly activated tokenizer). Not an error: Airflow marks the task and
    its downstream skipped, without an alert; the CLI reports it and exits 0."""


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    function: str
    help: str
    #: The ``--param`` keys the step reads; any other is refused (a misspelt one would be ignored).
    params: tuple[str, ...] = ()
    #: False for a step that sends no alert (it reads only): it runs without the alert sinks' settings.
    alerts: bool = True

    def resolve(self) -> Callable[[Any], dict[str, Any]]:
        return getattr(importlib.import_module(self.module), self.function)


STEPS: dict[str, Step] = {
    s.name: s
    for s in [
        Step("source-ready", "pipelines.ingest", "source_ready", "whether the day's source has landed: a generic source's dated drop and its ready_marker (the features DAG waits on it)"),
        Step("ingest", "pipelines.ingest", "ingest", "import the source into bronze (quarantining bad records) and merge into silver"),
        Step("validate", "pipelines.ingest", "validate", "GX gate on silver interactions; quarantine rows, fail + alert on a bad batch"),
        Step("embed", "pipelines.features", "embed", "item documents, user profiles and text/image/behaviour embeddings"),
        Step("embeddings-ready", "pipelines.tokenizer", "embeddings_ready", "whether item embeddings of every configured encoder exist (the tokenizer DAG waits on it)"),
        Step("train-tokenizer", "pipelines.tokenizer", "train_tokenizer", "train DST on a pinned embeddings snapshot, check codebook health, register", ("tokenizer_version", "force")),
        Step("tokenize-catalogue", "pipelines.tokenizer", "tokenize_catalogue", "write every item's semantic IDs for the run's tokenizer version", ("tokenizer_version",)),
        Step("tokenize-new-items", "pipelines.tokenizer", "tokenize_new_items", "daily: semantic IDs of @current, and of @champion's and @previous's older tokenizers, for items that have none yet (existing IDs never change)", ("skip_without_tokenizer",)),
        Step("build-sequences", "pipelines.sequences", "build_sequences", "gold.samples and gold.user_sequences for a tokenizer version", ("tokenizer_version", "skip_without_tokenizer")),
        Step("activate-tokenizer", "pipelines.tokenizer", "activate_tokenizer", "point hisam-tokenizer@current at the run's version", ("tokenizer_version", "force")),
        Step("samples-ready", "pipelines.sequences", "samples_ready", "whether the current tokenizer's samples are built for the day (the training DAGs wait on it)", ("tokenizer_version", "skip_without_tokenizer")),
        Step("validate-samples", "pipelines.ingest", "validate_samples", "GX gate on a tokenizer version's samples (@current's, or the one samples-ready found ready); fail + alert on a bad batch", ("tokenizer_version",)),
        Step("pretrain", "pipelines.ranker", "pretrain", "HMAT next-token pre-training on the current tokenizer; register", ("tokenizer_version", "samples_version", "force")),
        Step("finetune", "pipelines.ranker", "finetune", "HMAT SFT from the newest pre-trained model", ("tokenizer_version", "samples_version", "force")),
        Step("evaluate", "pipelines.ranker", "evaluate", "candidate and @champion on one frozen test snapshot", ("tokenizer_version", "samples_version")),
        Step("register", "pipelines.promotion", "register", "register the evaluated candidate as a pyfunc ranker"),
        Step("promote", "pipelines.promotion", "promote", "promotion gate: @champion, or rejected with reasons + alert"),
        Step("refresh-champion", "pipelines.promotion", "refresh_champion", "daily: @champion re-registered with the semantic IDs its tokenizer version gained (same weights)"),
        Step("rollback", "pipelines.promotion", "rollback", "restore @previous as @champion, then refresh it"),
        Step("maintain-lake", "pipelines.maintenance", "maintain_lake", "weekly: in every lake table, compact small files and delete the files only versions older than lake.retention_days read (contents unchanged)"),
        Step("recommend", "pipelines.recommend", "recommend", "one user's top-K items from @champion (reads the lake and the registry, writes no table or model)", ("user", "top_k", "alias", "include_seen"), alerts=False),
    ]
}  # fmt: skip


def config_path(path: str | Path | None = None) -> Path | None:
    """The config file to use: ``path``, else ``$HISAM_PIPELINE_CONFIG``, else configs/pipeline.yaml."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if chosen:
        if not Path(chosen).is_file():
            problem = "is not a file" if Path(chosen).exists() else "does not exist"
            origin = "" if path else f" (from ${CONFIG_ENV})"
            raise FileNotFoundError(f"pipeline config {chosen}{origin} {problem}")
        return Path(chosen)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
    """The validated :class:`~pipelines.config.PipelineConfig` (unknown keys are errors)."""
    from pydantic import ValidationError

    from hisam_core.config import describe
    from pipelines.config import PipelineConfig

    found = config_path(path)
    if found is None:
        log.warning(
            "no pipeline config (--config, $%s, %s): the built-in defaults, at the paper's sizes "
            "(a non-editable install has no configs/ beside the code)",
            CONFIG_ENV,
            DEFAULT_CONFIG,
        )
    try:  # name the file: it may have come from $HISAM_PIPELINE_CONFIG
        data = PipelineConfig.from_yaml(found).model_dump() if found else {}
        return PipelineConfig.model_validate(_deep_merge(data, dict(overrides or {})))
    except ValidationError as err:  # an override (the demo's dataset and source)
        raise ValueError(f"pipeline config {found or '(built-in defaults)'}: {describe(err)}") from None
    except ValueError as err:  # the file's own error names it
        raise ValueError(f"pipeline config {err}") from None


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


def check_step(name: str, params: Mapping[str, str] | None = None) -> None:
    """Refuse an unknown step, a param it does not take and a malformed one, before the config is
    read or any work starts (a typo'd ``force=ture`` fails at once)."""
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    unknown = sorted(set(params or {}) - set(STEPS[name].params))
    if unknown:
        takes = ", ".join(STEPS[name].params) or "none"
        raise ValueError(f"step {name} has no param {', '.join(unknown)} (its params: {takes})")
    from spark_jobs.tables import NAME_PATTERN

    version = (params or {}).get("tokenizer_version")
    if version is not None and not re.fullmatch(NAME_PATTERN, version):  # a user id (recommend) goes
        raise ValueError(  # only into Arrow filters: any text
            f"step {name}: param tokenizer_version must be letters, digits, '.', '_' or '-', starting with "
            f"a letter or digit, got {version!r}"
        )
    for key in FLAGS & set(params or {}):
        try:
            flag((params or {})[key], key)
        except ValueError as err:
            raise ValueError(f"step {name}: {err}") from None


def run_step(
    name: str,
    logical_date: dt.date | str,
    config: Any = None,
    params: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run step ``name`` for ``logical_date`` with ``config`` (a PipelineConfig, a YAML path or None)."""
    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext

    check_step(name, params)
    if not isinstance(config, PipelineConfig):
        config = load_config(config)
    day = dt.date.fromisoformat(logical_date) if isinstance(logical_date, str) else logical_date
    ctx = StepContext(config, day, params=dict(params or {}))
    if STEPS[name].alerts:
        _ = ctx.notifier  # a misconfigured alert sink fails the step now, not silently at its first alert
    apply_torch_threads()
    start = time.perf_counter()
    log.info("step %s for %s (%s) starts", name, day, config.dataset)
    summary = STEPS[name].resolve()(ctx)
    log.info("step %s done in %.1fs", name, time.perf_counter() - start)
    return json.loads(json.dumps(summary, default=str))  # JSON-able for XCom and the CLI


def step_errors() -> tuple[type[Exception], ...]:
    """What a step raises for bad input or state (failed quality gate, bad config or parameter,
    missing upstream table): retrying cannot help, so callers fail at once with the message."""
    from spark_jobs.quality.report import DataQualityError

    return (DataQualityError, ValueError, KeyError, FileNotFoundError)


def error_text(err: BaseException) -> str:
    """A step error as the on-call reads it: a ``KeyError``'s own text is only the quoted key."""
    return f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else str(err)


def apply_torch_threads() -> None:
    """Use ``$HISAM_TORCH_THREADS`` (default 1) torch intra-op threads, in the CLI and in Airflow tasks."""
    threads = positive_int(os.environ.get(THREADS_ENV, "1"), f"${THREADS_ENV}")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:  # torch reads it on import; importing torch here would slow steps that never use it
        os.environ["OMP_NUM_THREADS"] = str(threads)

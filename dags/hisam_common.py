"""What the Hi-SAM DAGs share: default arguments, the failure alert, and the step task factory.

Every task is a thin TaskFlow wrapper around :func:`pipelines.steps.run_step` for the run's logical
date; nothing from ``pipelines`` (torch, Spark, MLflow) is imported until a task runs, so parsing
these files costs only ``airflow.sdk``. Data and configuration errors (a failed quality gate, an
unhealthy tokenizer, a missing upstream output) fail the task at once (``AirflowFailException``, no
retries); a step waiting for an upstream output that is on its way skips (``AirflowSkipException``,
no alert); anything else is retried with exponential back-off. Every failed step alerts through the
pipeline's notifier (log, webhook, file; ``configs/pipeline.yaml`` ``notify`` and ``HISAM_NOTIFY_*``);
the ``watcher``, which only marks a run failed, does not.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from airflow.sdk import Asset, AssetAlias, PokeReturnValue, task

log = logging.getLogger(__name__)

#: The lake tables and registry states the DAGs produce and consume (data-aware scheduling).
ITEM_EMBEDDINGS = Asset(name="gold.item_embeddings", uri="delta://hisam/gold/item_embeddings")
SAMPLES = Asset(name="gold.samples", uri="delta://hisam/gold/samples")
TOKENIZER = Asset(name="hisam-tokenizer@current", uri="mlflow://hisam/models/hisam-tokenizer/current")
PRETRAINED = Asset(name="hisam-pretrained", uri="mlflow://hisam/models/hisam-pretrained")
RANKER = Asset(name="hisam-ranker@champion", uri="mlflow://hisam/models/hisam-ranker/champion")

#: ``validate-samples`` gates the tokenizer version whose samples ``samples-ready`` found ready (a
#: tokenizer activated in between has its own runs).
READY_SAMPLES = {"tokenizer_version": ("samples_ready", "tokenizer_version")}
#: Training reads the ``gold.samples`` version ``validate-samples`` passed, not a later build, and
#: skips when ``@current`` has moved away from the tokenizer version it gated.
VALIDATED_SAMPLES = {
    "samples_version": ("validate_samples", "samples_version"),
    "tokenizer_version": ("validate_samples", "tokenizer_version"),
}
#: Step params of the daily and weekly DAGs: before the first tokenizer, skip instead of failing.
SKIP_WITHOUT_TOKENIZER = {"skip_without_tokenizer": "true"}


def _seconds(name: str, default: float) -> dt.timedelta:
    """``$name`` in seconds (a positive number), else ``default``; a bad value names the variable."""
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{name} must be a positive number of seconds, got {text!r}")
    return dt.timedelta(seconds=seconds)


#: How often the sensors poke and how long they wait (``HISAM_SENSOR_POKE_SECONDS``,
#: ``HISAM_SENSOR_TIMEOUT_SECONDS``; the tests shorten both, so a missing upstream fails, not hangs).
SENSOR_POKE = _seconds("HISAM_SENSOR_POKE_SECONDS", 600)
SENSOR_TIMEOUT = _seconds("HISAM_SENSOR_TIMEOUT_SECONDS", 72000)
#: The longest one poke may run (a check takes seconds): the sensor's ``timeout`` is only looked at
#: between pokes, so a poke hung on a filesystem listing would otherwise hold its worker slot for good.
#: A poke past it fails that try, which is retried; the wait's own deadline is unchanged.
SENSOR_POKE_LIMIT = dt.timedelta(minutes=15)
#: The longest a step may run before Airflow fails it (and retries): a hung training would otherwise
#: hold the one ``gpu`` pool slot, stalling every GPU task of every DAG. Both stay under the Celery
#: ``visibility_timeout`` (24 h, infra/airflow/airflow.cfg.production), past which a task is re-sent.
TASK_TIMEOUT = _seconds("HISAM_TASK_TIMEOUT_SECONDS", 6 * 3600)
GPU_TASK_TIMEOUT = _seconds("HISAM_GPU_TASK_TIMEOUT_SECONDS", 16 * 3600)
#: The retry delay (``HISAM_RETRY_DELAY_SECONDS``): Airflow's exponential back-off waits between one
#: and two delays before the first retry, between two and four before the second (``max_retry_delay``
#: caps a wait). The tests shorten it, so a step failing with an unexpected error fails its test in
#: seconds, not minutes.
RETRY_DELAY = _seconds("HISAM_RETRY_DELAY_SECONDS", 120)

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TAGS = ["hisam"]
#: GPU work: the ``gpu`` pool (infra/airflow/pools.json) and, on a cluster, its queue or pod template.
GPU_POOL = "gpu"
GPU_QUEUE = os.environ.get("HISAM_GPU_QUEUE", "gpu")
GPU_POD_TEMPLATE = os.environ.get("HISAM_GPU_POD_TEMPLATE", "/opt/hisam/infra/k8s/gpu-pod-template.yaml")


#: Extra of an asset event that hands its run's day on (:func:`step_task`'s ``carry_day``).
CARRIED_DAY = "logical_date"


def logical_day(context: dict[str, Any]) -> dt.date:
    """The run's logical date. An asset-triggered run has none: it takes the newest day its triggering
    events carry (``hisam_pretrain`` pre-trains for the day of the tokenizer run that activated
    ``@current``, whose samples that run built, even when it activated after midnight), else the day
    it was due."""
    if (when := context.get("logical_date")) is not None:
        return when.date()
    events = (context.get("triggering_asset_events") or {}).values()
    carried = [e.extra[CARRIED_DAY] for group in events for e in group if CARRIED_DAY in (e.extra or {})]
    return dt.date.fromisoformat(max(carried)) if carried else context["dag_run"].run_after.date()


def alert_on_failure(context: dict[str, Any]) -> None:
    """``on_failure_callback``: one error alert naming the DAG, task, date and exception, unless the
    step alerted itself before raising (a failed quality gate or codebook health check)."""
    from pipelines.context import StepContext
    from pipelines.notify import was_alerted
    from pipelines.steps import load_config

    ti = context["ti"]
    error = context.get("exception")
    if was_alerted(error):
        log.info("%s.%s failed after its own alert: no second one", ti.dag_id, ti.task_id)
        return
    try:
        config = load_config()
    except Exception:  # a broken config must not silence the alert about it
        from pipelines.config import PipelineConfig

        log.exception("config unreadable: alerting through the defaults and HISAM_NOTIFY_*")
        config = PipelineConfig()
    StepContext(config, logical_day(context)).alert(
        f"{ti.dag_id}.{ti.task_id} failed",
        f"{type(error).__name__}: {error}" if error else "task failed",
        "error",
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        try_number=ti.try_number,
    )


DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": RETRY_DELAY,
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=30),
    "on_failure_callback": alert_on_failure,
}


#: What every Hi-SAM DAG shares: ``@dag(dag_id=..., schedule=..., doc_md=__doc__, **DAG_DEFAULTS)``.
DAG_DEFAULTS: dict[str, Any] = {
    "start_date": START,
    "catchup": False,
    "max_active_runs": 1,
    "default_args": DEFAULT_ARGS,
    "tags": TAGS,
}


def execute(step: str, context: dict[str, Any], params: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``step`` for the run's day; ``{ds_nodash}`` in a param is the day as YYYYMMDD."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
    from airflow.sdk.log import mask_secret

    from pipelines.notify import ENV_WEBHOOK_URL
    from pipelines.settings import Settings, redacted, uri_secrets
    from pipelines.steps import StepSkipped, check_step, error_text, load_config, run_step, step_errors

    # Airflow masks what it is told about in task logs (tracebacks too): these come from the
    # environment and the config, not from Connections, so it is told here, before the step logs
    for secret in uri_secrets(Settings.from_env().mlflow_tracking_uri):
        mask_secret(secret)
    if webhook := os.environ.get(ENV_WEBHOOK_URL):
        mask_secret(webhook)
    day = logical_day(context)
    resolved = {k: v.format(ds_nodash=day.strftime("%Y%m%d")) for k, v in (params or {}).items()}
    try:
        check_step(step, resolved)  # a bad param is reported before a bad config, as run_step does
        config = load_config()
        if config.notify.webhook_url:  # a secret wherever it is given
            mask_secret(config.notify.webhook_url)
        return run_step(step, day, config, params=resolved)
    except step_errors() as err:
        raise AirflowFailException(f"{step}: {redacted(error_text(err))}") from err
    except StepSkipped as skipped:
        raise AirflowSkipException(f"{step}: {skipped}") from skipped


def step_task(
    step: str,
    *,
    gpu: bool = False,
    params: dict[str, str] | None = None,
    outlets: list[Asset] | None = None,
    inlets: list[Asset] | None = None,
    trigger_rule: str = "all_success",
    upstream_params: dict[str, tuple[str, str]] | None = None,
    emit_if: str | None = None,
    carry_day: bool = False,
) -> Callable[[], Any]:
    """A TaskFlow task running one pipeline step; ``gpu`` tasks take a ``gpu`` pool slot. Each has an
    ``execution_timeout`` (:data:`TASK_TIMEOUT`, :data:`GPU_TASK_TIMEOUT`).
    ``upstream_params``: ``{param: (task_id, key)}``, params taken from an upstream task's result.
    ``emit_if``: a key of the step's result; ``outlets`` then get an asset event only when it is true
    (through an :class:`AssetAlias` per outlet), not on every success: a rejected candidate leaves
    ``@champion`` where it was, and DAGs scheduled on it should not run.
    ``carry_day``: the ``outlets``' events carry the run's day (extra :data:`CARRIED_DAY`), which the
    runs they trigger take as theirs (:func:`logical_day`)."""
    if carry_day and emit_if:
        raise ValueError(f"{step}: carry_day sets its outlets' own events, emit_if emits through aliases")
    aliases = {AssetAlias(name=f"{a.name} (when {emit_if})"): a for a in outlets or []} if emit_if else {}
    placement: dict[str, Any] = (
        {
            "pool": GPU_POOL,
            "queue": GPU_QUEUE,
            "executor_config": {"pod_template_file": GPU_POD_TEMPLATE},
            "execution_timeout": GPU_TASK_TIMEOUT,
        }
        if gpu
        else {"execution_timeout": TASK_TIMEOUT}
    )

    @task(
        task_id=step.replace("-", "_"),
        outlets=list(aliases) or outlets or [],
        inlets=inlets or [],
        trigger_rule=trigger_rule,
        **placement,
    )
    def run(**context: Any) -> dict[str, Any]:
        handed = {
            k: str(context["ti"].xcom_pull(task_ids=t)[key])
            for k, (t, key) in (upstream_params or {}).items()
        }
        result = execute(step, context, {**(params or {}), **handed})
        if carry_day:
            day = logical_day(context).isoformat()
            for asset in outlets or []:
                context["outlet_events"][asset].extra[CARRIED_DAY] = day
        if emit_if and result.get(emit_if):
            for alias, asset in aliases.items():
                context["outlet_events"][alias].add(asset)
        return result

    return run


def watcher(*upstream: Any) -> Any:
    """The watcher pattern of Airflow's best practices: a leaf that fails the run when any task of
    ``upstream`` (pass every task) failed. A DAG whose last task also runs after a failure
    (``all_done``) needs it: Airflow judges a run by its leaves, so the run would otherwise succeed.
    It does not retry or alert; the failed task already did."""

    @task(task_id="watcher", trigger_rule="one_failed", retries=0, on_failure_callback=None)
    def watch() -> None:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("an upstream task failed")

    leaf = watch()
    list(upstream) >> leaf
    return leaf


def sensor_task(
    step: str,
    *,
    params: dict[str, str] | None = None,
    poke_interval: dt.timedelta = SENSOR_POKE,
    timeout: dt.timedelta = SENSOR_TIMEOUT,
) -> Callable[[], Any]:
    """A TaskFlow sensor on a step returning ``{"ready": bool, ...}``: it pokes every
    ``poke_interval`` (releasing its worker slot in between; each poke within
    :data:`SENSOR_POKE_LIMIT`) and fails, with the alert, after ``timeout``."""

    @task.sensor(
        task_id=step.replace("-", "_"),
        poke_interval=poke_interval.total_seconds(),
        timeout=timeout.total_seconds(),
        mode="reschedule",
        execution_timeout=SENSOR_POKE_LIMIT,
    )
    def wait(**context: Any) -> PokeReturnValue:
        result = execute(step, context, params)
        return PokeReturnValue(is_done=bool(result["ready"]), xcom_value=result)

    return wait

"""``hisam_finetune`` (daily, App. A.4): wait for the day's samples, gate them, SFT from the newest
PT, evaluate against ``@champion`` on the same gated snapshot, register, promote (or reject with
reasons and an alert).

Runs every day at 04:00 and also as soon as a new PT is registered (``hisam-pretrained``), so a
new tokenizer reaches the champion the day it is pre-trained. ``samples-ready`` waits (up to 20 hours,
then fails and alerts) until ``hisam_features`` has built the day's samples; before the first
tokenizer, and between a tokenizer's activation and its first PT, there is nothing to fine-tune: the
run skips, without an alert. So does a second run of the day from a PT already fine-tuned and judged
that day (the Sunday PT lands before the 04:00 run starts, and its asset triggers the DAG again).
A failed data-quality gate stops the run before any training, and alerts.

Last, also when fine-tuning skipped or failed, ``refresh-champion`` re-registers ``@champion`` (same
weights) with the semantic IDs of items that arrived since it was registered, so neither a rejected
candidate nor a failed day leaves new items unservable; a ``watcher`` still fails the run when any
task failed. ``promote`` and ``refresh-champion`` emit the ``hisam-ranker@champion`` asset event only
when ``@champion`` moved: not for a rejected candidate, nor when there was nothing to refresh.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag
from hisam_common import (
    DAG_DEFAULTS,
    PRETRAINED,
    RANKER,
    READY_SAMPLES,
    SAMPLES,
    SKIP_WITHOUT_TOKENIZER,
    VALIDATED_SAMPLES,
    sensor_task,
    step_task,
    watcher,
)


@dag(
    dag_id="hisam_finetune",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 4 * * *", timezone="UTC"), assets=PRETRAINED
    ),
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_finetune() -> None:
    ready = sensor_task("samples-ready", params=SKIP_WITHOUT_TOKENIZER)()
    gate = step_task("validate-samples", inlets=[SAMPLES], upstream_params=READY_SAMPLES)()
    finetune = step_task("finetune", gpu=True, inlets=[PRETRAINED], upstream_params=VALIDATED_SAMPLES)()
    evaluate = step_task("evaluate", gpu=True, upstream_params=VALIDATED_SAMPLES)()
    register = step_task("register")()
    # the champion asset only when @champion moved (pipelines.promotion.CHAMPION_MOVED)
    promote = step_task("promote", outlets=[RANKER], emit_if="champion_moved")()
    refresh = step_task(
        "refresh-champion", outlets=[RANKER], emit_if="champion_moved", trigger_rule="all_done"
    )()
    ready >> gate >> finetune >> evaluate >> register >> promote >> refresh
    watcher(ready, gate, finetune, evaluate, register, promote, refresh)


hisam_finetune()

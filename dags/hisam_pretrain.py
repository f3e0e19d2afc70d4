"""``hisam_pretrain`` (weekly, App. A.4): HMAT next-token pre-training on the current tokenizer.

Runs every Sunday and also as soon as a new tokenizer is activated (``hisam-tokenizer@current``), so
pre-training never lags a re-tokenized catalogue by a week. Like fine-tuning, it waits for the day's
samples and trains only on rows the samples gate passed; before the first tokenizer it skips.
Registers ``hisam-pretrained``.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag
from hisam_common import (
    DAG_DEFAULTS,
    PRETRAINED,
    READY_SAMPLES,
    SAMPLES,
    SKIP_WITHOUT_TOKENIZER,
    TOKENIZER,
    VALIDATED_SAMPLES,
    sensor_task,
    step_task,
)


@dag(
    dag_id="hisam_pretrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"), assets=TOKENIZER
    ),
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_pretrain() -> None:
    ready = sensor_task("samples-ready", params=SKIP_WITHOUT_TOKENIZER)()
    gate = step_task("validate-samples", inlets=[SAMPLES], upstream_params=READY_SAMPLES)()
    pretrain = step_task(
        "pretrain",
        gpu=True,
        inlets=[SAMPLES, TOKENIZER],
        outlets=[PRETRAINED],
        upstream_params=VALIDATED_SAMPLES,
    )()
    ready >> gate >> pretrain


hisam_pretrain()

"""``hisam_tokenizer`` (monthly, App. A.4): DST on a pinned embeddings snapshot, health check,
register, re-tokenize the catalogue into a new semantic-ID version, build its samples, activate.

It first waits (up to 20 hours, then fails and alerts) until item embeddings of the configured
encoders exist, so the first run of a fresh deployment can start before the first ``hisam_features``.

The new version is ``dst-<YYYYMMDD of the logical date>``; ``@current`` moves only after its samples
exist and pass the samples gate (a version no samples gate passed never becomes current, so
pre-training and fine-tuning stay on the current one). The move triggers ``hisam_pretrain`` through the
``hisam-tokenizer@current`` asset, whose event carries this run's day: pre-training waits for the
samples of that day, which this run built, even when the activation comes after midnight.
"""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, dag
from hisam_common import DAG_DEFAULTS, ITEM_EMBEDDINGS, SAMPLES, TOKENIZER, sensor_task, step_task

VERSION = {"tokenizer_version": "dst-{ds_nodash}"}


@dag(
    dag_id="hisam_tokenizer",
    # named, not "@monthly": that preset's meaning follows [scheduler] create_cron_data_intervals
    schedule=CronTriggerTimetable("0 0 1 * *", timezone="UTC"),
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_tokenizer() -> None:
    ready = sensor_task("embeddings-ready")()
    train = step_task("train-tokenizer", gpu=True, params=VERSION, inlets=[ITEM_EMBEDDINGS])()
    tokenize = step_task("tokenize-catalogue", params=VERSION)()
    sequences = step_task("build-sequences", params=VERSION, outlets=[SAMPLES])()
    check = step_task("validate-samples", params=VERSION)()
    activate = step_task("activate-tokenizer", params=VERSION, outlets=[TOKENIZER], carry_day=True)()
    ready >> train >> tokenize >> sequences >> check >> activate


hisam_tokenizer()

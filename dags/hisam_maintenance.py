"""``hisam_maintenance`` (weekly, Saturday 12:00 UTC): ``maintain-lake``.

Compacts the small files the daily runs leave in every lake table and deletes the files only
versions older than ``lake.retention_days`` read (Delta OPTIMIZE and VACUUM). No other DAG starts
then (features 00:00 and fine-tuning 04:00 daily, pre-training Sunday 03:00), but a run waiting on
its sensor, or one an asset started, may still be writing: Delta then refuses the later commit of
the two (a concurrent transaction deleted data it read), and that task is retried.
"""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, dag
from hisam_common import DAG_DEFAULTS, step_task


@dag(
    dag_id="hisam_maintenance",
    schedule=CronTriggerTimetable("0 12 * * 6", timezone="UTC"),
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_maintenance() -> None:
    step_task("maintain-lake")()


hisam_maintenance()

"""``hisam_finetune`` (daily, App. A.4): gate the samples, SFT from the newest PT, evaluate against
``@champion`` on a frozen test snapshot, register, promote (or reject with reasons and an alert).

A failed data-quality gate stops the run before any training, and alerts.
"""

from __future__ import annotations

from airflow.sdk import dag
from hisam_common import DAG_DEFAULTS, PRETRAINED, RANKER, SAMPLES, step_task


@dag(
    dag_id="hisam_finetune",
    schedule="0 4 * * *",
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_finetune() -> None:
    gate = step_task("validate-samples", inlets=[SAMPLES])()
    finetune = step_task("finetune", gpu=True, inlets=[PRETRAINED])()
    evaluate = step_task("evaluate", gpu=True)()
    register = step_task("register")()
    promote = step_task("promote", outlets=[RANKER])()
    gate >> finetune >> evaluate >> register >> promote


hisam_finetune()

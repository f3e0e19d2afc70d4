"""``hisam_features`` (daily): source-ready -> ingest -> validate -> embed -> tokenize-new-items ->
build-sequences (Sec. 3.2.1, 3.3, 4.1).

Waits for the day's drop of a generic source (its dated paths and ``ready_marker``; up to the
sensor's timeout, then fails with an alert), imports it into bronze/silver, gates it with Great
Expectations, refreshes item documents and embeddings (only new or changed items are encoded), gives
items that arrived since the monthly catalogue run their semantic IDs under the current tokenizer,
and rebuilds the samples of that version (the last two are skipped before the first tokenizer
exists: the task state says so, and no ``gold.samples`` asset event is emitted).

``build-sequences`` also runs when ``tokenize-new-items`` failed (it alerted): the day's samples do not
need the new items' IDs (their interactions wait in quarantine as ``unknown_item``), and without them
fine-tuning and pre-training would wait all day for samples that never come. A ``watcher`` then
fails the run.
"""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, dag
from hisam_common import (
    DAG_DEFAULTS,
    ITEM_EMBEDDINGS,
    SAMPLES,
    SKIP_WITHOUT_TOKENIZER,
    sensor_task,
    step_task,
    watcher,
)


@dag(
    dag_id="hisam_features",
    # named, not "@daily": that preset's meaning follows [scheduler] create_cron_data_intervals
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC"),
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_features() -> None:
    ready = sensor_task("source-ready")()
    ingest = step_task("ingest")()
    validate = step_task("validate")()
    embed = step_task("embed", outlets=[ITEM_EMBEDDINGS])()
    new_items = step_task("tokenize-new-items", params=SKIP_WITHOUT_TOKENIZER)()
    sequences = step_task(
        "build-sequences",
        params=SKIP_WITHOUT_TOKENIZER,
        outlets=[SAMPLES],
        trigger_rule="all_done_min_one_success",  # after embed, whether or not new items got IDs
    )()
    ready >> ingest >> validate >> embed >> new_items >> sequences
    embed >> sequences
    watcher(ready, ingest, validate, embed, new_items, sequences)


hisam_features()

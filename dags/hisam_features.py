"""``hisam_features`` (daily): ingest -> validate -> embed -> build-sequences (Sec. 3.2.1, 3.3, 4.1).

Imports the day's source into bronze/silver, gates it with Great Expectations, refreshes item
documents and embeddings (only new or changed items are encoded), and rebuilds the samples of the
current tokenizer version (skipped, with a warning, before the first tokenizer exists).
"""

from __future__ import annotations

from airflow.sdk import dag
from hisam_common import DAG_DEFAULTS, ITEM_EMBEDDINGS, SAMPLES, step_task


@dag(
    dag_id="hisam_features",
    schedule="@daily",
    doc_md=__doc__,
    **DAG_DEFAULTS,
)
def hisam_features() -> None:
    ingest = step_task("ingest")()
    validate = step_task("validate")()
    embed = step_task("embed", outlets=[ITEM_EMBEDDINGS])()
    sequences = step_task("build-sequences", params={"skip_without_tokenizer": "true"}, outlets=[SAMPLES])()
    ingest >> validate >> embed >> sequences


hisam_features()

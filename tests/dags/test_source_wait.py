"""The daily DAG waits for a generic source's drop (``source_ready``): a drop that never lands fails
the wait with an alert and nothing is imported; once the drop and its marker are there, the same
date's run imports it. Real ``dag.test()`` runs, local Spark and Delta."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest

pytestmark = pytest.mark.slow

DAY = dt.date(2026, 10, 1)  # a date no other DAG test runs


def test_the_features_dag_waits_for_the_days_drop(airflow_db, tmp_path, write_config, pipeline_home) -> None:
    import hisam_lifecycle
    from deltalake import DeltaTable

    from spark_jobs.importers.synthetic import SyntheticConfig, generate

    drop = tmp_path / "drops" / DAY.isoformat()
    dated = tmp_path / "drops" / "{logical_date}"
    generic = {
        "dataset": "drops",
        "interactions": str(dated / "interactions"),  # a directory of Parquet parts
        "items": str(dated / "items.parquet"),
        "users": str(dated / "users.parquet"),
        "ready_marker": "_SUCCESS",
    }
    config = write_config(
        tmp_path / "pipeline.yaml",
        top={"dataset": "drops", "source": {"kind": "generic", "generic": generic}},
    )
    with pipeline_home(tmp_path, config):
        waited = hisam_lifecycle.run_dag("hisam_features", DAY)  # the sensor times out (6 s in the tests)
        assert waited.state == "failed" and waited.tasks.pop("source_ready") == "failed", waited.tasks
        assert waited.tasks.pop("watcher") == "failed"  # it fails the run, without a second alert
        assert set(waited.tasks.values()) == {"upstream_failed"}
        alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
        assert [a["title"] for a in alerts] == ["hisam_features.source_ready failed"]
        assert not (tmp_path / "lake").exists()  # nothing was read or written

        tiny = SyntheticConfig(
            num_users=40, num_items=60, num_events=800, num_clusters=4, seed=3, image_size=0
        )
        produced = generate(tiny, tmp_path / "producer")
        shutil.copytree(produced.out_dir, drop)  # the drop lands...
        (drop / "interactions" / "_SUCCESS").touch()
        (drop / "_SUCCESS").touch()  # ...and the producer marks it complete
        landed = hisam_lifecycle.run_dag("hisam_features", DAY)
        assert landed.state == "success", landed.tasks
        assert landed.tasks["source_ready"] == landed.tasks["ingest"] == landed.tasks["embed"] == "success"
        bronze = DeltaTable(str(tmp_path / "lake" / "bronze" / "interactions")).to_pandas()
        assert len(bronze) == produced.num_events  # every event of the drop, the markers read as none

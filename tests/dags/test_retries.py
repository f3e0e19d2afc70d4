"""A step failing with an unexpected error is retried (``DEFAULT_ARGS``: two retries with exponential
back-off; the tests set its delay to 1 second): a try that succeeds ends the run in success with no
alert, and three failed tries fail the run with one alert. A step error (bad input or state) fails at
once. Real ``dag.test()`` runs of ``hisam_maintenance``, whose one step is replaced."""

from __future__ import annotations

import datetime as dt
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("failures", "error", "state", "tries", "alerted"),
    [
        (1, ConnectionError, "success", 2, False),  # a lost connection, back on the retry
        (3, RuntimeError, "failed", 3, True),  # no try left: one alert, from the last
        (1, ValueError, "failed", 1, True),  # bad input: retrying cannot help
    ],
)
def test_an_unexpected_error_is_retried_and_alerts_once_no_try_is_left(
    airflow_db, tmp_path, write_config, pipeline_home, monkeypatch, failures, error, state, tries, alerted
) -> None:
    import hisam_lifecycle

    import pipelines.maintenance as maintenance

    day = dt.date(2026, 9, 5 + tries)  # a date of its own per case (dag.test() replaces a date's run)
    calls: list[dt.date] = []

    def flaky(ctx):
        calls.append(ctx.logical_date)
        if len(calls) <= failures:
            raise error(f"try {len(calls)} failed")
        return {"tables": {}}

    monkeypatch.setattr(maintenance, "maintain_lake", flaky)
    with pipeline_home(tmp_path, write_config(tmp_path / "pipeline.yaml")):
        result = hisam_lifecycle.run_dag("hisam_maintenance", day)
    assert (result.state, result.tasks["maintain_lake"]) == (state, state)
    assert calls == [day] * tries
    path = tmp_path / "alerts.jsonl"
    alerts = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if alerted:
        assert [(a["title"], a["details"]["try_number"]) for a in alerts] == [
            ("hisam_maintenance.maintain_lake failed", tries)
        ]
        assert f"try {tries} failed" in alerts[0]["text"]
    else:
        assert alerts == []

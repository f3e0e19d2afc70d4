"""Alert sinks: JSON-lines file, Slack-compatible webhook (against a local http.server), log, factory."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.notify import (
    Alert,
    FileNotifier,
    LogNotifier,
    MultiNotifier,
    NotificationError,
    Notifier,
    NotifyConfig,
    WebhookNotifier,
    notifier_from_config,
)

TRUNCATED, DROPPED = -1, -2


class _Hook:
    """A tiny webhook receiver on 127.0.0.1: records bodies, answers with scripted statuses
    (``TRUNCATED``: a 200 whose body ends before its Content-Length; ``DROPPED``: the connection is
    closed with no answer)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[dict] = []
        self.headers: list[str | None] = []
        self.times: list[float] = []
        self.retry_after = 0.3
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.times.append(time.monotonic())  # on arrival: the client waits after reading the answer
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                hook.headers.append(self.headers.get("Content-Type"))
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status == DROPPED:
                    self.close_connection = True
                    return
                self.send_response(200 if status == TRUNCATED else status)
                if status == 429:
                    self.send_header("Retry-After", str(hook.retry_after))
                self.send_header("Content-Length", "100" if status == TRUNCATED else "2")
                self.end_headers()
                self.wfile.write(b"ok")
                self.close_connection = True

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> _Hook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def alert() -> Alert:
    return Alert(title="gate 'interactions' failed", text="3 rows quarantined", details={"n_input": 10})


def test_file_sink_appends_one_json_line_per_alert(tmp_path, alert: Alert) -> None:
    sink = FileNotifier(tmp_path / "alerts" / "out.jsonl")
    sink.send(alert)
    sink.send(Alert(title="second", text="t", severity="warning"))
    rows = sink.read()
    assert [r["title"] for r in rows] == [alert.title, "second"]
    assert rows[0]["details"] == {"n_input": 10} and rows[1]["severity"] == "warning"
    assert isinstance(sink, Notifier)


def test_webhook_posts_slack_json_text(alert: Alert) -> None:
    with _Hook([200]) as hook:
        WebhookNotifier(hook.url, timeout_s=5, retries=0).send(alert)
    assert hook.bodies == [{"text": alert.render()}]
    assert hook.headers == ["application/json"]
    assert alert.title in hook.bodies[0]["text"] and "ERROR" in hook.bodies[0]["text"]


def test_webhook_text_escapes_slack_markup_and_is_cut_to_its_limit() -> None:
    """A source value quoted in a reason reaches chat: ``<!channel>`` or a disguised link must stay
    text, and a huge one must not make the post too large to deliver."""
    from pipelines.notify import WEBHOOK_MAX_CHARS

    sink = WebhookNotifier("http://127.0.0.1:1/hook")
    sneaky = Alert(title="gate failed", text="rating '<!channel> <https://x|login>' & more is not a number")
    assert sink.payload(sneaky)["text"].endswith(
        "rating '&lt;!channel&gt; &lt;https://x|login&gt;' &amp; more is not a number"
    )
    for title in ("gate failed", "gate failed!", "gate failed!!", "gate failed!!!"):  # every cut point
        huge = Alert(title=title, text="<" * 100_000)
        escaped = huge.render().replace("<", "&lt;")
        head, _, footer = sink.payload(huge)["text"].rpartition("\n... (")
        assert escaped.startswith(head) and WEBHOOK_MAX_CHARS - 3 <= len(head) <= WEBHOOK_MAX_CHARS
        assert footer == f"{len(escaped) - len(head)} more characters cut)"
        assert re.search(r"&[a-z]*$", head) is None  # never half an escape


def test_webhook_retries_server_errors_then_succeeds(alert: Alert) -> None:
    with _Hook([503, 500, 200]) as hook:
        WebhookNotifier(hook.url, timeout_s=5, retries=2, backoff_s=0.01).send(alert)
    assert hook.bodies == [{"text": alert.render()}] * 3  # the same message each time


def test_webhook_waits_out_rate_limiting_and_retries_a_dropped_connection(alert: Alert) -> None:
    """Slack answers 429 with Retry-After when rate limited: the alert is sent after that wait,
    not dropped as a client error. A connection closed before any answer is retried."""
    with _Hook([429, DROPPED, 200]) as hook:
        WebhookNotifier(hook.url, timeout_s=5, retries=2, backoff_s=0.01).send(alert)
    assert hook.bodies == [{"text": alert.render()}] * 3
    assert hook.times[1] - hook.times[0] >= hook.retry_after  # Retry-After, not the 0.01 s back-off


def test_webhook_a_2xx_answer_cut_off_is_a_delivery_not_resent(alert: Alert, caplog) -> None:
    with _Hook([TRUNCATED, 200]) as hook, caplog.at_level(logging.WARNING, logger="pipelines.notify"):
        WebhookNotifier(hook.url, timeout_s=5, retries=2, backoff_s=0.01).send(alert)
    assert len(hook.bodies) == 1  # sending again would post the alert twice
    assert "its answer was cut off" in caplog.text


def test_webhook_client_error_is_not_retried_and_raises(alert: Alert) -> None:
    with _Hook([404, 200]) as hook, pytest.raises(NotificationError, match="HTTP 404"):
        WebhookNotifier(hook.url, timeout_s=5, retries=3, backoff_s=0.01).send(alert)
    assert len(hook.bodies) == 1


def test_webhook_unreachable_fails_fast(alert: Alert) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NotificationError, match="after 2 attempt"):
        WebhookNotifier(f"http://127.0.0.1:{port}/x", timeout_s=1, retries=1, backoff_s=0.01).send(alert)


def test_log_sink_uses_the_severity_level(caplog, alert: Alert) -> None:
    with caplog.at_level(logging.INFO, logger="hisam.alerts"):
        LogNotifier().send(alert)
        LogNotifier().send(Alert(title="fine", text="ok", severity="info"))
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hisam.alerts"]
    assert levels[0][0] == logging.ERROR and alert.title in levels[0][1]
    assert levels[1][0] == logging.INFO


def test_multi_sink_tries_every_sink_before_raising(tmp_path, alert: Alert) -> None:
    class Broken:
        def send(self, alert: Alert) -> None:
            raise OSError("disk full")

    good = FileNotifier(tmp_path / "a.jsonl")
    with pytest.raises(NotificationError, match="disk full"):
        MultiNotifier([Broken(), good]).send(alert)
    assert len(good.read()) == 1


def test_factory_reads_config_and_environment(tmp_path, alert: Alert) -> None:
    path = tmp_path / "env.jsonl"
    assert isinstance(notifier_from_config(NotifyConfig(), env={}), LogNotifier)
    built = notifier_from_config(
        NotifyConfig(), env={"HISAM_NOTIFY_SINKS": "file,log", "HISAM_NOTIFY_FILE": str(path)}
    )
    assert isinstance(built, MultiNotifier)
    built.send(alert)
    assert json.loads(path.read_text())["title"] == alert.title
    # the environment's file wins over the config's; a sink named twice is built once
    configured = tmp_path / "config.jsonl"
    twice = notifier_from_config(
        NotifyConfig(sinks=["file", "file"], file_path=str(configured)), env={"HISAM_NOTIFY_FILE": str(path)}
    )
    assert isinstance(twice, FileNotifier)
    twice.send(alert)
    assert len(path.read_text().splitlines()) == 2 and not configured.exists()
    with pytest.raises(ValueError, match="no alert sink configured"):
        notifier_from_config(NotifyConfig(sinks=[]), env={})
    with _Hook([200]) as hook:
        cfg = NotifyConfig(sinks=["webhook"], retries=0)
        notifier_from_config(cfg, env={"HISAM_NOTIFY_WEBHOOK_URL": hook.url}).send(alert)
    assert len(hook.bodies) == 1
    with pytest.raises(ValueError, match="HISAM_NOTIFY_WEBHOOK_URL"):
        notifier_from_config(NotifyConfig(sinks=["webhook"]), env={})
    with pytest.raises(ValueError, match=r"unknown alert sink 'pager' \(from \$HISAM_NOTIFY_SINKS\)"):
        notifier_from_config(NotifyConfig(), env={"HISAM_NOTIFY_SINKS": "pager"})
    with pytest.raises(ValueError, match=r"http:// or https:// \(from \$HISAM_NOTIFY_WEBHOOK_URL\)"):
        notifier_from_config(NotifyConfig(sinks=["webhook"]), env={"HISAM_NOTIFY_WEBHOOK_URL": "ftp://x"})
    with pytest.raises(ValueError, match=r"http:// or https:// \(from notify.webhook_url\)"):
        notifier_from_config(NotifyConfig(sinks=["webhook"], webhook_url="hooks.example/x"), env={})


def test_alert_from_quality_report_names_failed_expectations() -> None:
    report = {
        "suite": "interactions",
        "success": False,
        "n_input": 10,
        "n_valid": 7,
        "n_quarantined": 3,
        "reason_counts": {"null_user_id": 3},
        "expectations": [
            {
                "expectation_type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "user_id"},
                "success": False,
                "unexpected_count": 3,
                "rule": "null_user_id",
            },
            {"expectation_type": "expect_table_row_count_to_be_between", "kwargs": {}, "success": True},
        ],
        "data_docs_index": "/tmp/docs/index.html",
    }
    alert = Alert.from_quality_report(report)
    assert alert.severity == "error" and "interactions" in alert.title
    assert "expect_column_values_to_not_be_null user_id unexpected=3" in alert.text
    assert "row_count" not in alert.text and "/tmp/docs/index.html" in alert.text
    assert json.loads(json.dumps(alert.to_dict())) == alert.to_dict()  # what the file sink writes
    with pytest.raises(ValueError, match="severity"):
        Alert(title="x", text="y", severity="fatal")  # type: ignore[arg-type]


def test_an_alert_whose_sinks_cannot_be_built_still_reaches_the_log(tmp_path, monkeypatch, caplog) -> None:
    """``sinks: [log, webhook]`` without a URL: the step fails at its start (run_step builds the
    notifier first); the failure callback's alert cannot be sent, so its text goes to the log."""
    import datetime as dt

    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.delenv("HISAM_NOTIFY_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("HISAM_NOTIFY_SINKS", raising=False)
    config = PipelineConfig.model_validate({"notify": {"sinks": ["log", "webhook"]}})
    ctx = StepContext(config, dt.date(2026, 11, 1))
    with pytest.raises(ValueError, match=r"alert sink 'webhook' needs notify\.webhook_url"):
        _ = ctx.notifier
    with caplog.at_level(logging.ERROR, logger="pipelines.context"):
        ctx.alert("hisam_features.ingest failed", "OSError: disk full")
    assert "could not deliver alert 'hisam_features.ingest failed' (error): OSError: disk full" in caplog.text

"""Alerts: a small ``Notifier`` protocol with log, Slack-compatible webhook and JSON-lines sinks.

Independent of Spark and GX: a pipeline step catches ``DataQualityError`` (or any failure), builds an
:class:`Alert` (``Alert.from_quality_report(error.report.to_dict())``) and calls ``send``.

Sinks:

* :class:`LogNotifier`: ``logging`` at a level matching the severity;
* :class:`WebhookNotifier`: ``POST`` of JSON ``{"text": ...}`` (Slack incoming-webhook format, also
  accepted by Mattermost, Rocket.Chat, Teams workflows...) with ``urllib``, bounded by a timeout and a
  few retries with backoff; failures raise :class:`NotificationError`;
* :class:`FileNotifier`: one JSON object per line (tests, audits, a local outbox);
* :class:`MultiNotifier`: fan-out; every sink is tried, then the failures are raised together.

:func:`notifier_from_config` builds one from :class:`NotifyConfig`, with environment overrides:
``HISAM_NOTIFY_SINKS`` (``log,webhook,file``), ``HISAM_NOTIFY_WEBHOOK_URL`` (keep the secret URL out of
config files) and ``HISAM_NOTIFY_FILE``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from hisam_core.config import Config

logger = logging.getLogger(__name__)

Severity = Literal["info", "warning", "error", "critical"]
_LEVELS: dict[str, int] = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: The most characters of an alert a webhook posts: chat services cap a message (Slack's text at
#: 40,000 characters) and cut or refuse a longer one; a quarantine summary needs far fewer.
WEBHOOK_MAX_CHARS = 4000

_ICONS: dict[str, str] = {
    "info": ":information_source:",
    "warning": ":warning:",
    "error": ":x:",
    "critical": ":rotating_light:",
}

ENV_SINKS = "HISAM_NOTIFY_SINKS"
ENV_WEBHOOK_URL = "HISAM_NOTIFY_WEBHOOK_URL"
ENV_FILE = "HISAM_NOTIFY_FILE"


class NotificationError(RuntimeError):
    """An alert could not be delivered."""


def alerted(error: BaseException, delivered: bool = True) -> BaseException:
    """Mark ``error`` as one its step has already alerted about (with more detail than a failure
    callback has), when that alert was ``delivered``: the orchestrator's callback then sends no
    second, generic alert (and still sends its own when the step's alert was lost)."""
    error.alerted = delivered  # type: ignore[attr-defined]
    return error


def was_alerted(error: BaseException | None) -> bool:
    """Whether ``error``, or the error it was raised from, is :func:`alerted`."""
    return error is not None and any(getattr(e, "alerted", False) for e in (error, error.__cause__))


@dataclass(frozen=True)
class Alert:
    """What happened, how bad, where; ``details`` must be JSON-able."""

    title: str
    text: str
    severity: Severity = "error"
    source: str = "hisam"
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.severity not in _LEVELS:
            raise ValueError(f"alert severity must be one of {sorted(_LEVELS)}, got {self.severity!r}")

    def render(self) -> str:
        """Plain text (Slack mrkdwn-friendly) for chat sinks."""
        return (
            f"{_ICONS[self.severity]} *[{self.severity.upper()}] {self.title}* ({self.source})\n{self.text}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_quality_report(cls, report: Mapping[str, Any], source: str = "quality-gate") -> Alert:
        """An alert from ``QualityReport.to_dict()``: error when the gate failed, else info."""
        ok = bool(report.get("success"))
        failed = [e for e in report.get("expectations", []) if not e.get("success")]
        lines = [
            f"{report.get('n_input')} rows in = {report.get('n_valid')} valid + "
            f"{report.get('n_quarantined')} quarantined {report.get('reason_counts') or ''}".rstrip()
        ]
        lines += [
            f"- {e.get('expectation_type')} {e.get('kwargs', {}).get('column') or e.get('kwargs', {}).get('column_list') or ''}"
            f" unexpected={e.get('unexpected_count')} rule={e.get('rule')}"
            + (f" error={e['exception']}" if e.get("exception") else "")
            for e in failed
        ]
        if report.get("data_docs_index"):
            lines.append(f"Data Docs: {report['data_docs_index']}")
        return cls(
            title=f"quality gate {report.get('suite')!r} {'passed' if ok else 'failed'}",
            text="\n".join(lines),
            severity="info" if ok else "error",
            source=source,
            details=dict(report),
        )


@runtime_checkable
class Notifier(Protocol):
    """Anything that can deliver an alert."""

    def send(self, alert: Alert) -> None: ...


class LogNotifier:
    """Writes alerts to a logger, at the level of their severity."""

    def __init__(self, logger_name: str = "hisam.alerts") -> None:
        self.logger = logging.getLogger(logger_name)

    def send(self, alert: Alert) -> None:
        self.logger.log(_LEVELS[alert.severity], "%s: %s | %s", alert.source, alert.title, alert.text)


class FileNotifier:
    """Appends each alert as one JSON line (thread-safe within the process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        line = json.dumps(alert.to_dict(), default=str, sort_keys=True)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every alert written so far (for tests)."""
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]


#: Client errors worth another try: a request timeout, and rate limiting (Slack answers 429).
RETRIED_STATUSES = frozenset({408, 429})
#: The longest ``Retry-After`` honoured: a step's alert must not hold its worker for minutes.
MAX_RETRY_AFTER_S = 30.0


def _retry_after(value: str | None) -> float:
    """Seconds of a ``Retry-After: <seconds>`` header (0 when absent or a date), at most
    :data:`MAX_RETRY_AFTER_S`."""
    try:
        return min(max(float(value or 0), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


class WebhookNotifier:
    """POSTs ``{"text": ...}`` (:meth:`payload`) as JSON to a Slack-compatible incoming webhook.

    Each attempt is bounded by ``timeout_s``; 5xx, 408 and 429 answers (after ``Retry-After``) and
    network errors before an answer are retried ``retries`` times with exponential backoff, other
    4xx answers are not. A 2xx answer is a delivery, even if its body is cut off: sending again
    would post the alert twice. The URL is never logged (webhook URLs are secrets).
    """

    def __init__(self, url: str, timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 0.5) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhook URL must start with http:// or https://")
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def payload(self, alert: Alert) -> dict[str, Any]:
        """``text``: :meth:`Alert.render` with ``&``, ``<`` and ``>`` escaped, as Slack reads them as
        markup (a source value ``<!channel>`` in a quarantine reason would ping a whole channel), then
        cut to :data:`WEBHOOK_MAX_CHARS` and a line that says so."""
        text = alert.render().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if len(text) > WEBHOOK_MAX_CHARS:
            cut = WEBHOOK_MAX_CHARS
            entity = text.rfind("&", cut - 4, cut)  # never half an escape: "&lt" would show
            cut = entity if entity >= 0 and ";" not in text[entity:cut] else cut
            text = f"{text[:cut]}\n... ({len(text) - cut} more characters cut)"
        return {"text": text}

    def send(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert)).encode("utf-8")
        last: str = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    try:
                        response.read()
                    except (OSError, http.client.HTTPException) as exc:  # accepted all the same
                        logger.warning("webhook accepted %r; its answer was cut off: %r", alert.title, exc)
                    return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code not in RETRIED_STATUSES:
                    break
                wait = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
                last = type(exc).__name__ + (
                    f": {exc.reason}" if isinstance(exc, urllib.error.URLError) else ""
                )
                wait = 0.0
            if attempt < self.retries:
                time.sleep(max(self.backoff_s * 2**attempt, wait))
        raise NotificationError(
            f"webhook delivery of {alert.title!r} failed after {attempt + 1} attempt(s): {last}"
        )


class MultiNotifier:
    """Sends to every sink; raises one :class:`NotificationError` listing the sinks that failed."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = list(notifiers)

    def send(self, alert: Alert) -> None:
        errors = []
        for notifier in self.notifiers:
            try:
                notifier.send(alert)
            except Exception as exc:  # one broken sink must not silence the others
                logger.error("alert sink %s failed: %s", type(notifier).__name__, exc)
                errors.append(f"{type(notifier).__name__}: {exc}")
        if errors:
            raise NotificationError("; ".join(errors))


SinkName = Literal["log", "webhook", "file"]


class NotifyConfig(Config):
    """Which sinks alerts go to; the webhook URL is best given by ``HISAM_NOTIFY_WEBHOOK_URL``."""

    sinks: list[SinkName] = Field(default_factory=lambda: ["log"])
    webhook_url: str | None = None
    file_path: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)


def notifier_from_config(
    config: NotifyConfig | None = None, env: Mapping[str, str] | None = None
) -> Notifier:
    """Build the notifier of ``config``; environment variables override sinks, URL and file."""
    cfg = config or NotifyConfig()
    env = os.environ if env is None else env
    sinks: list[str] = list(cfg.sinks)  # validated names; the environment's are checked below
    if env.get(ENV_SINKS):
        sinks = [s.strip() for s in env[ENV_SINKS].split(",") if s.strip()]
    url = env.get(ENV_WEBHOOK_URL) or cfg.webhook_url
    url_from = f"${ENV_WEBHOOK_URL}" if env.get(ENV_WEBHOOK_URL) else "notify.webhook_url"
    path = env.get(ENV_FILE) or cfg.file_path
    built: list[Notifier] = []
    for sink in dict.fromkeys(sinks):
        if sink == "log":
            built.append(LogNotifier())
        elif sink == "webhook":
            if not url:
                raise ValueError(f"alert sink 'webhook' needs notify.webhook_url or ${ENV_WEBHOOK_URL}")
            try:
                built.append(WebhookNotifier(url, cfg.timeout_s, cfg.retries, cfg.backoff_s))
            except ValueError as err:
                raise ValueError(f"{err} (from {url_from})") from None
        elif sink == "file":
            if not path:
                raise ValueError(f"alert sink 'file' needs notify.file_path or ${ENV_FILE}")
            built.append(FileNotifier(path))
        else:
            raise ValueError(
                f"unknown alert sink {sink!r} (from ${ENV_SINKS}); expected log, webhook or file"
            )
    if not built:
        raise ValueError("no alert sink configured")
    return built[0] if len(built) == 1 else MultiNotifier(built)

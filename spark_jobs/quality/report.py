"""Quality reports and the error a failed gate raises; plain Python (no Spark, no GX imports).

A pipeline step can import this module to catch :class:`DataQualityError` and turn
``error.report.to_dict()`` into an alert (``pipelines.notify``) without importing Spark.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExpectationOutcome:
    """One GX expectation's result over a batch."""

    expectation_type: str  # e.g. "expect_column_values_to_not_be_null"
    kwargs: dict[str, Any]  # column / min_value / mostly ... (batch_id removed)
    success: bool
    rule: str | None = None  # the row-level rule (quarantine reason) the expectation mirrors
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    observed_value: Any = None
    exception: str | None = None

    def describe(self) -> str:
        """``type(column=...)``: what failed and by how much, for messages and alerts."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "unexpected_rows_query")
        text = f"{self.expectation_type}({args})"
        if self.unexpected_count is not None:
            pct = f" ({self.unexpected_percent:.3g}%)" if self.unexpected_percent is not None else ""
            text += f": {self.unexpected_count} unexpected{pct}"
        elif self.observed_value is not None:
            text += f": observed {self.observed_value!r}"
        if self.rule:
            text += f" [rule {self.rule}]"
        if self.exception:
            text += f" [error: {self.exception}]"
        return text


@dataclass
class QualityReport:
    """What a quality gate saw: counts that reconcile, quarantine reasons, GX outcomes."""

    suite: str
    n_input: int
    n_valid: int
    n_quarantined: int
    reason_counts: dict[str, int]  # first reason of each quarantined row: sums to n_quarantined
    all_reason_counts: dict[str, int]  # every reason of every row (a row may count several times)
    expectations: list[ExpectationOutcome] = field(default_factory=list)
    data_docs_index: str | None = None
    seconds: float = 0.0

    @property
    def reconciled(self) -> bool:
        """``input = valid + quarantined``: the input is counted before the rules run and the
        outcome after, so a rule that loses or duplicates rows shows here."""
        return self.n_input == self.n_valid + self.n_quarantined

    @property
    def failed_expectations(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    @property
    def success(self) -> bool:
        """Batch-level verdict: every expectation passed and the counts reconcile."""
        return self.reconciled and not self.failed_expectations

    def summary(self) -> str:
        """One paragraph for logs and alerts."""
        head = (
            f"quality gate {self.suite!r}: {'passed' if self.success else 'FAILED'}; "
            f"{self.n_input} rows in = {self.n_valid} valid + {self.n_quarantined} quarantined"
        )
        if self.reason_counts:
            head += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reason_counts.items())) + ")"
        if not self.reconciled:
            head += "; COUNTS DO NOT RECONCILE"
        failed = self.failed_expectations
        if failed:
            head += f"; {len(failed)} of {len(self.expectations)} expectations failed: "
            head += "; ".join(e.describe() for e in failed)
        if self.data_docs_index:
            head += f"; data docs: {self.data_docs_index}"
        return head

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for alerts, step summaries, MLflow)."""
        out = asdict(self)
        out["success"] = self.success
        out["reconciled"] = self.reconciled
        out["expectations"] = [json.loads(json.dumps(asdict(e), default=str)) for e in self.expectations]
        return out


class DataQualityError(RuntimeError):
    """A batch failed its quality gate; ``report`` says which expectations and how badly."""

    def __init__(self, report: QualityReport) -> None:
        self.report = report
        super().__init__(report.summary())

    @property
    def failed_expectations(self) -> list[ExpectationOutcome]:
        return self.report.failed_expectations

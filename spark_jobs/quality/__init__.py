"""Data quality at every lake boundary: row-level quarantine + batch-level Great Expectations.

``run_quality_gate(df, suite, config)`` -> ``(valid_df, quarantine_df, report)``; raises
``DataQualityError`` naming the failed expectations when the batch fails. Suites:
``interactions_suite``, ``embeddings_suite``, ``semantic_ids_suite``, ``samples_suite``.
"""

from spark_jobs.quality.config import (
    EmbeddingRules,
    InteractionRules,
    QualityConfig,
    SampleRules,
    SemanticIdRules,
)
from spark_jobs.quality.gate import run_quality_gate
from spark_jobs.quality.report import DataQualityError, ExpectationOutcome, QualityReport
from spark_jobs.quality.rules import (
    GxSpec,
    QualitySuite,
    RowRule,
    split_valid_quarantine,
    to_bronze_quarantine,
)
from spark_jobs.quality.suites import embeddings_suite, interactions_suite, samples_suite, semantic_ids_suite

__all__ = [
    "DataQualityError",
    "EmbeddingRules",
    "ExpectationOutcome",
    "GxSpec",
    "InteractionRules",
    "QualityConfig",
    "QualityReport",
    "QualitySuite",
    "RowRule",
    "SampleRules",
    "SemanticIdRules",
    "embeddings_suite",
    "interactions_suite",
    "run_quality_gate",
    "samples_suite",
    "semantic_ids_suite",
    "split_valid_quarantine",
    "to_bronze_quarantine",
]

"""Typed settings of the quality gates (``configs/quality.yaml``)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, field_validator

from hisam_core.config import Config


class InteractionRules(Config):
    """Interactions (bronze -> silver boundary): keys, time window, rating range, references."""

    dataset_col: str = "dataset"
    user_col: str = "user_id"
    item_col: str = "item_id"
    timestamp_col: str = "event_ts"
    rating_col: str = "rating"
    label_col: str = "label"
    import_date_col: str | None = Field(
        default="logical_date",
        description="the day a row was imported: when present, an event later than the end of that day "
        "is in the future (so a rerun of an older date judges newer rows by their own import day); "
        "absent, the end of the run's logical date bounds every row",
    )
    rating_min: float = 1.0
    rating_max: float = 5.0
    timestamp_floor: dt.datetime = Field(
        default=dt.datetime(1995, 1, 1, tzinfo=dt.UTC), description="earliest plausible event (UTC)"
    )
    dedup_order: list[str] = Field(
        default_factory=lambda: ["logical_date desc"],
        description="which duplicate survives: 'col' or 'col desc', then every other column ascending",
    )


class EmbeddingRules(Config):
    """Item embeddings (``gold.item_embeddings``): dimension and finiteness per row."""

    key_columns: list[str] = Field(
        default_factory=lambda: ["dataset", "modality", "encoder", "encoder_version", "item_id"]
    )
    embedding_col: str = "embedding"
    dim_col: str | None = "dim"
    modality_col: str = "modality"
    expected_dims: dict[str, int] = Field(
        default_factory=dict, description="modality -> dimension; empty: trust the row's dim column"
    )


class SemanticIdRules(Config):
    """Semantic IDs (``gold.semantic_ids``): 6 codes per item inside the codebooks ``[0, K)``."""

    key_columns: list[str] = Field(default_factory=lambda: ["dataset", "tokenizer_version", "item_id"])
    codebook_size: int = Field(default=256, ge=1)
    num_positions: int = Field(default=6, ge=1)


class SampleRules(Config):
    """HMAT samples (``spark_jobs.sequences.build_samples``): budget and alignment of histories."""

    key_columns: list[str] = Field(
        default_factory=lambda: ["dataset", "split", "user_id", "item_id", "event_ts"]
    )
    token_budget: int = 300
    profile_tokens: int = 4
    count_target_in_budget: bool = True


class QualityConfig(Config):
    """Where GX writes, how strict a batch is, and the rules of each boundary."""

    docs_dir: str = Field(default=".hisam/quality/data_docs", description="GX Data Docs site (HTML)")
    build_data_docs: bool = True
    gx_mode: Literal["ephemeral", "file"] = "ephemeral"
    gx_project_dir: str = Field(default=".hisam/quality", description="GX project root in file mode")
    result_format: Literal["BOOLEAN_ONLY", "BASIC", "SUMMARY"] = "BASIC"
    max_quarantine_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="batch fails when more of its rows are quarantined, or fail one rule (each rule's GX "
        "'mostly' allows that share of all rows, also over a column with nulls)",
    )
    min_rows: int = Field(default=1, ge=0, description="batch fails with fewer input rows")
    persist: bool = Field(default=True, description="cache the annotated batch (it is scanned 3+ times)")
    logical_date: dt.datetime | dt.date | None = Field(
        default=None, description="events after this instant (end of day for a date) are in the future"
    )
    interactions: InteractionRules = Field(default_factory=InteractionRules)
    embeddings: EmbeddingRules = Field(default_factory=EmbeddingRules)
    semantic_ids: SemanticIdRules = Field(default_factory=SemanticIdRules)
    samples: SampleRules = Field(default_factory=SampleRules)

    @field_validator("logical_date", mode="before")
    @classmethod
    def _plain_date(cls, value: object) -> object:
        """``"1998-04-30"`` is a date (end of that day counts), not midnight of it."""
        if isinstance(value, str) and len(value.strip()) == 10:
            return dt.date.fromisoformat(value.strip())
        return value

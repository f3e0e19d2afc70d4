"""The pipeline's one typed config (``configs/pipeline.yaml``): a section per step.

Every step takes the whole :class:`PipelineConfig` and the run's logical date, reads the section it
needs and finds its inputs in the lake and the registry (never in an orchestrator's XCom), so
``hisam run <step> --config configs/pipeline.yaml --logical-date 2026-11-22`` and the Airflow task
do exactly the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hisam_core.config import Config
from hisam_core.encoders.behavior import BehaviorEncoderConfig
from hisam_core.ranker.model import HMATConfig
from hisam_core.ranker.sequence import SequenceConfig as RankerSequenceConfig
from hisam_core.ranker.train import TrainConfig
from hisam_core.tokenizer import TokenizerTrainConfig
from pipelines.notify import NotifyConfig
from pipelines.registry import PromotionGateConfig
from spark_jobs.content import ContentConfig
from spark_jobs.embeddings import EmbeddingJobConfig, EncoderSpec
from spark_jobs.importers.generic import GenericImportConfig
from spark_jobs.importers.silver import SilverConfig
from spark_jobs.importers.synthetic import SyntheticConfig
from spark_jobs.lake import LakeConfig
from spark_jobs.quality import QualityConfig
from spark_jobs.sequences import SequenceConfig
from spark_jobs.tables import NAME_PATTERN


class SourceConfig(Config):
    """Where ``ingest`` reads raw data: the synthetic generator, a MovieLens bundle or generic files."""

    kind: Literal["synthetic", "movielens", "generic"] = "synthetic"
    movielens_dir: Path | None = None
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    generic: GenericImportConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.kind == "movielens" and self.movielens_dir is None:
            raise ValueError("source.kind movielens needs source.movielens_dir")
        if self.kind == "generic" and self.generic is None:
            raise ValueError("source.kind generic needs source.generic (interactions, items, users)")
        for kind, given in (("movielens", self.movielens_dir), ("generic", self.generic)):
            if given is not None and self.kind != kind:  # else ingest writes other data under this name
                field = "movielens_dir" if kind == "movielens" else kind
                raise ValueError(f"source.{field} is given but source.kind is {self.kind}: set kind: {kind}")
        return self


class EmbeddingsConfig(Config):
    """Modality encoders (Sec. 3.2.1): text and image through the Spark job, behaviour via SASRec."""

    text: EncoderSpec = Field(default_factory=lambda: EncoderSpec(modality="text"))
    image: EncoderSpec = Field(default_factory=lambda: EncoderSpec(modality="image"))
    behavior: BehaviorEncoderConfig = Field(default_factory=BehaviorEncoderConfig)
    behavior_version: str = "1"
    job: EmbeddingJobConfig = Field(default_factory=EmbeddingJobConfig)


class TokenizerHealthConfig(Config):
    """Codebook-health floors a new DST must clear before it is registered (Sec. 3.2.2, App. B.2)."""

    min_utilisation: float = Field(0.3, ge=0, le=1, description="every codebook's share of codes in use")
    min_unique_id_rate: float = Field(0.9, ge=0, le=1, description="share of items with a unique 6-code ID")


class TokenizerStageConfig(Config):
    train: TokenizerTrainConfig = Field(default_factory=TokenizerTrainConfig)
    health: TokenizerHealthConfig = Field(default_factory=TokenizerHealthConfig)


#: The categorical columns of ``gold.user_profiles`` (``spark_jobs.content.user_profiles``).
PROFILE_COLUMNS = ("age_bucket", "gender", "occupation")


class RankerStageConfig(Config):
    """HMAT shape shared by PT and SFT, and each stage's optimisation (Sec. 3.4.1, B.2)."""

    sequence: RankerSequenceConfig = Field(default_factory=RankerSequenceConfig)
    # gold.user_profiles columns that become profile tokens (Sec. 3.3), e.g. PROFILE_COLUMNS; their
    # buckets come from the data (hisam_core.ranker.profile), fitted at pre-training and kept by
    # every model built on it. Empty: no profile tokens (configs/pipeline.yaml says why by default).
    profile_fields: list[str] = Field(default_factory=list)
    model: HMATConfig = Field(default_factory=HMATConfig)
    pretrain: TrainConfig = Field(default_factory=lambda: TrainConfig(objective="pt"))
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(objective="sft"))
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RankerStageConfig:
        if self.pretrain.objective != "pt" or self.finetune.objective != "sft":
            raise ValueError("ranker.pretrain.objective must be pt and ranker.finetune.objective sft")
        return self


class RegistryNames(Config):
    tokenizer: str = Field("hisam-tokenizer", pattern=NAME_PATTERN)
    pretrained: str = Field("hisam-pretrained", pattern=NAME_PATTERN)
    ranker: str = Field("hisam-ranker", pattern=NAME_PATTERN)

    @property
    def names(self) -> list[str]:
        """The three registered model names: tokenizer, pretrained, ranker."""
        return [self.tokenizer, self.pretrained, self.ranker]

    @model_validator(mode="after")
    def _check(self) -> RegistryNames:
        if len(set(self.names)) != len(self.names):  # each step finds its versions by model name
            raise ValueError(
                f"models: the tokenizer, pretrained and ranker names must differ, got {self.names}"
            )
        return self


class PipelineConfig(Config):
    """Everything the lifecycle needs; ``configs/pipeline.yaml`` documents each field."""

    dataset: str = Field("synthetic", pattern=NAME_PATTERN)
    lake: LakeConfig = Field(default_factory=LakeConfig)  # root null: $HISAM_HOME/lake
    source: SourceConfig = Field(default_factory=SourceConfig)
    silver: SilverConfig = Field(default_factory=SilverConfig)
    #: ``file``: each step runs in its own process, and an ephemeral GX context's Data Docs rebuild
    #: deletes the pages of every validation it did not run itself (an alerted failure's among them)
    quality: QualityConfig = Field(default_factory=lambda: QualityConfig(gx_mode="file"))
    content: ContentConfig = Field(default_factory=ContentConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    tokenizer: TokenizerStageConfig = Field(default_factory=TokenizerStageConfig)
    sequences: SequenceConfig = Field(default_factory=lambda: SequenceConfig(profile_tokens=0))
    ranker: RankerStageConfig = Field(default_factory=RankerStageConfig)
    gate: PromotionGateConfig = Field(default_factory=PromotionGateConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    models: RegistryNames = Field(default_factory=RegistryNames)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        seq, rk = self.sequences, self.ranker.sequence
        generic = self.source.generic
        if generic is not None and generic.dataset != self.dataset:  # ingest writes under dataset
            raise ValueError(
                f"source.generic.dataset {generic.dataset!r} differs from dataset {self.dataset!r}: the "
                "pipeline imports under dataset; set both to the same name"
            )
        gate, ratings = self.quality.interactions, generic.rating_range if generic else None
        if ratings is not None and (ratings[0] < gate.rating_min or ratings[1] > gate.rating_max):
            raise ValueError(  # else bronze keeps ratings the interactions gate then quarantines
                f"source.generic.rating_range {ratings} is wider than the interactions gate's "
                f"[quality.interactions.rating_min, rating_max] = [{gate.rating_min}, {gate.rating_max}]"
            )
        self._check_derived_quality_rules()
        if seq.num_semantic_positions != rk.num_positions:
            raise ValueError(
                f"sequences.num_semantic_positions={seq.num_semantic_positions} but "
                f"ranker.sequence.num_positions={rk.num_positions}"
            )
        dst = self.tokenizer.train.model
        if dst.dedup_suffix:
            raise ValueError(
                "tokenizer.train.model.dedup_suffix is for hisam_core and the benchmarks: a suffix depends "
                "on every other item's codes, which the registered tokenizer model, asked one request "
                "at a time, does not have; the pipeline serves the paper's 6 codes"
            )
        if rk.num_positions != dst.shared_layers + 3 or rk.codebook_size != dst.codebook_size:
            raise ValueError(
                f"ranker.sequence expects {rk.num_positions} codes of K={rk.codebook_size}; DST writes "
                f"{dst.shared_layers} shared + 3 modality codes of K={dst.codebook_size}"
            )
        if rk.profile_fields:
            raise ValueError(
                "ranker.sequence.profile_fields is set from the data at pre-training: list the "
                "gold.user_profiles columns in ranker.profile_fields instead"
            )
        pretrained = "the newest pre-trained model of the tokenizer version it trains on"
        for key, value, source in (  # build-sequences and finetune overwrite them: a value is ignored
            ("sequences.dataset", seq.dataset, "the top-level dataset"),
            ("sequences.tokenizer_version", seq.tokenizer_version, "its run's version (@current by default)"),
            ("ranker.finetune.init_from", self.ranker.finetune.init_from, pretrained),
        ):
            if value is not None:
                raise ValueError(f"{key}={value!r} would be ignored: the pipeline sets it to {source}")
        if seq.positive_rating_threshold != self.silver.positive_threshold:
            raise ValueError(  # silver.interactions.label is never null, so the sequence job's is unused
                f"sequences.positive_rating_threshold={seq.positive_rating_threshold} would be ignored: "
                f"silver.interactions already holds labels from silver.positive_threshold="
                f"{self.silver.positive_threshold}; set both to the same value"
            )
        if seq.action_source == "label" and rk.action_names.index(rk.positive_action) != 1:
            raise ValueError(  # else P(positive) would read the negative action's probability
                f"sequences.action_source label writes action 1 for a positive label, but "
                f"ranker.sequence.action_names {rk.action_names} put {rk.positive_action!r} at "
                f"{rk.action_names.index(rk.positive_action)}: list it second"
            )
        if seq.action_source == "label" and len(rk.action_names) != 2:
            raise ValueError(f"sequences.action_source label has 2 actions, not {rk.action_names}")
        if seq.action_vocab is not None and len(seq.action_vocab) != len(rk.action_names):
            raise ValueError(
                f"sequences.action_vocab {seq.action_vocab} and ranker.sequence.action_names "
                f"{rk.action_names} must have as many actions (index i of one is action i of the other)"
            )
        fields = self.ranker.profile_fields
        if seq.profile_tokens != len(fields):
            raise ValueError(
                f"sequences.profile_tokens={seq.profile_tokens} but ranker.profile_fields has "
                f"{len(fields)} fields {fields}: the token budget must count the profile HMAT reads"
            )
        unknown = sorted(set(fields) - set(PROFILE_COLUMNS))
        if unknown:
            raise ValueError(
                f"ranker.profile_fields {unknown} are not gold.user_profiles columns {PROFILE_COLUMNS}"
            )
        return self

    def derived_quality_rules(self) -> dict[str, dict[str, tuple[Any, str]]]:
        """The quality rules taken from other sections, one source of truth for both: section of
        ``quality`` -> rule -> (value, the key it comes from). ``pipelines.ingest.quality_config``
        applies them (with the run's logical date)."""
        seq, dst = self.sequences, self.tokenizer.train.model
        return {
            "semantic_ids": {
                "codebook_size": (dst.codebook_size, "tokenizer.train.model.codebook_size"),
                "num_positions": (seq.num_semantic_positions, "sequences.num_semantic_positions"),
            },
            "samples": {
                "token_budget": (seq.token_budget, "sequences.token_budget"),
                "profile_tokens": (seq.profile_tokens, "sequences.profile_tokens"),
                "count_target_in_budget": (seq.count_target_in_budget, "sequences.count_target_in_budget"),
            },
        }

    def _check_derived_quality_rules(self) -> None:
        """The derived quality rules (:meth:`derived_quality_rules`, and the logical date) must be left
        at their defaults or agree: a value there would be ignored."""
        default = QualityConfig()
        ignored = []
        if self.quality.logical_date is not None:
            ignored.append(
                f"quality.logical_date={self.quality.logical_date!r} (it is the run's logical date)"
            )
        for section, rules in self.derived_quality_rules().items():
            given, fallback = getattr(self.quality, section), getattr(default, section)
            for name, (used, source) in rules.items():
                if getattr(given, name) not in (used, getattr(fallback, name)):
                    ignored.append(
                        f"quality.{section}.{name}={getattr(given, name)!r} (it is {source}: {used!r})"
                    )
        if ignored:
            raise ValueError(f"set from other sections, so leave them out: {'; '.join(ignored)}")

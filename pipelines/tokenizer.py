"""Pipeline step ``train-tokenizer``: train DST (Sec. 3.2), tokenize the catalogue, track it in MLflow.

Writes under ``output_dir/<version>/``: ``dst.pt`` (checkpoint), ``semantic_ids.parquet`` (the
item -> 6-token table) and ``figure3.png`` (code position x modality similarity, Sec. 4.4). The same
config and seed give the same IDs, so a rerun of a version rewrites identical outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import torch
from pydantic import Field, model_validator

from hisam_core.config import Config
from hisam_core.features import ItemFeatures
from hisam_core.tokenizer import TokenizerTrainConfig, train_tokenizer
from hisam_core.tokenizer.figure import position_modality_similarity, save_similarity_figure
from hisam_core.tokenizer.metrics import collision_rate, unique_id_rate
from hisam_core.tokenizer.synthetic import planted_features
from pipelines.settings import Settings
from pipelines.tracking import configure_mlflow, log_config, log_training_curves, mlflow_callback

log = logging.getLogger(__name__)


class TrainTokenizerStepConfig(Config):
    """Where item features come from, how DST trains, and which version it writes."""

    features: Literal["synthetic", "npz"] = "synthetic"
    features_path: Path | None = None  # .npz with ``item_ids`` and one [N, d] array per modality
    synthetic_items: int = Field(2000, gt=0)
    train: TokenizerTrainConfig = Field(default_factory=TokenizerTrainConfig)
    output_dir: Path | None = None  # default: $HISAM_HOME/tokenizer
    version: str = Field("dst-v1", pattern=r"^[A-Za-z0-9._-]+$")
    track: bool = True  # log the run to MLflow

    @model_validator(mode="after")
    def _check(self) -> TrainTokenizerStepConfig:
        if self.features == "npz" and self.features_path is None:
            raise ValueError("features: npz needs features_path")
        return self


def load_features(config: TrainTokenizerStepConfig) -> ItemFeatures:
    """The step's input features, validated by :class:`ItemFeatures`."""
    if config.features == "synthetic":
        features, _ = planted_features(num_items=config.synthetic_items, seed=config.train.seed)
        return features
    path = Path(config.features_path)  # type: ignore[arg-type]
    if not path.exists():
        raise FileNotFoundError(f"features file {path} does not exist")
    with np.load(path) as data:
        if "item_ids" not in data:
            raise ValueError(f"{path}: no 'item_ids' array")
        return ItemFeatures(data["item_ids"], {k: data[k] for k in data.files if k != "item_ids"})


def train_tokenizer_step(config: TrainTokenizerStepConfig) -> dict[str, Any]:
    """Train, tokenize, write the artifacts of ``config.version``; return a summary."""
    settings = Settings.from_env()
    features = load_features(config)  # validated before anything is written
    out = (config.output_dir or settings.home / "tokenizer") / config.version
    out.mkdir(parents=True, exist_ok=True)

    def run() -> dict[str, Any]:
        callback = mlflow_callback("dst/") if config.track else None
        model = train_tokenizer(features, config.train, callback=callback, checkpoint_path=out / "dst.pt")
        ids = model.encode(features, version=config.version)
        ids.save(out / "semantic_ids.parquet")
        with torch.no_grad():
            forward = model(model.tensors(features))
            codewords = model.codewords(forward.codes).numpy()
        aligned = {m: forward.aligned[m].numpy() for m in model.modalities}
        similarity = position_modality_similarity(codewords, aligned)
        save_similarity_figure(similarity, ids.position_names, model.modalities, out / "figure3.png")
        summary = {
            "version": config.version,
            "items": len(features),
            "unique_id_rate": unique_id_rate(ids.codes),
            "collision_rate": collision_rate(ids.codes),
            "checkpoint": str(out / "dst.pt"),
            "semantic_ids": str(out / "semantic_ids.parquet"),
            "figure": str(out / "figure3.png"),
        }
        if config.track:
            mlflow.log_metrics({k: summary[k] for k in ("unique_id_rate", "collision_rate")})
            log_training_curves(callback.history, "dst_training")  # type: ignore[union-attr]
            mlflow.log_artifacts(str(out), artifact_path="tokenizer")
            mlflow.set_tag("tokenizer_version", config.version)
        return summary

    if not config.track:
        return run()
    configure_mlflow(settings)
    with mlflow.start_run(run_name=f"train-tokenizer-{config.version}") as active:
        log_config(config, name="train_tokenizer")
        summary = run()
        summary["mlflow_run_id"] = active.info.run_id
    return summary

"""DST as an MLflow pyfunc model: item embeddings in, semantic IDs out (Sec. 3.2.2).

Request: one row per item with ``item_id`` and one list-of-float column per modality (the raw
embeddings of ``gold.item_embeddings``, in the model's ``modality_dims`` order), and optionally a bool
``present_<modality>`` column (the table's ``present``: False where the row is the encoder's fallback,
e.g. no poster; absent means True). Response: ``item_id``
and ``semantic_ids`` (the item's codes), exactly what ``DST.encode`` writes into ``gold.semantic_ids``.
The tokenizer version is the model's ``tokenizer_version`` metadata and registry tag; the ranker is
tagged with the same string, which is how the lifecycle refuses mismatched pairs.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.dst import DST
from pipelines.ranker_model import TOKENIZER_VERSION, pip_requirements, stage_code

ARTIFACT_CHECKPOINT = "checkpoint"
#: The cold behaviour embedding of the space DST was trained in (``pipelines.tokenizer.cold_behavior_embedding``):
#: what a new item's behaviour row is until the next monthly run. Carried by the model, so the daily
#: ``tokenize-new-items`` never reads the old embeddings snapshot, which ``maintain-lake`` vacuums.
ARTIFACT_COLD_BEHAVIOUR = "cold_behaviour"
PRESENT_PREFIX = "present_"


def features_frame(features: ItemFeatures) -> pd.DataFrame:
    """The request layout of an :class:`ItemFeatures`."""
    frame = pd.DataFrame({"item_id": features.item_ids})
    for modality, values in features.modalities.items():
        frame[modality] = list(np.asarray(values, dtype=np.float64))  # JSON requests carry doubles
    for modality, present in features.present.items():
        frame[PRESENT_PREFIX + modality] = present
    return frame


def request_features(request: pd.DataFrame, dims: Mapping[str, int]) -> ItemFeatures:
    """The :class:`ItemFeatures` of a request: :func:`request_embeddings`, and each modality's
    ``present_<modality>`` flags (True when the column is absent; a null flag, or a flag column of no
    modality of the model, is refused)."""
    modalities = request_embeddings(request, dims)
    unknown = [
        c for c in request.columns if c.startswith(PRESENT_PREFIX) and c[len(PRESENT_PREFIX) :] not in dims
    ]
    if unknown:
        raise ValueError(f"tokenizer request: {unknown} flag no modality of the model ({list(dims)})")
    present = {}
    for modality in dims:
        column = PRESENT_PREFIX + modality
        if column in request.columns:
            if request[column].isna().any():
                raise ValueError(f"tokenizer request: {column} has nulls (send true or false)")
            present[modality] = request[column].to_numpy(dtype=bool)
    return ItemFeatures(request["item_id"].to_numpy(), modalities, present)


def request_embeddings(request: pd.DataFrame, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The ``[N, dim]`` array of each modality of a request; a ValueError names the missing column,
    or the modality and item whose embedding is not ``dim`` numbers (NaN and inf: ``DST.encode``)."""
    missing = [c for c in ("item_id", *dims) if c not in request.columns]
    if missing:
        raise ValueError(f"tokenizer request: no column {missing} (expected item_id and {list(dims)})")
    if request.empty:
        raise ValueError("tokenizer request: no rows")
    out = {}
    for modality, dim in dims.items():
        rows = [np.asarray(v if v is not None else [], dtype=np.float32) for v in request[modality]]
        bad = next((i for i, row in enumerate(rows) if row.shape != (dim,)), None)
        if bad is not None:
            raise ValueError(
                f"tokenizer request: {modality} of item {request['item_id'].iloc[bad]} has shape "
                f"{rows[bad].shape}, expected ({dim},)"
            )
        out[modality] = np.stack(rows)
    return out


class HisamTokenizerModel(mlflow.pyfunc.PythonModel):
    """Tokenizes items with a trained DST."""

    #: :data:`ARTIFACT_COLD_BEHAVIOUR`; None for a tokenizer registered before the model carried it.
    #: A class attribute: MLflow unpickles the instance logged then, whose state lacks it.
    cold_behaviour: np.ndarray | None = None

    def __init__(self) -> None:
        self.dst: DST | None = None
        self.version: str = ""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.dst = DST.load_checkpoint(context.artifacts[ARTIFACT_CHECKPOINT])
        self.version = str((context.model_config or {})[TOKENIZER_VERSION])
        if ARTIFACT_COLD_BEHAVIOUR in context.artifacts:
            self.cold_behaviour = np.load(context.artifacts[ARTIFACT_COLD_BEHAVIOUR])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict | None = None,
    ) -> pd.DataFrame:
        assert self.dst is not None, "load_context first"
        features = request_features(model_input, self.dst.config.modality_dims)
        ids = self.dst.encode(features, self.version)
        return pd.DataFrame(
            {"item_id": ids.item_ids, "semantic_ids": list(ids.codes)}, index=model_input.index
        )


def log_tokenizer(
    checkpoint: str | Path,
    version: str,
    example: ItemFeatures,
    registered_name: str,
    version_tags: Mapping[str, str] | None = None,
    cold_behaviour: np.ndarray | None = None,
) -> ModelVersion:
    """Log the DST checkpoint (and ``cold_behaviour``, :data:`ARTIFACT_COLD_BEHAVIOUR`) as a pyfunc in
    the active run and register it, tagged with ``version`` and ``version_tags`` when the version is
    created (a retry finds it complete, or not at all)."""
    wrapper = HisamTokenizerModel()
    wrapper.dst, wrapper.version = DST.load_checkpoint(checkpoint), version
    request = features_frame(example.subset(np.arange(min(len(example), 4))))
    with warnings.catch_warnings():  # "integer columns cannot hold missing values": item ids never are
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(request, wrapper.predict(None, request))
    optional = [  # requests without present_<modality> columns mean every row is real
        ColSpec(c.type, c.name, required=not c.name.startswith(PRESENT_PREFIX))
        for c in signature.inputs.inputs
    ]
    signature = ModelSignature(Schema(optional), signature.outputs)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {ARTIFACT_CHECKPOINT: str(checkpoint)}
        if cold_behaviour is not None:
            artifacts[ARTIFACT_COLD_BEHAVIOUR] = str(Path(tmp) / "cold_behaviour.npy")
            np.save(artifacts[ARTIFACT_COLD_BEHAVIOUR], np.asarray(cold_behaviour, dtype=np.float32))
        info = mlflow.pyfunc.log_model(
            name="tokenizer",
            python_model=HisamTokenizerModel(),
            artifacts=artifacts,
            code_paths=stage_code(Path(tmp) / "code"),
            signature=signature,
            input_example=request,
            pip_requirements=pip_requirements(),
            model_config={TOKENIZER_VERSION: version},
            metadata={TOKENIZER_VERSION: version},
            registered_model_name=registered_name,
            tags={TOKENIZER_VERSION: version, **(version_tags or {})},  # also the version's tags
        )
    return MlflowClient().get_model_version(registered_name, str(info.registered_model_version))


def load_tokenizer(model_uri: str) -> HisamTokenizerModel:
    """The registered DST behind ``model_uri`` (e.g. ``models:/hisam-tokenizer@current``)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()

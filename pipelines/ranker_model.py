"""The HMAT ranker as an MLflow pyfunc model: checkpoint + RankerConfig + semantic-ID table.

Request format (one row per request, :data:`REQUEST_COLUMNS`): ``user_id`` (int),
``history_item_ids`` (list[int], oldest first), ``history_actions`` (list[int], indices into
``SequenceConfig.action_names``), ``candidate_item_ids`` (list[int]) and one ``profile_<field>``
int column per ``SequenceConfig.profile_fields`` entry: the user's bucket of that field, which the
packaged ``profile_vocabulary`` (:class:`~hisam_core.ranker.profile.ProfileVocabulary`, also
``HisamRankerModel.profile_vocabulary``) gives from the profile's values. Optional
``history_timestamps`` (list[int], one non-decreasing time per history item, as the pipeline's
unix microseconds): interactions of one time are one instant and none is another's history, as in
training (:attr:`~hisam_core.ranker.sequence.UserHistory.instants`); without it each history item
is its own instant. The response has one row
per request (same index) with ``scores``: ``P(positive action)`` per candidate, in candidate order,
computed by one-pass ranking (:meth:`hisam_core.ranker.HMATRanker.rank`, Sec. 3.4.2).

Item ids map to codes through the packaged :class:`~hisam_core.semantic_ids.SemanticIds` table.
A candidate missing from it is an error: ``ValueError`` naming the request row, the user and the
items (no NaN scores: a caller must not mistake "unknown" for "unlikely"). A history item missing
from it is left out with a warning (``params.unknown_history=error`` refuses it instead). Items
tokenized after registration reach ``@champion`` through the daily ``refresh-champion`` step
(:func:`pipelines.promotion.refresh_champion`), which re-registers the same weights with them. A
registered model runs the code packaged with it, when it is the first model its process loads
(:data:`PACKAGED_MODULES`; a process with the repository on its path runs the repository's):
versions registered before this rule refuse unknown history items until their next refresh or
registration.

Tokenizer versions. The semantic IDs an HMAT was trained on are only meaningful for that
tokenizer version, so the packaged table's ``version`` is recorded as ``tokenizer_version`` in the
model's ``model_config`` and metadata and as a tag of the registered version. ``load_context``
refuses a table whose version differs from the recorded one, and a caller's expected version
(``load_ranker(uri, expected_tokenizer_version=...)``, or ``model_config=
{"expected_tokenizer_version": ...}`` with plain ``mlflow.pyfunc.load_model``) that differs too.

Self-contained artifacts: ``hisam_core`` and this module are logged as ``code_paths``, so the model
loads in a process without the repository on ``sys.path`` (the pinned pip requirements cover the
rest). This module therefore imports nothing else from ``pipelines``.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema

import hisam_core
from hisam_core.device import resolve_device
from hisam_core.features import FLOAT_EXACT, integral
from hisam_core.ranker.attention import MASK_RULE
from hisam_core.ranker.profile import ProfileVocabulary
from hisam_core.ranker.sequence import UserHistory
from hisam_core.ranker.serving import HMATRanker
from hisam_core.ranker.train import RankerConfig, build_model, checkpoint_mask_rule, load_model
from hisam_core.semantic_ids import SemanticIds

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ("user_id", "history_item_ids", "history_actions", "candidate_item_ids")
HISTORY_TIMESTAMPS = "history_timestamps"  # optional
PROFILE_PREFIX = "profile_"
SCORES = "scores"

ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_CONFIG = "ranker_config"
ARTIFACT_SEMANTIC_IDS = "semantic_ids"
ARTIFACT_PROFILE_VOCABULARY = "profile_vocabulary"

TOKENIZER_VERSION = "tokenizer_version"
EXPECTED_TOKENIZER_VERSION = "expected_tokenizer_version"
TRAINING_RUN_TAG = "training_run_id"
DEFAULT_CHUNK_SIZE = 1024
#: What a request may do with history items the packaged table lacks (``params.unknown_history``).
UNKNOWN_HISTORY = ("drop", "error")

_REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "tqdm", "mlflow")


def _check_versions(packaged: str, recorded: str | None, expected: str | None) -> None:
    """Refuse a semantic-ID table whose version is not the model's (or the caller's)."""
    if recorded is not None and packaged != recorded:
        raise ValueError(
            f"semantic-ID table is tokenizer version {packaged!r} but the model was logged with "
            f"tokenizer version {recorded!r}"
        )
    if expected is not None and str(expected) != packaged:
        raise ValueError(
            f"model was trained on tokenizer version {packaged!r}, the caller expects tokenizer "
            f"version {expected!r}; re-train or re-register the ranker for {expected!r}"
        )


def _whole(value: Any, what: str) -> int:
    """One integer of a request: an int as it is (hashed ids lie from 2**62 on), or a whole float below
    2**53 (a float column's; above, a float holds no id exactly). A bool or text is not one."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        if abs(value) >= FLOAT_EXACT:
            raise ValueError(
                f"{what} came as a float, which cannot hold {value!r} exactly: send it as an integer"
            )
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _item_list(value: Any, what: str) -> np.ndarray:
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a list of integers, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{what} must be a list of integers, got {array[:5].tolist()}")
    return integral(array, what)  # a list that passed through a float column: whole and exact, or refused


class HisamRankerModel(mlflow.pyfunc.PythonModel):
    """Scores ``(history, candidates)`` requests with one-pass HMAT ranking (module docstring)."""

    def __init__(self) -> None:
        self.ranker: HMATRanker | None = None
        self.semantic_ids: SemanticIds | None = None
        self.profile_vocabulary: ProfileVocabulary | None = None
        self.mask_rule: int | None = None  # what its checkpoint records (load_context)
        self._config: RankerConfig | None = None
        self._index: pd.Index | None = None

    @property
    def config(self) -> RankerConfig:
        """The packaged :class:`~hisam_core.ranker.train.RankerConfig`."""
        if self._config is None:
            raise RuntimeError("model not loaded: call load_context or setup first")
        return self._config

    def setup(
        self,
        config: RankerConfig,
        model: torch.nn.Module,
        semantic_ids: SemanticIds,
        profile_vocabulary: ProfileVocabulary | None = None,
    ) -> None:
        """Bind a model, its table and its profile vocabulary (what ``load_context`` does from the
        artifacts); the vocabulary's bucket counts must be the model's ``profile_fields``."""
        if profile_vocabulary is not None and profile_vocabulary.bucket_counts != dict(
            config.sequence.profile_fields
        ):
            raise ValueError(
                f"profile vocabulary buckets {profile_vocabulary.bucket_counts} are not the model's "
                f"profile_fields {dict(config.sequence.profile_fields)}"
            )
        self.profile_vocabulary = profile_vocabulary
        model.eval()
        self.ranker = HMATRanker(model, config.sequence)
        self.ranker.vocab.check_semantic_ids(semantic_ids)
        self.semantic_ids = semantic_ids
        self._config = config
        self._index = pd.Index(semantic_ids.item_ids)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load checkpoint, config and table; refuse a tokenizer-version mismatch."""
        settings = context.model_config or {}
        semantic_ids = SemanticIds.load(context.artifacts[ARTIFACT_SEMANTIC_IDS])
        _check_versions(
            semantic_ids.version, settings.get(TOKENIZER_VERSION), settings.get(EXPECTED_TOKENIZER_VERSION)
        )
        config = RankerConfig.from_yaml(context.artifacts[ARTIFACT_CONFIG])
        device = resolve_device(str(settings.get("device", "cpu")))
        checkpoint_config, model = load_model(context.artifacts[ARTIFACT_CHECKPOINT], device)
        if (checkpoint_config.sequence, checkpoint_config.model) != (config.sequence, config.model):
            raise ValueError("packaged checkpoint and ranker_config disagree on the sequence/model config")
        self.mask_rule = checkpoint_mask_rule(context.artifacts[ARTIFACT_CHECKPOINT])
        if self.mask_rule != MASK_RULE:
            log.warning(
                "this ranker was trained under %s and is served under this code's rule %d "
                "(hisam_core.ranker.attention.MASK_RULE): its scores shift until a model trained under it "
                "is promoted",
                f"mask rule {self.mask_rule}" if self.mask_rule is not None else "an unrecorded mask rule",
                MASK_RULE,
            )
        vocabulary = context.artifacts.get(ARTIFACT_PROFILE_VOCABULARY)
        self.setup(config, model, semantic_ids, ProfileVocabulary.load(vocabulary) if vocabulary else None)

    def _codes(self, item_ids: np.ndarray, what: str) -> np.ndarray:
        positions = self._index.get_indexer(item_ids)
        if (positions < 0).any():
            missing = item_ids[positions < 0][:10].tolist()
            raise ValueError(
                f"{what}: item ids without semantic IDs in tokenizer version "
                f"{self.semantic_ids.version!r}: {missing}"
            )
        return self.semantic_ids.codes[positions].reshape(len(item_ids), self.semantic_ids.num_positions)

    def score(
        self,
        request: dict[str, Any],
        what: str = "request",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        unknown_history: str = "drop",
    ) -> np.ndarray:
        """Scores (numpy ``[C]``) of one request row (a mapping with the request columns).

        A history item the packaged table has no semantic IDs for (it arrived after this version was
        packaged or refreshed) is left out, with a warning, before the token budget keeps the most
        recent ones (as ``hisam recommend`` does); ``unknown_history="error"`` refuses the request
        instead. An unknown candidate is always an error: it cannot be scored."""
        if unknown_history not in UNKNOWN_HISTORY:
            raise ValueError(f"unknown_history must be one of {UNKNOWN_HISTORY}, got {unknown_history!r}")
        if self.ranker is None:
            raise RuntimeError("model not loaded: call load_context or setup first")
        user = _whole(request.get("user_id"), f"{what}: user_id")
        what = f"{what} (user {user})"
        history_ids = _item_list(request["history_item_ids"], f"{what} history_item_ids")
        actions = _item_list(request["history_actions"], f"{what} history_actions")
        if len(actions) != len(history_ids):
            raise ValueError(
                f"{what}: {len(history_ids)} history_item_ids but {len(actions)} history_actions"
            )
        times = request.get(HISTORY_TIMESTAMPS)
        if times is None or (np.ndim(times) == 0 and pd.isna(times)):
            instants = None
        else:
            instants = _item_list(times, f"{what} {HISTORY_TIMESTAMPS}")
            if len(instants) != len(history_ids) or (np.diff(instants) < 0).any():
                raise ValueError(
                    f"{what}: {HISTORY_TIMESTAMPS} must be one non-decreasing time per history item "
                    f"(oldest first), got {len(instants)} for {len(history_ids)} items: {instants[:5].tolist()}"
                )
        given = request.get("candidate_item_ids")
        if given is None or (np.ndim(given) == 0 and pd.isna(given)):  # an empty list is no candidates
            raise ValueError(f"{what}: candidate_item_ids is missing")
        candidates = _item_list(given, f"{what} candidate_item_ids")
        profile = {}
        for name in self._config.sequence.profile_fields:
            value = request[f"{PROFILE_PREFIX}{name}"]
            if value is None or pd.isna(value):
                raise ValueError(f"{what}: profile column {PROFILE_PREFIX}{name} is missing a value")
            profile[name] = _whole(value, f"{what}: profile column {PROFILE_PREFIX}{name}")
        known = self._index.get_indexer(history_ids) >= 0
        if unknown_history == "drop" and not known.all():
            log.warning(
                "%s: %d history items without semantic IDs in %r left out, e.g. %s",
                what,
                int((~known).sum()),
                self.semantic_ids.version,
                history_ids[~known][:5].tolist(),
            )
            history_ids, actions = history_ids[known], actions[known]
            instants = None if instants is None else instants[known]
        history = UserHistory(
            user, self._codes(history_ids, f"{what} history"), actions, profile, instants=instants
        )
        codes = self._codes(candidates, f"{what} candidates")
        return self.ranker.rank(history, codes, chunk_size=chunk_size).float().cpu().numpy()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """One row of ``scores`` (list of floats aligned with ``candidate_item_ids``) per request."""
        if self.ranker is None:
            raise RuntimeError("model not loaded: call load_context or setup first")
        needed = list(REQUEST_COLUMNS) + [
            f"{PROFILE_PREFIX}{n}" for n in self._config.sequence.profile_fields
        ]
        missing = [column for column in needed if column not in model_input.columns]
        if missing:
            raise ValueError(f"ranker request is missing columns {missing} (has {list(model_input.columns)})")
        if HISTORY_TIMESTAMPS in model_input.columns:
            needed.append(HISTORY_TIMESTAMPS)
        chunk_size = int((params or {}).get("chunk_size", DEFAULT_CHUNK_SIZE))
        unknown_history = str((params or {}).get("unknown_history", "drop"))
        scores = [
            self.score(row, f"row {label}", chunk_size, unknown_history).tolist()
            for label, row in zip(model_input.index, model_input[needed].to_dict("records"), strict=True)
        ]
        return pd.DataFrame({SCORES: scores}, index=model_input.index)


def example_request(semantic_ids: SemanticIds, config: RankerConfig, rows: int = 2) -> pd.DataFrame:
    """A small valid request built from the first items of the table (the logged input example)."""
    ids = semantic_ids.item_ids.tolist()
    if not ids:
        raise ValueError(f"semantic-ID table {semantic_ids.version!r} is empty")
    records = []
    for row in range(rows):
        history = [ids[(row + k) % len(ids)] for k in range(2)]
        record = {
            "user_id": row,
            "history_item_ids": history,
            "history_actions": [k % len(config.sequence.action_names) for k in range(len(history))],
            HISTORY_TIMESTAMPS: [1_000_000 * k for k in range(len(history))],
            "candidate_item_ids": [ids[(row + 2 + k) % len(ids)] for k in range(3)],
        }
        record.update({f"{PROFILE_PREFIX}{name}": 0 for name in config.sequence.profile_fields})
        records.append(record)
    return pd.DataFrame(records)


def pip_requirements() -> list[str]:
    """Exact pins of what a packaged model imports (drawn from this environment)."""
    pins = []
    for package in _REQUIREMENTS:
        version = importlib_metadata.version(package).split("+")[0]  # drop local tags (+cpu)
        pins.append(f"{package}=={version}")
    return pins


#: The ``pipelines`` modules a registered model runs, packaged with every model: MLflow puts a model's
#: code first on ``sys.path`` but keeps the packages a process imported already, so the first model
#: a process loads provides ``pipelines`` (and ``hisam_core``) for every later one, of either kind.
PACKAGED_MODULES = ("ranker_model.py", "tokenizer_model.py")


def stage_code(root: Path) -> list[str]:
    """Copy ``hisam_core`` and :data:`PACKAGED_MODULES` (which import nothing else from
    ``pipelines``) under ``root`` as a ``pipelines`` package; returns the MLflow ``code_paths``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    core = Path(hisam_core.__file__).parent
    shutil.copytree(core, root / "hisam_core", ignore=ignore)
    package = root / "pipelines"
    package.mkdir()
    (package / "__init__.py").write_text('"""Packaged subset of the pipelines package."""\n')
    for name in PACKAGED_MODULES:
        shutil.copy2(Path(__file__).with_name(name), package / name)
    return [str(root / "hisam_core"), str(package)]


def log_ranker(
    model_checkpoint_path: str | Path,
    ranker_config: RankerConfig,
    semantic_ids: SemanticIds,
    registered_name: str,
    name: str = "ranker",
    training_run_id: str | None = None,
    profile_vocabulary: ProfileVocabulary | None = None,
    version_tags: Mapping[str, str] | None = None,
) -> ModelVersion:
    """Log the ranker (checkpoint weights, config YAML, semantic-ID parquet, code) as a pyfunc model
    in the active run (a new run when none is active), register it as ``registered_name`` and tag
    the new version with ``tokenizer_version`` and ``training_run_id`` (default: the run it is logged
    in) and ``version_tags``, all set when the version is created (a retried step finds the version
    by its tags, so it never registers twice). The checkpoint is re-saved with config and weights
    only (no optimizer state); its sequence/model config must equal ``ranker_config``'s, the table
    must fit its vocabulary and the profile vocabulary (packaged when given) its ``profile_fields``."""
    checkpoint = torch.load(model_checkpoint_path, map_location="cpu", weights_only=True)
    checkpoint_config = RankerConfig.from_dict(checkpoint["config"])
    if (checkpoint_config.sequence, checkpoint_config.model) != (ranker_config.sequence, ranker_config.model):
        raise ValueError(
            f"checkpoint {model_checkpoint_path} was trained with a different sequence/model config "
            "than the ranker_config given"
        )
    model = build_model(ranker_config)
    model.load_state_dict(checkpoint["state_dict"])
    wrapper = HisamRankerModel()
    wrapper.setup(ranker_config, model, semantic_ids, profile_vocabulary)  # checks table and profile
    example = example_request(semantic_ids, ranker_config)
    with warnings.catch_warnings():  # "integer columns cannot hold missing values": intended here
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(
            example,
            wrapper.predict(None, example),
            params={"chunk_size": DEFAULT_CHUNK_SIZE, "unknown_history": "drop"},
        )
    inputs = [ColSpec(c.type, c.name, required=c.name != HISTORY_TIMESTAMPS) for c in signature.inputs.inputs]
    signature = ModelSignature(Schema(inputs), signature.outputs, signature.params)
    version = semantic_ids.version
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        rule = {"mask_rule": checkpoint["mask_rule"]} if "mask_rule" in checkpoint else {}
        torch.save(
            {"config": ranker_config.model_dump(mode="json"), "state_dict": model.state_dict(), **rule},
            tmp_path / "hmat.pt",
        )
        ranker_config.to_yaml(tmp_path / "ranker_config.yaml")
        semantic_ids.save(tmp_path / "semantic_ids.parquet")
        artifacts = {
            ARTIFACT_CHECKPOINT: str(tmp_path / "hmat.pt"),
            ARTIFACT_CONFIG: str(tmp_path / "ranker_config.yaml"),
            ARTIFACT_SEMANTIC_IDS: str(tmp_path / "semantic_ids.parquet"),
        }
        if profile_vocabulary is not None:
            profile_vocabulary.save(tmp_path / "profile_vocabulary.json")
            artifacts[ARTIFACT_PROFILE_VOCABULARY] = str(tmp_path / "profile_vocabulary.json")
        code_paths = stage_code(tmp_path / "code")
        run_context = nullcontext(active) if active is not None else mlflow.start_run()
        with run_context as run:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=HisamRankerModel(),
                artifacts=artifacts,
                code_paths=code_paths,
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements(),
                model_config={TOKENIZER_VERSION: version, EXPECTED_TOKENIZER_VERSION: None, "device": "cpu"},
                metadata={TOKENIZER_VERSION: version},
                tags={TOKENIZER_VERSION: version},
            )
            logged_in = run.info.run_id
    training_run = training_run_id or logged_in
    # the fluent call also links the logged model to the version (its mlflow.modelVersions tag)
    registered = mlflow.register_model(
        info.model_uri,
        registered_name,
        tags={TOKENIZER_VERSION: version, TRAINING_RUN_TAG: training_run, **(version_tags or {})},
    )
    log.info(
        "registered %s v%s (tokenizer %s, run %s)", registered_name, registered.version, version, training_run
    )
    return registered


def load_ranker(
    model_uri: str, expected_tokenizer_version: str | SemanticIds | None = None
) -> mlflow.pyfunc.PyFuncModel:
    """Load a logged ranker (``models:/name/1``, ``models:/name@champion``, ``runs:/...``); refuse
    with a ValueError naming both versions when ``expected_tokenizer_version`` (a version string
    or the caller's SemanticIds table) differs from the packaged one. The HisamRankerModel is
    ``.unwrap_python_model()``."""
    expected = (
        expected_tokenizer_version.version
        if isinstance(expected_tokenizer_version, SemanticIds)
        else expected_tokenizer_version
    )
    info = mlflow.models.get_model_info(model_uri)
    recorded = (info.metadata or {}).get(TOKENIZER_VERSION)
    if recorded is None:
        raise ValueError(f"{model_uri} records no {TOKENIZER_VERSION}: not a Hi-SAM ranker model")
    _check_versions(recorded, None, expected)
    return mlflow.pyfunc.load_model(model_uri, model_config={EXPECTED_TOKENIZER_VERSION: expected})

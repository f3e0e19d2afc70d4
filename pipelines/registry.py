"""Model registry policy on MLflow 3: the promotion gate, aliases and rollback.

Aliases, not stages: ``@champion`` is what serves; the champion it replaced keeps ``@previous``.
A candidate is promoted only when every metric clears its absolute floor and no metric regresses
against the champion by more than its tolerance, both measured on the same frozen test snapshot.
A rejected candidate keeps its version, tagged ``gate=rejected`` with the reasons.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from hisam_core.config import Config

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
#: The tokenizer the lifecycle uses now (set once its catalogue and samples are written).
CURRENT = "current"


class PromotionGateConfig(Config):
    """Floors and no-regression tolerances per metric (absolute differences)."""

    floors: dict[str, float] = {"auc": 0.55, "gauc": 0.52, "cold_gauc": 0.50}
    max_regression: dict[str, float] = {"auc": 0.002, "gauc": 0.002, "cold_gauc": 0.005}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, config: PromotionGateConfig
) -> GateDecision:
    """Apply the gate; the reasons list every failed condition (empty when promoted)."""
    reasons: list[str] = []
    for metric, floor in config.floors.items():
        if metric not in candidate:
            reasons.append(f"{metric}: missing from the candidate's evaluation")
        elif not candidate[metric] >= floor:  # also catches NaN
            reasons.append(f"{metric}: {candidate[metric]:.4f} below floor {floor:.4f}")
    if champion is not None:
        for metric, tolerance in config.max_regression.items():
            theirs = champion.get(metric)
            if theirs is None or not math.isfinite(theirs):  # nothing measured to regress from
                continue
            if metric not in candidate:
                if metric not in config.floors:  # else already listed as missing
                    reasons.append(f"{metric}: missing from the candidate's evaluation")
            elif not candidate[metric] >= theirs - tolerance:  # also catches NaN
                reasons.append(
                    f"{metric}: {candidate[metric]:.4f} regresses from champion {theirs:.4f} "
                    f"by more than {tolerance:.4f}"
                )
    return GateDecision(promote=not reasons, reasons=reasons)


def find_versions(client: MlflowClient, model: str, **tags: str) -> list[ModelVersion]:
    """Versions of ``model`` carrying every ``tag=value``, newest first (empty when none)."""
    query = " and ".join([f"name = '{model}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    found = client.search_model_versions(query)
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def alias_version(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version behind ``@alias``, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def champion_version(client: MlflowClient, model: str) -> str | None:
    """The version behind ``@champion``, or None before the first promotion."""
    try:
        return str(client.get_model_version_by_alias(model, CHAMPION).version)
    except MlflowException:
        return None


def apply_decision(client: MlflowClient, model: str, version: str, decision: GateDecision) -> None:
    """Move the aliases (promote) or tag the candidate rejected; both are recorded as tags."""
    if not decision.promote:
        client.set_model_version_tag(model, version, "gate", "rejected")
        client.set_model_version_tag(model, version, "gate_reasons", "; ".join(decision.reasons))
        log.warning("%s v%s rejected: %s", model, version, "; ".join(decision.reasons))
        return
    old = champion_version(client, model)
    if old is not None and old != version:
        client.set_registered_model_alias(model, PREVIOUS, old)
    client.set_registered_model_alias(model, CHAMPION, version)
    client.set_model_version_tag(model, version, "gate", "promoted")
    log.info("%s v%s promoted to @%s (previous: %s)", model, version, CHAMPION, old)


def make_refreshed_champion(client: MlflowClient, model: str, version: str) -> None:
    """Point ``@champion`` at a refreshed version (the champion's weights with more semantic IDs,
    ``refresh-champion``); ``@previous`` stays where it was."""
    client.set_model_version_tag(model, version, "gate", "refreshed")  # first: a retry keys on the alias
    client.set_registered_model_alias(model, CHAMPION, version)
    log.info("%s v%s (refreshed) is @%s", model, version, CHAMPION)


def rollback(client: MlflowClient, model: str) -> str:
    """Restore ``@previous`` as ``@champion``; the demoted version is tagged ``rolled_back``."""
    try:
        previous = str(client.get_model_version_by_alias(model, PREVIOUS).version)
    except MlflowException as err:
        raise ValueError(f"{model}: no @{PREVIOUS} version to roll back to") from err
    demoted = champion_version(client, model)
    if demoted == previous:  # a retry after @champion moved: only @previous is left to remove
        client.delete_registered_model_alias(model, PREVIOUS)
        log.warning("%s: rollback to v%s completed", model, previous)
        return previous
    if demoted is not None:  # first, so a retry after the aliases moved never tags the restored one
        client.set_model_version_tag(model, demoted, "gate", "rolled_back")
    client.set_registered_model_alias(model, CHAMPION, previous)
    client.delete_registered_model_alias(model, PREVIOUS)
    log.warning("%s: rolled back @%s from v%s to v%s", model, CHAMPION, demoted, previous)
    return previous

"""Model registry policy on MLflow 3: the promotion gate, aliases and rollback.

Aliases, not stages: ``@champion`` is what serves; the champion it replaced keeps ``@previous``.
A candidate is promoted only when every metric clears its absolute floor, no metric regresses
against the champion by more than its tolerance (both measured on the same frozen test snapshot), and
the champion line has not drifted too far below its best: small tolerated regressions add up, so each
promoted version carries its estimated distance below the line's best (``gate.drift.<metric>`` tags,
see :func:`decide`). A rejected candidate keeps its version, tagged ``gate=rejected`` with the reasons.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Self

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import model_validator

from hisam_core.config import Config

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
#: The tokenizer the lifecycle uses now (set once its catalogue and samples are written).
CURRENT = "current"
#: Model-version tag prefix of a promoted version's drift: how far, per metric, it is estimated to be
#: below the best version of its champion line (0 at a new best; see :func:`decide`).
DRIFT_PREFIX = "gate.drift."
#: Model-version tags naming the logical run (``<dataset>/<date>``) that produced a version: the
#: ranker's and pre-trained model's, the tokenizer's, a refreshed champion's (:func:`check_dataset`).
RUN_KEY_TAGS = ("run_key", "hisam.run_key", "refresh_key")
#: What ``evaluate`` measures and the gate can judge (Sec. 4.1).
GATE_METRICS = ("auc", "gauc", "cold_auc", "cold_gauc")


class PromotionGateConfig(Config):
    """Floors, no-regression tolerances and drift budgets per metric (absolute differences).

    ``max_regression`` bounds one promotion against the champion it replaces; ``max_drift`` bounds
    the sum of the tolerated regressions since the champion line's best, so a run of small ones cannot
    walk the champion down to the floors. The defaults are about twice the std of the difference
    between two seeds of the demo's fine-tune (``benchmarks/gate_noise.py``): at 0.002, by that
    noise, GAUC alone would reject about a third of equally good candidates.
    """

    floors: dict[str, float] = {"auc": 0.55, "gauc": 0.52, "cold_gauc": 0.50}
    max_regression: dict[str, float] = {"auc": 0.01, "gauc": 0.01, "cold_gauc": 0.015}
    max_drift: dict[str, float] = {"auc": 0.02, "gauc": 0.02, "cold_gauc": 0.03}

    @model_validator(mode="after")
    def _check(self) -> Self:
        for section in ("floors", "max_regression", "max_drift"):
            unknown = sorted(set(getattr(self, section)) - set(GATE_METRICS))
            if unknown:  # a misspelt metric would leave the real one unchecked
                raise ValueError(
                    f"gate.{section} names {unknown}, which evaluate does not measure; "
                    f"the gate metrics are {list(GATE_METRICS)}"
                )
        for section in ("floors", "max_regression", "max_drift"):
            bad = {m: v for m, v in getattr(self, section).items() if not 0.0 <= v <= 1.0}  # NaN too
            if bad:  # the gate metrics are AUCs: a floor above 1 or a negative tolerance refuses all
                raise ValueError(f"gate.{section} {bad} must lie in [0, 1] (the gate metrics are AUCs)")
        tighter = {
            m: budget for m, budget in self.max_drift.items() if budget < self.max_regression.get(m, 0.0)
        }
        if tighter:
            raise ValueError(
                f"max_drift {tighter} is below max_regression for the same metrics: one tolerated "
                "regression would already exceed the drift budget; raise max_drift"
            )
        return self


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)  # the candidate's, tagged when promoted
    unmeasured: list[str] = field(default_factory=list)  # skipped: the snapshot cannot define them


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    config: PromotionGateConfig,
    champion_drift: dict[str, float] | None = None,
    unmeasured: Collection[str] = (),
) -> GateDecision:
    """Apply the gate; the reasons list every failed condition (empty when promoted).

    Drift is a one-sided CUSUM of same-snapshot differences: the candidate's drift is
    ``min(0, champion_drift + candidate - champion)`` per metric, so each promotion's difference is
    chained onto the champion's and a new best resets it to 0. Every difference is measured on one
    snapshot, so the chain compares models across days without comparing days. A metric the champion
    never measured starts a new chain at 0; one it has but logged as NaN chains no difference: the
    candidate carries the champion's drift, not a reset. (``evaluate`` logs no NaN score metric: scores
    that are not finite, the candidate's or the champion's, fail it with their alert.)

    ``unmeasured`` names metrics the evaluation could not define on its snapshot (a cold-start subset
    that is empty or has one class). Candidate and champion are scored on the same rows, so neither
    has them: their conditions are skipped, not failed, and the champion's drift is carried over.
    Any other missing metric still fails.
    """
    skip = sorted(m for m in unmeasured if not math.isfinite(candidate.get(m, math.nan)))
    reasons: list[str] = []
    for metric, floor in config.floors.items():
        if metric in skip:
            continue
        if metric not in candidate:
            reasons.append(f"{metric}: missing from the candidate's evaluation")
        elif not candidate[metric] >= floor:  # also catches NaN
            reasons.append(f"{metric}: {candidate[metric]:.4f} below floor {floor:.4f}")
    if champion is not None:
        for metric, tolerance in config.max_regression.items():
            theirs = champion.get(metric)
            if metric in skip or theirs is None or not math.isfinite(theirs):  # nothing to regress from
                continue
            if metric not in candidate:
                if metric not in config.floors:  # else already listed as missing
                    reasons.append(f"{metric}: missing from the candidate's evaluation")
            elif not candidate[metric] >= theirs - tolerance:  # also catches NaN
                reasons.append(
                    f"{metric}: {candidate[metric]:.4f} regresses from champion {theirs:.4f} "
                    f"by more than {tolerance:.4f}"
                )
    drift: dict[str, float] = {}
    for metric, budget in config.max_drift.items():
        if metric in skip:
            if metric in (champion_drift or {}):
                drift[metric] = (champion_drift or {})[metric]
            continue
        mine = candidate.get(metric, math.nan)
        theirs = math.nan if champion is None else champion.get(metric, math.nan)
        if not math.isfinite(theirs):  # the first champion, a metric it never measured, or NaN
            if math.isfinite(mine):
                drift[metric] = (champion_drift or {}).get(metric, 0.0) if metric in (champion or {}) else 0.0
            continue
        if not math.isfinite(mine):
            if metric not in config.floors and metric not in config.max_regression:  # else listed above
                reasons.append(f"{metric}: missing or NaN in the candidate's evaluation")
            continue
        drift[metric] = min(0.0, (champion_drift or {}).get(metric, 0.0) + mine - theirs)
        if drift[metric] < -budget:
            reasons.append(
                f"{metric}: {mine:.4f} would put the champion line {-drift[metric]:.4f} below its best "
                f"(tolerated regressions add up), more than {budget:.4f}"
            )
    return GateDecision(promote=not reasons, reasons=reasons, drift=drift, unmeasured=skip)


def find_versions(client: MlflowClient, model: str, **tags: str) -> list[ModelVersion]:
    """Versions of ``model`` carrying every ``tag=value``, newest first (empty when none)."""
    query = " and ".join([f"name = '{model}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    found = client.search_model_versions(query)
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def required_tag(version: ModelVersion, tag: str) -> str:
    """``version``'s ``tag``; a clear error naming model, version and tag when it lacks it (set by
    hand, or registered by an older pipeline or outside it)."""
    if (value := version.tags.get(tag)) is None:
        raise ValueError(
            f"{version.name} v{version.version} has no {tag} tag: it was not registered by this "
            "pipeline's steps (set by hand, or by an older release?); register or activate one that was"
        )
    return str(value)


def check_dataset(client: MlflowClient, models: Collection[str], dataset: str) -> None:
    """Refuse registered models in ``models`` whose versions are another dataset's: aliases
    (``@current``, ``@champion``) are per model name, and steps find versions by
    ``tokenizer_version`` or run key, so two datasets under one name would skip, judge and serve on
    each other's versions. A model's dataset is that of its newest version's logical run
    (``run_key``, ``hisam.run_key`` or ``refresh_key``: ``<dataset>/<date>``), so the check reads
    only, and holds from the first version on, whoever created it."""
    for name in models:
        newest = client.search_model_versions(
            f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
        )
        keys = (newest[0].tags.get(k) for k in RUN_KEY_TAGS) if newest else ()
        owner = next((key.rpartition("/")[0] for key in keys if key), None)
        if owner is not None and owner != dataset:
            raise ValueError(
                f"registered model {name!r} holds dataset {owner!r}'s versions, and this config's dataset "
                f"is {dataset!r}: give it other models.* names, or use another MLflow store "
                "(for `hisam demo`, another HISAM_HOME)"
            )


def alias_version(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version behind ``@alias``, or None when the alias (or the model) does not exist. Any other
    registry error (a locked database, a lost connection) is raised, never read as "no alias"."""
    try:
        registered = client.get_registered_model(model)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return client.get_model_version_by_alias(model, alias) if alias in registered.aliases else None


def champion_version(client: MlflowClient, model: str) -> str | None:
    """The version behind ``@champion``, or None before the first promotion."""
    found = alias_version(client, model, CHAMPION)
    return None if found is None else str(found.version)


def _still_champion(client: MlflowClient, model: str, expected: str | None, version: str, what: str) -> None:
    """``@champion`` read again just before an alias moves: it must still be ``expected`` (or already
    ``version``, a retry). A rollback or promote since ``expected`` was read is refused, not undone.
    MLflow has no compare-and-set for aliases, so this narrows the race to the alias write itself."""
    now = champion_version(client, model)
    if now not in (expected, version):
        raise ValueError(
            f"{model}@champion moved from v{expected} to v{now} while {what} v{version} was prepared "
            "(a rollback or another promotion): refusing to move it back; rerun the step"
        )


RESTORED_FROM = "restored_from"  # model-version tag: the champion a rollback demoted for it
#: model-version tag of the version a rollback restores, while its alias moves are under way
ROLLBACK_PENDING = "rollback_pending"


def apply_decision(
    client: MlflowClient, model: str, version: str, decision: GateDecision, *, against: str | None
) -> None:
    """Move the aliases (promote) or tag the candidate rejected; both are recorded as tags.
    ``against`` is the champion the candidate was judged against (None: there was none)."""
    _still_champion(client, model, against, version, "candidate")
    if decision.unmeasured:
        client.set_model_version_tag(model, version, "gate_unmeasured", ",".join(decision.unmeasured))
    if not decision.promote:  # the reasons first: a retry skips a version tagged with its gate
        client.set_model_version_tag(model, version, "gate_reasons", "; ".join(decision.reasons))
        client.set_model_version_tag(model, version, "gate", "rejected")
        log.warning("%s v%s rejected: %s", model, version, "; ".join(decision.reasons))
        return
    old = champion_version(client, model)
    if old is not None and old != version and ROLLBACK_PENDING in client.get_model_version(model, old).tags:
        # a rollback to it that stopped before its last step: done, and its mark must not pass for
        # one under way once @previous points here
        client.delete_model_version_tag(model, old, ROLLBACK_PENDING)
    if old != version:  # a retry after the aliases moved keeps the drift its first attempt tagged
        stale = [t for t in client.get_model_version(model, version).tags if t.startswith(DRIFT_PREFIX)]
        for tag in stale:  # an attempt that stopped before a re-evaluation left its own: this decision's only
            if tag.removeprefix(DRIFT_PREFIX) not in decision.drift:
                client.delete_model_version_tag(model, version, tag)
        for metric, value in decision.drift.items():  # before the aliases: a retry keys on them
            client.set_model_version_tag(model, version, f"{DRIFT_PREFIX}{metric}", f"{value:.6f}")
    if old is not None and old != version:
        client.set_registered_model_alias(model, PREVIOUS, old)
    client.set_registered_model_alias(model, CHAMPION, version)
    client.set_model_version_tag(model, version, "gate", "promoted")
    log.info("%s v%s promoted to @%s (previous: %s)", model, version, CHAMPION, old)


def make_refreshed_champion(client: MlflowClient, model: str, version: str, *, refreshed_from: str) -> None:
    """Point ``@champion`` at a refreshed version (the champion's weights with more semantic IDs,
    ``refresh-champion``) if it still is ``refreshed_from``; ``@previous`` stays where it was."""
    _still_champion(client, model, refreshed_from, version, "refresh")
    client.set_model_version_tag(model, version, "gate", "refreshed")  # first: a retry keys on the alias
    client.set_registered_model_alias(model, CHAMPION, version)
    log.info("%s v%s (refreshed) is @%s", model, version, CHAMPION)


def rollback(client: MlflowClient, model: str) -> tuple[str, str | None]:
    """Restore ``@previous`` as ``@champion``; the demoted version is tagged ``rolled_back``.
    Returns (restored, demoted) versions, also when a retry completes an interrupted rollback (the
    restored version is tagged ``rollback_pending`` until its aliases have moved). Both aliases on
    one version without that tag is a promotion interrupted after it moved ``@previous``: refused,
    since its rerun of ``promote`` completes it."""
    found = alias_version(client, model, PREVIOUS)
    if found is None:
        champion = alias_version(client, model, CHAMPION)
        pending = champion.tags.get(ROLLBACK_PENDING) if champion is not None else None
        if pending is not None:  # a retry after @previous went: only the mark is left to remove
            client.delete_model_version_tag(model, str(champion.version), ROLLBACK_PENDING)
            log.warning("%s: rollback from v%s to v%s completed", model, pending, champion.version)
            return str(champion.version), pending
        earlier = champion.tags.get(RESTORED_FROM) if champion is not None else None
        hint = (  # a refresh keeps the restored version's tags, so it may be the refreshed one
            f" (a rollback demoted v{earlier} for the weights @{CHAMPION} v{champion.version} serves: if it "
            "stopped before its refresh, `hisam run refresh-champion` completes it)"
            if earlier
            else ""
        )
        raise ValueError(f"{model}: no @{PREVIOUS} version to roll back to{hint}")
    previous = str(found.version)
    demoted = champion_version(client, model)
    if demoted == previous:  # a retry after @champion moved: @previous and the mark are left
        demoted = found.tags.get(ROLLBACK_PENDING)
        if demoted is None:
            raise ValueError(
                f"{model}: @{PREVIOUS} and @{CHAMPION} are both v{previous} and no rollback to it is "
                "under way: a promotion stopped between its two alias moves; rerun promote to finish "
                "it (there is nothing to roll back to)"
            )
        client.delete_registered_model_alias(model, PREVIOUS)
        client.delete_model_version_tag(model, previous, ROLLBACK_PENDING)
        log.warning("%s: rollback from v%s to v%s completed", model, demoted, previous)
        return previous, demoted
    if demoted is not None:  # first, so a retry after the aliases moved never tags the restored one
        client.set_model_version_tag(model, previous, RESTORED_FROM, demoted)
        client.set_model_version_tag(model, previous, ROLLBACK_PENDING, demoted)
        client.set_model_version_tag(model, demoted, "gate", "rolled_back")
    client.set_registered_model_alias(model, CHAMPION, previous)
    client.delete_registered_model_alias(model, PREVIOUS)
    if demoted is not None:  # last: until here a retry finds the rollback under way and completes it
        client.delete_model_version_tag(model, previous, ROLLBACK_PENDING)
    log.warning("%s: rolled back @%s from v%s to v%s", model, CHAMPION, demoted, previous)
    return previous, demoted

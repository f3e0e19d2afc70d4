"""Promotion gate and rollback against a real MLflow SQLite registry."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
from mlflow import MlflowClient

from pipelines.ranker import metrics_of
from pipelines.registry import (
    DRIFT_PREFIX,
    GATE_METRICS,
    PREVIOUS,
    GateDecision,
    PromotionGateConfig,
    alias_version,
    apply_decision,
    champion_version,
    decide,
    find_versions,
    make_refreshed_champion,
    rollback,
)

GATE = PromotionGateConfig(
    floors={"auc": 0.6, "gauc": 0.55, "cold_gauc": 0.5},
    max_regression={"auc": 0.01, "gauc": 0.01, "cold_gauc": 0.02},
    max_drift={"auc": 0.015, "gauc": 0.015, "cold_gauc": 0.03},
)


def _drift(tags: dict[str, str]) -> dict[str, float]:
    return metrics_of(tags, DRIFT_PREFIX, GATE_METRICS)


GOOD = {"auc": 0.70, "gauc": 0.62, "cold_gauc": 0.58}


def test_gate_promotes_first_candidate_above_floors() -> None:
    assert decide(GOOD, None, GATE) == GateDecision(True, [], dict.fromkeys(GOOD, 0.0))


def test_gate_lists_every_failed_condition() -> None:
    bad = {"auc": 0.59, "gauc": 0.60, "cold_gauc": math.nan}
    decision = decide(bad, GOOD, GATE)
    assert not decision.promote
    assert decision.reasons == [
        "auc: 0.5900 below floor 0.6000",
        "cold_gauc: nan below floor 0.5000",  # NaN never passes
        "auc: 0.5900 regresses from champion 0.7000 by more than 0.0100",
        "gauc: 0.6000 regresses from champion 0.6200 by more than 0.0100",
        "cold_gauc: nan regresses from champion 0.5800 by more than 0.0200",
        "auc: 0.5900 would put the champion line 0.1100 below its best (tolerated regressions add up), "
        "more than 0.0150",
        "gauc: 0.6000 would put the champion line 0.0200 below its best (tolerated regressions add up), "
        "more than 0.0150",
    ]


def test_gate_refuses_nan_or_missing_metrics_that_only_have_a_tolerance() -> None:
    """A metric with a regression tolerance but no floor: NaN or a missing value is a regression,
    not a pass; a champion that never measured it leaves nothing to regress from."""
    gate = PromotionGateConfig(floors={"auc": 0.6}, max_regression={"auc": 0.01, "gauc": 0.01}, max_drift={})
    assert decide({"auc": 0.7, "gauc": math.nan}, GOOD, gate).reasons == [
        "gauc: nan regresses from champion 0.6200 by more than 0.0100"
    ]
    assert decide({"auc": 0.7}, GOOD, gate).reasons == ["gauc: missing from the candidate's evaluation"]
    assert decide({"auc": 0.7, "gauc": 0.5}, {"auc": 0.7, "gauc": math.nan}, gate).promote
    assert decide({"auc": 0.7, "gauc": 0.5}, {"auc": 0.7}, gate).promote


def test_a_champion_metric_measured_as_nan_carries_its_drift_instead_of_resetting_it() -> None:
    """Nothing to regress from and no difference to chain: a broken champion score is no new best, so
    the line's accumulated drift stays; a metric the champion never measured starts at 0."""
    gate = PromotionGateConfig(floors={}, max_regression={}, max_drift={"auc": 0.02, "gauc": 0.02})
    decision = decide({"auc": 0.7, "gauc": 0.6}, {"auc": math.nan}, gate, {"auc": -0.012, "gauc": -0.01})
    assert decision.promote and decision.drift == {"auc": -0.012, "gauc": 0.0}


def test_gate_tolerates_regression_within_tolerance() -> None:
    within = {k: v - 0.005 for k, v in GOOD.items()}
    assert decide(within, GOOD, GATE).promote


def _shift(metrics: dict[str, float], by: float) -> dict[str, float]:
    return {k: v + by for k, v in metrics.items()}


def test_drift_chains_tolerated_regressions_and_resets_at_a_new_best() -> None:
    """Promotions each 0.007 worse than their champion pass the per-promotion tolerance (0.01), but
    the third would leave the line 0.021 below its best (budget 0.015 for auc and gauc, 0.03 for
    cold_gauc); a better candidate resets the chain to 0, and a smaller gain only recovers part."""
    v2 = decide(_shift(GOOD, -0.007), GOOD, GATE, {})
    assert v2.promote and v2.drift == pytest.approx(dict.fromkeys(GOOD, -0.007))
    v3 = decide(_shift(GOOD, -0.014), _shift(GOOD, -0.007), GATE, v2.drift)
    assert v3.promote and v3.drift == pytest.approx(dict.fromkeys(GOOD, -0.014))
    v4 = decide(_shift(GOOD, -0.021), _shift(GOOD, -0.014), GATE, v3.drift)
    assert v4.reasons == [
        f"{m}: {GOOD[m] - 0.021:.4f} would put the champion line 0.0210 below its best "
        "(tolerated regressions add up), more than 0.0150"
        for m in ("auc", "gauc")
    ]
    assert v4.drift["cold_gauc"] == pytest.approx(-0.021)  # within its own budget of 0.03
    partial = decide(_shift(GOOD, -0.006), _shift(GOOD, -0.014), GATE, v3.drift)
    assert partial.promote and partial.drift == pytest.approx(dict.fromkeys(GOOD, -0.006))
    best = decide(_shift(GOOD, 0.004), _shift(GOOD, -0.014), GATE, v3.drift)
    assert best.promote and best.drift == dict.fromkeys(GOOD, 0.0)
    # a metric the champion never measured starts a new chain
    fresh = decide(GOOD, {"auc": GOOD["auc"], "gauc": GOOD["gauc"]}, GATE, {"cold_gauc": -0.029})
    assert fresh.drift["cold_gauc"] == 0.0
    # a metric with only a drift budget: NaN or missing is refused, not a pass (NaN + x < y is False)
    only_drift = PromotionGateConfig(floors={}, max_regression={}, max_drift={"gauc": 0.01})
    for broken in ({"gauc": math.nan}, {}):
        assert decide(broken, GOOD, only_drift).reasons == [
            "gauc: missing or NaN in the candidate's evaluation"
        ]


def test_metrics_the_snapshot_cannot_define_are_skipped_only_when_declared() -> None:
    """No cold-start test user with both classes: cold_gauc is undefined for candidate and champion
    alike. Declared unmeasured, its floor, tolerance and drift budget are skipped and the champion's
    drift carries over; undeclared, a missing metric still fails."""
    warm = {"auc": 0.70, "gauc": 0.62}
    first = decide(warm, None, GATE, unmeasured=["cold_auc", "cold_gauc"])
    assert first == GateDecision(True, [], {"auc": 0.0, "gauc": 0.0}, ["cold_auc", "cold_gauc"])
    assert decide(warm, None, GATE).reasons == ["cold_gauc: missing from the candidate's evaluation"]
    later = decide(warm, warm, GATE, {"auc": -0.004, "cold_gauc": -0.02}, unmeasured=["cold_gauc"])
    assert later.promote and later.drift == pytest.approx({"auc": -0.004, "gauc": 0.0, "cold_gauc": -0.02})
    # measured after all: judged as usual, whatever the declaration says
    measured = decide({**warm, "cold_gauc": 0.4}, GOOD, GATE, unmeasured=["cold_gauc"])
    assert measured.unmeasured == [] and "cold_gauc: 0.4000 below floor 0.5000" in measured.reasons


def test_register_reads_only_what_the_latest_evaluation_measured(tmp_path, mlflow_store) -> None:
    """Run metrics keep every key ever logged: a cold_gauc an earlier evaluation logged is not the
    latest evaluation's when that one could not measure it."""
    from pipelines.ranker import EVAL_METRICS, evaluated_metrics

    client = MlflowClient(tracking_uri=mlflow_store(tmp_path))
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    assert evaluated_metrics(client.get_run(run_id)) == {}
    first = {"eval.auc": 0.7, "eval.cold_gauc": 0.6, "champion.cold_gauc": 0.61}
    for key, value in {**first, "sft/loss": 0.3}.items():
        client.log_metric(run_id, key, value)
    assert evaluated_metrics(client.get_run(run_id)) == first  # evaluated before the tag existed
    client.set_tag(run_id, EVAL_METRICS, "eval.auc,eval.cold_gauc,champion.cold_gauc")
    client.log_metric(run_id, "eval.auc", 0.71)  # evaluated again, cold subset gone
    client.set_tag(run_id, EVAL_METRICS, "eval.auc")
    assert evaluated_metrics(client.get_run(run_id)) == {"eval.auc": 0.71}
    client.set_tag(run_id, EVAL_METRICS, "")  # evaluate's first write: until its last, none holds
    client.log_metric(run_id, "eval.auc", 0.9)
    assert evaluated_metrics(client.get_run(run_id)) == {}


def test_a_registered_model_holds_one_datasets_versions(tmp_path, mlflow_store, monkeypatch) -> None:
    """Aliases are per model name: a second dataset on the same store and names would skip, judge
    and serve on the first one's versions. Its steps are refused from the first version on (read from
    the newest version's run key, whoever created the model), naming the way out; other names work,
    the first dataset goes on, and the check writes nothing."""
    import datetime as dt

    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    day = dt.date(2026, 11, 2)

    def context(dataset: str, **names: str) -> StepContext:
        return StepContext(PipelineConfig.model_validate({"dataset": dataset, "models": names}), day)

    first = context("movielens")
    first.mlflow.create_registered_model("hisam-tokenizer")  # created, no version yet: nobody's
    _ = context("synthetic").mlflow
    source = str(tmp_path / "artifacts")
    first.mlflow.create_model_version(
        "hisam-tokenizer", source, tags={"hisam.run_key": "movielens/2026-11-01"}
    )
    first.mlflow.create_registered_model("hisam-ranker")
    first.mlflow.create_model_version("hisam-ranker", source, tags={"run_key": "movielens/2026-11-02"})
    first.mlflow.create_model_version("hisam-ranker", source, tags={"refresh_key": "movielens/2026-11-03"})
    for model, names in (
        ("hisam-tokenizer", {}),
        ("hisam-ranker", {"tokenizer": "t-synthetic"}),  # the newest version decides: a refreshed one
    ):
        with pytest.raises(ValueError, match=rf"'{model}' holds dataset 'movielens'.* is 'synthetic'"):
            _ = context("synthetic", **names).mlflow
    own = context("synthetic", tokenizer="t-synthetic", pretrained="p-synthetic", ranker="r-synthetic")
    own.mlflow.create_registered_model("t-synthetic")
    own.mlflow.create_model_version("t-synthetic", source, tags={"hisam.run_key": "synthetic/2026-11-01"})
    _ = context("movielens").mlflow
    assert first.mlflow.get_registered_model("hisam-tokenizer").tags == {}


def test_drift_budget_below_the_regression_tolerance_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"max_drift \{'auc': 0.001\} is below max_regression"):
        PromotionGateConfig(max_regression={"auc": 0.002}, max_drift={"auc": 0.001})


@pytest.fixture()
def client(tmp_path, mlflow_store) -> MlflowClient:
    uri = mlflow_store(tmp_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("ranker")
    for _ in range(3):
        client.create_model_version("ranker", source=str(tmp_path / "artifacts"))
    return client


def test_promotion_moves_aliases_and_rollback_restores(client: MlflowClient) -> None:
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    assert champion_version(client, "ranker") == "1"
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE), against="1")
    assert champion_version(client, "ranker") == "2"
    assert str(client.get_model_version_by_alias("ranker", PREVIOUS).version) == "1"

    worse = {k: v - 0.1 for k, v in GOOD.items()}
    apply_decision(client, "ranker", "3", decide(worse, GOOD, GATE), against="2")
    assert champion_version(client, "ranker") == "2"  # unchanged
    tags = client.get_model_version("ranker", "3").tags
    assert tags["gate"] == "rejected" and "regresses" in tags["gate_reasons"]

    assert rollback(client, "ranker") == ("1", "2")
    assert champion_version(client, "ranker") == "1"
    assert client.get_model_version("ranker", "2").tags["gate"] == "rolled_back"
    with pytest.raises(ValueError, match="no @previous"):
        rollback(client, "ranker")


def test_promotions_record_their_drift_and_a_drifted_line_refuses_a_tolerated_regression(client) -> None:
    """Through the real registry: each promoted version carries its drift as tags, the next decision
    chains from the champion's tags, and a rejected version gets none."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    second = _shift(GOOD, -0.009)
    apply_decision(
        client,
        "ranker",
        "2",
        decide(second, GOOD, GATE, _drift(client.get_model_version("ranker", "1").tags)),
        against="1",
    )
    tags = client.get_model_version("ranker", "2").tags
    assert {k: v for k, v in tags.items() if k.startswith("gate.drift.")} == {
        f"gate.drift.{m}": "-0.009000" for m in GOOD
    }
    third = _shift(second, -0.009)  # within the 0.01 tolerance of v2, but 0.018 below v1
    decision = decide(third, second, GATE, _drift(tags))
    apply_decision(client, "ranker", "3", decision, against="2")
    assert champion_version(client, "ranker") == "2"
    rejected = client.get_model_version("ranker", "3").tags
    assert rejected["gate"] == "rejected" and "below its best" in rejected["gate_reasons"]
    assert _drift(rejected) == {}


def test_a_promotion_keeps_only_its_own_drift_tags(client) -> None:
    """An attempt that stopped after tagging its drift, then a re-evaluation whose decision measures
    fewer metrics: the promoted version carries this decision's drift only, since the next
    promotion chains from it. A retry after the aliases moved (promote's, with no decision) keeps it."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    client.set_model_version_tag("ranker", "2", f"{DRIFT_PREFIX}cold_gauc", "-0.020000")  # the first try
    decision = decide(GOOD, GOOD, GATE)
    apply_decision(client, "ranker", "2", replace(decision, drift={"auc": -0.003}), against="1")
    assert _drift(client.get_model_version("ranker", "2").tags) == {"auc": -0.003}
    apply_decision(client, "ranker", "2", GateDecision(True, []), against="1")
    assert _drift(client.get_model_version("ranker", "2").tags) == {"auc": -0.003}


class _Crashing:
    """``client`` whose ``at``-th registry write raises, as a process dying there would."""

    WRITES = frozenset(
        {"set_model_version_tag", "delete_model_version_tag", "set_registered_model_alias",
         "delete_registered_model_alias"}
    )  # fmt: skip

    def __init__(self, client: MlflowClient, at: int) -> None:
        self.client, self.at, self.writes = client, at, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if name not in self.WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes == self.at:
                raise RuntimeError(f"died at registry write {self.at}")
            return attr(*args, **kwargs)

        return write


@pytest.mark.parametrize("at", range(1, 7))
def test_a_rollback_that_died_at_any_write_is_completed_by_its_retry(client, at) -> None:
    """Each of the rollback's six registry writes may be the last one made: the retry ends where a
    whole rollback ends (v1 champion, no @previous, no mark left, v2 tagged rolled back) and names
    what it demoted; one more rollback has nothing to restore."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE), against="1")
    with pytest.raises(RuntimeError, match=f"died at registry write {at}"):
        rollback(_Crashing(client, at), "ranker")
    assert rollback(client, "ranker") == ("1", "2")
    assert champion_version(client, "ranker") == "1"
    assert alias_version(client, "ranker", PREVIOUS) is None
    tags = client.get_model_version("ranker", "1").tags
    assert (tags["gate"], tags["restored_from"], "rollback_pending" in tags) == ("promoted", "2", False)
    assert client.get_model_version("ranker", "2").tags["gate"] == "rolled_back"
    done = r"no @previous .*\(a rollback demoted v2 for the weights @champion v1 serves: if it stopped"
    with pytest.raises(ValueError, match=done + r" before its refresh, `hisam run refresh-champion`"):
        rollback(client, "ranker")  # one killed in its refresh: a rerun says what finishes it


def test_a_rollback_mark_left_behind_is_cleared_by_the_next_promotion(client) -> None:
    """A rollback that died before removing its mark, never retried: the next promotion clears it, so
    a later promotion stopped between its alias moves is not taken for a rollback under way."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE), against="1")
    with pytest.raises(RuntimeError):
        rollback(_Crashing(client, 6), "ranker")  # the last write: the mark stays on v1
    apply_decision(client, "ranker", "3", decide(GOOD, GOOD, GATE), against="1")
    assert "rollback_pending" not in client.get_model_version("ranker", "1").tags
    client.set_registered_model_alias("ranker", PREVIOUS, "3")  # v4's promotion, before it died
    with pytest.raises(ValueError, match="no rollback to it is under way"):
        rollback(client, "ranker")


def test_a_rollback_after_an_interrupted_promotion_is_refused_and_the_promote_retry_completes(client) -> None:
    """A promotion that died between its alias moves leaves @previous and @champion on the old
    champion. A rollback then has nothing to restore: it says so and keeps @previous, instead of
    reporting a completed rollback; the promote retry then moves @champion."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    client.set_registered_model_alias("ranker", PREVIOUS, "1")  # v2's promotion, before it died
    with pytest.raises(ValueError, match=r"both v1 and no rollback to it is under way.*rerun promote"):
        rollback(client, "ranker")
    assert str(client.get_model_version_by_alias("ranker", PREVIOUS).version) == "1"
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE), against="1")
    assert champion_version(client, "ranker") == "2"
    assert rollback(client, "ranker") == ("1", "2")
    assert "rollback_pending" not in client.get_model_version("ranker", "1").tags
    # the tags of that completed rollback do not pass a later interrupted promotion for a rollback
    client.set_registered_model_alias("ranker", PREVIOUS, "1")  # v3's promotion, before it died
    with pytest.raises(ValueError, match="no rollback to it is under way"):
        rollback(client, "ranker")
    assert str(client.get_model_version_by_alias("ranker", PREVIOUS).version) == "1"


def test_a_champion_moved_since_it_was_read_is_not_moved_back(client) -> None:
    """An operator's rollback while refresh-champion or promote prepared v3 against v2: neither step
    undoes it; their reruns read the champion again."""
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE), against=None)
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE), against="1")
    assert rollback(client, "ranker") == ("1", "2")
    with pytest.raises(ValueError, match="ranker@champion moved from v2 to v1 while refresh v3"):
        make_refreshed_champion(client, "ranker", "3", refreshed_from="2")
    with pytest.raises(ValueError, match="moved from v2 to v1 while candidate v3"):
        apply_decision(client, "ranker", "3", decide(GOOD, GOOD, GATE), against="2")
    assert champion_version(client, "ranker") == "1"
    assert "gate" not in client.get_model_version("ranker", "3").tags
    for _ in range(2):  # a rerun against the champion it reads now, and its retry
        make_refreshed_champion(client, "ranker", "3", refreshed_from="1")
    assert champion_version(client, "ranker") == "3"
    assert client.get_model_version("ranker", "3").tags["gate"] == "refreshed"


def test_a_retag_follows_the_latest_evaluation_until_the_gate_judges(client) -> None:
    """A re-evaluated candidate (a new champion since) gets the new values, loses the metrics only
    the earlier evaluation measured, and keeps its other tags; a judged version keeps them all."""
    from pipelines.promotion import retag

    earlier = {"eval.auc": "0.700000", "eval.cold_gauc": "0.600000", "champion.cold_gauc": "0.610000"}
    for key, value in {**earlier, "run_key": "d/2026-11-02"}.items():
        client.set_model_version_tag("ranker", "1", key, value)
        client.set_model_version_tag("ranker", "2", key, value)
    client.set_model_version_tag("ranker", "2", "gate", "promoted")
    latest = {"eval.auc": "0.710000", "run_key": "d/2026-11-02"}  # this time no cold subset
    version = client.get_model_version("ranker", "1")
    assert retag(client, version, latest, ("eval.", "champion.")) == [
        "champion.cold_gauc", "eval.auc", "eval.cold_gauc"
    ]  # fmt: skip
    assert client.get_model_version("ranker", "1").tags == latest
    assert retag(client, client.get_model_version("ranker", "1"), latest, ("eval.", "champion.")) == []
    judged = client.get_model_version("ranker", "2")
    assert retag(client, judged, latest, ("eval.", "champion.")) == []
    assert client.get_model_version("ranker", "2").tags == judged.tags


def test_an_unreadable_registry_is_an_error_never_a_missing_alias(client, tmp_path) -> None:
    """A missing alias or model reads as None; a registry that cannot answer (here its alias table is
    gone; in production a locked or unreachable database) raises, so the step retries and alerts
    instead of skipping as if no tokenizer or champion existed."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    client.set_registered_model_alias("ranker", "champion", "2")
    assert str(alias_version(client, "ranker", "champion").version) == "2"
    assert alias_version(client, "ranker", "previous") is None
    assert alias_version(client, "absent", "champion") is None
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("ALTER TABLE registered_model_aliases RENAME TO moved")
    with pytest.raises(MlflowException, match="registered_model_aliases"):
        alias_version(client, "ranker", "champion")


def test_a_candidate_exactly_on_a_floor_tolerance_or_drift_budget_passes() -> None:
    """The gate's bounds are inclusive (values exact in binary): on the floor, regressing by exactly
    the tolerance, or drifting exactly the budget is promoted; a hair past any of them is not."""
    gate = PromotionGateConfig(floors={"auc": 0.5}, max_regression={"auc": 0.25}, max_drift={"auc": 0.375})
    assert decide({"auc": 0.5}, None, gate).promote
    assert not decide({"auc": 0.5 - 2**-20}, None, gate).promote
    assert decide({"auc": 0.5}, {"auc": 0.75}, gate, {"auc": -0.125}).promote  # drift -0.375 exactly
    assert not decide({"auc": 0.5 - 2**-20}, {"auc": 0.75}, gate, {"auc": 0.0}).promote  # regression
    assert not decide({"auc": 0.625}, {"auc": 0.75}, gate, {"auc": -0.25 - 2**-20}).promote  # drift


def test_find_versions_lists_the_newest_first(client: MlflowClient) -> None:
    """Candidates and refreshes are picked as ``find_versions(...)[0]``: the newest version."""
    for version in ("1", "3", "2"):
        client.set_model_version_tag("ranker", version, "hisam.run_key", "ds/2026-11-02")
    assert [str(v.version) for v in find_versions(client, "ranker", **{"hisam.run_key": "ds/2026-11-02"})] == [
        "3", "2", "1"]  # fmt: skip


def test_a_misspelt_gate_metric_is_a_config_error() -> None:
    """A typo would replace the default tolerances and leave the real metric unchecked."""
    with pytest.raises(ValueError, match=r"gate.max_regression names \['cold_guac'\]"):
        PromotionGateConfig(max_regression={"auc": 0.01, "cold_guac": 0.02})
    with pytest.raises(ValueError, match=r"gate.floors names \['ndcg'\]"):
        PromotionGateConfig(floors={"ndcg": 0.1})


@pytest.mark.parametrize(
    "section, value",
    [("floors", 5.0), ("floors", math.nan), ("max_regression", -0.5), ("max_drift", math.inf)],
)
def test_a_gate_value_outside_0_1_is_a_config_error(section, value) -> None:
    """Each would refuse every candidate (a floor of 5, NaN, a negative tolerance) or none."""
    with pytest.raises(ValueError, match=rf"gate.{section} .* must lie in \[0, 1\]"):
        PromotionGateConfig.model_validate({section: {"auc": value}})


def _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions: int) -> tuple[Any, Any]:
    """A step context on a fresh store (``HISAM_HOME`` = ``tmp_path``), a finished fine-tune run of
    its logical run, and ``versions`` bare versions of the ranker model."""
    import datetime as dt

    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext
    from pipelines.ranker import SFT_CHECKPOINT_SHA256

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 2))
    tags = {"hisam.step": "finetune", "hisam.run_key": ctx.run_key, SFT_CHECKPOINT_SHA256: "ab"}  # trained
    run = ctx.mlflow.create_run(ctx.experiment_id, tags=tags)
    ctx.mlflow.create_registered_model(ctx.config.models.ranker)
    for _ in range(versions):
        ctx.mlflow.create_model_version(ctx.config.models.ranker, source=str(tmp_path / "artifacts"))
    return ctx, run


def _evaluated(ctx, run, mine: dict[str, float], theirs: dict[str, float], against: str) -> None:
    """What ``evaluate`` logs to the fine-tune ``run``: the metrics, then the tags naming them."""
    from pipelines.ranker import EVAL_METRICS

    metrics = {f"eval.{m}": v for m, v in mine.items()} | {f"champion.{m}": v for m, v in theirs.items()}
    for key, value in metrics.items():
        ctx.mlflow.log_metric(run.info.run_id, key, value)
    ctx.mlflow.set_tag(run.info.run_id, EVAL_METRICS, ",".join(sorted(metrics)))
    ctx.mlflow.set_tag(run.info.run_id, "eval.champion_version", against)


def _candidate(ctx, run, version: str) -> None:
    """Version ``version`` registered from ``run`` with the run's evaluation, as ``register`` tags it."""
    from pipelines.promotion import candidate_tags
    from pipelines.ranker_model import TRAINING_RUN_TAG

    tags = {TRAINING_RUN_TAG: run.info.run_id, **candidate_tags(ctx)[1]}
    for key, value in tags.items():
        ctx.mlflow.set_model_version_tag(ctx.config.models.ranker, version, key, value)


def test_promote_refuses_a_candidate_judged_against_a_champion_since_replaced(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """Candidate v3 was evaluated against v1, but @champion is v2 now (another day's promotion or a
    rollback): judging v3 on a comparison with v1 could replace a better champion. Refused, and
    nothing moves or is tagged; evaluated against v2, it is judged and promoted."""

    from pipelines.promotion import promote

    ctx, run = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=3)
    client, name = ctx.mlflow, ctx.config.models.ranker
    apply_decision(client, name, "1", decide(GOOD, None, GATE), against=None)
    apply_decision(client, name, "2", decide(GOOD, GOOD, GATE), against="1")
    better = {m: v + 0.05 for m, v in GOOD.items()}
    _evaluated(ctx, run, better, GOOD, against="1")
    _candidate(ctx, run, "3")

    with pytest.raises(ValueError, match=rf"{name}@champion is v2 but candidate v3 was evaluated against v1"):
        promote(ctx)
    assert champion_version(client, name) == "2"
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == "1"
    assert "gate" not in client.get_model_version(name, "3").tags

    _evaluated(ctx, run, better, GOOD, against="2")  # evaluate ran again; register did not
    assert promote(ctx)["promoted"] is True  # judged on the run's latest evaluation
    assert client.get_model_version(name, "3").tags["eval.champion_version"] == "2"
    assert champion_version(client, name) == "3"
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == "2"


def test_promote_chains_the_drift_from_the_champions_tags(tmp_path, mlflow_store, monkeypatch) -> None:
    """The step reads the drift the champion carries: a candidate 0.009 below a champion already
    0.015 below its line's best is 0.024 below it, past max_drift 0.020, though within the 0.010
    regression tolerance; without that drift it is promoted, carrying its own."""

    from pipelines.promotion import promote

    ctx, run = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=3)
    client, name = ctx.mlflow, ctx.config.models.ranker
    apply_decision(client, name, "1", decide(GOOD, None, GATE), against=None)
    client.set_model_version_tag(name, "1", f"{DRIFT_PREFIX}auc", "-0.015000")
    _evaluated(ctx, run, {**GOOD, "auc": GOOD["auc"] - 0.009}, GOOD, against="1")

    _candidate(ctx, run, "2")
    result = promote(ctx)
    assert result["promoted"] is False and any("below its best" in r for r in result["reasons"])
    assert champion_version(client, name) == "1"
    client.delete_model_version_tag(name, "1", f"{DRIFT_PREFIX}auc")  # a line without that drift
    _candidate(ctx, run, "3")
    result = promote(ctx)
    assert result["promoted"] is True and champion_version(client, name) == "3"
    for version in ("2", "3"):  # each verdict records the rules it was reached by
        judged_by = json.loads(client.get_model_version(name, version).tags["gate.config"])
        assert PromotionGateConfig.model_validate(judged_by) == ctx.config.gate
    assert _drift(client.get_model_version(name, "3").tags)["auc"] == pytest.approx(-0.009)


def test_a_rollback_stands_when_its_refresh_fails_and_says_so(
    tmp_path, mlflow_store, monkeypatch, capsys
) -> None:
    """The restored champion is served even if refreshing its semantic IDs fails: the step returns
    the rollback with the error, ``hisam rollback`` exits 3, and a second alert (an error) tells the
    on-call to run refresh-champion."""
    import json

    import pipelines.promotion as promotion
    from pipelines.cli import main
    from pipelines.context import StepContext

    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    ctx, _ = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=2)
    client, name = ctx.mlflow, ctx.config.models.ranker
    apply_decision(client, name, "1", decide(GOOD, None, GATE), against=None)
    apply_decision(client, name, "2", decide(GOOD, GOOD, GATE), against="1")

    def lake_down(_ctx: StepContext) -> dict:
        raise OSError("lake unreachable")

    monkeypatch.setattr(promotion, "refresh_champion", lake_down)
    monkeypatch.delenv("HISAM_PIPELINE_CONFIG", raising=False)
    assert main(["rollback"]) == 3
    assert json.loads(capsys.readouterr().out) == {
        "champion": "1",
        "restored": "1",
        "demoted": "2",
        "refreshed": False,
        "refresh_error": "OSError: lake unreachable",
    }
    assert champion_version(client, name) == "1"
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["title"], a["severity"]) for a in alerts] == [
        (f"{name} rolled back", "warning"),
        (f"{name} v1 restored but not refreshed", "error"),
    ]
    assert "lake unreachable" in alerts[1]["text"] and "refresh-champion" in alerts[1]["text"]


def _tokenizers_serving(tmp_path, mlflow_store, monkeypatch) -> Any:
    """A context whose registry holds tokenizer versions of October, November and December (the
    last ``@current``) and one ranker version on each, none of them aliased yet."""
    from pipelines.ranker_model import TOKENIZER_VERSION
    from pipelines.registry import CURRENT

    monkeypatch.setenv("HISAM_NOTIFY_SINKS", "file")
    monkeypatch.setenv("HISAM_NOTIFY_FILE", str(tmp_path / "alerts.jsonl"))
    ctx, _ = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=0)
    models, source = ctx.config.models, str(tmp_path / "artifacts")
    ctx.mlflow.create_registered_model(models.tokenizer)
    for month in ("20261001", "20261101", "20261201"):
        tags = {TOKENIZER_VERSION: f"dst-{month}"}
        ctx.mlflow.create_model_version(models.tokenizer, source, tags=tags)
        ctx.mlflow.create_model_version(models.ranker, source, tags=tags)
    ctx.mlflow.set_registered_model_alias(models.tokenizer, CURRENT, "3")
    return ctx


def test_the_serving_tokenizers_are_currents_then_the_rankers_champion_and_previous_once_each(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """``tokenize-new-items`` writes IDs under each, and ``maintain-lake`` keeps the embeddings
    snapshot of those registered before their model carried its cold behaviour row."""
    from pipelines.maintenance import snapshot_readers
    from pipelines.registry import CHAMPION
    from pipelines.tokenizer import COLD_BEHAVIOUR, serving_tokenizer_versions

    ctx = _tokenizers_serving(tmp_path, mlflow_store, monkeypatch)
    client, models = ctx.mlflow, ctx.config.models
    assert serving_tokenizer_versions(ctx) == {"current": "dst-20261201"}
    client.set_registered_model_alias(models.ranker, CHAMPION, "2")
    client.set_registered_model_alias(models.ranker, PREVIOUS, "1")
    assert list(serving_tokenizer_versions(ctx).items()) == [
        ("current", "dst-20261201"),
        ("champion", "dst-20261101"),
        ("previous", "dst-20261001"),
    ]
    client.set_registered_model_alias(models.ranker, PREVIOUS, "2")  # rolled back to a day's refresh
    assert serving_tokenizer_versions(ctx) == {"current": "dst-20261201", "champion": "dst-20261101"}
    client.set_registered_model_alias(models.ranker, CHAMPION, "3")  # December's first champion
    client.set_registered_model_alias(models.ranker, PREVIOUS, "3")  # (a rollback to itself, say)
    assert serving_tokenizer_versions(ctx) == {"current": "dst-20261201"}
    client.set_registered_model_alias(models.ranker, PREVIOUS, "1")
    assert snapshot_readers(ctx) == ["dst-20261001", "dst-20261201"]
    client.set_model_version_tag(models.tokenizer, "3", COLD_BEHAVIOUR, "1")
    assert snapshot_readers(ctx) == ["dst-20261001"]


def test_a_current_tokenizer_without_its_version_tag_is_a_clear_error(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """An alias set by hand on a version this pipeline did not register: an error naming the model,
    version and tag, not ``'tokenizer_version'`` (a bare KeyError's text, as any KeyError was)."""
    from pipelines.registry import CURRENT
    from pipelines.steps import error_text
    from pipelines.tokenizer import (
        current_tokenizer_version,
        current_tokenizer_version_or_skip,
        serving_tokenizer_versions,
    )

    ctx = _tokenizers_serving(tmp_path, mlflow_store, monkeypatch)
    name = ctx.config.models.tokenizer
    ctx.mlflow.create_model_version(name, str(tmp_path / "artifacts"))  # v4, untagged
    ctx.mlflow.set_registered_model_alias(name, CURRENT, "4")
    or_skip = partial(current_tokenizer_version_or_skip, step="samples-ready", why="no samples")
    ctx.params["skip_without_tokenizer"] = "true"  # as the daily DAGs run it: skips only without @current
    for read in (current_tokenizer_version, serving_tokenizer_versions, or_skip):
        with pytest.raises(
            ValueError, match=rf"{name} v4 has no tokenizer_version tag: it was not registered"
        ):
            read(ctx)
    assert error_text(KeyError("tokenizer_version")) == "KeyError: 'tokenizer_version'"
    assert error_text(ValueError("bad")) == "bad"


def test_the_skip_decision_and_the_version_come_from_one_read_of_current(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """A tokenizer activated between two reads cannot make a step decide on one registry state and
    run on another; and a sensor poke costs one alias lookup, not two."""
    from pipelines import registry
    from pipelines.tokenizer import current_tokenizer_version, current_tokenizer_version_or_skip

    ctx = _tokenizers_serving(tmp_path, mlflow_store, monkeypatch)
    ctx.params["skip_without_tokenizer"] = "true"
    expected = current_tokenizer_version(ctx)
    reads = []
    read = registry.alias_version
    monkeypatch.setattr(registry, "alias_version", lambda *args: reads.append(args[-1]) or read(*args))
    assert current_tokenizer_version_or_skip(ctx, step="samples-ready", why="no samples") == expected
    assert reads == [registry.CURRENT]


def test_new_items_failing_under_previous_alert_and_skip_but_under_champion_fail_the_day(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """``@previous`` serves only after a rollback, so the day goes on without its IDs, and the
    on-call hears why; ``@champion`` serves now, so its failure fails the step. The failure here is
    real: the ranker names a tokenizer version the registry no longer holds."""
    from pipelines import tokenizer
    from pipelines.ranker_model import TOKENIZER_VERSION
    from pipelines.registry import CHAMPION

    ctx = _tokenizers_serving(tmp_path, mlflow_store, monkeypatch)
    client, models = ctx.mlflow, ctx.config.models
    tokenized = []

    def tokenize(_ctx, registered, *_features) -> dict[str, str]:  # the lake's part, covered elsewhere
        tokenized.append(registered.tags[TOKENIZER_VERSION])
        return {"tokenizer_version": tokenized[-1]}

    monkeypatch.setattr(tokenizer, "untokenized_items", lambda _ctx, versions: set())
    monkeypatch.setattr(tokenizer, "load_new_item_features", lambda _ctx, items: (None, 0, {}))
    monkeypatch.setattr(tokenizer, "_tokenize_new_items", tokenize)
    client.set_model_version_tag(models.ranker, "1", TOKENIZER_VERSION, "dst-20260901")  # deleted since
    client.set_registered_model_alias(models.ranker, CHAMPION, "2")
    client.set_registered_model_alias(models.ranker, PREVIOUS, "1")

    summary = tokenizer.tokenize_new_items(ctx)
    assert tokenized == ["dst-20261201", "dst-20261101"]
    assert summary["champion"] == {"tokenizer_version": "dst-20261101"}
    assert summary["previous"] == {
        "tokenizer_version": "dst-20260901",
        "skipped": True,
        "reason": "ValueError: hisam-tokenizer has no version tagged tokenizer_version=dst-20260901 "
        "(deleted from the registry?)",
    }
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["title"], a["severity"]) for a in alerts] == [
        ("no new dst-20260901 IDs for @previous", "warning")
    ]

    client.set_registered_model_alias(models.ranker, CHAMPION, "1")
    with pytest.raises(ValueError, match="no version tagged tokenizer_version=dst-20260901"):
        tokenizer.tokenize_new_items(ctx)


def test_evaluate_register_and_promote_take_the_newest_fine_tune_that_finished(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """A second fine-tune of the day crashed (Airflow retries it, and training continues that run):
    until it finishes, the steps after it read the one that did, or say none did."""
    import datetime as dt

    from pipelines.config import PipelineConfig
    from pipelines.context import StepContext
    from pipelines.promotion import promote, register
    from pipelines.ranker import SFT_CHECKPOINT_SHA256, _find_run, evaluate

    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    ctx = StepContext(PipelineConfig(), dt.date(2026, 11, 2))
    tags = {"hisam.step": "finetune", "hisam.run_key": ctx.run_key}
    crashed = ctx.mlflow.create_run(ctx.experiment_id, start_time=2, tags=tags)
    ctx.mlflow.set_terminated(crashed.info.run_id, "FAILED")
    with pytest.raises(ValueError, match=f"no finetune run of {ctx.run_key} finished training"):
        evaluate(ctx)
    with pytest.raises(ValueError, match=f"no evaluated finetune run for {ctx.run_key}"):
        register(ctx)
    with pytest.raises(ValueError, match=f"no registered candidate for {ctx.run_key}"):
        promote(ctx)
    finished = ctx.mlflow.create_run(
        ctx.experiment_id, start_time=1, tags={**tags, SFT_CHECKPOINT_SHA256: "ab"}
    )
    assert _find_run(ctx, "finetune").info.run_id == crashed.info.run_id  # the retry continues it
    assert _find_run(ctx, "finetune", trained=True).info.run_id == finished.info.run_id


def test_a_second_fine_tune_of_the_day_from_the_same_pt_trains_nothing(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """The Sunday PT lands before the 04:00 fine-tune starts, then triggers the DAG again: the
    second run finds that PT fine-tuned. Before the gate judged its candidate, evaluation goes on
    from the finished run; after, the step skips (so nothing re-evaluates a promoted model against
    itself). Another PT of the day trains anew."""
    from pipelines import ranker
    from pipelines.ranker_model import TRAINING_RUN_TAG
    from pipelines.steps import StepSkipped

    ctx, run = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=0)
    for key, value in {"tokenizer_version": "dst-1", ranker.PRETRAINED_VERSION: "3"}.items():
        ctx.mlflow.set_tag(run.info.run_id, key, value)
    trained: list[str] = []
    pt = {"v": "3"}
    monkeypatch.setattr(ranker, "training_tokenizer_version", lambda ctx: "dst-1")
    monkeypatch.setattr(ranker, "_newest_pretrained", lambda ctx, version: pt["v"])
    monkeypatch.setattr(  # nothing is downloaded to decide that nothing is to be trained
        ranker, "_pretrained_checkpoint", lambda ctx, v: ("pt.pt", None) if v == "4" else pytest.fail(v)
    )
    monkeypatch.setattr(
        ranker, "_train_stage", lambda ctx, stage, *a, **k: trained.append(k["pretrained"]) or {}
    )
    assert ranker.finetune(ctx) == {
        "tokenizer_version": "dst-1",
        "pretrained_version": "3",
        "mlflow_run_id": run.info.run_id,
        "trained_before": True,
    }
    tags = {ranker.RUN_KEY: ctx.run_key, TRAINING_RUN_TAG: run.info.run_id}
    candidate = ctx.mlflow.create_model_version(ctx.config.models.ranker, source="x", tags=tags)
    assert ranker.finetune(ctx)["trained_before"]  # registered, not judged yet: promote goes on
    ctx.mlflow.set_model_version_tag(candidate.name, candidate.version, "gate", "promoted")
    with pytest.raises(StepSkipped, match=r"already fine-tuned hisam-pretrained v3 .* v1 and promoted"):
        ranker.finetune(ctx)
    assert trained == []
    pt["v"] = "4"
    monkeypatch.setattr(ctx.mlflow, "get_model_version", lambda name, version: type("V", (), {"tags": {}}))
    assert ranker.finetune(ctx) == {"pretrained_version": "4"} and trained == ["4"]


def test_a_rerun_of_pretraining_triggers_fine_tuning_only_until_one_started(
    tmp_path, mlflow_store, monkeypatch
) -> None:
    """A retry after the PT was registered succeeds again (its asset event triggers fine-tuning);
    once a fine-tune of this dataset started from that PT, a rerun skips, so no event fine-tunes it
    again. Another dataset's fine-tune of its own PT of that number (a shared experiment) does not."""
    from pipelines import ranker
    from pipelines.steps import StepSkipped

    ctx, _ = _registry_with_a_trained_run(tmp_path, mlflow_store, monkeypatch, versions=0)
    monkeypatch.setattr(ranker, "training_tokenizer_version", lambda ctx: "dst-1")
    monkeypatch.setattr(ranker, "_train_stage", lambda *a, **k: pytest.fail("trained again"))
    name = ctx.config.models.pretrained
    ctx.mlflow.create_registered_model(name)
    tags = {"tokenizer_version": "dst-1", ranker.RUN_KEY: ctx.run_key}
    pt = ctx.mlflow.create_model_version(name, source="x", tags=tags)
    assert ranker.pretrain(ctx) == {
        "tokenizer_version": "dst-1",
        "model_version": str(pt.version),
        "skipped": True,
    }
    tuned = {
        "hisam.step": "finetune",
        "hisam.run_key": "other-dataset/2026-11-02",
        "tokenizer_version": "dst-1",
        ranker.PRETRAINED_VERSION: str(pt.version),
    }
    ctx.mlflow.create_run(ctx.experiment_id, tags=tuned)
    assert ranker.pretrain(ctx)["skipped"] is True  # not this dataset's fine-tune: a retry still triggers
    tuned["hisam.run_key"] = f"{ctx.dataset}/2026-11-02"  # this dataset's, the next day
    ctx.mlflow.create_run(ctx.experiment_id, tags=tuned)
    with pytest.raises(StepSkipped, match=f"pre-trained {name} v{pt.version} already"):
        ranker.pretrain(ctx)

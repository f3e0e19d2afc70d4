"""Promotion gate and rollback against a real MLflow SQLite registry."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from pipelines.registry import (
    PREVIOUS,
    GateDecision,
    PromotionGateConfig,
    apply_decision,
    champion_version,
    decide,
    rollback,
)

GATE = PromotionGateConfig(
    floors={"auc": 0.6, "gauc": 0.55, "cold_gauc": 0.5},
    max_regression={"auc": 0.01, "gauc": 0.01, "cold_gauc": 0.02},
)
GOOD = {"auc": 0.70, "gauc": 0.62, "cold_gauc": 0.58}


def test_gate_promotes_first_candidate_above_floors() -> None:
    assert decide(GOOD, None, GATE) == GateDecision(True, [])


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
    ]


def test_gate_refuses_nan_or_missing_metrics_that_only_have_a_tolerance() -> None:
    """A metric with a regression tolerance but no floor: NaN or a missing value is a regression,
    not a pass; a champion that never measured it leaves nothing to regress from."""
    gate = PromotionGateConfig(floors={"auc": 0.6}, max_regression={"auc": 0.01, "gauc": 0.01})
    assert decide({"auc": 0.7, "gauc": math.nan}, GOOD, gate).reasons == [
        "gauc: nan regresses from champion 0.6200 by more than 0.0100"
    ]
    assert decide({"auc": 0.7}, GOOD, gate).reasons == ["gauc: missing from the candidate's evaluation"]
    assert decide({"auc": 0.7, "gauc": 0.5}, {"auc": 0.7, "gauc": math.nan}, gate).promote
    assert decide({"auc": 0.7, "gauc": 0.5}, {"auc": 0.7}, gate).promote


def test_gate_tolerates_regression_within_tolerance() -> None:
    within = {k: v - 0.005 for k, v in GOOD.items()}
    assert decide(within, GOOD, GATE).promote


@pytest.fixture()
def client(tmp_path, mlflow_store) -> MlflowClient:
    uri = mlflow_store(tmp_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("ranker")
    for _ in range(3):
        client.create_model_version("ranker", source=str(tmp_path / "artifacts"))
    return client


def test_promotion_moves_aliases_and_rollback_restores(client: MlflowClient) -> None:
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE))
    assert champion_version(client, "ranker") == "1"
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE))
    assert champion_version(client, "ranker") == "2"
    assert str(client.get_model_version_by_alias("ranker", PREVIOUS).version) == "1"

    worse = {k: v - 0.1 for k, v in GOOD.items()}
    apply_decision(client, "ranker", "3", decide(worse, GOOD, GATE))
    assert champion_version(client, "ranker") == "2"  # unchanged
    tags = client.get_model_version("ranker", "3").tags
    assert tags["gate"] == "rejected" and "regresses" in tags["gate_reasons"]

    assert rollback(client, "ranker") == "1"
    assert champion_version(client, "ranker") == "1"
    assert client.get_model_version("ranker", "2").tags["gate"] == "rolled_back"
    with pytest.raises(ValueError, match="no @previous"):
        rollback(client, "ranker")


def test_a_rollback_retried_after_the_champion_moved_completes_without_mistagging(client) -> None:
    apply_decision(client, "ranker", "1", decide(GOOD, None, GATE))
    apply_decision(client, "ranker", "2", decide(GOOD, GOOD, GATE))
    client.set_model_version_tag("ranker", "2", "gate", "rolled_back")  # what the first attempt did
    client.set_registered_model_alias("ranker", "champion", "1")  # ... before it died
    assert rollback(client, "ranker") == "1"
    assert champion_version(client, "ranker") == "1"
    assert client.get_model_version("ranker", "1").tags["gate"] == "promoted"
    assert client.get_model_version("ranker", "2").tags["gate"] == "rolled_back"
    with pytest.raises(ValueError, match="no @previous"):
        rollback(client, "ranker")

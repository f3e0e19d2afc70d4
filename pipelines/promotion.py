"""Steps ``register``, ``promote`` and ``rollback`` of the ranker on the MLflow registry.

``register`` logs the day's SFT checkpoint as the pyfunc ranker (one-pass ranking, its semantic-ID
table packaged) in the finetune run, as a new ``hisam-ranker`` version tagged with its tokenizer
version, PT version, the test snapshot and both models' metrics on it. ``promote`` applies the gate
(:mod:`pipelines.registry`): promoted versions become ``@champion`` (the old one ``@previous``); a
rejected one is tagged with the reasons and an alert goes out. Both are idempotent per logical run.
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines.context import StepContext

log = logging.getLogger(__name__)

GATE_METRICS = ("auc", "gauc", "cold_auc", "cold_gauc")


def _candidate(ctx: StepContext) -> Any:
    from pipelines.ranker import RUN_KEY
    from pipelines.registry import find_versions

    found = find_versions(ctx.mlflow, ctx.config.models.ranker, **{RUN_KEY: ctx.run_key})
    return found[0] if found else None


def register(ctx: StepContext) -> dict[str, Any]:
    """Register the evaluated candidate of this logical run (once)."""
    import mlflow

    from hisam_core.ranker.profile import ProfileVocabulary
    from hisam_core.ranker.train import RankerConfig
    from pipelines.ranker import (
        CHAMPION_PREFIX,
        EVAL_PREFIX,
        PROFILE_VOCABULARY,
        RUN_KEY,
        _find_run,
        metrics_of,
        sft_checkpoint_dir,
    )
    from pipelines.ranker_model import log_ranker
    from pipelines.tokenizer import semantic_ids_of

    name = ctx.config.models.ranker
    existing = _candidate(ctx)
    if existing is not None:
        return {"model_version": str(existing.version), "skipped": True}
    run = _find_run(ctx, "finetune")
    if run is None or f"{EVAL_PREFIX}auc" not in run.data.metrics:
        raise ValueError(f"no evaluated finetune run for {ctx.run_key}: run finetune and evaluate first")
    version = run.data.tags["tokenizer_version"]
    checkpoint = sft_checkpoint_dir(ctx, version, run) / "checkpoint.pt"
    import torch

    config = RankerConfig.from_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["config"])
    tags = {
        RUN_KEY: ctx.run_key,
        "pretrained_version": run.data.tags.get("pretrained_version", ""),
        "eval.snapshot": run.data.tags.get("eval.snapshot", ""),
        "eval.champion_version": run.data.tags.get("eval.champion_version", ""),
    }
    for prefix in (EVAL_PREFIX, CHAMPION_PREFIX):
        tags.update(
            {
                f"{prefix}{k}": f"{v:.6f}"
                for k, v in metrics_of(run.data.metrics, prefix, GATE_METRICS).items()
            }
        )
    with mlflow.start_run(run_id=run.info.run_id):
        vocabulary = ProfileVocabulary.load(checkpoint.with_name(PROFILE_VOCABULARY))
        registered = log_ranker(
            checkpoint,
            config,
            semantic_ids_of(ctx, version),
            name,
            profile_vocabulary=vocabulary,
            version_tags=tags,  # set with the version: a retry finds it complete, or not at all
        )
    return {"model_version": str(registered.version), "tokenizer_version": version, "tags": tags}


def promote(ctx: StepContext) -> dict[str, Any]:
    """Gate the candidate against the champion it was evaluated with; move aliases or reject + alert."""
    from pipelines.ranker import CHAMPION_PREFIX, EVAL_PREFIX, metrics_of
    from pipelines.registry import GateDecision, apply_decision, champion_version, decide

    name = ctx.config.models.ranker
    candidate = _candidate(ctx)
    if candidate is None:
        raise ValueError(f"no registered candidate for {ctx.run_key}: run register first")
    version = str(candidate.version)
    if "gate" in candidate.tags:
        return {"model_version": version, "gate": candidate.tags["gate"], "skipped": True}
    evaluated_against = candidate.tags.get("eval.champion_version") or None
    current = champion_version(ctx.mlflow, name)
    if current == version:  # a retry after the aliases moved but before the tag was written
        apply_decision(ctx.mlflow, name, version, GateDecision(True, []))
        return {"model_version": version, "gate": "promoted", "skipped": True}
    if current != evaluated_against:
        raise ValueError(
            f"{name}@champion is v{current} but candidate v{version} was evaluated against "
            f"v{evaluated_against}: rerun evaluate before promoting"
        )
    mine = metrics_of(candidate.tags, EVAL_PREFIX, GATE_METRICS)
    theirs = metrics_of(candidate.tags, CHAMPION_PREFIX, GATE_METRICS) if current else None
    decision = decide(mine, theirs, ctx.config.gate)
    apply_decision(ctx.mlflow, name, version, decision)
    if not decision.promote:
        ctx.alert(
            f"{name} v{version} not promoted",
            "\n".join(decision.reasons),
            "warning",
            candidate=mine,
            champion=theirs,
            champion_version=current,
        )
    return {
        "model_version": version,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "champion": version if decision.promote else current,
        "metrics": mine,
    }


def rollback(ctx: StepContext) -> dict[str, Any]:
    """Restore ``@previous`` as ``@champion`` and tell the on-call."""
    from pipelines.registry import champion_version
    from pipelines.registry import rollback as restore

    name = ctx.config.models.ranker
    demoted = champion_version(ctx.mlflow, name)
    restored = restore(ctx.mlflow, name)
    ctx.alert(f"{name} rolled back", f"@champion v{demoted} -> v{restored}", "warning")
    return {"champion": restored, "demoted": demoted}

"""Steps ``register``, ``promote``, ``refresh-champion`` and ``rollback`` of the ranker on the MLflow
registry.

``register`` logs the day's SFT checkpoint as the pyfunc ranker (one-pass ranking, its semantic-ID
table packaged) in the finetune run, as a new ``hisam-ranker`` version tagged with its tokenizer
version, PT version, the test snapshot and both models' metrics on it. ``promote`` applies the gate
(:mod:`pipelines.registry`: floors, the regression against the champion, and the drift of the champion
line, chained from the champion's ``gate.drift.*`` tags): promoted versions become ``@champion`` (the
old one ``@previous``); a rejected one is tagged with the reasons and an alert goes out.
``refresh-champion`` packages the semantic IDs of items that arrived since ``@champion`` was
registered, so they are servable while no new champion is promoted. All are idempotent per logical run.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from pipelines.context import StepContext
from pipelines.registry import GATE_METRICS
from pipelines.settings import redacted

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

REFRESH_KEY = "refresh_key"  # model-version tag: the logical run that refreshed the champion
REFRESHED_FROM = "refreshed_from"  # model-version tag: the version whose weights it serves
#: Model-version tag: the gate's floors, tolerances and drift budgets the version was judged by (JSON).
GATE_CONFIG = "gate.config"
#: Summary key of promote and refresh-champion: whether ``@champion`` now points at another version
#: (the DAGs emit the ``hisam-ranker@champion`` asset event only then, not on a rejection).
CHAMPION_MOVED = "champion_moved"


def _candidate(ctx: StepContext) -> Any:
    """The version registered from this logical run's newest finetune run (a day can hold two: the
    04:00 run and one triggered by a PT that landed later)."""
    from pipelines.ranker import RUN_KEY, _find_run
    from pipelines.ranker_model import TRAINING_RUN_TAG
    from pipelines.registry import find_versions

    run = _find_run(ctx, "finetune", trained=True)
    if run is None:
        return None
    tags = {RUN_KEY: ctx.run_key, TRAINING_RUN_TAG: run.info.run_id}
    found = find_versions(ctx.mlflow, ctx.config.models.ranker, **tags)
    return found[0] if found else None


def retag(
    client: MlflowClient, version: ModelVersion, tags: dict[str, str], prefixes: tuple[str, ...]
) -> list[str]:
    """Bring a registered, not yet judged ``version``'s tags up to the latest evaluation: set the
    changed ``tags`` and delete the ``prefixes`` tags that only an earlier evaluation measured.
    A version the gate has judged keeps its tags (they record that judgement). Returns the keys
    changed, sorted."""
    if "gate" in version.tags:
        return []
    stale = {k: v for k, v in tags.items() if version.tags.get(k) != v}
    gone = [k for k in version.tags if k.startswith(prefixes) and k not in tags]
    for key, value in stale.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    for key in gone:
        client.delete_model_version_tag(version.name, version.version, key)
    return sorted([*stale, *gone])


def candidate_tags(ctx: StepContext) -> tuple[Any, dict[str, str]]:
    """This logical run's newest trained finetune run and the version tags of its latest evaluation
    (what the gate reads); a ValueError when it was not evaluated."""
    from pipelines.ranker import (
        CHAMPION_PREFIX,
        EVAL_PREFIX,
        RUN_KEY,
        TRAINED_UNTIL,
        UNMEASURED,
        _find_run,
        evaluated_metrics,
        metrics_of,
    )

    run = _find_run(ctx, "finetune", trained=True)
    evaluated = evaluated_metrics(run) if run is not None else {}
    if f"{EVAL_PREFIX}auc" not in evaluated:
        raise ValueError(f"no evaluated finetune run for {ctx.run_key}: run finetune and evaluate first")
    tags = {
        RUN_KEY: ctx.run_key,
        "pretrained_version": run.data.tags.get("pretrained_version", ""),
        "eval.snapshot": run.data.tags.get("eval.snapshot", ""),
        "eval.champion_version": run.data.tags.get("eval.champion_version", ""),
        UNMEASURED: run.data.tags.get(UNMEASURED, ""),
        TRAINED_UNTIL: run.data.tags.get(TRAINED_UNTIL, ""),
    }
    for prefix in (EVAL_PREFIX, CHAMPION_PREFIX):
        tags.update(
            {f"{prefix}{k}": f"{v:.6f}" for k, v in metrics_of(evaluated, prefix, GATE_METRICS).items()}
        )
    return run, tags


def register(ctx: StepContext) -> dict[str, Any]:
    """Register the evaluated candidate of this logical run (once)."""
    from hisam_core.ranker.profile import ProfileVocabulary
    from hisam_core.ranker.train import RankerConfig
    from pipelines.ranker import CHAMPION_PREFIX, EVAL_PREFIX, PROFILE_VOCABULARY, sft_checkpoint_dir
    from pipelines.ranker_model import log_ranker
    from pipelines.tokenizer import semantic_ids_of
    from pipelines.tracking import reopened

    name = ctx.config.models.ranker
    run, tags = candidate_tags(ctx)
    existing = _candidate(ctx)
    if existing is not None:  # registered before; evaluate may have run again since (a new champion)
        retagged = retag(ctx.mlflow, existing, tags, (EVAL_PREFIX, CHAMPION_PREFIX))
        if retagged:
            log.info("%s v%s: evaluation tags updated from run %s", name, existing.version, run.info.run_id)
        return {"model_version": str(existing.version), "skipped": True, "retagged": retagged}
    version = run.data.tags["tokenizer_version"]
    checkpoint = sft_checkpoint_dir(ctx, version, run) / "checkpoint.pt"
    import torch

    config = RankerConfig.from_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["config"])
    with reopened(run.info.run_id):
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
    from pipelines.ranker import CHAMPION_PREFIX, EVAL_PREFIX, UNMEASURED, metrics_of
    from pipelines.registry import (
        CHAMPION,
        DRIFT_PREFIX,
        GateDecision,
        _still_champion,
        alias_version,
        apply_decision,
        decide,
    )

    name = ctx.config.models.ranker
    candidate = _candidate(ctx)
    if candidate is None:
        raise ValueError(f"no registered candidate for {ctx.run_key}: run register first")
    version = str(candidate.version)
    champion = alias_version(ctx.mlflow, name, CHAMPION)
    current = str(champion.version) if champion else None
    if "gate" in candidate.tags:  # judged: the champion moved then, if it was promoted and still serves
        moved = candidate.tags["gate"] == "promoted" and current == version
        return {
            "model_version": version,
            "gate": candidate.tags["gate"],
            CHAMPION_MOVED: moved,
            "skipped": True,
        }
    # judged on the latest evaluation (`hisam run evaluate` again without `register` tags only the run)
    if retag(ctx.mlflow, candidate, candidate_tags(ctx)[1], (EVAL_PREFIX, CHAMPION_PREFIX)):
        candidate = ctx.mlflow.get_model_version(name, version)
    evaluated_against = candidate.tags.get("eval.champion_version") or None
    if current == version:  # a retry after the aliases moved but before the tag was written
        apply_decision(ctx.mlflow, name, version, GateDecision(True, []), against=evaluated_against)
        return {"model_version": version, "gate": "promoted", CHAMPION_MOVED: True, "skipped": True}
    if current != evaluated_against:
        now = "unset" if current is None else f"v{current}"
        then = "no champion" if evaluated_against is None else f"v{evaluated_against}"
        raise ValueError(
            f"{name}@champion is {now} but candidate v{version} was evaluated against {then}: "
            "rerun evaluate before promoting"
        )
    mine = metrics_of(candidate.tags, EVAL_PREFIX, GATE_METRICS)
    theirs = metrics_of(candidate.tags, CHAMPION_PREFIX, GATE_METRICS) if champion else None
    behind = metrics_of(champion.tags, DRIFT_PREFIX, GATE_METRICS) if champion else {}
    unmeasured = [m for m in candidate.tags.get(UNMEASURED, "").split(",") if m]
    decision = decide(mine, theirs, ctx.config.gate, behind, unmeasured)
    if not decision.promote:  # before the verdict is tagged: a retry after the tag skips, alert-less
        # and after @champion is read again: a verdict a rollback made stale alerts nobody
        _still_champion(ctx.mlflow, name, evaluated_against, version, "candidate")
        ctx.alert(
            f"{name} v{version} not promoted",
            "\n".join(decision.reasons),
            "warning",
            candidate=mine,
            champion=theirs,
            champion_version=current,
            champion_drift=behind,
        )
    rules = json.dumps(ctx.config.gate.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    ctx.mlflow.set_model_version_tag(name, version, GATE_CONFIG, rules)  # what it was judged by
    apply_decision(ctx.mlflow, name, version, decision, against=evaluated_against)
    return {
        "model_version": version,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "champion": version if decision.promote else current,
        CHAMPION_MOVED: decision.promote,
        "metrics": mine,
        "drift": decision.drift,
        "unmeasured": decision.unmeasured,
    }


def refresh_champion(ctx: StepContext) -> dict[str, Any]:
    """Give ``@champion`` the semantic IDs that its tokenizer version gained since it was registered.

    A registered ranker packages its item -> semantic-ID table, so an item tokenized later
    (``tokenize-new-items``) is refused by it until a new champion is promoted, which a rejected
    candidate delays. HMAT reads items only through their semantic IDs (Sec. 3.2, the cold start of
    Sec. 4.3), so the same weights serve them: the champion is registered again with the table extended
    by ``gold.semantic_ids`` of its version, tagged ``refreshed_from``, and ``@champion`` moves to it
    (``@previous`` stays). Nothing is retrained, so there is no gate. The packaged IDs must equal the
    lake's (a version's IDs never change): a difference is an error, and nothing is registered. One
    refresh per champion and logical run: a retry, or a champion restored since, reuses it.
    """
    import tempfile
    from pathlib import Path

    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from hisam_core.semantic_ids import SemanticIds
    from pipelines.ranker import RUN_KEY, _find_run
    from pipelines.ranker_model import TOKENIZER_VERSION, TRAINING_RUN_TAG, load_ranker, log_ranker
    from pipelines.registry import (
        CHAMPION,
        PREVIOUS,
        ROLLBACK_PENDING,
        alias_version,
        find_versions,
        make_refreshed_champion,
    )
    from pipelines.steps import StepSkipped
    from pipelines.tokenizer import semantic_ids_of

    name = ctx.config.models.ranker
    champion = alias_version(ctx.mlflow, name, CHAMPION)
    if champion is None:
        return {"skipped": True, "reason": f"{name} has no @{CHAMPION} yet", CHAMPION_MOVED: False}
    behind = alias_version(ctx.mlflow, name, PREVIOUS)
    if behind is not None and str(behind.version) == str(champion.version):
        # only a promote or rollback stopped between its alias writes leaves both on one version: a
        # refresh now would hide it (a rollback would then restore what already serves)
        raise StepSkipped(
            f"{name}@{PREVIOUS} and @{CHAMPION} are both v{champion.version}: a promote or rollback "
            "stopped midway; rerun it, then the champion is refreshed"
        )
    key = {REFRESH_KEY: ctx.run_key, REFRESHED_FROM: str(champion.version)}
    done = find_versions(ctx.mlflow, name, **key)
    if done:  # a retry after registering, or a champion restored since the day's refresh of it
        refreshed = str(done[0].version)
        make_refreshed_champion(ctx.mlflow, name, refreshed, refreshed_from=str(champion.version))
        return {"champion": refreshed, "model_version": refreshed, CHAMPION_MOVED: True, "skipped": True}

    version = champion.tags.get(TOKENIZER_VERSION)
    if version is None:
        raise ValueError(
            f"{name}@{CHAMPION} v{champion.version} has no {TOKENIZER_VERSION} tag: it was not "
            "registered by this pipeline; register a candidate and promote it"
        )
    served = load_ranker(f"models:/{name}/{champion.version}").unwrap_python_model()
    packaged, lake = served.semantic_ids, semantic_ids_of(ctx, version)
    position = pd.Index(packaged.item_ids).get_indexer(lake.item_ids)
    known = position >= 0
    changed = lake.item_ids[known][(lake.codes[known] != packaged.codes[position[known]]).any(axis=1)]
    if changed.size:
        raise ValueError(
            f"gold.semantic_ids of {version} gives other IDs than {name} v{champion.version} packaged for "
            f"items {changed[:10].tolist()}: a version's IDs must never change; refusing to refresh"
        )
    summary: dict[str, Any] = {
        "tokenizer_version": version,
        REFRESHED_FROM: str(champion.version),
        "packaged_items": len(packaged.item_ids),
        "new_items": int((~known).sum()),
    }
    if known.all():
        log.info("%s v%s already serves every %s item", name, champion.version, version)
        # the day's refresh moved @champion: a retry of a run that failed after moving it announces it
        # again (at least once), and so does a second run of the day (a duplicate event is harmless)
        moved = champion.tags.get(REFRESH_KEY) == ctx.run_key
        return {**summary, "champion": str(champion.version), CHAMPION_MOVED: moved}
    table = SemanticIds(
        np.concatenate([packaged.item_ids, lake.item_ids[~known]]),
        np.concatenate([packaged.codes, lake.codes[~known]]),
        packaged.codebook_size,
        version,
        packaged.position_names,
    )
    # not inherited: the gate's verdict, the producing logical run, and what log_ranker sets itself
    dropped = {"gate", "gate_reasons", ROLLBACK_PENDING, RUN_KEY, TOKENIZER_VERSION, TRAINING_RUN_TAG}
    kept = {k: v for k, v in champion.tags.items() if k not in dropped}
    tags = {**kept, **key}
    previous = _find_run(ctx, "refresh-champion", **{REFRESHED_FROM: str(champion.version)})
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(
            run_id=previous.info.run_id if previous else None, run_name=f"refresh-champion-{ctx.logical_date}"
        ),
    ):
        mlflow.set_tags({**ctx.run_tags("refresh-champion"), **summary})
        checkpoint = Path(tmp) / "checkpoint.pt"
        state = {
            "config": served.config.model_dump(mode="json"),
            "state_dict": served.ranker.model.state_dict(),
            **({"mask_rule": served.mask_rule} if served.mask_rule is not None else {}),
        }
        torch.save(state, checkpoint)
        registered = log_ranker(
            checkpoint,
            served.config,
            table,
            name,
            training_run_id=champion.tags.get(TRAINING_RUN_TAG),
            profile_vocabulary=served.profile_vocabulary,
            version_tags=tags,
        )
    make_refreshed_champion(ctx.mlflow, name, str(registered.version), refreshed_from=str(champion.version))
    log.info(
        "%s v%s serves v%s's weights with %d more %s items",
        name, registered.version, champion.version, summary["new_items"], version,
    )  # fmt: skip
    return {
        **summary,
        "champion": str(registered.version),
        "model_version": str(registered.version),
        CHAMPION_MOVED: True,
    }


def rollback(ctx: StepContext) -> dict[str, Any]:
    """Restore ``@previous`` as ``@champion``, tell the on-call, then refresh it
    (:func:`refresh_champion`: it packaged its semantic IDs before the items that arrived since).
    The rollback stands if the refresh fails: a second alert says so, the summary has
    ``refreshed: false`` and the error (``hisam rollback`` exits 3), and ``refresh-champion``
    completes it."""
    from pipelines.registry import rollback as restore

    name = ctx.config.models.ranker
    restored, demoted = restore(ctx.mlflow, name)
    was = f"v{demoted}" if demoted else "(none)"
    ctx.alert(f"{name} rolled back", f"@champion {was} -> v{restored}", "warning")
    summary: dict[str, Any] = {"champion": restored, "restored": restored, "demoted": demoted}
    try:
        refreshed = refresh_champion(ctx)
    except Exception as err:
        log.exception("refreshing the restored champion v%s failed", restored)
        reason = redacted(f"{type(err).__name__}: {err}")  # also in the summary (XCom)
        ctx.alert(
            f"{name} v{restored} restored but not refreshed",
            f"{reason}. It refuses items that arrived since it was registered until "
            "`hisam run refresh-champion` succeeds.",
            "error",
        )
        return {**summary, "refreshed": False, "refresh_error": reason}
    if refreshed["champion"] != restored:
        log.info("%s v%s serves the restored v%s with the items since", name, refreshed["champion"], restored)
    return {
        **summary,
        "champion": refreshed["champion"],
        "new_items": refreshed.get("new_items"),
        "refreshed": True,
    }

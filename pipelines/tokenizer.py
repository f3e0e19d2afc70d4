"""Steps ``embeddings-ready``, ``train-tokenizer``, ``tokenize-catalogue``, ``activate-tokenizer`` and
``tokenize-new-items`` (Sec. 3.2, App. A.4).

Monthly: DST trains on a pinned snapshot of ``gold.item_embeddings`` (the Delta version is logged as
the run's input), must clear the codebook-health floors, and is registered as ``hisam-tokenizer``
tagged ``tokenizer_version = dst-YYYYMMDD``. ``tokenize-catalogue`` writes every item's codes as a
new ``gold.semantic_ids`` partition of that version; ``activate-tokenizer`` points ``@current`` at it
once the samples of that version exist, so weekly pre-training and daily fine-tuning switch together.
A version that is already registered is not retrained: reruns of the same month change nothing.

Daily, ``tokenize-new-items`` gives items that arrived since the catalogue run their IDs under the
``@current`` version, so their interactions reach the samples the same day instead of waiting a
month as ``unknown_item`` quarantine, and under ``@champion``'s version while that is older, so the
champion can serve them; IDs already written never change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hisam_core.features import ItemFeatures
from hisam_core.semantic_ids import SemanticIds
from pipelines.context import StepContext
from pipelines.notify import alerted
from pipelines.settings import redacted

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run

log = logging.getLogger(__name__)

EMBEDDINGS = "gold.item_embeddings"
#: Model-version tag: the ``gold.item_embeddings`` version ``tokenize-catalogue`` encoded.
CATALOGUE_SNAPSHOT = "hisam.catalogue_embeddings_version"
#: Version tag: the registered model carries its cold behaviour row (``tokenizer_model``); a version
#: without it (registered before) has ``tokenize-new-items`` read its embeddings snapshot instead.
COLD_BEHAVIOUR = "hisam.cold_behaviour"
#: Model-version tag: the encoders (name and version per modality) DST was trained on.
ENCODERS = "hisam.encoders"
#: Model-version tag: the unix second before which the behaviour encoder of DST's training
#: embeddings saw every interaction; the version's samples are never cut earlier (App. B.2).
BEHAVIOUR_CUT = "hisam.behaviour_cut"
#: Beside a run's ``dst.pt``: DST's training state after its last epoch, until the run registers.
TRAINING_STATE = "dst_state.pt"


class TokenizerHealthError(ValueError):
    """A trained DST failed the codebook-health floors; it is not registered."""


def tokenizer_version(ctx: StepContext) -> str:
    """The version a run writes (``params.tokenizer_version`` overrides ``dst-<logical date>``)."""
    return str(ctx.params.get("tokenizer_version") or f"dst-{ctx.logical_date:%Y%m%d}")


def current_tokenizer_version(ctx: StepContext) -> str:
    """The ``tokenizer_version`` tag of ``@current`` (error when no tokenizer was activated)."""
    from pipelines.registry import CURRENT, alias_version

    return _tokenizer_version_of_current(ctx, alias_version(ctx.mlflow, ctx.config.models.tokenizer, CURRENT))


def _tokenizer_version_of_current(ctx: StepContext, found: Any) -> str:
    """The tag of ``found``, the registry's ``@current`` model version (``None``: none activated yet)."""
    from pipelines.ranker_model import TOKENIZER_VERSION
    from pipelines.registry import CURRENT, required_tag

    if found is None:
        raise ValueError(
            f"no {ctx.config.models.tokenizer}@{CURRENT} yet: run the hisam_tokenizer DAG (or the steps "
            "train-tokenizer, tokenize-catalogue, build-sequences, validate-samples, activate-tokenizer) first"
        )
    return required_tag(found, TOKENIZER_VERSION)


def registered_tokenizer(ctx: StepContext, version: str) -> Any:
    """The registered tokenizer (newest model version) tagged ``tokenizer_version=version``."""
    from pipelines.registry import find_versions

    name = ctx.config.models.tokenizer
    if found := find_versions(ctx.mlflow, name, tokenizer_version=version):
        return found[0]
    raise ValueError(f"{name} has no version tagged tokenizer_version={version} (deleted from the registry?)")


def serving_tokenizer_versions(ctx: StepContext, current: str | None = None) -> dict[str, str]:
    """Tokenizer versions that serve, by alias, each once: ``@current``'s (the tokenizer model's, or
    ``current`` when the caller read it already), then the ranker's ``@champion``'s and
    ``@previous``'s (which a rollback restores) when they differ."""
    from pipelines.ranker_model import TOKENIZER_VERSION
    from pipelines.registry import CHAMPION, CURRENT, PREVIOUS, alias_version, required_tag

    if current is None and (found := alias_version(ctx.mlflow, ctx.config.models.tokenizer, CURRENT)):
        current = required_tag(found, TOKENIZER_VERSION)
    versions = {} if current is None else {CURRENT: current}
    for alias in (CHAMPION, PREVIOUS):
        held = alias_version(ctx.mlflow, ctx.config.models.ranker, alias)
        version = None if held is None else held.tags.get(TOKENIZER_VERSION)
        if version is not None and version not in versions.values():
            versions[alias] = version
    return versions


def current_tokenizer_version_or_skip(ctx: StepContext, step: str, why: str) -> str:
    """:func:`current_tokenizer_version`; when there is none yet and the step was run with
    ``skip_without_tokenizer=true`` (the daily DAG before the first monthly tokenizer run), the step
    skips (:class:`~pipelines.steps.StepSkipped`, ``why`` it has nothing to do), logged: skipped, not
    done, so its DAG emits no asset event and the tasks after it skip too."""
    from pipelines.registry import CURRENT, alias_version
    from pipelines.settings import flag
    from pipelines.steps import StepSkipped

    skip = flag(ctx.params.get("skip_without_tokenizer"), "skip_without_tokenizer")  # a typo fails at once
    found = alias_version(ctx.mlflow, ctx.config.models.tokenizer, CURRENT)  # read once
    if skip and found is None:
        log.warning("%s skipped: no %s@%s yet", step, ctx.config.models.tokenizer, CURRENT)
        raise StepSkipped(f"no tokenizer activated yet: {why}")
    return _tokenizer_version_of_current(ctx, found)  # any other error (an untagged @current) fails


def encoder_specs(ctx: StepContext) -> dict[str, tuple[str, str]]:
    """``modality -> (encoder name, encoder version)`` of the configured embeddings."""
    from pipelines.features import BEHAVIOR_ENCODER

    emb = ctx.config.embeddings
    return {
        "behavior": (BEHAVIOR_ENCODER, emb.behavior_version),
        "image": (emb.image.encoder_name(), emb.image.version),
        "text": (emb.text.encoder_name(), emb.text.version),
    }


def encoder_fingerprints(ctx: StepContext) -> dict[str, str]:
    """``modality -> settings fingerprint`` of the configured text and image encoders: the
    ``fingerprint`` of their ``gold.item_embeddings`` rows. Behaviour rows record none: each
    training writes all of them in one commit (their ``input_hash`` covers the settings), so a
    snapshot never holds two behaviour spaces of one version."""
    emb = ctx.config.embeddings
    return {"image": emb.image.fingerprint(), "text": emb.text.fingerprint()}


def configured_rows(
    ctx: StepContext, modality: str, frame: pd.DataFrame, fingerprinted: bool | None = None
) -> pd.DataFrame:
    """The rows of ``frame`` (``gold.item_embeddings`` of ``modality``, with ``encoder``,
    ``encoder_version`` and ``fingerprint``) that the configured encoder computed with the configured
    settings: one vector space, even while a re-embed under new settings and the same version is in
    progress. A snapshot written before the ``fingerprint`` column (none of the encoder's rows has
    one) gives all the encoder's rows, as then; once one has it, a row without one was computed with
    other settings (:func:`spark_jobs.embeddings.record_fingerprints`). ``fingerprinted``: whether one
    has, when ``frame`` holds only some items' rows (default: judged from ``frame``). Behaviour rows
    go by name and version (:func:`encoder_fingerprints`)."""
    name, enc_version = encoder_specs(ctx)[modality]
    frame = frame[(frame["encoder"] == name) & (frame["encoder_version"] == enc_version)]
    fingerprint = encoder_fingerprints(ctx).get(modality)
    if fingerprinted is None:
        fingerprinted = bool(frame["fingerprint"].notna().any())
    if fingerprint is None or not fingerprinted:
        return frame
    return frame[frame["fingerprint"] == fingerprint]


def encoders_tag(ctx: StepContext) -> str:
    """The :data:`ENCODERS` tag value of the configured encoders: ``modality -> [name, version]``,
    with the settings fingerprint for text and image (the behaviour encoder's version covers its)."""
    emb = ctx.config.embeddings
    specs: dict[str, list[str]] = {m: list(pair) for m, pair in encoder_specs(ctx).items()}
    specs["image"].append(emb.image.fingerprint())
    specs["text"].append(emb.text.fingerprint())
    return json.dumps(specs, sort_keys=True)


def encoder_mismatch(ctx: StepContext, registered: Any) -> str | None:
    """Why a DST must not encode the configured embeddings (trained on other encoders or settings:
    their embeddings live in other spaces), or None (a tokenizer registered before the tag existed
    passes, and one registered before it held fingerprints is compared on names and versions)."""
    trained, configured = registered.tags.get(ENCODERS), encoders_tag(ctx)
    if trained is None or trained == configured:
        return None
    legacy = {m: spec[:2] for m, spec in json.loads(configured).items()}
    if json.loads(trained) == legacy:
        return None
    return (
        f"{registered.name} v{registered.version} was trained on encoders {trained}, the config now "
        f"says {configured}: train a tokenizer for them first (the hisam_tokenizer DAG)"
    )


def check_encoders(ctx: StepContext, registered: Any) -> None:
    """Refuse to encode with a DST whose training encoders are not the configured ones."""
    if reason := encoder_mismatch(ctx, registered):
        raise ValueError(reason)


def embeddings_ready(ctx: StepContext) -> dict[str, Any]:
    """Whether every item of ``gold.item_documents`` has a ``gold.item_embeddings`` row of each
    configured encoder computed with its configured settings (``ready``; ``missing`` counts the
    others per modality). The monthly tokenizer DAG waits on it: on a fresh deployment its first run
    may start before the first ``embed``, and an ``embed`` in progress (after an encoder or settings
    change, say) has covered only part of the catalogue. Rows that do not record their settings yet
    (written before the ``fingerprint`` column) count as missing until the next ``embed`` records
    them."""
    from spark_jobs.tables import GOLD_ITEM_DOCUMENTS

    encoders, fingerprints = encoder_specs(ctx), encoder_fingerprints(ctx)
    if ctx.table_version(GOLD_ITEM_DOCUMENTS.name) is None or ctx.table_version(EMBEDDINGS) is None:
        return {"ready": False, "items": 0, "missing": {}}
    documents, _ = ctx.read_table(GOLD_ITEM_DOCUMENTS.name, {"dataset": ctx.dataset}, ["item_id"])
    items = set(documents["item_id"].tolist())
    missing = {}
    for modality, (name, enc_version) in encoders.items():
        frame, _ = ctx.read_table(
            EMBEDDINGS,
            {"dataset": ctx.dataset, "modality": modality},
            ["item_id", "encoder", "encoder_version", "fingerprint"],
        )
        mine = (frame["encoder"] == name) & (frame["encoder_version"] == enc_version)
        if modality in fingerprints:
            mine &= frame["fingerprint"] == fingerprints[modality]
        have = frame.loc[mine, "item_id"]
        missing[modality] = len(items - set(have.tolist()))
    ready = bool(items) and not any(missing.values())
    if not ready:
        log.info("%d catalogue items, without embeddings of %s: %s", len(items), encoders, missing)
    return {"ready": ready, "items": len(items), "missing": missing}


def trained_behaviour_cut(ctx: StepContext, snapshot: int, item_ids: np.ndarray) -> int | None:
    """The behaviour cut of the embeddings snapshot ``snapshot`` for these items (the latest, when
    its rows come from several embed runs), or None when a row's cut was never recorded."""
    from pipelines.features import behaviour_cut_of

    frame = behaviour_rows(ctx, snapshot, ["item_id", "input_hash"])
    return behaviour_cut_of(ctx, set(frame.loc[frame["item_id"].isin(item_ids), "input_hash"]))


def behaviour_rows(ctx: StepContext, snapshot: int, columns: list[str]) -> pd.DataFrame:
    """The configured behaviour encoder's rows of the embeddings snapshot ``snapshot`` (pandas,
    :func:`configured_rows`)."""
    frame, _ = ctx.read_table(
        EMBEDDINGS,
        {"dataset": ctx.dataset, "modality": "behavior"},
        columns=["encoder", "encoder_version", "fingerprint", *columns],
        version=snapshot,
    )
    return configured_rows(ctx, "behavior", frame)


def behaviour_cut_floor(ctx: StepContext, version: str) -> int | None:
    """The :data:`BEHAVIOUR_CUT` of the registered tokenizer ``version``: ``build-sequences`` never
    cuts its samples earlier. None when it is not registered or was registered without it."""
    from pipelines.registry import find_versions

    found = find_versions(ctx.mlflow, ctx.config.models.tokenizer, tokenizer_version=version)
    cut = found[0].tags.get(BEHAVIOUR_CUT) if found else None
    return None if cut is None else int(cut)


def load_item_features(
    ctx: StepContext, version: int | None = None, catalogue: int | None = None
) -> tuple[ItemFeatures, int, dict[int, str]]:
    """Every item of the catalogue (``gold.item_documents`` at version ``catalogue``, default latest)
    with all three modality embeddings of the configured encoders, ``present`` False where one is the
    encoder's fallback row, from the embeddings snapshot ``version`` (default latest), the version
    read, and ``item_id -> reason`` for the catalogue items that lack a modality
    (``missing_embedding:image``; all three when none was embedded yet, read at the latest version
    only: a pinned one predates items embedded since) or whose vector the embeddings gate rejects
    (``invalid_embedding:text``: null, not of its ``dim`` or of ``quality.embeddings.expected_dims``,
    NaN or inf): they get no semantic ID until the embed step writes a good one. Embeddings of items
    no longer in the catalogue (retracted upstream: the embed step's merge keeps their rows) are left
    out, and counted in the log."""
    features, read_version, incomplete = _item_features(ctx, version, catalogue)
    if features is None:
        raise ValueError(
            f"no catalogue item has a usable embedding of every modality in {EMBEDDINGS}@v{read_version} "
            f"({len(incomplete)} lack one): run the embed step first"
        )
    return features, read_version, incomplete


def load_new_item_features(
    ctx: StepContext, items: Collection[int] | None
) -> tuple[ItemFeatures | None, int, dict[int, str]]:
    """:func:`load_item_features` at the latest snapshots, of ``items`` only (None: every item): the
    daily step reads the vectors of the items some serving version has no ID for, not the
    catalogue's. A modality none of them has a usable row of is no error (they are incomplete);
    None in place of the features when no item is complete."""
    return _item_features(ctx, None, None, items)


def _item_features(
    ctx: StepContext, version: int | None, catalogue: int | None, items: Collection[int] | None = None
) -> tuple[ItemFeatures | None, int, dict[int, str]]:
    from pipelines.ingest import quality_config
    from spark_jobs.tables import GOLD_ITEM_DOCUMENTS

    encoders = encoder_specs(ctx)
    gate = quality_config(ctx).embeddings
    only = {} if items is None else {"item_id": sorted(int(i) for i in items)}
    frames, read_version = {}, version
    invalid: dict[int, list[str]] = {}
    for modality, (name, enc_version) in encoders.items():
        frame, read_version = ctx.read_table(
            EMBEDDINGS,
            {"dataset": ctx.dataset, "modality": modality},
            columns=["item_id", "encoder", "encoder_version", "fingerprint", "embedding", "dim", "present"],
            version=read_version,
            where={"encoder": name, "encoder_version": enc_version, **only},  # not other encoders'
        )
        fingerprinted = None
        if (  # some items' rows, none with a fingerprint: do the encoder's other rows have one?
            items is not None
            and modality in encoder_fingerprints(ctx)
            and len(frame)
            and frame["fingerprint"].isna().all()
        ):
            rows, _ = ctx.read_table(
                EMBEDDINGS,
                {"dataset": ctx.dataset, "modality": modality},
                columns=["fingerprint"],
                version=read_version,
                where={"encoder": name, "encoder_version": enc_version},
            )
            fingerprinted = bool(rows["fingerprint"].notna().any())
        frame = configured_rows(ctx, modality, frame, fingerprinted)
        expected = gate.expected_dims.get(modality)
        usable = [  # the embeddings gate's row rules (spark_jobs.quality.embeddings_suite)
            vector is not None
            and len(vector) == dim
            and (expected is None or len(vector) == expected)
            and bool(np.isfinite(vector).all())
            for vector, dim in zip(frame["embedding"], frame["dim"], strict=True)
        ]
        for item in frame.loc[[not ok for ok in usable], "item_id"]:  # the embeddings gate quarantined these
            invalid.setdefault(int(item), []).append(modality)
        if not any(usable) and items is None:
            rejected = f" ({len(usable)} fail the embeddings gate's rules)" if usable else ""
            raise ValueError(
                f"{EMBEDDINGS}@v{read_version} has no usable {modality} rows of encoder {name} "
                f"v{enc_version} for dataset {ctx.dataset!r}{rejected}: run the embed step first"
                + (f", or check quality.embeddings.expected_dims {expected}" if rejected and expected else "")
            )
        frame = frame[np.asarray(usable, dtype=bool)]  # (a plain empty list would select no columns)
        frames[modality] = frame.set_index("item_id")[["embedding", "present"]]
    documents, _ = ctx.read_table(
        GOLD_ITEM_DOCUMENTS.name, {"dataset": ctx.dataset}, ["item_id"], version=catalogue, where=only
    )
    listed = {int(i) for i in documents["item_id"]}
    embedded = set.union(set(invalid), *(set(f.index) for f in frames.values()))
    if retracted := len(embedded - listed):
        log.info(
            "%d items with embeddings are no longer in %s: left out", retracted, GOLD_ITEM_DOCUMENTS.name
        )
    complete = sorted(set.intersection(*(set(f.index) for f in frames.values())) & listed)
    # a pinned snapshot predates the catalogue items embedded since: they are the daily step's
    expected = listed if version is None else listed & embedded
    incomplete = {}
    for item in sorted(expected - set(complete)):
        bad = invalid.get(item, [])
        missing = [m for m, f in frames.items() if item not in f.index and m not in bad]
        reasons = [f"invalid_embedding:{','.join(bad)}"] if bad else []
        reasons += [f"missing_embedding:{','.join(missing)}"] if missing else []
        incomplete[int(item)] = "; ".join(reasons)
    if incomplete:
        log.warning("%d items lack a usable modality embedding and get no semantic ID yet", len(incomplete))
    if not complete:
        return None, int(read_version), incomplete
    modalities = {
        m: np.stack(f.loc[complete, "embedding"].to_numpy()).astype(np.float32) for m, f in frames.items()
    }
    present = {m: f.loc[complete, "present"].to_numpy(dtype=bool) for m, f in frames.items()}
    features = ItemFeatures(np.asarray(complete, dtype=np.int64), modalities, present)
    return features, int(read_version), incomplete


def quarantine_items(ctx: StepContext, reasons: dict[int, str], label: str) -> int:
    """Replace this run's ``bronze.quarantine`` partition ``label`` with one row per item and reason
    (an empty partition when there are none, so a rerun clears what an earlier run wrote)."""
    from spark_jobs.tables import BRONZE_QUARANTINE

    rows = [
        (
            ctx.dataset,
            label,
            ctx.logical_date,
            reason,
            json.dumps({"dataset": ctx.dataset, "item_id": item}),
            None,
        )
        for item, reason in sorted(reasons.items())
    ]
    df = ctx.lake.spark.createDataFrame(rows, schema=BRONZE_QUARANTINE.schema)
    return ctx.lake.write(
        df,
        BRONZE_QUARANTINE,
        mode="replace_partition",
        partition_values={"dataset": ctx.dataset, "target_table": label, "logical_date": ctx.logical_date},
    )


def code_health(ids: SemanticIds) -> dict[str, float]:
    """Utilisation and perplexity per code position, unique-ID and collision rates."""
    from hisam_core.tokenizer.metrics import collision_rate, unique_id_rate
    from hisam_core.tokenizer.train import code_metrics

    return {
        **code_metrics(ids.codes, ids.codebook_size, tuple(ids.position_names)),
        "unique_id_rate": unique_id_rate(ids.codes),
        "collision_rate": collision_rate(ids.codes),
    }


def health_failures(health: dict[str, float], ctx: StepContext) -> list[str]:
    floors = ctx.config.tokenizer.health
    failures = [
        f"{name}: {value:.3f} below {floors.min_utilisation:.3f}"
        for name, value in health.items()
        if name.startswith("utilisation_") and value < floors.min_utilisation
    ]
    if health["unique_id_rate"] < floors.min_unique_id_rate:
        failures.append(
            f"unique_id_rate: {health['unique_id_rate']:.3f} below {floors.min_unique_id_rate:.3f}"
        )
    return failures


def _utilisation_figure(health: dict[str, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k.removeprefix("utilisation_") for k in health if k.startswith("utilisation_")]
    figure = Figure(figsize=(6, 3), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.bar(names, [health[f"utilisation_{n}"] for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of codes used")
    ax.set_title("DST codebook utilisation per position")
    return figure


def train_tokenizer(ctx: StepContext) -> dict[str, Any]:
    """Train DST on the pinned embeddings snapshot, check codebook health, register it. A backfill or
    rerun of a month that a newer ``@current`` replaced skips (:func:`skip_if_superseded`), and the
    rest of its DAG run with it (its samples are not rebuilt). A version registered meanwhile by
    another run of the month (hours of training overlap) is not registered twice: the steps after
    find one model per version. A rerun after an attempt that stopped (killed, failed, or failed
    codebook health) continues its MLflow run from the training state of its last epoch, on the
    snapshots it pinned (:func:`_resumable_run`); ``params.force=true`` trains in a new run on
    today's snapshots instead (after the embeddings a failed health check blamed were fixed; tagged
    ``hisam.forced``, so a forced run that stopped before its health check is continued). A run of
    the same logical date started beside a live one (the CLI beside the DAG) continues it too:
    training is deterministic, so both reach the same weights, and only the first to finish
    registers them."""
    import mlflow

    from hisam_core.tokenizer import train_tokenizer as fit_dst
    from hisam_core.tokenizer.figure import position_modality_similarity, save_similarity_figure
    from pipelines.ranker import FORCED
    from pipelines.registry import find_versions
    from pipelines.settings import flag
    from pipelines.tokenizer_model import log_tokenizer
    from pipelines.tracking import input_versions, log_config, log_training_curves, mlflow_callback
    from spark_jobs.tables import GOLD_ITEM_DOCUMENTS

    version, name = tokenizer_version(ctx), ctx.config.models.tokenizer
    skip_if_superseded(ctx, ctx.logical_date.isoformat())  # a backfill or rerun of a month since replaced
    existing = find_versions(ctx.mlflow, name, tokenizer_version=version)
    if existing:
        log.info("%s %s is already registered as v%s: nothing to do", name, version, existing[0].version)
        return {"tokenizer_version": version, "model_version": existing[0].version, "skipped": True}
    stopped = next(iter(ctx.step_runs("train-tokenizer", tokenizer_version=version)), None)
    stopped = stopped if stopped is not None and stopped.info.status != "FINISHED" else None
    force = flag(ctx.params.get("force"), "force")
    midway = (
        stopped is not None and stopped.data.tags.get(FORCED) == "true" and "health" not in stopped.data.tags
    )
    if stopped is not None and force and not midway:  # a forced run that stopped midway is continued
        log.warning(
            "force=true: training in a new run on today's snapshots, not continuing %s", stopped.info.run_id
        )
        if stopped.info.status == "RUNNING":  # its worker was killed: it never ended
            ctx.mlflow.set_terminated(stopped.info.run_id, "KILLED")
        stopped = None
    elif stopped is not None and stopped.data.tags.get("health") == "failed":
        log.warning(
            "continuing run %s, which failed codebook health: on the snapshots it pinned it ends with the "
            "same model (passing only if the health settings changed); --param force=true trains anew "
            "on today's embeddings",
            stopped.info.run_id,
        )
    pinned = input_versions(ctx.mlflow.get_run(stopped.info.run_id)) if stopped is not None else {}
    # pinned: logged as what DST trained on
    catalogue = pinned.get("item_documents", ctx.table_version(GOLD_ITEM_DOCUMENTS.name))
    if catalogue is None:
        raise ValueError(f"{GOLD_ITEM_DOCUMENTS.name} does not exist: run the features DAG first")
    # tokenize-catalogue quarantines the incomplete
    features, snapshot, _ = load_item_features(ctx, pinned.get("item_embeddings"), catalogue=catalogue)
    cold = cold_behavior_embedding(ctx, snapshot)  # before training: it fails without warm rows
    resumed = _resumable_run(ctx, stopped, version, features) if stopped is not None else None
    with mlflow.start_run(run_id=resumed, run_name=f"train-tokenizer-{version}") as run:
        out = _training_dir(ctx, version, run.info.run_id)  # one per run: two never mix
        out.mkdir(parents=True, exist_ok=True)
        callback = mlflow_callback("dst/")
        if resumed is None:
            mlflow.set_tags({**ctx.run_tags("train-tokenizer"), "tokenizer_version": version})
            if force:
                mlflow.set_tag(FORCED, "true")
            log_config(ctx.config.tokenizer, name="tokenizer")
            ctx.log_input(EMBEDDINGS, snapshot, "training", "item_embeddings")
            ctx.log_input(GOLD_ITEM_DOCUMENTS.name, catalogue, "training", "item_documents")
        else:
            callback.resume(resumed)
        model = fit_dst(
            features,
            ctx.config.tokenizer.train,
            callback=callback,
            checkpoint_path=out / "dst.pt",
            state_path=out / TRAINING_STATE,
        )
        ids = model.encode(features, version=version)
        health = code_health(ids)
        mlflow.log_metrics(health)
        log_training_curves(callback.history, "dst_training")
        mlflow.log_figure(_utilisation_figure(health), "plots/codebook_utilisation.png")
        codewords, aligned = model.codewords_and_aligned(features)
        similarity = position_modality_similarity(codewords, aligned, features.present)
        save_similarity_figure(similarity, ids.position_names, model.modalities, out / "figure3.png")
        mlflow.log_artifact(str(out / "figure3.png"), "plots")
        failures = health_failures(health, ctx)
        mlflow.set_tag("health", "failed" if failures else "passed")
        if failures:
            title = f"tokenizer {version} failed codebook health"
            delivered = ctx.alert(title, "\n".join(failures), health=health)
            raise alerted(TokenizerHealthError(f"{title}: {'; '.join(failures)}"), delivered)
        tags = {"hisam.run_key": ctx.run_key, "delta.version": str(snapshot), ENCODERS: encoders_tag(ctx)}
        cut = trained_behaviour_cut(ctx, snapshot, features.item_ids)
        if cut is None:
            log.warning(
                "the behaviour cut of %s@v%d was not recorded: its samples are cut as they fall",
                EMBEDDINGS,
                snapshot,
            )
        else:
            tags[BEHAVIOUR_CUT] = str(cut)
        if existing := find_versions(ctx.mlflow, name, tokenizer_version=version):  # another run's, since
            log.warning(
                "%s %s was registered as v%s meanwhile: this one is not", name, version, existing[0].version
            )
            mlflow.set_tag("registered", "no: another run registered the version first")
            (out / TRAINING_STATE).unlink(missing_ok=True)
            return {"tokenizer_version": version, "model_version": existing[0].version, "skipped": True}
        registered = log_tokenizer(
            out / "dst.pt",
            version,
            features,
            name,
            version_tags={**tags, COLD_BEHAVIOUR: "carried"},
            cold_behaviour=cold,
        )
        (out / TRAINING_STATE).unlink(missing_ok=True)  # registered: no attempt resumes it
    return {
        "tokenizer_version": version,
        "model_version": str(registered.version),
        "items": len(features),
        "embeddings_version": snapshot,
        "mlflow_run_id": run.info.run_id,
        **{k: round(v, 4) for k, v in health.items() if not k.startswith("perplexity")},
    }


def _training_dir(ctx: StepContext, version: str, run_id: str) -> Path:
    """Per MLflow run, among the checkpoints (a volume a retry on another node mounts too)."""
    return ctx.settings.checkpoints / "dst" / ctx.dataset / version / run_id


def _resumable_run(ctx: StepContext, stopped: Run, version: str, features: ItemFeatures) -> str | None:
    """The id of ``stopped`` (this logical run's newest ``train-tokenizer`` run of ``version``, not
    finished) when its training state can resume on ``features`` under today's settings; otherwise
    None, and a run still marked RUNNING (its worker was killed) is marked KILLED."""
    from hisam_core.tokenizer.train import state_conflicts

    run_id = stopped.info.run_id
    state = _training_dir(ctx, version, run_id) / TRAINING_STATE
    if not state.exists():
        why = f"it saved no training state at {state}"
    elif changed := state_conflicts(state, features, ctx.config.tokenizer.train):
        why = f"its training differs in {changed}"
    else:
        log.info("continuing run %s from its training state %s", run_id, state)
        return run_id
    log.warning("run %s of this tokenizer stopped, but %s: training in a new run", run_id, why)
    if stopped.info.status == "RUNNING":
        ctx.mlflow.set_terminated(run_id, "KILLED")
    return None


def tokenize_catalogue(ctx: StepContext) -> dict[str, Any]:
    """Encode every catalogue item of the embeddings snapshot DST was trained on (its ``delta.version``
    tag: a daily embed may have written a new behaviour space since) with the registered DST of this run's
    version into ``gold.semantic_ids``. Once written (the version's ``hisam.catalogue_embeddings_version``
    tag), a rerun does nothing: rewriting the partition would drop the items ``tokenize-new-items``
    has merged into it since."""
    from pipelines.ingest import quality_config, run_gate, versioned_label
    from pipelines.registry import find_versions
    from pipelines.tokenizer_model import load_tokenizer
    from spark_jobs.quality import semantic_ids_suite
    from spark_jobs.tables import GOLD_SEMANTIC_IDS

    version, name = tokenizer_version(ctx), ctx.config.models.tokenizer
    found = find_versions(ctx.mlflow, name, tokenizer_version=version)
    if not found:
        raise ValueError(
            f"{name} has no version tagged tokenizer_version={version}: run train-tokenizer first"
        )
    if CATALOGUE_SNAPSHOT in found[0].tags:
        log.info("%s %s: catalogue already written, nothing to do", name, version)
        return {
            "tokenizer_version": version,
            "embeddings_version": int(found[0].tags[CATALOGUE_SNAPSHOT]),
            "skipped": True,
        }
    check_encoders(ctx, found[0])
    tokenizer = load_tokenizer(f"models:/{name}/{found[0].version}")
    trained_on = found[0].tags.get("delta.version")
    if trained_on is None:
        raise ValueError(f"{name} v{found[0].version} records no delta.version: re-register it")
    features, snapshot, incomplete = load_item_features(ctx, version=int(trained_on))
    quarantine_items(ctx, incomplete, versioned_label(GOLD_SEMANTIC_IDS.name, version))
    ids = tokenizer.dst.encode(features, version=version)  # type: ignore[union-attr]
    frame = ids.to_frame().assign(dataset=ctx.dataset, codebook_size=ids.codebook_size)
    frame["semantic_ids"] = [np.asarray(c, dtype=np.int64).tolist() for c in frame["semantic_ids"]]
    df = ctx.lake.spark.createDataFrame(frame[GOLD_SEMANTIC_IDS.columns], schema=GOLD_SEMANTIC_IDS.schema)
    valid, gate = run_gate(
        ctx,
        df,
        semantic_ids_suite(df, quality_config(ctx, ids.codebook_size, ids.num_positions)),
        versioned_label(GOLD_SEMANTIC_IDS.name, version, gate=True),
    )
    written = ctx.lake.write(
        valid,
        GOLD_SEMANTIC_IDS,
        mode="replace_partition",
        partition_values={"dataset": ctx.dataset, "tokenizer_version": version},
    )
    ctx.mlflow.set_model_version_tag(name, found[0].version, CATALOGUE_SNAPSHOT, str(snapshot))
    return {
        "tokenizer_version": version,
        "items": gate["n_valid"],  # written: the gate's rejects are in "quarantined"
        "embeddings_version": snapshot,
        "semantic_ids_version": written,
        "quarantined": gate["n_quarantined"] + len(incomplete),
    }


def cold_behavior_embedding(ctx: StepContext, snapshot: int) -> np.ndarray:
    """The behaviour embedding of an item without interactions in the behaviour space of ``snapshot``:
    the mean of its warm rows (what the SASRec encoder gives cold items, ``hisam_core.encoders.behavior``).
    ``train-tokenizer`` stores it in the registered model, so no daily step reads ``snapshot`` again.
    """
    frame = behaviour_rows(ctx, snapshot, ["embedding", "present"])
    frame = frame[frame["present"]]
    if frame.empty:
        raise ValueError(f"{EMBEDDINGS}@v{snapshot} has no warm behaviour rows to place a new item by")
    embeddings = np.stack(frame["embedding"].to_numpy())
    return embeddings.mean(0, dtype=np.float64).astype(np.float32)  # the same in any row order


def tokenize_new_items(ctx: StepContext) -> dict[str, Any]:
    """Daily: semantic IDs for items that have none yet, under every version that serves.

    That is ``@current``'s, ``@champion``'s while it is on an older tokenizer (after a monthly run,
    until a model on the new one is promoted, which a rejected candidate delays): ``refresh-champion``
    then packages them, so the champion serves items that arrived meanwhile; and ``@previous``'s,
    which a rollback restores and refreshes from its version's IDs (the first champion of a new
    tokenizer is the likeliest to be rolled back). The summary is ``@current``'s, with ``champion``
    and ``previous`` holding an older version's, or why it was skipped: a DST is never fed embeddings
    of encoders it was not trained on (a warning alert when that leaves the champion without them).
    """
    from pipelines.registry import CHAMPION, CURRENT, PREVIOUS

    current = current_tokenizer_version_or_skip(ctx, "tokenize-new-items", "no item can get a semantic ID")
    registered = registered_tokenizer(ctx, current)
    check_encoders(ctx, registered)
    serving = serving_tokenizer_versions(ctx, current)
    features = load_new_item_features(ctx, untokenized_items(ctx, list(serving.values())))
    summary = _tokenize_new_items(ctx, registered, *features)
    for alias, older in serving.items():
        if alias == CURRENT:  # tokenized above
            continue
        try:
            registered = registered_tokenizer(ctx, older)
            if reason := encoder_mismatch(ctx, registered):
                log.warning("no new %s IDs for @%s: %s", older, alias, reason)
                if alias == CHAMPION:  # serving now (a rollback target is only logged: it may wait weeks)
                    ctx.alert(
                        f"no new {older} IDs for @{alias}",
                        f"{registered.name} v{registered.version} was trained on other encoders than the "
                        f"config's: the champion cannot serve the items that arrived today until a model "
                        f"on {current} is promoted",
                        "warning",
                    )
                summary[alias] = {"tokenizer_version": older, "skipped": True, "reason": reason}
            else:
                summary[alias] = _tokenize_new_items(ctx, registered, *features)
        except Exception as err:  # @previous only serves after a rollback: it must not stop the day
            if alias != PREVIOUS:
                raise
            reason = redacted(f"{type(err).__name__}: {err}")  # also in the summary (XCom)
            log.exception("no new %s IDs for @%s", older, alias)
            ctx.alert(
                f"no new {older} IDs for @{alias}", f"a rollback would not serve them: {reason}", "warning"
            )
            summary[alias] = {"tokenizer_version": older, "skipped": True, "reason": reason}
    return summary


def untokenized_items(ctx: StepContext, versions: list[str]) -> set[int] | None:
    """The catalogue's items that one of ``versions`` (the first is ``@current``'s) has no semantic ID
    for: the only ones whose vectors the daily step reads. None (every item) when the IDs of a later
    version cannot be read: its own turn reports why."""
    from spark_jobs.tables import GOLD_ITEM_DOCUMENTS, GOLD_SEMANTIC_IDS

    documents, _ = ctx.read_table(GOLD_ITEM_DOCUMENTS.name, {"dataset": ctx.dataset}, ["item_id"])
    listed = {int(i) for i in documents["item_id"]}
    untokenized: set[int] = set()
    for position, version in enumerate(versions):
        try:
            known, _ = ctx.read_table(
                GOLD_SEMANTIC_IDS.name, {"dataset": ctx.dataset, "tokenizer_version": version}, ["item_id"]
            )
        except Exception:
            if position == 0:
                raise
            log.warning("cannot read the %s IDs: reading every item's embeddings", version, exc_info=True)
            return None
        untokenized |= listed - {int(i) for i in known["item_id"]}
    return untokenized


def _tokenize_new_items(
    ctx: StepContext,
    registered: Any,
    features: ItemFeatures | None,
    latest: int,
    incomplete: dict[int, str],
) -> dict[str, Any]:
    """IDs of the ``registered`` DST for the items of ``features`` (embeddings snapshot ``latest``;
    None: no item) its version has none for.

    Text and image come from the latest embeddings (their encoders are fixed). Behaviour does not: the
    SASRec encoder is retrained whenever the interactions move, so today's rows live in another space
    than the one DST was trained and the catalogue encoded in. A new item had no interactions in that
    space, so it gets that space's cold embedding, exactly as it would have there; the next monthly DST
    run gives it its own behaviour code. Rows already in ``gold.semantic_ids`` are never rewritten.
    """
    from pipelines.ingest import quality_config, run_gate, versioned_label
    from pipelines.ranker_model import TOKENIZER_VERSION
    from pipelines.registry import required_tag
    from pipelines.tokenizer_model import load_tokenizer
    from spark_jobs.quality import semantic_ids_suite
    from spark_jobs.tables import GOLD_SEMANTIC_IDS

    version = required_tag(registered, TOKENIZER_VERSION)
    known = semantic_ids_of(ctx, version)
    label = f"{GOLD_SEMANTIC_IDS.name}.new_items"  # on the 1st, tokenize-catalogue writes the same day
    tokenized = set(known.item_ids.tolist())
    incomplete = {i: r for i, r in incomplete.items() if i not in tokenized}
    quarantine_items(ctx, incomplete, versioned_label(label, version))
    new = np.zeros(0, dtype=bool) if features is None else ~np.isin(features.item_ids, known.item_ids)
    summary: dict[str, Any] = {
        "tokenizer_version": version,
        "known_items": len(known.item_ids),
        "new_items": int(new.sum()),
        "tokenized": 0,  # new items written: new_items less the gate's rejects
        "embeddings_version": latest,
        "quarantined": len(incomplete),
    }
    if features is None or not new.any():
        log.info("every item with embeddings already has a %s semantic ID", version)
        return summary
    snapshot = int(registered.tags.get(CATALOGUE_SNAPSHOT) or required_tag(registered, "delta.version"))
    fresh = features.subset(np.flatnonzero(new))
    tokenizer = load_tokenizer(f"models:/{registered.name}/{registered.version}")
    cold = tokenizer.cold_behaviour  # None: registered before the model carried it
    cold = cold_behavior_embedding(ctx, snapshot) if cold is None else cold
    fresh = ItemFeatures(
        fresh.item_ids,
        {**fresh.modalities, "behavior": np.repeat(cold[None], len(fresh), axis=0)},
        {**fresh.present, "behavior": np.zeros(len(fresh), dtype=bool)},
    )
    ids = tokenizer.dst.encode(fresh, version=version)  # type: ignore[union-attr]
    frame = ids.to_frame().assign(dataset=ctx.dataset, codebook_size=ids.codebook_size)
    frame["semantic_ids"] = [np.asarray(c, dtype=np.int64).tolist() for c in frame["semantic_ids"]]
    df = ctx.lake.spark.createDataFrame(frame[GOLD_SEMANTIC_IDS.columns], schema=GOLD_SEMANTIC_IDS.schema)
    suite = semantic_ids_suite(df, quality_config(ctx, ids.codebook_size, ids.num_positions))
    valid, gate = run_gate(ctx, df, suite, versioned_label(label, version, gate=True))
    summary["semantic_ids_version"] = ctx.lake.write(
        valid,
        GOLD_SEMANTIC_IDS,
        mode="merge",
        partition_values={"dataset": ctx.dataset, "tokenizer_version": version},
    )
    summary["behaviour_space_version"] = snapshot
    summary["tokenized"] = gate["n_valid"]
    summary["quarantined"] += gate["n_quarantined"]
    log.info("gave %d new items %s semantic IDs", len(fresh), version)
    return summary


def _trained_for(version: Any) -> str:
    """The logical date (ISO) of the run that trained a registered tokenizer version."""
    return version.tags.get("hisam.run_key", "").rpartition("/")[2]


def skip_if_superseded(ctx: StepContext, trained_for: str) -> None:
    """Skip (:class:`~pipelines.steps.StepSkipped`) a tokenizer of the month ``trained_for`` (ISO
    date) when ``@current`` was trained for a later one, unless ``params.force=true``: a rerun or
    backfill of an older month must not move pre-training, fine-tuning and serving back to it."""
    from pipelines.registry import CURRENT, alias_version
    from pipelines.settings import flag
    from pipelines.steps import StepSkipped

    force = flag(ctx.params.get("force"), "force")  # a typo fails at once, needed or not
    name = ctx.config.models.tokenizer
    current = alias_version(ctx.mlflow, name, CURRENT)
    if current is None or _trained_for(current) <= trained_for:
        return
    if force:
        log.warning("%s@%s is newer; force=true: going on", name, CURRENT)
        return
    raise StepSkipped(
        f"{name}@{CURRENT} is {current.tags.get('tokenizer_version')}, newer than the tokenizer of "
        f"{trained_for}: left where it is (--param force=true moves it back)"
    )


def activate_tokenizer(ctx: StepContext) -> dict[str, Any]:
    """Point ``@current`` at this run's tokenizer version (its catalogue and samples are written, and
    ``validate-samples`` passed some of them: a version whose samples fail the gate would move
    pre-training and the daily fine-tune onto samples no gate lets through).

    A rerun of an older month leaves a newer ``@current`` where it is (:func:`skip_if_superseded`;
    the step skips, so no asset event triggers the training DAGs). So does a rerun once the version
    is current and pre-trained: its event would start another pre-training from scratch. Before
    that (a retry after the alias moved), it succeeds again, so pre-training is still triggered."""
    from pipelines.ingest import validated_samples_version
    from pipelines.registry import CURRENT, alias_version, find_versions
    from pipelines.steps import StepSkipped

    version, name = tokenizer_version(ctx), ctx.config.models.tokenizer
    found = find_versions(ctx.mlflow, name, tokenizer_version=version)
    if not found:
        raise ValueError(
            f"{name} has no version tagged tokenizer_version={version}: run train-tokenizer (and "
            "tokenize-catalogue, build-sequences) for it first, or pass --param tokenizer_version=<one that has>"
        )
    skip_if_superseded(ctx, _trained_for(found[0]))
    part = {"dataset": ctx.dataset, "tokenizer_version": version}
    if (
        ctx.table_version("gold.samples") is None
        or ctx.read_table("gold.samples", part, ["item_id"])[0].empty
    ):
        raise ValueError(
            f"gold.samples has no rows of {version} for {ctx.dataset!r}: run build-sequences for it first"
        )
    if validated_samples_version(ctx, version) is None:
        raise ValueError(
            f"no gold.samples of {version} for {ctx.dataset!r} passed validate-samples: run it with "
            f"--param tokenizer_version={version} first (training follows @{CURRENT})"
        )
    before = alias_version(ctx.mlflow, name, CURRENT)
    if before is not None and str(before.version) == str(found[0].version):
        pt = ctx.config.models.pretrained
        if pretrained := find_versions(ctx.mlflow, pt, tokenizer_version=version):
            raise StepSkipped(
                f"{name}@{CURRENT} is already v{before.version} ({version}), pre-trained as {pt} "
                f"v{pretrained[0].version}: activating it again would start another pre-training"
            )
    ctx.mlflow.set_registered_model_alias(name, CURRENT, found[0].version)
    return {
        "tokenizer_version": version,
        "model_version": str(found[0].version),
        "replaced": None if before is None else str(before.version),
    }


def semantic_ids_of(ctx: StepContext, version: str) -> SemanticIds:
    """The ``gold.semantic_ids`` table of ``version`` for the dataset."""
    frame, _ = ctx.read_table(
        "gold.semantic_ids",
        {"dataset": ctx.dataset, "tokenizer_version": version},
        columns=["item_id", "semantic_ids", "tokenizer_version", "codebook_size"],
    )
    if frame.empty:
        raise ValueError(
            f"gold.semantic_ids has no rows of tokenizer version {version!r} for {ctx.dataset!r}"
        )
    return SemanticIds.from_frame(frame.sort_values("item_id"), int(frame["codebook_size"].iloc[0]))


__all__ = [
    "BEHAVIOUR_CUT",
    "CATALOGUE_SNAPSHOT",
    "COLD_BEHAVIOUR",
    "ENCODERS",
    "TokenizerHealthError",
    "activate_tokenizer",
    "behaviour_cut_floor",
    "check_encoders",
    "cold_behavior_embedding",
    "current_tokenizer_version",
    "encoder_mismatch",
    "encoder_specs",
    "encoders_tag",
    "load_item_features",
    "load_new_item_features",
    "registered_tokenizer",
    "semantic_ids_of",
    "serving_tokenizer_versions",
    "tokenize_catalogue",
    "tokenize_new_items",
    "train_tokenizer",
    "untokenized_items",
]

"""Steps ``pretrain``, ``finetune`` and ``evaluate`` of HMAT (Sec. 3.4.1, 4.1; App. A.4).

Both stages read ``gold.samples`` of the tokenizer at ``@current`` with delta-rs (no Spark on the
training node). One user is one token stream of their chronological interactions; streams longer
than the token budget are cut into windows that each add up to half a budget of new labelled items
behind as much earlier context as fits, so every interaction is labelled exactly once.

With ``ranker.profile_fields`` set, each stream opens with the user's profile tokens (Sec. 3.3): those
columns of ``gold.user_profiles``, as buckets of a :class:`~hisam_core.ranker.profile.ProfileVocabulary` fitted
at pre-training and kept by every model built on it (a value unseen then is bucket 0).

* ``pretrain`` (weekly): next-token PT, registered as ``hisam-pretrained`` with its semantic IDs.
* ``finetune`` (daily): SFT initialised from the newest PT of the same tokenizer version; the
  checkpoint resumes, so a rerun of the day continues (or, when done, does nothing).
* ``evaluate``: candidate and ``hisam-ranker@champion`` on the same frozen Delta snapshot of the test
  split (version logged as the run's evaluation input); each model maps item ids through its own
  semantic-ID table, so a champion of an older tokenizer is still compared on the same events.
  Test rows no later than the last event either model (or the PT it started from) trained on
  (:data:`TRAINED_UNTIL`) are context, not scored: older interactions imported late can move the
  split before what a model has seen.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hisam_core.ranker.profile import UNKNOWN, ProfileVocabulary
from hisam_core.ranker.sequence import SequenceConfig, UserHistory
from hisam_core.semantic_ids import SemanticIds
from pipelines.context import StepContext

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run

    from hisam_core.ranker.train import RankerConfig

log = logging.getLogger(__name__)

SAMPLES = "gold.samples"
PROFILES = "gold.user_profiles"
PROFILE_VOCABULARY = "profile_vocabulary.json"  # beside each stage's checkpoint
SFT_ARTIFACTS = "checkpoint"  # the finetune run's copy of the SFT checkpoint and its vocabulary
SFT_CHECKPOINT_SHA256 = "sft.checkpoint_sha256"  # run tag: the hash of that final checkpoint
SAMPLE_COLUMNS = ["user_id", "item_id", "event_ts", "split", "action", "is_cold_user"]
RUN_KEY = "run_key"  # model-version tag: the logical run that produced the version
PRETRAINED_VERSION = "pretrained_version"  # finetune-run and ranker-version tag: the PT it started from
FORCED = "hisam.forced"  # pretrain/finetune-run tag: trained again by params.force=true
EVAL_PREFIX = "eval."  # candidate metrics, as finetune-run metrics and candidate version tags
CHAMPION_PREFIX = "champion."  # the champion's metrics on the same snapshot
EVAL_METRICS = "eval.metrics"  # finetune-run tag: the metrics the latest evaluate logged (run metrics
# keep every key ever logged, so a value an earlier evaluation logged must not be taken for today's)
UNMEASURED = "eval.unmeasured"  # finetune-run and version tag: metrics the snapshot cannot define
COLD_METRICS = ("cold_auc", "cold_gauc")  # undefined when no cold-start test user has both classes
INTERNAL = ("semantic_ids", "config", "profile_vocabulary")  # _train_stage results not in summaries
#: Run and model-version tag: the latest event (unix microseconds) of any sample the model, or the PT
#: it started from, trained on.
TRAINED_UNTIL = "hisam.trained_until"
SEEN_TEST_ROWS = "eval.seen_test_rows"  # finetune-run tag: test rows left unscored, as a model saw them


def event_micros(events: pd.Series) -> np.ndarray:
    """Event times as unix microseconds."""
    import pandas as pd

    return (
        (pd.to_datetime(events, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "us")
    ).to_numpy()


def trained_until(frame: pd.DataFrame, earlier: int | None = None) -> int | None:
    """The :data:`TRAINED_UNTIL` of a model trained on the ``train`` rows of ``frame`` after a model
    trained until ``earlier``."""
    train = event_micros(frame.loc[frame["split"] == "train", "event_ts"])
    seen = [int(train.max())] if len(train) else []
    if earlier is not None:
        seen.append(earlier)
    return max(seen, default=None)


def unseen_test(frame: pd.DataFrame, until: int | None) -> tuple[pd.DataFrame, int]:
    """``frame`` with its test rows at or before ``until`` turned into context (``train``): no model
    is scored on an event it trained on. Returns the frame and how many rows were turned; a
    ValueError when no test row is left. ``is_cold_user`` stays the build's (train rows of the split)."""
    if until is None:
        return frame, 0
    test = (frame["split"] == "test").to_numpy()
    seen = test & (event_micros(frame["event_ts"]) <= until)
    if not seen.any():
        return frame, 0
    if seen.sum() == test.sum():
        raise ValueError(
            f"all {int(test.sum())} test rows are at or before {until} (unix µs), the latest event a model "
            "trained on: nothing to score until later interactions arrive (or choose another samples_version)"
        )
    return frame.assign(split=np.where(seen, "train", frame["split"])), int(seen.sum())


def load_samples(
    ctx: StepContext, tokenizer_version: str, snapshot: int | None = None
) -> tuple[pd.DataFrame, int]:
    """The dataset's samples of one tokenizer version (chronological per user) and the version read."""
    frame, version = ctx.read_table(
        SAMPLES, {"dataset": ctx.dataset, "tokenizer_version": tokenizer_version}, SAMPLE_COLUMNS, snapshot
    )
    if frame.empty:
        raise ValueError(
            f"{SAMPLES} has no rows for {ctx.dataset!r} at tokenizer version {tokenizer_version!r}"
        )
    return frame.sort_values(["user_id", "event_ts", "item_id"], kind="stable").reset_index(
        drop=True
    ), version


def samples_version(ctx: StepContext, tokenizer_version: str) -> int:
    """The ``gold.samples`` version to read: ``params.samples_version`` (the training DAGs hand on
    the one ``validate-samples`` just passed), else the newest version it passed for
    ``tokenizer_version``, so training never reads a build no gate has seen."""
    from pipelines.ingest import validated_samples_version

    value = ctx.params.get("samples_version")
    if value is not None and value != "":
        if not value.strip().isdigit():
            raise ValueError(
                f"param samples_version must be a Delta version (an integer >= 0), got {value!r}"
            )
        return int(value)
    version = validated_samples_version(ctx, tokenizer_version)
    if version is None:
        raise ValueError(
            f"validate-samples has not passed {SAMPLES} of tokenizer {tokenizer_version!r} for "
            f"{ctx.dataset!r}: run `hisam run validate-samples` first, or pass "
            "--param samples_version=N to read version N as it is"
        )
    log.info("reading %s version %d, the newest validate-samples passed", SAMPLES, version)
    return version


def load_profiles(
    ctx: StepContext, fields: Sequence[str], snapshot: int | None = None
) -> tuple[pd.DataFrame, int]:
    """``user_id`` and the ``fields`` columns of the dataset's ``gold.user_profiles`` (at ``snapshot``,
    default latest), and the version read."""
    return ctx.read_table(PROFILES, {"dataset": ctx.dataset}, ["user_id", *fields], snapshot)


def encode_profiles(frame: pd.DataFrame, vocabulary: ProfileVocabulary) -> dict[int, dict[str, int]]:
    """``user_id -> {field: bucket}`` of every profile row."""
    return {int(row["user_id"]): vocabulary.encode(row) for row in frame.to_dict("records")}


def windows(history: UserHistory, max_items: int) -> list[UserHistory]:
    """Cut a labelled stream into windows of at most ``max_items`` items; each window labels up to
    ``max_items // 2`` of the stream's targets (in order, as many as fit beside the first) after the
    items just before them, so every target is labelled exactly once."""
    targets = np.flatnonzero(history.targets)
    stride, out, i = max(max_items // 2, 1), [], 0
    while i < len(targets):
        take = targets[i : i + stride]
        take = take[take - take[0] < max_items]  # a later target too far from the first waits
        end = int(take[-1]) + 1
        start = max(0, end - max_items)
        mask = np.zeros(end - start, dtype=bool)
        mask[take - start] = True
        instants = None if history.instants is None else history.instants[start:end]
        out.append(
            UserHistory(
                history.user_id,
                history.items[start:end],
                history.actions[start:end],
                history.profile,
                mask,
                instants,
            )
        )
        i += len(take)
    return out


def histories(
    frame: pd.DataFrame,
    semantic_ids: SemanticIds,
    config: SequenceConfig,
    split: str,
    profiles: dict[int, dict[str, int]] | None = None,
) -> list[UserHistory]:
    """Windows of every user's stream labelling the ``split`` rows (``train``: the training events;
    ``test``: the test events, after all of the user's training events as context). ``profiles``:
    ``user_id -> buckets`` of ``config.profile_fields``; a user without one gets bucket 0 in each.
    Events of one ``event_ts`` are one instant: none is another's history (``UserHistory.instants``)."""
    profiles = profiles or {}
    nobody = dict.fromkeys(config.profile_fields, UNKNOWN)
    max_items = (config.max_tokens - config.profile_length) // config.item_length
    rows = frame if split == "test" else frame[frame["split"] == "train"]
    codes = semantic_ids.lookup(rows["item_id"].to_numpy())
    actions, users = rows["action"].to_numpy(np.int64), rows["user_id"].to_numpy()
    instants = event_micros(rows["event_ts"])
    labelled = (rows["split"] == split).to_numpy()
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    out: list[UserHistory] = []
    for idx in np.split(np.arange(len(rows)), bounds):
        if len(idx) and labelled[idx].any():
            user = int(users[idx[0]])
            full = UserHistory(
                user, codes[idx], actions[idx], profiles.get(user, nobody), labelled[idx], instants[idx]
            )
            out.extend(windows(full, max_items))
    return out


def evaluate_model(
    model: Any,
    config: SequenceConfig,
    semantic_ids: SemanticIds,
    frame: pd.DataFrame,
    batch_size: int = 256,
    profiles: dict[int, dict[str, int]] | None = None,
) -> dict[str, float]:
    """AUC, GAUC and their cold-start variants (Sec. 4.1) of ``model`` on the test rows of ``frame``.

    Each test event is scored after every earlier event of its user (train and test: the offline
    protocol; ``sequences.test_history`` shapes only ``gold.samples``' history arrays). The test
    rows are cut into :func:`windows` as in training, so a target sees between half and the whole
    budget of earlier items, where serving always gives the whole budget: a cheaper protocol than one
    window per target, and the same for the candidate and the champion."""
    from hisam_core.ranker.train import evaluate

    test = frame[frame["user_id"].isin(frame.loc[frame["split"] == "test", "user_id"])]
    cold = set(test.loc[test["is_cold_user"] & (test["split"] == "test"), "user_id"].tolist())
    windows_ = histories(test, semantic_ids, config, "test", profiles)
    return evaluate(model, config, windows_, batch_size, cold_users=cold)


def _ranker_config(
    ctx: StepContext, stage: str, vocabulary: ProfileVocabulary, init_from: str | None = None
) -> Any:
    from hisam_core.ranker.train import RankerConfig

    rk = ctx.config.ranker
    train = rk.pretrain if stage == "pt" else rk.finetune.model_copy(update={"init_from": init_from})
    sequence = SequenceConfig.model_validate(
        {**rk.sequence.model_dump(), "profile_fields": vocabulary.bucket_counts}
    )
    return RankerConfig(sequence=sequence, model=rk.model, train=train)


def _checkpoint_dir(
    ctx: StepContext, stage: str, tokenizer_version: str, pretrained: str | None = None
) -> Path:
    """Per logical run; an SFT also per PT version (a PT may land after the day's first fine-tune)."""
    day = ctx.settings.checkpoints / stage / ctx.dataset / tokenizer_version / ctx.logical_date.isoformat()
    return day / f"pt-{pretrained}" if pretrained else day


def sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sft_checkpoint_dir(ctx: StepContext, tokenizer_version: str, run: Run) -> Path:
    """The folder holding this logical run's final SFT ``checkpoint.pt`` and profile vocabulary: the
    one ``finetune`` wrote on this worker when its hash is the one the run recorded (a crashed attempt
    may have left a half-trained checkpoint here while a retry finished elsewhere), else the copy
    logged to the MLflow ``run``."""
    import mlflow

    from hisam_core.ranker.train import CHECKPOINT_NAME

    local = _checkpoint_dir(ctx, "sft", tokenizer_version, run.data.tags.get(PRETRAINED_VERSION))
    recorded = run.data.tags.get(SFT_CHECKPOINT_SHA256)
    if (
        recorded is not None
        and (local / CHECKPOINT_NAME).exists()
        and (local / PROFILE_VOCABULARY).exists()
        and sha256(local / CHECKPOINT_NAME) == recorded
    ):
        return local
    target = local.with_name(f"{local.name}.from-run")
    target.mkdir(parents=True, exist_ok=True)
    log.info("no local SFT checkpoint at %s: reading the one logged to run %s", local, run.info.run_id)
    logged = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=SFT_ARTIFACTS, dst_path=str(target)
        )
    )
    if recorded is not None and sha256(logged / CHECKPOINT_NAME) != recorded:
        raise ValueError(  # two attempts overlapped: one's file under the other's hash
            f"the SFT checkpoint logged to run {run.info.run_id} is not the one its {SFT_CHECKPOINT_SHA256} "
            "tag records (two attempts of the fine-tune overlapped?): fine-tune again with --param force=true"
        )
    return logged


def _stored_config(checkpoint: Path) -> dict[str, Any]:
    """The config a ranker checkpoint was trained with (read on the CPU)."""
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]


def _logged_config_changes(ctx: StepContext, run: Run, step: str, config: RankerConfig) -> list[str]:
    """The settings in which the config ``run`` logged differs from ``config``: its
    ``config/<step>.yaml`` compared by :func:`~hisam_core.config.differences` (key order included),
    else (an attempt that died between the two) its flattened params; nothing when it logged neither;
    the YAML's path when this code cannot read it. ``train.init_from`` is left out: it is where each
    attempt downloaded the PT to."""
    import mlflow

    from hisam_core.config import differences
    from hisam_core.ranker.train import RankerConfig
    from pipelines.tracking import CONFIG_DIR, config_params

    path = f"{CONFIG_DIR}/{step}.yaml"
    if path in {a.path for a in ctx.mlflow.list_artifacts(run.info.run_id, CONFIG_DIR)}:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=path, dst_path=tmp
            )
            try:
                changed = differences(RankerConfig.from_yaml(local), config)
            except ValueError:  # written by code whose settings this one no longer reads
                changed = {path}
    elif logged := run.data.params:
        today = config_params(config)
        changed = {k for k in today.keys() | logged.keys() if today.get(k) != logged.get(k)}
    else:
        changed = set()
    return sorted(changed - {"train.init_from"})


def _find_run(ctx: StepContext, step: str, trained: bool = False, **tags: str) -> Run | None:
    """This logical run's newest MLflow run of ``step`` (so a rerun continues it instead of adding one),
    among those carrying every ``tags`` value; ``trained``: among those whose SFT finished (a crashed
    fine-tune, still to be retried, has no checkpoint to evaluate or register)."""
    found = [
        run for run in ctx.step_runs(step, **tags) if SFT_CHECKPOINT_SHA256 in run.data.tags or not trained
    ]
    return found[0] if found else None


def _train_stage(
    ctx: StepContext,
    stage: str,
    tokenizer_version: str,
    init_from: str | None = None,
    vocabulary: ProfileVocabulary | None = None,
    pretrained: str | None = None,
    pretrained_until: int | None = None,
    fresh: bool = False,
    forced: bool = False,
) -> dict[str, Any]:
    """Train one stage; PT fits the profile vocabulary (``vocabulary`` None), SFT keeps PT's and
    records the PT version it starts from (``pretrained``). A rerun of the logical run continues its
    MLflow run and checkpoint, the newest run that trains the same thing (tokenizer and PT version):
    the asset-triggered fine-tune of a PT that landed after the day's 04:00 run trains anew.
    ``fresh``: a new run and checkpoint whatever ran before (tagged :data:`FORCED` under
    ``params.force``). ``forced``: the run continued is a forced one that stopped; trained with
    settings its checkpoint refuses (a second fix after the first forced run diverged too), it is left
    and a fresh one trains instead. So is a run, forced or not, with no checkpoint here (it stopped
    before its first, or it was written on another worker's disk) whose logged config differs from
    today's (:func:`_logged_config_changes`): MLflow params cannot change, so its record would name
    settings it did not train with. With a checkpoint, the settings it may resume under
    (``RESUMABLE_CHANGES``: ``max_steps``...) continue the run, whose params keep its first values."""
    import mlflow
    import pandas as pd

    from hisam_core.ranker.train import CHECKPOINT_NAME, resume_conflicts, train
    from pipelines.settings import flag
    from pipelines.tokenizer import semantic_ids_of
    from pipelines.tracking import (
        CONFIG_DIR,
        input_versions,
        log_config,
        log_training_curves,
        mlflow_callback,
    )

    step = "pretrain" if stage == "pt" else "finetune"
    lineage = {
        "tokenizer_version": tokenizer_version,
        **({PRETRAINED_VERSION: pretrained} if pretrained else {}),
    }
    previous = None if fresh else _find_run(ctx, step, **lineage)
    # a continued run reads the snapshots it started on: its checkpoint's batches index into them
    pinned = input_versions(ctx.mlflow.get_run(previous.info.run_id)) if previous else {}
    given = vocabulary
    fields = vocabulary.fields if vocabulary is not None else ctx.config.ranker.profile_fields
    profile_frame, profile_snapshot = (
        load_profiles(ctx, fields, pinned.get("user_profiles"))
        if fields
        else (pd.DataFrame({"user_id": []}), None)
    )
    if vocabulary is None:
        vocabulary = ProfileVocabulary.fit({f: profile_frame[f] for f in fields})
    config = _ranker_config(ctx, stage, vocabulary, init_from)
    out = _checkpoint_dir(ctx, stage, tokenizer_version, pretrained)
    checkpoint = out / CHECKPOINT_NAME
    changed: Sequence[str] = ()
    if previous is not None and checkpoint.exists():
        changed = resume_conflicts(_stored_config(checkpoint), config) if forced else ()  # else train refuses
    elif previous is not None:  # no checkpoint here (it stopped before its first, or it is elsewhere)
        changed = _logged_config_changes(ctx, previous, step, config)
    if changed:
        log.warning(
            "the stopped run %s trained with other settings (%s): training again in a new run",
            previous.info.run_id,
            changed,
        )
        if previous.info.status == "RUNNING":  # its worker was killed: it never ended
            ctx.mlflow.set_terminated(previous.info.run_id, "KILLED")
        return _train_stage(
            ctx, stage, tokenizer_version, init_from, given, pretrained, pretrained_until, fresh=True
        )
    read = pinned["samples"] if "samples" in pinned else samples_version(ctx, tokenizer_version)
    frame, snapshot = load_samples(ctx, tokenizer_version, read)
    ids = semantic_ids_of(ctx, tokenizer_version)
    profiles = encode_profiles(profile_frame, vocabulary)
    train_histories = histories(frame, ids, config.sequence, "train", profiles)
    until = trained_until(frame, pretrained_until)
    if pretrained is not None and pretrained_until is None:  # a PT registered before the tag
        until = None  # unknown, rather than only this stage's
    if previous is None:  # a new run starts from step 0, not from another run's checkpoint
        (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary.save(out / PROFILE_VOCABULARY)
    with mlflow.start_run(
        run_id=previous.info.run_id if previous else None, run_name=f"{step}-{ctx.logical_date}"
    ) as run:
        if previous is None:
            mlflow.set_tags({**ctx.run_tags(step), **lineage})
            if flag(ctx.params.get("force"), "force"):
                mlflow.set_tag(FORCED, "true")
        # a continued run logs what its first attempt died before logging (it is found by its tags);
        # inputs first: a retry reads the profiles pinned, so it fits the same vocabulary and config
        if "samples" not in pinned:
            ctx.log_input(SAMPLES, snapshot, "training", "samples")
        if profile_snapshot is not None and "user_profiles" not in pinned:
            ctx.log_input(PROFILES, profile_snapshot, "training", "user_profiles")
        logged = (
            {a.path for a in ctx.mlflow.list_artifacts(run.info.run_id, CONFIG_DIR)} if previous else set()
        )
        if f"{CONFIG_DIR}/{step}.yaml" not in logged:
            log_config(config, name=step)
        mlflow.log_artifact(str(out / PROFILE_VOCABULARY))
        if until is not None:
            mlflow.set_tag(TRAINED_UNTIL, str(until))
        callback = mlflow_callback(f"{stage}/")
        if previous is not None:  # the curve of the earlier attempts, for the plot
            callback.resume(run.info.run_id)
        train(config, train_histories, out, callback)
        if callback.history:
            log_training_curves(callback.history, f"{stage}_training")
        if stage == "sft":  # evaluate and register may run on another worker: they read this copy
            with tempfile.TemporaryDirectory() as tmp:  # one file hashed and logged, whatever an
                final = Path(tmp) / CHECKPOINT_NAME  # overlapping attempt renames over the original
                shutil.copyfile(out / CHECKPOINT_NAME, final)
                mlflow.log_artifact(str(final), artifact_path=SFT_ARTIFACTS)
                mlflow.log_artifact(str(out / PROFILE_VOCABULARY), artifact_path=SFT_ARTIFACTS)
                mlflow.set_tag(SFT_CHECKPOINT_SHA256, sha256(final))
        mlflow.log_metric(f"{stage}/train_windows", len(train_histories))
    return {
        "tokenizer_version": tokenizer_version,
        "checkpoint": str(out / "checkpoint.pt"),
        "samples_version": snapshot,
        "trained_until": until,
        "train_windows": len(train_histories),
        "mlflow_run_id": run.info.run_id,
        "semantic_ids": ids,
        "config": config,
        "profile_vocabulary": vocabulary,
    }


def training_tokenizer_version(ctx: StepContext) -> str:
    """The ``@current`` tokenizer version, which pre-training and fine-tuning train on. The training
    DAGs hand on the version ``validate-samples`` gated (``params.tokenizer_version``); when
    ``@current`` has moved since, the step skips: the gate never saw the new version's samples, and
    the activation's own DAG runs gate and train them."""
    from pipelines.steps import StepSkipped
    from pipelines.tokenizer import current_tokenizer_version

    current, gated = current_tokenizer_version(ctx), ctx.params.get("tokenizer_version")
    if gated and gated != current:
        raise StepSkipped(
            f"validate-samples passed the samples of tokenizer {gated}, but @current is now {current}: "
            "the runs its activation triggered train on it"
        )
    return current


def pretrain(ctx: StepContext) -> dict[str, Any]:
    """Semantic pre-training on the current tokenizer version; registers ``hisam-pretrained``.

    Once per logical run: a rerun finds its version. It then skips when a fine-tune of this dataset
    has started from that version (its ``hisam-pretrained`` event would trigger fine-tuning again for
    nothing), and otherwise succeeds again, so a retry after the registration still triggers
    fine-tuning. A rerun before registration continues the run and its checkpoint (without a
    checkpoint, only under the config the run logged: else a new run trains). Two attempts that
    overlap (a retry beside a worker that is still alive) continue one run: the second to finish
    finds the version the first registered from it and registers none.

    ``params.force=true`` trains again in a new MLflow run from step 0, tagged ``hisam.forced`` (after
    a divergence fixed by other settings, which the stopped run's checkpoint refuses, or a registered
    version found bad), and registers a new version; a forced run that stopped midway is continued
    (unless its checkpoint refuses the settings: then a new one trains)."""
    import mlflow

    from pipelines.ranker_model import log_ranker
    from pipelines.registry import find_versions
    from pipelines.settings import flag
    from pipelines.steps import StepSkipped

    force = flag(ctx.params.get("force"), "force")
    version, name = training_tokenizer_version(ctx), ctx.config.models.pretrained
    existing = find_versions(ctx.mlflow, name, tokenizer_version=version, **{RUN_KEY: ctx.run_key})
    if existing and not force:
        pt = str(existing[0].version)
        tuned = ctx.mlflow.search_runs(
            [ctx.experiment_id],
            filter_string=f"tags.`hisam.step` = 'finetune' and tags.`{PRETRAINED_VERSION}` = '{pt}' and "
            f"tags.`tokenizer_version` = '{version}'",
        )  # this dataset's (a LIKE would read a '_' in its name as a wildcard)
        if any(r.data.tags.get("hisam.run_key", "").partition("/")[0] == ctx.dataset for r in tuned):
            raise StepSkipped(f"{ctx.run_key} pre-trained {name} v{pt} already, and it is being fine-tuned")
        return {"tokenizer_version": version, "model_version": pt, "skipped": True}
    fresh = False
    if force:
        newest = _find_run(ctx, "pretrain", tokenizer_version=version)
        stopped = newest is not None and newest.info.run_id not in {v.run_id for v in existing}
        fresh = not (stopped and newest.data.tags.get(FORCED) == "true")  # a forced run resumes
        if existing:
            log.warning("force=true: pre-training again (%s v%s was this run's)", name, existing[0].version)
    result = _train_stage(ctx, "pt", version, fresh=fresh, forced=force and not fresh)
    found = find_versions(ctx.mlflow, name, tokenizer_version=version, **{RUN_KEY: ctx.run_key})
    if mine := [v for v in found if v.run_id == result["mlflow_run_id"]]:  # an overlapping attempt's
        log.warning("%s v%s was registered from this run meanwhile: not again", name, mine[0].version)
        return {
            **{k: v for k, v in result.items() if k not in INTERNAL},
            "model_version": str(mine[0].version),
            "skipped": True,
        }
    with mlflow.start_run(run_id=result["mlflow_run_id"]):
        registered = log_ranker(
            result["checkpoint"],
            result["config"],
            result["semantic_ids"],
            name,
            name="pretrained",
            profile_vocabulary=result["profile_vocabulary"],
            version_tags={RUN_KEY: ctx.run_key, **_until_tag(result["trained_until"])},
        )
    return {
        **{k: v for k, v in result.items() if k not in INTERNAL},
        "model_version": str(registered.version),
    }


def _until_tag(until: int | None) -> dict[str, str]:
    return {} if until is None else {TRAINED_UNTIL: str(until)}


def tagged_until(tags: dict[str, str]) -> int | None:
    """The :data:`TRAINED_UNTIL` of a run's or version's tags (None: trained before it was recorded)."""
    value = tags.get(TRAINED_UNTIL)
    return int(value) if value else None


def _newest_pretrained(ctx: StepContext, version: str) -> str:
    """The newest registered PT version of tokenizer ``version`` (skips when there is none yet)."""
    from pipelines.registry import find_versions
    from pipelines.steps import StepSkipped

    name = ctx.config.models.pretrained
    found = find_versions(ctx.mlflow, name, tokenizer_version=version)
    if not found:
        raise StepSkipped(
            f"no {name} version for tokenizer {version!r} yet: fine-tuning waits for hisam_pretrain, "
            "which a tokenizer activation triggers (and which then triggers hisam_finetune)"
        )
    return str(found[0].version)


def _pretrained_checkpoint(ctx: StepContext, pt_version: str) -> tuple[str, ProfileVocabulary]:
    """(path of PT ``pt_version``'s checkpoint, its profile vocabulary: none, so no profile tokens,
    for a PT registered before profiles were wired in)."""
    import mlflow

    from pipelines.ranker_model import ARTIFACT_CHECKPOINT

    name = ctx.config.models.pretrained
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{pt_version}")
    path = Path(local) / "artifacts" / "hmat.pt"
    if not path.exists():
        raise FileNotFoundError(f"{name} v{pt_version} has no {ARTIFACT_CHECKPOINT} at {path}")
    vocabulary = path.with_name(PROFILE_VOCABULARY)
    if not vocabulary.exists():
        log.warning("%s v%s has no profile vocabulary: fine-tuning without profile tokens", name, pt_version)
        return str(path), ProfileVocabulary({})
    return str(path), ProfileVocabulary.load(vocabulary)


def finetune(ctx: StepContext) -> dict[str, Any]:
    """SFT (action NLL under the MA mask) from the newest PT of the current tokenizer version.

    Once per logical run and PT: a second run of the day from the same PT (the Sunday PT lands
    before the 04:00 run starts, then triggers the DAG again through its asset) trains nothing. When
    the gate has judged that fine-tune's candidate, the step skips (and with it evaluation,
    registration and promotion); otherwise evaluation goes on from the finished run.
    ``params.force=true`` trains again in a new MLflow run from step 0 (after a fix, say), tagged
    ``hisam.forced``, unless the newest run of that PT is a forced one that stopped midway: it
    continues that one (unless its checkpoint refuses the settings, or it has no checkpoint here and
    logged another config: then a new one trains). The following steps evaluate, register and gate
    that run's candidate."""
    from pipelines.settings import flag
    from pipelines.steps import StepSkipped

    force = flag(ctx.params.get("force"), "force")
    version = training_tokenizer_version(ctx)
    pt_version = _newest_pretrained(ctx, version)
    lineage = {"tokenizer_version": version, PRETRAINED_VERSION: pt_version}
    done = _find_run(ctx, "finetune", trained=True, **lineage)
    newest = _find_run(ctx, "finetune", **lineage) if force else None
    stopped = newest is not None and SFT_CHECKPOINT_SHA256 not in newest.data.tags
    fresh = force and not (stopped and newest.data.tags.get(FORCED) == "true")  # a forced run resumes
    if done is not None and force:
        log.warning("force=true: fine-tuning PT v%s again (run %s trained it)", pt_version, done.info.run_id)
    elif done is not None:
        judged = _judged_candidate(ctx, done)
        if judged is not None:
            raise StepSkipped(
                f"{ctx.run_key} already fine-tuned {ctx.config.models.pretrained} v{pt_version} (MLflow run "
                f"{done.info.run_id}), registered as {judged.name} v{judged.version} and {judged.tags['gate']}"
            )
        log.info(
            "run %s already fine-tuned PT v%s: nothing to train (param samples_version=%s unused)",
            done.info.run_id,
            pt_version,
            ctx.params.get("samples_version"),
        )
        return {
            "tokenizer_version": version,
            "pretrained_version": pt_version,
            "mlflow_run_id": done.info.run_id,
            "trained_before": True,
        }
    init_from, vocabulary = _pretrained_checkpoint(ctx, pt_version)
    pt_tags = ctx.mlflow.get_model_version(ctx.config.models.pretrained, pt_version).tags
    result = _train_stage(
        ctx,
        "sft",
        version,
        init_from,
        vocabulary,
        pretrained=pt_version,
        pretrained_until=tagged_until(pt_tags),
        fresh=fresh,
        forced=force and not fresh,
    )
    return {
        **{k: v for k, v in result.items() if k not in INTERNAL},
        "pretrained_version": pt_version,
    }


def _judged_candidate(ctx: StepContext, run: Run) -> Any:
    """The ranker version registered from finetune ``run`` once the gate judged it, else None."""
    from pipelines.ranker_model import TRAINING_RUN_TAG
    from pipelines.registry import find_versions

    found = find_versions(
        ctx.mlflow, ctx.config.models.ranker, **{RUN_KEY: ctx.run_key, TRAINING_RUN_TAG: run.info.run_id}
    )
    return next((v for v in found if "gate" in v.tags), None)


def evaluate(ctx: StepContext) -> dict[str, Any]:
    """Candidate vs ``@champion`` on one frozen snapshot of the test split (``params.samples_version``,
    else the one the candidate was trained on); metrics go to the finetune run (``eval.*`` and
    ``champion.*``). ``params.tokenizer_version`` (the one the DAG's gate passed) must be the
    candidate's.

    The champion reads its tokenizer version's IDs from ``gold.semantic_ids``, which also holds the
    items tokenized since it was registered (``tokenize-new-items`` serves an older champion's version
    too). Rows of items that version has no ID for (its encoders are no longer the configured ones)
    are left out of *both* evaluations, so the two are scored on the same rows; their count is the
    ``eval.champion_unknown_rows`` tag.
    """
    import mlflow

    from hisam_core.device import resolve_device
    from hisam_core.metrics import NonFiniteScoresError
    from hisam_core.ranker.train import load_model
    from pipelines.config import PROFILE_COLUMNS
    from pipelines.ranker_model import load_ranker
    from pipelines.registry import CHAMPION, alias_version
    from pipelines.tokenizer import current_tokenizer_version, semantic_ids_of
    from pipelines.tracking import input_versions, reopened

    run = _find_run(ctx, "finetune", trained=True)
    if run is None:
        raise ValueError(f"no finetune run of {ctx.run_key} finished training: run finetune first")
    version = run.data.tags["tokenizer_version"]
    gated = ctx.params.get("tokenizer_version")
    if gated and gated != version:
        raise ValueError(
            f"validate-samples gated the samples of tokenizer {gated}, but the candidate of {ctx.run_key} "
            f"was trained on {version}"
        )
    if version != current_tokenizer_version(ctx):
        log.warning("the candidate was trained on tokenizer %s, which is no longer @current", version)
    inputs = input_versions(ctx.mlflow.get_run(run.info.run_id))
    trained_on = inputs.get("samples")
    named = ctx.params.get("samples_version") or trained_on is None
    frame, snapshot = load_samples(ctx, version, samples_version(ctx, version) if named else trained_on)
    batch = ctx.config.ranker.eval_batch_size
    # the profiles the candidate trained on, when it read any: a re-evaluation scores the same inputs
    profile_frame, profile_snapshot = load_profiles(ctx, PROFILE_COLUMNS, inputs.get("user_profiles"))
    candidate_ids = champion_ids = semantic_ids_of(ctx, version)
    champion = alias_version(ctx.mlflow, ctx.config.models.ranker, CHAMPION)
    served, unknown = None, 0
    if champion is not None:
        served = load_ranker(f"models:/{ctx.config.models.ranker}/{champion.version}").unwrap_python_model()
        assert served.ranker is not None and served.semantic_ids is not None
        if served.semantic_ids.version != version:
            champion_ids = semantic_ids_of(ctx, served.semantic_ids.version)
        known = frame["item_id"].isin(champion_ids.item_ids)
        unknown = int((~known).sum())
        if unknown:
            log.warning(
                "%d sample rows have items without %s IDs: both models are evaluated without them",
                unknown,
                champion_ids.version,
            )
            frame = frame[known]
    seen = [tagged_until(run.data.tags), *([] if champion is None else [tagged_until(champion.tags)])]
    if None in seen:
        log.warning("a model records no %s: test rows it trained on may be scored", TRAINED_UNTIL)
    frame, seen_rows = unseen_test(frame, max((u for u in seen if u is not None), default=None))
    if seen_rows:
        log.warning(
            "%d test rows are no later than what a model trained on: scored as context only", seen_rows
        )
    checkpoints = sft_checkpoint_dir(ctx, version, run)
    device = resolve_device(ctx.config.ranker.finetune.device)  # the GPU the task holds, as fine-tuning's
    config, model = load_model(checkpoints / "checkpoint.pt", device)
    vocabulary = ProfileVocabulary.load(checkpoints / PROFILE_VOCABULARY)
    profiles = encode_profiles(profile_frame, vocabulary)
    try:
        candidate = evaluate_model(model, config.sequence, candidate_ids, frame, batch, profiles)
    except NonFiniteScoresError as err:
        raise NonFiniteScoresError(
            f"the candidate (finetune run {run.info.run_id}) gives non-finite scores on {SAMPLES} "
            f"v{snapshot}: fine-tune it again (hisam run finetune --param force=true)"
        ) from err
    unmeasured = [m for m in COLD_METRICS if not math.isfinite(candidate.get(m, math.nan))]
    if unmeasured:
        test = frame[frame["split"] == "test"]
        log.warning(
            "%s not measurable on %s v%d: %d cold-start test users, none with both a positive and a "
            "negative sample; the gate skips them for candidate and champion alike",
            ", ".join(unmeasured),
            SAMPLES,
            snapshot,
            test.loc[test["is_cold_user"], "user_id"].nunique(),
        )
    metrics = {f"{EVAL_PREFIX}{k}": v for k, v in candidate.items() if k not in unmeasured}
    if served is not None:
        assert champion is not None
        try:
            scored = evaluate_model(
                served.ranker.model.to(device),
                served.ranker.builder.config,
                champion_ids,
                frame,
                batch,
                encode_profiles(profile_frame, served.profile_vocabulary or ProfileVocabulary({})),
            )
        except NonFiniteScoresError as err:
            raise NonFiniteScoresError(
                f"the champion, {ctx.config.models.ranker} v{champion.version}, gives non-finite scores on "
                f"{SAMPLES} v{snapshot}: no candidate is judged against it until @champion moves "
                "(`hisam rollback` restores @previous, where there is one)"
            ) from err
        metrics.update({f"{CHAMPION_PREFIX}{k}": v for k, v in scored.items() if k not in unmeasured})
    tags = {
        "eval.snapshot": str(snapshot),
        "eval.champion_version": str(champion.version) if champion else "",
        "eval.champion_unknown_rows": str(unknown),
        SEEN_TEST_ROWS: str(seen_rows),
        EVAL_METRICS: ",".join(sorted(metrics)),
        UNMEASURED: ",".join(unmeasured),
    }
    # each evaluation one step past the last: MLflow's latest value (highest step, then timestamp) is
    # then the newest evaluation's, whatever the clocks of the workers that logged them
    earlier = [
        m.step
        for name in run.data.metrics
        if name.startswith((EVAL_PREFIX, CHAMPION_PREFIX))
        for m in ctx.mlflow.get_metric_history(run.info.run_id, name)
    ]
    with reopened(run.info.run_id):
        # no evaluation until the tags naming these metrics are written: a failure midway never leaves
        # them under the previous one's tags (register would copy the mix); MLflow has no transaction
        mlflow.set_tag(EVAL_METRICS, "")
        mlflow.log_metrics(metrics, step=max(earlier, default=-1) + 1)
        mlflow.set_tags(tags)
        ctx.log_input(SAMPLES, snapshot, "evaluation", "test_samples")
        ctx.log_input(PROFILES, profile_snapshot, "evaluation", "test_user_profiles")
    return {
        "tokenizer_version": version,
        "snapshot": snapshot,
        "champion_version": None if champion is None else str(champion.version),
        "champion_unknown_rows": unknown,
        "seen_test_rows": seen_rows,
        "unmeasured": unmeasured,
        **{k: round(v, 4) for k, v in metrics.items()},
    }


def metrics_of(values: dict[str, Any], prefix: str, names: Sequence[str]) -> dict[str, float]:
    """``{name: value}`` of the ``prefix``-ed entries of ``values`` (run metrics or version tags)."""
    return {n: float(values[f"{prefix}{n}"]) for n in names if f"{prefix}{n}" in values}


def evaluated_metrics(run: Run) -> dict[str, float]:
    """The ``eval.*`` and ``champion.*`` metrics the latest ``evaluate`` logged to the finetune ``run``
    (empty before any): what an earlier evaluation logged and this one did not is left out. A run
    evaluated before ``eval.metrics`` was recorded gives every such metric it has."""
    names = run.data.tags.get(EVAL_METRICS)
    if names is None:
        return {k: v for k, v in run.data.metrics.items() if k.startswith((EVAL_PREFIX, CHAMPION_PREFIX))}
    return {n: run.data.metrics[n] for n in names.split(",") if n}

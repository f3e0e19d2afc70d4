"""Step ``recommend``: one user's top-K items from a registered ranker (``@champion`` by default).

What an operator runs to see what the model serves (``hisam recommend 196``). It builds the request
exactly as training saw the user: the user's stream from ``gold.samples`` of the model's tokenizer
version (every interaction, oldest first, with its action and time: events of one time are one
instant), the profile buckets of the packaged
vocabulary from ``gold.user_profiles``, and as candidates every item of the packaged semantic-ID
table that is still in ``silver.items`` (one retracted since is counted, ``not_in_catalogue``) and
the user has no interaction with in ``silver.interactions`` (``include_seen`` keeps those).
The pyfunc model scores them in one pass (Sec. 3.4.2); the lake reads keep only this user's rows,
the item ids of ``silver.items`` and the top items' titles in Arrow, so a large table is not loaded
whole. Reads the lake and the
registry, writes no table or model. History items the model has no IDs for (newer than its table)
are left out and counted. A user with no interaction yet (only in ``silver.users``) is ranked from
the profile alone; without profile tokens (or a profile row) that is the same list for every such
user, which the output says (``personalised``). The samples of a model whose tokenizer version is
no longer ``@current`` are not rebuilt daily: interactions newer than its history are counted and
warned about (an upper bound: an interaction the gates left out of the samples counts too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.context import StepContext
from pipelines.settings import flag, masked, positive_int

log = logging.getLogger(__name__)

INTERACTIONS = "silver.interactions"
ITEMS = "silver.items"
USERS = "silver.users"


def _demo_hint(ctx: StepContext) -> str:
    """A pointer to ``$HISAM_HOME/demo_pipeline.yaml`` when ``hisam demo`` ran another dataset there."""
    import yaml

    demo = Path(ctx.settings.home) / "demo_pipeline.yaml"
    if not demo.is_file():
        return ""
    dataset = (yaml.safe_load(demo.read_text()) or {}).get("dataset")
    if dataset in (None, ctx.dataset):
        return ""
    return f" (hisam demo ran {dataset!r} here: pass --config {demo})"


def recommend(ctx: StepContext) -> dict[str, Any]:
    """Top ``params.top_k`` (default 10) items for ``params.user`` (the source's user id, the
    ``user_key`` of ``silver.interactions``, else of ``silver.users``) from ``<ranker>@<params.alias>``
    (default ``champion``)."""
    from hisam_core.ranker.profile import UNKNOWN
    from pipelines.ranker import event_micros
    from pipelines.ranker_model import HISTORY_TIMESTAMPS, PROFILE_PREFIX, load_ranker
    from pipelines.registry import CHAMPION, alias_version

    user_key = ctx.params.get("user")
    if not user_key:
        raise ValueError("recommend needs --param user=<the source's user id>")
    top_k = positive_int(ctx.params.get("top_k", "10"), "param top_k")
    alias = ctx.params.get("alias", CHAMPION)
    include_seen = flag(ctx.params.get("include_seen"), "include_seen")
    name = ctx.config.models.ranker
    store = ctx.settings.tracking_uri
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise ValueError(  # reading only: a mistyped $HISAM_HOME must not become an empty store
            f"no MLflow store at {store} ($HISAM_HOME or $MLFLOW_TRACKING_URI): run `hisam demo` or the "
            "DAGs first"
        )
    try:
        client = ctx.mlflow
    except ValueError as err:  # the store holds another dataset's models: after a demo, its config
        raise ValueError(f"{err}{_demo_hint(ctx)}") from None
    version = alias_version(client, name, alias)
    if version is None:
        raise ValueError(
            f"{name}@{alias} does not exist in the MLflow store {masked(ctx.settings.mlflow_tracking_uri)} "
            "($HISAM_HOME or $MLFLOW_TRACKING_URI): run the fine-tuning DAG (or `hisam demo`) first"
        )
    model = load_ranker(f"models:/{name}/{version.version}").unwrap_python_model()
    table, config = model.semantic_ids, model.config.sequence

    part = {"dataset": ctx.dataset}
    events, _ = ctx.read_table(
        INTERACTIONS, part, ["user_key", "user_id", "item_id", "event_ts"], where={"user_key": user_key}
    )
    if events.empty:  # a user without interactions yet: ranked from the profile alone
        users, _ = ctx.read_table(USERS, part, ["user_id"], where={"user_key": user_key})
        if users.empty:
            raise ValueError(
                f"user {user_key!r} is in neither {INTERACTIONS} nor {USERS} of {ctx.dataset!r}{_demo_hint(ctx)}"
            )
        user_id = int(users["user_id"].iloc[0])
    else:
        user_id = int(events["user_id"].iloc[0])
    stream, samples_version = ctx.read_table(
        "gold.samples",
        {**part, "tokenizer_version": table.version},
        ["user_id", "item_id", "event_ts", "action"],
        where={"user_id": user_id},
    )
    stream = stream.sort_values(["event_ts", "item_id"], kind="stable")
    built_until = stream["event_ts"].max() if not stream.empty else None
    newer = int((events["event_ts"] > built_until).sum()) if built_until is not None else len(events)
    if newer:  # the samples of an older tokenizer version (a champion not on @current) are not rebuilt
        log.warning(
            "user %s has %d interactions in %s newer than the history in gold.samples of %s: they are not "
            "in the request",
            user_key,
            newer,
            INTERACTIONS,
            table.version,
        )
    known = np.isin(stream["item_id"].to_numpy(), table.item_ids)  # the model leaves the others out
    request: dict[str, Any] = {
        "user_id": user_id,
        "history_item_ids": stream["item_id"].tolist(),
        "history_actions": stream["action"].tolist(),
        HISTORY_TIMESTAMPS: event_micros(stream["event_ts"]).tolist(),  # one time: one instant
    }
    profile = dict.fromkeys(config.profile_fields, UNKNOWN)
    if config.profile_fields and model.profile_vocabulary is not None:
        fields = list(model.profile_vocabulary.fields)
        rows, _ = ctx.read_table("gold.user_profiles", part, fields, where={"user_id": user_id})
        if not rows.empty:
            profile = model.profile_vocabulary.encode(rows.iloc[0].to_dict())
    elif config.profile_fields:  # registered through the library: its callers send buckets themselves
        log.warning(
            "%s v%s reads the profile fields %s but packages no vocabulary to bucket them with: they are "
            "sent as unknown (bucket %d)",
            name,
            version.version,
            list(config.profile_fields),
            UNKNOWN,
        )
    personalised = bool(known.any()) or any(b != UNKNOWN for b in profile.values())
    if not personalised:
        log.warning(
            "user %s: no history in the model's samples and no profile it reads: ranked as any such user "
            "(less the items they interacted with)",
            user_key,
        )
    request.update({f"{PROFILE_PREFIX}{f}": b for f, b in profile.items()})

    catalogue, _ = ctx.read_table(ITEMS, part, ["item_id"])
    listed = np.isin(table.item_ids, catalogue["item_id"].to_numpy())
    candidates = table.item_ids[listed]  # an item retracted from silver.items since is not offered
    if not include_seen:
        candidates = candidates[~np.isin(candidates, events["item_id"].to_numpy())]
    request["candidate_item_ids"] = candidates.tolist()
    scores = model.score(request, f"user {user_key!r}")
    order = np.lexsort((candidates, -scores))[:top_k]  # highest score first, ties by item id
    top = candidates[order]
    titles, _ = ctx.read_table(ITEMS, part, ["item_id", "item_key", "title"], where={"item_id": top.tolist()})
    info = titles.set_index("item_id").to_dict("index")
    log.info("%s v%s: %d candidates scored for user %s", name, version.version, len(candidates), user_key)
    return {
        "model": f"{name}@{alias}",
        "model_version": str(version.version),
        "tokenizer_version": table.version,
        "samples_version": samples_version,
        "user": user_key,
        "user_id": user_id,
        "history_items": int(known.sum()),
        "history_left_out": int((~known).sum()),
        "newer_interactions_not_in_history": newer,
        "personalised": personalised,
        "candidates": len(candidates),
        "not_in_catalogue": int((~listed).sum()),
        "recommendations": [
            {
                "rank": rank,
                "item_id": int(item),
                "item_key": info.get(int(item), {}).get("item_key"),
                "title": info.get(int(item), {}).get("title"),
                "score": round(float(scores[i]), 6),
            }
            for rank, (i, item) in enumerate(zip(order, top, strict=True), start=1)
        ],
    }

"""The packaged HMAT ranker on a real MLflow SQLite registry: one-pass scores equal the per-candidate
reference, aliases resolve, tokenizer versions are enforced, the artifacts are self-contained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from hisam_core.ranker.model import HMATConfig
from hisam_core.ranker.sequence import SequenceConfig, UserHistory
from hisam_core.ranker.serving import rank_reference
from hisam_core.ranker.synthetic import random_semantic_ids, synthetic_histories
from hisam_core.ranker.train import RankerConfig, TrainConfig, load_model, train
from pipelines.ranker_model import (
    SCORES,
    TOKENIZER_VERSION,
    TRAINING_RUN_TAG,
    load_ranker,
    log_ranker,
)
from pipelines.registry import GateDecision, apply_decision
from pipelines.settings import Settings
from pipelines.tracking import configure_mlflow, mlflow_callback

NAME = "hisam-ranker"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_store, isolated_mlflow):
    """A tiny HMAT trained for 4 SFT steps inside a run, logged and registered as version 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("hisam")
    settings = Settings(home=home, mlflow_tracking_uri=mlflow_store(home), experiment="ranker")
    try:
        with isolated_mlflow():
            yield _train_and_register(settings, home)
    finally:
        torch.set_num_threads(threads)


def _train_and_register(settings: Settings, home: Path) -> dict:
    configure_mlflow(settings)
    config = RankerConfig(
        sequence=SequenceConfig(codebook_size=16, profile_fields={"age": 4, "gender": 3}, max_tokens=64),
        model=HMATConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128),
        train=TrainConfig(max_steps=4, warmup_steps=1, batch_size=8, log_every=2, learning_rate=1e-3),
    )
    semantic_ids = random_semantic_ids(120, config.sequence, seed=0)
    histories = synthetic_histories(semantic_ids, config.sequence, 16, seed=1)
    callback = mlflow_callback(prefix="sft/")
    with mlflow.start_run() as run:
        train(config, histories, home / "ckpt", callback=callback)
        version = log_ranker(home / "ckpt" / "checkpoint.pt", config, semantic_ids, NAME)
    _, model = load_model(home / "ckpt" / "checkpoint.pt")
    return {
        "config": config,
        "model": model.eval(),
        "semantic_ids": semantic_ids,
        "version": version,
        "run_id": run.info.run_id,
        "callback": callback,
        "settings": settings,
    }


def requests(trained: dict, users: int = 3, seed: int = 5) -> pd.DataFrame:
    """Requests with random histories (one of them empty) and 7 candidates each."""
    rng = np.random.default_rng(seed)
    ids = trained["semantic_ids"].item_ids
    rows = []
    for user in range(users):
        length = 0 if user == 0 else int(rng.integers(1, 6))
        rows.append(
            {
                "user_id": 100 + user,
                "history_item_ids": rng.choice(ids, size=length).tolist(),
                "history_actions": rng.integers(0, 2, size=length).tolist(),
                "candidate_item_ids": rng.choice(ids, size=7, replace=False).tolist(),
                "profile_age": int(rng.integers(0, 4)),
                "profile_gender": int(rng.integers(0, 3)),
            }
        )
    return pd.DataFrame(rows)


def reference_scores(trained: dict, frame: pd.DataFrame) -> list[np.ndarray]:
    """Per-candidate full forward passes (rank_reference) for every request row."""
    table, config = trained["semantic_ids"], trained["config"]
    out = []
    for row in frame.to_dict("records"):
        history = UserHistory(
            row["user_id"],
            table.lookup(np.asarray(row["history_item_ids"], dtype=np.int64)).reshape(
                -1, table.num_positions
            ),
            row["history_actions"],
            {"age": row["profile_age"], "gender": row["profile_gender"]},
        )
        candidates = table.lookup(np.asarray(row["candidate_item_ids"]))
        out.append(rank_reference(trained["model"], config.sequence, history, candidates).numpy())
    return out


def test_registered_version_carries_tokenizer_version_run_and_signature(trained: dict) -> None:
    version = trained["version"]
    assert (version.name, str(version.version)) == (NAME, "1")
    assert version.tags[TOKENIZER_VERSION] == trained["semantic_ids"].version == "random-0"
    assert version.tags[TRAINING_RUN_TAG] == trained["run_id"] == version.run_id
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.metadata[TOKENIZER_VERSION] == "random-0"
    client = mlflow.MlflowClient()
    source = client.get_model_version(NAME, "1").source  # models:/<logged model id>
    logged = client.get_logged_model(source.removeprefix("models:/"))  # linked both ways
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": 1}]
    assert set(info.signature.inputs.input_names()) == {
        "user_id",
        "history_item_ids",
        "history_actions",
        "candidate_item_ids",
        "profile_age",
        "profile_gender",
        "history_timestamps",
    }


def test_training_callback_history_is_in_the_run(trained: dict) -> None:
    client = MlflowClient()
    history = trained["callback"].history
    assert [step for step, _ in history["sft/loss"]] == [2, 4]
    for name, points in history.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(trained["run_id"], name))
        assert logged == points


def test_predict_equals_reference_and_ignores_candidate_order(trained: dict) -> None:
    model = load_ranker(f"models:/{NAME}/1", expected_tokenizer_version=trained["semantic_ids"])
    frame = requests(trained)
    scores = model.predict(frame)[SCORES].tolist()
    for got, want in zip(scores, reference_scores(trained, frame), strict=True):
        assert len(got) == len(want)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert np.ptp(want) > 0  # the candidates really are told apart

    rng = np.random.default_rng(0)
    permutations = [rng.permutation(7) for _ in range(len(frame))]
    shuffled = frame.assign(
        candidate_item_ids=[
            list(np.asarray(c)[p]) for c, p in zip(frame["candidate_item_ids"], permutations, strict=True)
        ]
    )
    for got, base, perm in zip(model.predict(shuffled)[SCORES], scores, permutations, strict=True):
        np.testing.assert_allclose(got, np.asarray(base)[perm], atol=1e-6, rtol=0)


def test_champion_alias_serves_the_version_it_points_at(trained: dict, tmp_path: Path) -> None:
    """v2 holds other weights (v1's, perturbed): ``@champion`` serves v1, then v2 once promoted."""
    state = torch.load(trained["settings"].home / "ckpt" / "checkpoint.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["state_dict"] = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state["state_dict"].items()
    }
    torch.save(state, tmp_path / "checkpoint.pt")
    with mlflow.start_run():
        log_ranker(tmp_path / "checkpoint.pt", trained["config"], trained["semantic_ids"], NAME)
    frame = requests(trained, seed=9)
    scores = {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict(frame) for v in ("1", "2")}
    assert not scores["1"].equals(scores["2"])
    for version, against in (("1", None), ("2", "1")):
        apply_decision(MlflowClient(), NAME, version, GateDecision(True, []), against=against)
        champion = load_ranker(f"models:/{NAME}@champion", "random-0").predict(frame)
        pd.testing.assert_frame_equal(champion, scores[version])


def test_tokenizer_version_mismatch_is_refused(trained: dict) -> None:
    other = random_semantic_ids(120, trained["config"].sequence, seed=1)  # version "random-1"
    uri = f"models:/{NAME}/1"
    with pytest.raises(ValueError, match=r"'random-0'.*'random-1'"):
        load_ranker(uri, expected_tokenizer_version=other)
    with pytest.raises(ValueError, match=r"'random-0'.*'v2'"):  # plain pyfunc load, in load_context
        mlflow.pyfunc.load_model(uri, model_config={"expected_tokenizer_version": "v2"})
    with pytest.raises(ValueError, match=r"table is tokenizer version 'random-0'.*logged with.*'v3'"):
        mlflow.pyfunc.load_model(uri, model_config={TOKENIZER_VERSION: "v3"})


def test_unknown_items_and_bad_requests_raise(trained: dict) -> None:
    model = load_ranker(f"models:/{NAME}/1")
    frame = requests(trained, users=2)
    unknown = frame.copy()
    unknown.at[1, "candidate_item_ids"] = [3, 99_999]
    with pytest.raises(ValueError, match=r"row 1 \(user 101\) candidates.*\[99999\]"):
        model.predict(unknown)
    # a history item newer than the packaged table: left out (as if absent), or refused on request
    newer, absent = frame.copy(), frame.copy()
    newer.at[1, "history_item_ids"] = [99_999, *frame.at[1, "history_item_ids"]]
    newer.at[1, "history_actions"] = [1, *frame.at[1, "history_actions"]]
    assert model.predict(newer)[SCORES].tolist() == model.predict(absent)[SCORES].tolist()
    with pytest.raises(ValueError, match=r"row 1 \(user 101\) history.*\[99999\]"):
        model.predict(newer, params={"unknown_history": "error"})
    with pytest.raises(ValueError, match=r"unknown_history must be one of \('drop', 'error'\), got 'keep'"):
        model.predict(frame, params={"unknown_history": "keep"})
    empty = frame.copy()
    empty.at[1, "candidate_item_ids"] = []
    assert model.predict(empty)[SCORES].map(len).tolist() == [7, 0]
    mismatched = frame.copy()
    mismatched.at[1, "history_item_ids"] = [0, 1]
    mismatched.at[1, "history_actions"] = [0]
    with pytest.raises(ValueError, match="2 history_item_ids but 1 history_actions"):
        model.predict(mismatched)
    # what the logged signature refuses before the model sees it (MLflow's schema enforcement)
    with pytest.raises(MlflowException, match=r"Model is missing inputs \['profile_gender'\]"):
        model.predict(frame.drop(columns=["profile_gender"]))
    for column, value in (("profile_age", None), ("candidate_item_ids", [3, 2.5])):
        bad = frame.astype({column: object})
        bad.at[1, column] = value
        with pytest.raises(MlflowException, match=f"Failed to enforce schema|{column}"):
            model.predict(bad)
    # what only the model can tell: ids that came through a float column are taken while exact
    python_model, floats = model.unwrap_python_model(), frame.copy()
    floats["history_item_ids"] = [np.asarray(ids, dtype=np.float64) for ids in frame["history_item_ids"]]
    assert python_model.predict(None, floats)[SCORES].tolist() == model.predict(frame)[SCORES].tolist()
    hashed = list(floats["history_item_ids"])
    hashed[1] = np.array([2.0**62 + 12345, *hashed[1][1:]])  # a hashed id, rounded to a multiple of 1024
    floats["history_item_ids"] = hashed
    with pytest.raises(
        ValueError, match=r"history_item_ids came as floats.*from 2\*\*53 on.*send them as integers"
    ):
        python_model.predict(None, floats)
    bad = frame.copy()
    bad.at[1, "profile_age"] = 9
    with pytest.raises(ValueError, match=r"profile field 'age' value 9 outside \[0, 4\)"):
        model.predict(bad)
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        model.predict(frame, params={"chunk_size": 0})
    # what the signature stops on the pyfunc path, a direct score() call must refuse as well
    row = frame.iloc[0].to_dict()
    with pytest.raises(ValueError, match=r"\(user 100\): candidate_item_ids is missing"):
        python_model.score({**row, "candidate_item_ids": None})
    for user in (float("nan"), None, 1.5, "100", True):
        with pytest.raises(ValueError, match="user_id must be an integer"):
            python_model.score({**row, "user_id": user})
    with pytest.raises(ValueError, match=r"profile column profile_age must be an integer, got 1\.5"):
        python_model.score({**row, "profile_age": 1.5})  # not bucket 1
    # a hashed user id (a string key's stable_id, from 2**62 on) is an id like any other; as a float
    # it cannot be exact
    hashed_user = np.int64(2**62 + 12345)
    assert python_model.score({**row, "user_id": hashed_user}).tolist() == python_model.score(row).tolist()
    with pytest.raises(ValueError, match="user_id came as a float, which cannot hold"):
        python_model.score({**row, "user_id": float(hashed_user)})


def test_history_timestamps_make_equal_times_one_instant(trained: dict) -> None:
    """Optional ``history_timestamps``: the logged signature takes requests with and without it and
    passes it on; the scores are the reference's over the history's instants (tied items are not
    each other's history), which differ from the untimed ones; a history item without semantic IDs
    is left out with its time."""
    table = trained["semantic_ids"]
    ids, second = table.item_ids, 1_000_000
    frame = pd.DataFrame(
        [
            {
                "user_id": 7,
                "history_item_ids": ids[[3, 5, 8, 13, 21]].tolist(),
                "history_actions": [1, 0, 1, 1, 0],
                "candidate_item_ids": ids[30:37].tolist(),
                "profile_age": 2,
                "profile_gender": 1,
            }
        ]
    )
    times = [0, second, second, second, 2 * second]
    timed = frame.assign(history_timestamps=[times])
    model = load_ranker(f"models:/{NAME}/1")
    columns = {c.name: c.required for c in model.metadata.get_input_schema().inputs}
    assert columns["history_timestamps"] is False and columns["history_item_ids"] is True
    row = frame.iloc[0]
    history = UserHistory(
        7, table.lookup(np.asarray(row["history_item_ids"])), row["history_actions"], {"age": 2, "gender": 1}
    )
    candidates = table.lookup(np.asarray(row["candidate_item_ids"]))
    config = trained["config"].sequence
    want = rank_reference(trained["model"], config, replace(history, instants=times), candidates).numpy()
    untimed = rank_reference(trained["model"], config, history, candidates).numpy()
    got = model.predict(timed)[SCORES].iloc[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - untimed).max() > 1e-4
    np.testing.assert_allclose(model.predict(frame)[SCORES].iloc[0], untimed, atol=1e-5, rtol=0)
    newer = timed.assign(
        history_item_ids=[[99_999, *row["history_item_ids"]]],
        history_actions=[[1, *row["history_actions"]]],
        history_timestamps=[[0, *times]],
    )
    assert model.predict(newer)[SCORES].iloc[0] == got
    backwards = frame.assign(history_timestamps=[[0, 2, 1, 3, 4]])
    with pytest.raises(ValueError, match=r"row 0 \(user 7\): history_timestamps must be one non-decreasing"):
        model.predict(backwards)
    with pytest.raises(ValueError, match=r"one non-decreasing time per history item.*4 for 5"):
        model.predict(timed.assign(history_timestamps=[times[:-1]]))


def test_log_ranker_rejects_a_config_that_is_not_the_checkpoints(trained: dict) -> None:
    settings = trained["settings"]
    checkpoint = settings.home / "ckpt" / "checkpoint.pt"
    wrong = trained["config"].model_copy(update={"sequence": SequenceConfig(codebook_size=16, max_tokens=64)})
    with pytest.raises(ValueError, match="different sequence/model config"):
        log_ranker(checkpoint, wrong, trained["semantic_ids"], NAME)


@pytest.mark.slow
def test_model_loads_and_predicts_in_a_fresh_process_without_the_repo(trained: dict, tmp_path: Path) -> None:
    """The pyfunc carries hisam_core and its own module (code_paths): with the editable install's
    finder removed and the repository off sys.path, load + predict still work. It carries the
    tokenizer's module too: the first model a process loads provides the packages of every later one."""
    repo = str(Path(__file__).resolve().parents[2])
    frame = requests(trained, users=2, seed=11)
    frame.to_json(tmp_path / "request.json", orient="records")
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(frame)[SCORES].tolist()
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
        sys.path = [p for p in sys.path if p.rstrip("/") not in ("", ".", {repo!r})]
        import mlflow, pandas as pd, torch
        torch.set_num_threads(1)
        mlflow.set_tracking_uri({trained["settings"].mlflow_tracking_uri!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}/1")
        frame = pd.read_json({str(tmp_path / "request.json")!r}, orient="records")
        import pipelines.ranker_model, pipelines.tokenizer_model, hisam_core
        print(json.dumps({{
            "scores": model.predict(frame)["scores"].tolist(),
            "modules": [pipelines.ranker_model.__file__, pipelines.tokenizer_model.__file__, hisam_core.__file__],
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(not path.startswith(repo) and "/code/" in path for path in out["modules"]), out["modules"]
    np.testing.assert_allclose(np.concatenate(out["scores"]), np.concatenate(expected), atol=1e-6)


def test_the_served_model_knows_the_mask_rule_it_was_trained_under(
    trained: dict, tmp_path: Path, caplog
) -> None:
    """The packaged checkpoint keeps the training checkpoint's mask rule; a model trained before rules
    were recorded is served with a warning (this code's rule may not be the one it learned)."""
    from hisam_core.ranker.attention import MASK_RULE

    assert load_ranker(f"models:/{NAME}/1").unwrap_python_model().mask_rule == MASK_RULE
    state = torch.load(trained["settings"].home / "ckpt" / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "mask_rule"}, tmp_path / "unrecorded.pt")
    older = log_ranker(tmp_path / "unrecorded.pt", trained["config"], trained["semantic_ids"], NAME)
    with caplog.at_level("WARNING", logger="pipelines.ranker_model"):
        served = load_ranker(f"models:/{NAME}/{older.version}").unwrap_python_model()
    assert served.mask_rule is None
    assert (
        f"trained under an unrecorded mask rule and is served under this code's rule {MASK_RULE}"
        in caplog.text
    )

"""Sec. 4.1 protocol: labels, the global chronological split, cold users and the shared windows."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from hisam_core.evaluation.protocol import (
    ProtocolConfig,
    build_windows,
    chronological_split,
    cut_rank,
    label_interactions,
    load_movielens,
    target_arrays,
)


def test_events_of_one_instant_are_ordered_by_item_as_the_sequence_job_orders_them():
    """Same-second events of a user are in item order whatever the file order, as in
    spark_jobs.sequences: a user's windows, and so every score, do not depend on the file."""
    rows = pd.DataFrame(
        {"user_id": [3] * 4, "item_id": [52, 60, 50, 51], "label": [1, 1, 0, 1], "timestamp": [5, 1, 5, 5]}
    )
    for frame in (rows, rows.iloc[::-1]):
        split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
        assert split.interactions["item_id"].tolist() == [60, 50, 51, 52]


def test_movielens_split_matches_the_spark_sequence_job(movielens_dir):
    dataset = load_movielens(movielens_dir, ProtocolConfig())
    split = chronological_split(dataset.interactions, ProtocolConfig())
    summary = split.summary()
    assert dt.datetime.fromtimestamp(split.cut, dt.UTC) == dt.datetime(1998, 3, 31, 22, 11, 49, tzinfo=dt.UTC)
    assert (summary["train"], summary["test"]) == (90_000, 10_000)
    assert summary["test_users"] == 166
    assert summary["cold_test_users"] == 77
    assert summary["unseen_test_items"] == 45
    assert len(dataset.profiles) == 943
    assert all(0 <= p[f] < n for p in dataset.profiles.values() for f, n in dataset.profile_fields.items())
    import pandas as pd

    users = pd.read_csv(movielens_dir / "raw" / "u.user", sep="|", header=None, usecols=[0, 1], dtype=int)
    ages = dict(zip(users[0], users[1], strict=True))
    for user, age in ages.items():  # <18 is 0, 18-24 is 1, ..., 56+ is 6
        expected = sum(age >= bound for bound in (18, 25, 35, 45, 50, 56))
        assert dataset.profiles[user]["age_bucket"] == expected, (user, age)
    counts = pd.Series([p["age_bucket"] for p in dataset.profiles.values()]).value_counts()
    assert set(counts.index) == set(range(7))  # every bucket has users: none is skipped or merged


def test_labels_are_rating_above_three_or_the_label_column():
    ratings = pd.DataFrame(
        {"user_id": [1] * 5, "item_id": range(5), "rating": [1, 2, 3, 4, 5], "timestamp": range(5)}
    )
    assert label_interactions(ratings, ProtocolConfig())["label"].tolist() == [0, 0, 0, 1, 1]
    labelled = ratings.drop(columns="rating").assign(label=[1, 0, 1, 0, 1])
    assert label_interactions(labelled, ProtocolConfig())["label"].tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="'label' or a 'rating'"):
        label_interactions(ratings.drop(columns="rating"), ProtocolConfig())
    with pytest.raises(ValueError, match="'label' must hold 0 or 1"):
        label_interactions(labelled.assign(label=[1, 0, 2, 0, 1]), ProtocolConfig())
    with pytest.raises(ValueError, match="'rating' has 1 missing"):  # not a silent negative
        label_interactions(ratings.assign(rating=[1, 2, float("nan"), 4, 5]), ProtocolConfig())
    # ids and timestamps are whole numbers: a cast would fail obscurely, or truncate 2.5 to 2
    for column, values, first in (
        ("user_id", [1, 1, None, 1, 1], "nan"),
        ("item_id", ["1", "2", "three", "4", "5"], "'three'"),
        ("timestamp", [0, 1, 2.5, 3, 4.25], "2.5"),
        ("timestamp", [0, 1, float("inf"), 3, 4], "inf"),
        ("item_id", [1, 2, 1e20, 4, 5], "1e\\+20"),
    ):
        with pytest.raises(
            ValueError, match=rf"column '{column}' must hold whole numbers: \d of 5 rows .*first: {first}"
        ):
            label_interactions(ratings.assign(**{column: values}), ProtocolConfig())
    as_text = ratings.astype({"user_id": str, "timestamp": float})  # "1" and 3.0 are whole numbers
    pd.testing.assert_frame_equal(
        label_interactions(as_text, ProtocolConfig()), label_interactions(ratings, ProtocolConfig())
    )


def test_split_is_chronological_with_ties_at_the_cut_in_test(planted):
    frame, _, _ = planted
    frame = pd.concat([frame, frame.head(7).assign(user_id=999)])  # some timestamps now repeat
    k = int(np.floor(0.9 * (len(frame) + 3)))
    at = np.sort(frame["timestamp"].to_numpy())[k - 1]  # three more rows there: ranks k-1..k+2 tie
    frame = pd.concat([frame, frame[frame["timestamp"] == at].head(1).assign(user_id=998).iloc[[0, 0, 0]]])
    ranked = np.sort(frame["timestamp"].to_numpy())
    assert ranked[k - 1] == ranked[k]  # a row-count split would cut this instant in two
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    train, test = split.train, split.test
    assert len(train) + len(test) == len(frame)
    assert train["timestamp"].max() < split.cut <= test["timestamp"].min()
    k = int(np.floor(0.9 * len(frame)))
    assert np.sort(frame["timestamp"].to_numpy())[k] == split.cut
    assert len(train) <= k
    n_train = train.groupby("user_id").size().reindex(split.interactions["user_id"].unique(), fill_value=0)
    assert split.cold_users == frozenset(n_train[n_train < 10].index)
    assert split.test_users == frozenset(test["user_id"])


def test_the_split_rank_is_floor_of_the_fraction_exactly() -> None:
    """0.7 * 90 is 62.99999999999999 in floating point: as in the pipeline, the cut is row 63."""
    frame = pd.DataFrame({"user_id": np.arange(90) % 3, "item_id": np.arange(90), "timestamp": np.arange(90),
                          "rating": 4.0})  # fmt: skip
    config = ProtocolConfig(train_fraction=0.7)
    split = chronological_split(label_interactions(frame, config), config)
    assert split.cut == 63 and len(split.train) == 63
    assert (cut_rank(19 / 23, 23), cut_rank(0.9999999, 1000), cut_rank(0.9, 100_000)) == (19, 999, 90_000)
    config = ProtocolConfig(train_fraction=0.99999999)  # rounds to all ten rows: none left to test
    with pytest.raises(
        ValueError, match=r"train_fraction 0\.99999999 of 10 interactions leaves none to test"
    ):
        chronological_split(label_interactions(frame.head(10), config), config)


@pytest.mark.parametrize(("window", "stride"), [(5, 2), (7, 7), (4, 1)])
def test_windows_cover_every_interaction_once_with_enough_context(planted, window, stride):
    frame, _, _ = planted
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    train_windows, test_windows = build_windows(split, window, stride)
    for windows, part in ((train_windows, split.train), (test_windows, split.test)):
        targets = target_arrays(windows)
        keys = pd.Series(list(zip(targets["users"], targets["items"], strict=True)))
        assert len(keys) == len(part)  # each interaction is a target exactly once: none lost, none twice
        assert not keys.duplicated().any()
        assert set(keys) == set(zip(part["user_id"], part["item_id"], strict=True))
    sequences = {u: rows["item_id"].to_numpy() for u, rows in split.interactions.groupby("user_id")}
    test_items = set(zip(split.test["user_id"], split.test["item_id"], strict=True))
    for windows, is_test in ((train_windows, False), (test_windows, True)):
        for w in windows:
            assert len(w) <= window
            sequence = sequences[w.user_id]
            start = next(
                s for s in range(len(sequence)) if np.array_equal(sequence[s : s + len(w)], w.item_ids)
            )
            for offset in np.flatnonzero(w.targets):
                # a target sees at least window - stride earlier items, or its whole past
                assert offset >= min(window - stride, start + offset)
            if not is_test:
                assert not {(w.user_id, int(i)) for i in w.item_ids} & test_items
    with pytest.raises(ValueError, match="stride"):
        build_windows(split, 3, 4)

"""Sequence job: labels, chronological split and its tie rule, cold flag, truncation to the token
budget, semantic-ID join and quarantine, declared gold layouts, and the MovieLens protocol facts."""

from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from spark_jobs.lake import Lake, check_schema
from spark_jobs.sequences import (
    SequenceConfig,
    add_labels,
    build_sequences,
    build_user_sequences,
    compute_cut,
    prepare_interactions,
    to_gold_samples,
    to_gold_user_sequences,
)
from spark_jobs.sequences import (
    _exact_cut as exact_cut,
)

EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
SCHEMA = "dataset string, user_id long, item_id long, event_ts timestamp, rating double"


def events(spark, rows, schema: str = SCHEMA):
    """rows: (user, item, second offset, rating[, extra columns])."""
    data = [("t", u, i, EPOCH + dt.timedelta(seconds=s), *rest) for u, i, s, *rest in rows]
    return spark.createDataFrame(data, schema)


def codes(item: int, positions: int = 6, k: int = 256) -> list[int]:
    return [(item * 7 + p * 13) % k for p in range(positions)]


def semantic_ids(spark, items, version: str = "v1"):
    return spark.createDataFrame(
        [(int(i), codes(int(i)), version) for i in items],
        "item_id long, semantic_ids array<bigint>, tokenizer_version string",
    )


def test_labels_follow_the_rating_rule_unless_an_explicit_label_is_given(spark) -> None:
    schema = SCHEMA + ", label int, action string"
    df = events(
        spark,
        [(1, 1, 0, 5.0, None, "click"), (1, 2, 1, 3.0, None, "click"), (1, 3, 2, 4.0, 0, "reply"),
         (1, 4, 3, 1.0, 1, "click"), (1, 5, 4, None, None, "click"), (1, 6, 5, 3.5, None, "like"),
         (1, 7, 6, float("nan"), None, "click")],
        schema,
    )  # fmt: skip
    cfg = SequenceConfig(action_source="column", action_vocab=["click", "reply"])
    got = {r["item_id"]: (r["label"], r["action"], r["_reason"]) for r in add_labels(df, cfg).collect()}
    assert got[1] == (1, 0, None) and got[2] == (0, 0, None)  # rating > 3 positive, 3 negative
    assert got[3] == (0, 1, None) and got[4] == (1, 0, None)  # explicit label wins over the rating
    assert got[5][2] == "no_label" and got[7][2] == "no_label"  # NaN is no rating (not above 3)
    assert got[6] == (1, None, "unknown_action")
    by_label = {r["item_id"]: r["action"] for r in add_labels(df, SequenceConfig()).collect()}
    assert by_label == {1: 1, 2: 0, 3: 0, 4: 1, 5: None, 6: 1, 7: None}  # default: action token = label
    # a float label column (pandas writes one for a column with gaps): NaN is no label, not a positive
    floats = df.withColumn(
        "label", F.when(F.col("item_id") == 5, F.lit(float("nan"))).otherwise(F.col("label"))
    )
    floats = floats.withColumn("label", F.col("label").cast("double"))
    got = {r["item_id"]: (r["label"], r["_reason"]) for r in add_labels(floats, SequenceConfig()).collect()}
    assert (
        got[5] == (None, "no_label") and got[3] == (0, None) and got[4] == (1, None) and got[1] == (1, None)
    )


TIE_CASES = [
    (list(range(10)), 9),  # no tie: exactly floor(0.9 * 10) train rows
    ([0, 1, 2, 3, 4, 5, 6, 8, 8, 8], 7),  # the cut instant (rank 9) is shared: all of it is test
    ([5] * 10, 0),  # one instant: everything is test
]


def test_split_tie_rule(spark) -> None:
    for seconds, n_train in TIE_CASES:
        df = events(spark, [(u % 3, 100 + u, s, 4.0) for u, s in enumerate(seconds)])
        prepared, _, cut = prepare_interactions(df, SequenceConfig())
        split = {r["item_id"]: r["split"] for r in prepared.select("item_id", "split").collect()}
        train = [s for u, s in enumerate(seconds) if split[100 + u] == "train"]
        test = [s for u, s in enumerate(seconds) if split[100 + u] == "test"]
        assert len(train) == n_train, seconds
        assert not train or not test or max(train) < min(test)  # every test row strictly later
        cut_rank_value = sorted(seconds)[math.floor(0.9 * len(seconds))]
        assert cut.cut_seconds() == EPOCH.timestamp() + cut_rank_value
        assert all(s < cut_rank_value for s in train) and all(s >= cut_rank_value for s in test)


def test_the_cut_rank_is_floor_of_the_fraction_exactly(spark) -> None:
    """0.7 * 90 is 62.99999999999999 in floating point: the documented floor(0.7 * 90) is 63."""
    df = events(spark, [(u % 3, 100 + u, u, 4.0) for u in range(90)])  # 90 distinct instants
    _, _, cut = prepare_interactions(df, SequenceConfig(train_fraction=0.7))
    assert cut.rank == 63 and cut.cut_seconds() == EPOCH.timestamp() + 63  # 63 train rows


def test_a_cut_floor_only_ever_moves_the_cut_later(spark) -> None:
    """``cut_not_before``: no row before the floor is test, whatever the quantile says; a floor
    before the quantile cut changes nothing. Timestamps (micros), numbers (seconds) and dates."""
    seconds = list(range(0, 1000, 10))  # 100 rows: the quantile cut is the row of rank 90, at 900 s
    epoch = EPOCH.timestamp()
    frames = {
        "us": events(spark, [(u % 7, u, s, 4.0) for u, s in enumerate(seconds)]),
        "s": events(spark, [(u % 7, u, s, 4.0) for u, s in enumerate(seconds)]).withColumn(
            "event_ts", F.unix_timestamp("event_ts")
        ),
    }
    for unit, df in frames.items():
        _, _, quantile = prepare_interactions(df, SequenceConfig())
        assert quantile.cut_seconds() == epoch + 900 and quantile.raised_from is None
        for floor, cut_at in ((epoch + 955.5, 960), (epoch + 555.5, 900), (epoch + 990, 990)):
            prepared, _, cut = prepare_interactions(df, SequenceConfig(cut_not_before=floor))
            split = dict(prepared.select("item_id", "split").collect())
            test = sorted(seconds[i] for i, s in split.items() if s == "test")
            assert min(test) == cut_at and len(split) == 100, (unit, floor)
            assert all(split[i] == "train" for i, s in enumerate(seconds) if s < cut_at)
            raised = cut_at != 900
            expected = (floor if unit == "us" else math.ceil(floor)) if raised else epoch + 900
            assert cut.cut_seconds() == expected, (unit, floor)  # the first key at or after the floor
            assert cut.raised_from == (quantile.cut_key if raised else None), (unit, floor)
    days = events(spark, [(u, u, 86_400 * d, 4.0) for u, d in enumerate(range(10))]).withColumn(
        "event_ts", F.to_date("event_ts")
    )
    cfg = SequenceConfig(train_fraction=0.3, cut_not_before=epoch + 86_400 * 5.5)  # quantile cut: day 3
    prepared, _, cut = prepare_interactions(days, cfg)
    assert cut.cut_seconds() == epoch + 86_400 * 6  # the first whole day at or after the floor
    assert sorted(r["item_id"] for r in prepared.filter("split = 'test'").collect()) == [6, 7, 8, 9]


def test_no_row_a_behaviour_encoder_cut_at_a_whole_second_saw_is_test(spark) -> None:
    """The encoder keeps rows with ``unix_timestamp(event_ts) < cutoff`` (whole seconds, rounded
    down); with that cutoff as the floor, sub-second rows on either side of it split the same way."""
    from spark_jobs.sequences import SplitCut

    offsets = [0.25, 1.5, 2.0, 99.999999, 100.0, 100.000001, 100.5, 101.0]  # quantile cut (0.3): 2 s
    rows = [("t", k, k, EPOCH + dt.timedelta(seconds=s), 4.0) for k, s in enumerate(offsets)]
    df = spark.createDataFrame(rows, SCHEMA)
    cutoff = int(EPOCH.timestamp()) + 100
    prepared, _, cut = prepare_interactions(df, SequenceConfig(train_fraction=0.3, cut_not_before=cutoff))
    seen = F.unix_timestamp("event_ts") < F.lit(cutoff)  # what the encoder trained on
    assert prepared.filter(seen & (F.col("split") == "test")).count() == 0
    assert prepared.filter(~seen & (F.col("split") == "train")).count() == 0  # and nothing else moved
    assert cut.whole_seconds() == cutoff and cut.raised_from == (cutoff - 98) * 1_000_000
    half_micro = prepare_interactions(df, SequenceConfig(train_fraction=0.3, cut_not_before=cutoff + 5e-7))[2]
    assert half_micro.cut_key == cutoff * 1_000_000 + 1  # rounded up, never down onto a seen row
    assert SplitCut(1_500_000_999_999, 9, 8, "exact", "us").whole_seconds() == 1_500_000
    assert SplitCut(3, 9, 8, "exact", "days").whole_seconds() == 3 * 86_400


def test_fractional_second_timestamps_keep_sub_second_order(spark) -> None:
    """Timestamps as float seconds become micros, not whole seconds: 100.2 and 100.7 are two
    instants, so a cut at 100.7 puts 100.2 in train (truncated, both would be test); a NaN, an
    infinite or an out-of-range one is a quarantined key, and every row is accounted for."""
    offsets = [1.0, 50.5, 99.9, 100.2, 100.7, 101.0, 102.25, 103.0, 104.0, 105.0]
    base = EPOCH.timestamp()
    rows = [("t", k % 3, k, base + s, 4.0) for k, s in enumerate(offsets)]
    rows += [("t", 1, 90 + k, v, 4.0) for k, v in enumerate((float("nan"), float("inf"), 1e19))]
    schema = "dataset string, user_id long, item_id long, event_ts double, rating double"
    df = spark.createDataFrame(rows, schema)
    prepared, quarantined, cut = prepare_interactions(df, SequenceConfig(train_fraction=0.4))
    assert (cut.key_unit, cut.cut_key) == ("us", round((base + 100.7) * 1e6)) and cut.rank == 4
    split = dict(prepared.select("item_id", "split").collect())
    assert [split[k] for k in range(len(offsets))] == ["train"] * 4 + ["test"] * 6
    assert {r["item_id"]: r["reason"] for r in quarantined.collect()} == dict.fromkeys(
        (90, 91, 92), "null_key"
    )
    assert prepared.count() + quarantined.count() == df.count()
    for as_decimal in (False, True):  # a decimal column (exact) keys the same instants
        typed = df.withColumn("event_ts", F.col("event_ts").cast("decimal(20,6)")) if as_decimal else df
        finite = typed.filter(F.col("item_id") < 90)
        assert prepare_interactions(finite, SequenceConfig(train_fraction=0.4))[2].cut_key == cut.cut_key


def test_exact_cut_matches_a_sort_and_survives_a_missed_bracket(spark, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    seconds = rng.integers(0, 400, size=3000)  # many ties
    df = add_labels(
        events(spark, [(int(i % 50), int(i), int(s), 4.0) for i, s in enumerate(seconds)]), SequenceConfig()
    )
    cfg = SequenceConfig(train_fraction=0.73)
    cut = compute_cut(df, cfg)
    k = math.floor(0.73 * len(seconds))
    epoch = int(EPOCH.timestamp())
    expected = (epoch + int(np.sort(seconds)[k])) * 1_000_000
    assert (cut.cut_key, cut.rank, cut.n_total, cut.key_unit) == (expected, k, 3000, "us")
    # a bracket that misses the answer, above or below it, is detected (None); the recount is exact
    assert exact_cut(df, k, expected + 10, expected + 20) is None
    assert exact_cut(df, k, expected - 20_000_000, expected - 10_000_000) is None
    assert exact_cut(df, k, None, None) == expected
    from spark_jobs import sequences

    brackets = []

    def missing(df, k, lo, hi):  # the approximate quantiles' bracket lands below the answer
        brackets.append((lo, hi))
        return exact_cut(
            df, k, *((expected - 20_000_000, expected - 10_000_000) if lo is not None else (lo, hi))
        )

    monkeypatch.setattr(sequences, "_exact_cut", missing)
    assert compute_cut(df, cfg).cut_key == expected and brackets[1:] == [(None, None)]
    monkeypatch.undo()
    approx = compute_cut(df, cfg.model_copy(update={"cut_method": "approx"}))
    rank = int((seconds < approx.cut_key // 1_000_000 - epoch).sum())
    ties = int(np.bincount(seconds).max())  # the cut falls between seconds: a tie group moves whole
    assert abs(rank - k) <= 3000 / cfg.quantile_accuracy + ties  # within the approximation's bound


def test_cold_flag_counts_training_interactions_only(spark) -> None:
    rows = [(1, i, i, 4.0) for i in range(9)] + [(2, 100 + i, i, 4.0) for i in range(10)]
    rows += [(1, 50 + i, 1000 + i, 4.0) for i in range(3)] + [(2, 150, 1000, 4.0)]  # test rows, later
    df = events(spark, rows)
    result = build_sequences(
        df, semantic_ids(spark, {r[1] for r in rows}), SequenceConfig(train_fraction=19 / 23)
    )
    got = result.samples.groupBy("user_id", "split").agg(
        F.min("is_cold_user"), F.max("is_cold_user"), F.max("n_train")
    )
    flags = {(r[0], r[1]): (r[2], r[3], r[4]) for r in got.collect()}
    assert flags[(1, "train")] == (True, True, 9) and flags[(1, "test")] == (True, True, 9)  # 9 < 10: cold
    assert flags[(2, "train")] == (False, False, 10) and flags[(2, "test")] == (False, False, 10)


def test_truncation_keeps_the_most_recent_items_in_order(spark) -> None:
    items = [(7, 1000 + i, i, 5.0 if i % 3 else 2.0) for i in range(30)]
    df = events(spark, items)
    sem = semantic_ids(spark, [r[1] for r in items])
    cfg = SequenceConfig(token_budget=50, profile_tokens=2, train_fraction=1.0)
    assert cfg.max_history_items == (50 - 2) // 8 - 1 == 5  # the target takes a whole item's room
    samples = {r["seq_pos"]: r for r in build_sequences(df, sem, cfg).samples.collect()}
    assert sorted(samples) == list(range(30))
    for pos, row in samples.items():
        kept = list(range(max(0, pos - 5), pos))  # the 5 most recent earlier interactions
        assert row["history_item_ids"] == [1000 + i for i in kept]
        assert row["history_actions"] == [1 if i % 3 else 0 for i in kept]
        assert row["history_semantic_ids"] == [c for i in kept for c in codes(1000 + i)]
        assert row["target_semantic_ids"] == codes(1000 + pos) and row["history_len"] == len(kept)
        assert 2 + 8 * row["history_len"] + 8 <= 50
    assert cfg.model_copy(update={"count_target_in_budget": False}).max_history_items == (50 - 2) // 8 == 6


def test_events_of_one_instant_are_ordered_by_item_and_share_one_history(spark) -> None:
    """Same-second events of a user (75.8% of MovieLens rows share one) are ordered by item id, as
    the offline protocol orders them, whatever the input order: positions are deterministic. None
    of them is another's history (it would show that event's label): each sees the earlier
    instants only, the ``max_history_items`` most recent of them (4 here)."""
    rows = [(3, 52, 5, 4.0), (3, 60, 1, 4.0), (3, 50, 5, 2.0), (3, 51, 5, 4.0), (3, 70, 9, 1.0)]
    rows += [(3, 80 + k, 2, 4.0) for k in range(3)] + [(3, 90, 9, 5.0), (3, 91, 12, 5.0)]
    sem = semantic_ids(spark, [r[1] for r in rows])
    cfg = SequenceConfig(train_fraction=1.0, profile_tokens=3, token_budget=3 + 5 * 8)  # history: 4 items
    assert cfg.max_history_items == 4
    for order in (rows, rows[::-1]):
        samples = {r["item_id"]: r for r in build_sequences(events(spark, order), sem, cfg).samples.collect()}
        by_pos = sorted(samples, key=lambda i: samples[i]["seq_pos"])
        assert by_pos == [60, 80, 81, 82, 50, 51, 52, 70, 90, 91]
        history = {i: samples[i]["history_item_ids"] for i in samples}
        assert history[60] == [] and history[80] == history[81] == history[82] == [60]
        assert history[50] == history[51] == history[52] == [60, 80, 81, 82]
        assert history[70] == history[90] == [82, 50, 51, 52]
        assert history[91] == [51, 52, 70, 90] and samples[91]["history_actions"] == [1, 1, 0, 1]
        assert all(samples[i]["history_len"] == len(history[i]) for i in samples)
        flat = {i: samples[i]["history_semantic_ids"] for i in samples}
        assert flat[70] == [c for item in history[70] for c in codes(item)]  # aligned with the items


def test_a_train_only_test_history_is_capped_by_the_budget(spark) -> None:
    rows = [(1, 10 + i, i, 4.0) for i in range(8)] + [(1, 30, 100, 4.0), (1, 31, 101, 4.0)]
    sem = semantic_ids(spark, [r[1] for r in rows])
    cfg = SequenceConfig(train_fraction=0.8, token_budget=50, profile_tokens=2, test_history="train_only")
    assert cfg.max_history_items == 5
    samples = {r["item_id"]: r for r in build_sequences(events(spark, rows), sem, cfg).samples.collect()}
    assert samples[31]["history_item_ids"] == samples[30]["history_item_ids"] == list(range(13, 18))


def test_test_history_modes(spark) -> None:
    rows = [(1, 10 + i, i, 4.0) for i in range(8)] + [(1, 30, 100, 4.0), (1, 31, 101, 4.0)]
    df = events(spark, rows)
    sem = semantic_ids(spark, [r[1] for r in rows])
    cfg = SequenceConfig(train_fraction=0.8)
    earlier = {r["item_id"]: r for r in build_sequences(df, sem, cfg).samples.collect()}
    assert earlier[31]["split"] == "test" and earlier[31]["history_item_ids"][-2:] == [17, 30]
    train_only = cfg.model_copy(update={"test_history": "train_only"})
    only = {r["item_id"]: r for r in build_sequences(df, sem, train_only).samples.collect()}
    assert only[31]["history_item_ids"] == only[30]["history_item_ids"] == list(range(10, 18))
    assert only[15]["history_item_ids"] == earlier[15]["history_item_ids"]  # train samples unchanged


def test_semantic_id_join_quarantines_unknown_items_and_counts_reconcile(spark) -> None:
    rows = [(1, i, i, 4.0) for i in range(1, 9)] + [(1, 99, 4.5, 4.0), (2, 99, 3, 4.0), (2, 1, 4, None)]
    df = events(spark, rows)
    table = semantic_ids(spark, range(1, 9), "v2").unionByName(
        spark.createDataFrame([(int(i), [0] * 6, "v1") for i in range(1, 100)], "item_id long, semantic_ids array<bigint>, tokenizer_version string")
    )  # fmt: skip
    with pytest.raises(ValueError, match="set tokenizer_version"):
        build_sequences(df, table, SequenceConfig())
    with pytest.raises(ValueError, match="'v9'"):
        build_sequences(df, table, SequenceConfig(tokenizer_version="v9"))
    result = build_sequences(df, table, SequenceConfig(tokenizer_version="v2"))
    reasons = sorted((r["user_id"], r["item_id"], r["reason"]) for r in result.quarantine.collect())
    assert reasons == [(1, 99, "unknown_item"), (2, 1, "no_label"), (2, 99, "unknown_item")]  # each once
    assert result.samples.count() + len(reasons) == df.count()
    samples = result.samples.collect()
    assert sorted((r["user_id"], r["item_id"]) for r in samples) == [(1, i) for i in range(1, 9)]
    later = {r["item_id"]: r["history_item_ids"] for r in samples if r["item_id"] > 4}
    assert later == {i: list(range(1, i)) for i in range(5, 9)}  # user 1's item 99 (second 4.5) in none
    assert {r["tokenizer_version"] for r in samples} == {"v2"}
    assert all(r["target_semantic_ids"] == codes(r["item_id"]) for r in samples)


def test_rows_without_a_key_label_or_known_action_are_quarantined_as_they_came(spark) -> None:
    """The quarantine keeps the input's own ``action`` and ``label`` (not the mapped ones, and not
    null for an action the vocabulary lacks), also for a row quarantined after labelling (its item
    has no semantic IDs); a row without a timestamp is quarantined rather than
    made the first test row, which every train history would then start with."""
    schema = SCHEMA + ", label int, action string"
    rows = [(1, i, i, None, None, "click") for i in range(1, 9)]
    rows += [
        (1, 20, 9, None, 1, "purchase_typo"),
        (1, 21, 10, None, None, "reply"),
        (None, 22, 11, 4.0, 1, "click"),
        (1, 40, 12, 4.0, None, "reply"),  # an item without semantic IDs: its label came from the rating
    ]
    df = events(spark, rows, schema).withColumn(
        "label", F.when(F.col("item_id") < 9, F.lit(1)).otherwise(F.col("label"))
    )
    df = df.unionByName(
        spark.createDataFrame(
            [("t", 1, 23, None, None, 0, "click")],
            "dataset string, user_id long, item_id long, event_ts timestamp, rating double, label int, action string",
        )
    )
    cfg = SequenceConfig(action_source="column", action_vocab=["click", "reply"], train_fraction=0.5)
    result = build_sequences(df, semantic_ids(spark, range(1, 30)), cfg)
    quarantined = {r["item_id"]: (r["reason"], r["label"], r["action"]) for r in result.quarantine.collect()}
    assert quarantined == {
        20: ("unknown_action", 1, "purchase_typo"),
        21: ("no_label", None, "reply"),
        22: ("null_key", 1, "click"),  # no user
        23: ("null_key", 0, "click"),  # no timestamp
        40: ("unknown_item", None, "reply"),  # as given, not the derived label 1 and action "1"
    }
    samples = result.samples.collect()
    assert len(samples) + len(quarantined) == df.count()
    assert sorted(r["item_id"] for r in samples) == list(range(1, 9))
    assert all(23 not in r["history_item_ids"] for r in samples)


def test_outputs_conform_to_the_declared_gold_tables(spark, tmp_path) -> None:
    rows = [(u, 10 * u + i, 3 * i + u, float(1 + (i % 5))) for u in range(1, 4) for i in range(6)]
    df = events(spark, rows)
    result = build_sequences(df, semantic_ids(spark, {r[1] for r in rows}), SequenceConfig())
    gold = to_gold_samples(result.samples)
    check_schema(gold.schema, "gold.samples")
    # the HMAT inputs survive a Delta round trip unchanged
    lake = Lake(spark, tmp_path / "lake")
    lake.write(gold.withColumn("dataset", F.lit("t")), "gold.samples", mode="overwrite")
    arrays = ["history_item_ids", "history_semantic_ids", "history_actions", "target_semantic_ids"]
    key = ["user_id", "item_id", "event_ts"]
    stored = {
        tuple(r[k] for k in key): [list(r[a]) for a in arrays] for r in lake.read("gold.samples").collect()
    }
    built = {tuple(r[k] for k in key): [list(r[a]) for a in arrays] for r in result.samples.collect()}
    assert stored == built and len(stored) == len(rows)
    sequences = to_gold_user_sequences(build_user_sequences(result.interactions, SequenceConfig()))
    check_schema(sequences.schema, "gold.user_sequences")
    collected = sequences.collect()
    assert sorted(r["user_id"] for r in collected) == sorted({u for u, *_ in rows})  # one row per user
    for r in collected:
        mine = sorted((s, i, rt) for u, i, s, rt in rows if u == r["user_id"])
        assert r["item_ids"] == [i for _, i, _ in mine] and r["length"] == 6
        assert r["timestamps"] == [int(EPOCH.timestamp()) + s for s, _, _ in mine]
        assert r["labels"] == [int(rt > 3) for _, _, rt in mine]


def test_mixed_datasets_are_refused(spark) -> None:
    df = events(spark, [(1, 1, 0, 4.0), (1, 2, 1, 4.0)]).withColumn(
        "dataset", F.when(F.col("item_id") == 1, "a").otherwise("b")
    )
    with pytest.raises(ValueError, match="mix datasets"):
        build_sequences(df, semantic_ids(spark, [1, 2]), SequenceConfig())
    only_a, _, cut = prepare_interactions(df, SequenceConfig(dataset="a"))
    assert cut.n_total == 1 and [r["item_id"] for r in only_a.collect()] == [1]


def test_movielens_protocol_facts(spark, movielens_dir) -> None:
    raw = (
        spark.read.csv(
            str(movielens_dir / "raw" / "u.data"),
            sep="\t",
            schema="user_id long, item_id long, rating double, ts long",
        )
        .withColumn("event_ts", F.timestamp_seconds("ts"))
        .drop("ts")
    )
    rng = np.random.default_rng(0)
    sem = spark.createDataFrame(
        [(i, rng.integers(0, 256, 6).tolist(), "ml-v1") for i in range(1, 1683)],
        "item_id long, semantic_ids array<bigint>, tokenizer_version string",
    )
    result = build_sequences(raw, sem, SequenceConfig())
    cut = dt.datetime.fromtimestamp(result.cut.cut_seconds(), dt.UTC)
    assert cut.date() == dt.date(1998, 3, 31)
    rows = result.interactions  # labelled, split and flagged; the sample windows are not needed here
    train = F.col("split") == "train"
    stats = rows.agg(
        F.count("*").alias("n"),
        F.sum(train.cast("int")).alias("train"),
        F.avg("label").alias("pos"),
        F.countDistinct(F.when(~train, F.col("user_id"))).alias("test_users"),
        F.countDistinct(F.when(~train & F.col("is_cold_user"), F.col("user_id"))).alias("cold"),
        F.max(F.when(train, F.col("event_ts"))).alias("last_train"),
        F.min(F.when(~train, F.col("event_ts"))).alias("first_test"),
    ).first()
    assert (stats["n"], stats["train"]) == (100_000, 90_000)
    assert round(stats["pos"], 3) == 0.554
    assert (stats["test_users"], stats["cold"]) == (166, 77)
    assert stats["last_train"] < stats["first_test"]
    per_item = rows.groupBy("item_id").agg(F.max(train.cast("int")).alias("in_train"))
    assert per_item.filter("in_train = 0").count() == 45  # test items never seen in training
    assert SequenceConfig().max_history_items == 36  # (300 - 4 profile - 7 target) // 8


def test_the_spark_job_and_the_offline_protocol_agree_row_by_row(spark) -> None:
    """One random frame, with many events per second and a crowded cut instant, through both
    implementations of Sec. 4.1: the same label, split and cold flag on every row, each user's
    rows in the same order, and every protocol window target sees the most recent part of the
    Spark sample's history (the events of earlier seconds), never an event of its own second."""
    from hisam_core.evaluation.protocol import (
        ProtocolConfig,
        build_windows,
        chronological_split,
        label_interactions,
    )

    rng = np.random.default_rng(7)
    n = 1500
    users, items = rng.zipf(1.6, n) % 60, rng.integers(0, 90, n)  # a few heavy users, many cold ones
    seconds, ratings = rng.integers(0, 120, n), rng.integers(1, 6, n).astype(float)
    frame = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": seconds, "rating": ratings})
    frame = frame.drop_duplicates(["user_id", "item_id", "timestamp"])  # silver's key
    protocol = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    reference = protocol.interactions.set_index(["user_id", "item_id", "timestamp"])

    rows = [(int(r.user_id), int(r.item_id), int(r.timestamp), float(r.rating)) for r in frame.itertuples()]
    cfg = SequenceConfig(token_budget=8 * 2000, profile_tokens=0)  # no truncation: whole histories
    result = build_sequences(events(spark, rows), semantic_ids(spark, range(90)), cfg)
    start = int(EPOCH.timestamp())  # events() counts seconds from EPOCH
    assert result.cut.cut_seconds() == start + protocol.cut and (frame["timestamp"] == protocol.cut).sum() > 1
    second = (F.unix_timestamp("event_ts") - start).alias("t")
    columns = ["label", "split", "is_cold_user", "seq_pos", "history_item_ids"]
    samples = result.samples.select("user_id", "item_id", second, *columns).toPandas()
    assert len(samples) == len(frame)
    got = samples.set_index(["user_id", "item_id", "t"]).loc[reference.index]
    assert (got["label"].to_numpy() == reference["label"].to_numpy()).all()
    assert (got["split"].to_numpy() == reference["split"].to_numpy()).all()
    assert (got["is_cold_user"].to_numpy() == reference["is_cold"].to_numpy()).all()
    assert 0 < reference["is_cold"].sum() < len(reference)  # both kinds of user
    positions = got.groupby(level=0)["seq_pos"]  # each user's rows in the protocol's order
    assert (positions.first() == 0).all() and (positions.diff().dropna() == 1).all()

    history = {key: list(h) for key, h in zip(got.index, got["history_item_ids"], strict=True)}
    _, test_windows = build_windows(protocol, window=12, stride=4)
    checked = 0
    for w in test_windows:
        for position in np.flatnonzero(w.targets):
            t = int(w.timestamps[position])
            seen = [
                int(i) for i, s in zip(w.item_ids[:position], w.timestamps[:position], strict=True) if s < t
            ]
            spark_history = history[(w.user_id, int(w.item_ids[position]), t)]
            assert seen == spark_history[len(spark_history) - len(seen) :]
            checked += 1
    assert checked == (reference["split"] == "test").sum() > 0


def _output_frames(result, cfg: SequenceConfig) -> tuple:
    """The job's three outputs: gold.samples, the unknown-item quarantine, gold.user_sequences."""
    return (
        to_gold_samples(result.samples),
        result.quarantine,
        to_gold_user_sequences(build_user_sequences(result.interactions, cfg)),
    )


def _outputs(result, cfg: SequenceConfig) -> list[list[tuple]]:
    return [sorted(map(tuple, frame.collect())) for frame in _output_frames(result, cfg)]


def test_a_persisted_build_computes_the_positioned_interactions_once_and_equals_a_lazy_one(spark) -> None:
    """With ``persist``, the samples, the unknown-item quarantine and the user sequences all read the
    one cached frame of positioned interactions (its window is computed once), and every output is
    the lazy build's; ``unpersist`` drops it from the cache."""
    rows = [(u, 10 * u + i, 3 * i + u, float(1 + (i % 5))) for u in range(1, 5) for i in range(8)]
    df = events(spark, rows)
    known = semantic_ids(spark, [r[1] for r in rows if r[1] % 4])  # every fourth item unknown
    cfg = SequenceConfig(train_fraction=0.75)

    def reads_cache(frame) -> bool:
        return "InMemoryRelation" in frame._jdf.queryExecution().withCachedData().toString()

    lazy = build_sequences(df, known, cfg)
    assert not reads_cache(lazy.samples)
    expected = _outputs(lazy, cfg)  # before anything is cached: Spark's cache serves any equal plan
    assert len(expected[1]) == sum(1 for r in rows if not r[1] % 4) > 0
    persisted = build_sequences(df, known, cfg, persist=True)
    try:
        frames = (persisted.samples, persisted.quarantine, build_user_sequences(persisted.interactions, cfg))
        assert all(map(reads_cache, frames))
        assert _outputs(persisted, cfg) == expected
    finally:
        persisted.unpersist()
    assert not reads_cache(build_sequences(df, known, cfg).samples)


def test_spark_code_generation_and_adaptive_execution_give_the_same_outputs(spark) -> None:
    """The tests run Spark without code generation or adaptive re-planning (``HISAM_SPARK_CONF`` in
    tests/conftest.py); ``make demo`` and production run Spark's defaults. On a random frame with
    many events per second, unknown items and a crowded cut, the sequence job's three outputs under
    the defaults (generated stages and an adaptive plan) are its outputs without either, row for row."""
    off = {
        "spark.sql.adaptive.enabled": "false",
        "spark.sql.codegen.wholeStage": "false",
        "spark.sql.codegen.factoryMode": "NO_CODEGEN",
    }
    rng = np.random.default_rng(11)
    n = 1500
    users, items = rng.zipf(1.6, n) % 60, rng.integers(0, 90, n)
    seconds, ratings = rng.integers(0, 120, n), rng.integers(1, 6, n).astype(float)
    keyed = {
        (int(u), int(i), int(s)): float(r) for u, i, s, r in zip(users, items, seconds, ratings, strict=True)
    }
    rows = sorted(keyed.items())  # one event per key, as in silver
    df = events(spark, [(*key, rating) for key, rating in rows])
    known = semantic_ids(spark, [i for i in range(90) if i % 9])  # every ninth item unknown: quarantined
    cfg = SequenceConfig(token_budget=8 * 12 + 4)  # truncated histories

    def run() -> tuple[list[list[tuple]], str]:
        frames = _output_frames(build_sequences(df, known, cfg), cfg)
        collected = [sorted(map(tuple, frame.collect())) for frame in frames]
        return collected, frames[0]._jdf.queryExecution().executedPlan().toString()  # final, once run

    before = {key: spark.conf.get(key, None) for key in off}
    try:
        for key, value in off.items():
            spark.conf.set(key, value)
        plain, plain_plan = run()
        for key in off:
            spark.conf.unset(key)
        defaults, defaults_plan = run()
    finally:
        for key, value in before.items():  # the session's own settings again
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
    generated = re.compile(r"\*\(\d+\) ")  # "*(1) Project": a stage of generated code
    assert generated.search(defaults_plan) and "AdaptiveSparkPlan isFinalPlan=true" in defaults_plan
    assert not generated.search(plain_plan) and "AdaptiveSparkPlan" not in plain_plan
    assert all(plain) and len(plain[1]) == sum(1 for (_, i, _), _ in rows if i % 9 == 0)
    assert defaults == plain

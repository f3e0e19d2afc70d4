"""Quality gates: every bad input type is quarantined with its reason and counts reconcile exactly;
a failing batch raises DataQualityError naming the expectation; Data Docs HTML is written."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pipelines.notify import Alert
from spark_jobs.lake import check_schema
from spark_jobs.quality import (
    DataQualityError,
    QualityConfig,
    QualitySuite,
    RowRule,
    embeddings_suite,
    interactions_suite,
    run_quality_gate,
    samples_suite,
    semantic_ids_suite,
    split_valid_quarantine,
    to_bronze_quarantine,
)

ROOT = Path(__file__).resolve().parents[2]
DAY = dt.date(1998, 4, 30)
T0 = dt.datetime(1998, 1, 1, tzinfo=dt.UTC)
INTERACTIONS = (
    "row string, dataset string, user_id long, item_id long, event_ts timestamp, rating double, label int, "
    "logical_date date"
)


def quiet(tmp_path: Path, **kw) -> QualityConfig:
    """Tolerant, fast settings for row-level tests (no Data Docs, BOOLEAN_ONLY)."""
    base = {
        "docs_dir": str(tmp_path / "docs"),
        "build_data_docs": False,
        "result_format": "BOOLEAN_ONLY",
        "max_quarantine_fraction": 1.0,
        "logical_date": DAY,
    }
    return QualityConfig(**{**base, **kw})


def reasons_by_row(quarantine) -> dict[str, tuple[str, list[str]]]:
    return {r["row"]: (r["reason"], list(r["reasons"])) for r in quarantine.collect()}


def check_reconciles(n_in: int, valid_rows: list, quarantined_rows: dict, report) -> None:
    """Exact reconciliation: every input row is on exactly one side, and the report agrees."""
    assert n_in == len(valid_rows) + len(quarantined_rows) == report.n_input
    assert (report.n_valid, report.n_quarantined) == (len(valid_rows), len(quarantined_rows))
    assert report.reconciled and sum(report.reason_counts.values()) == len(quarantined_rows)


def interactions(spark):
    t = lambda days: T0 + dt.timedelta(days=days)  # noqa: E731
    old, new = dt.date(1998, 4, 1), dt.date(1998, 4, 2)
    rows = [
        ("ok1", "ml", 1, 10, t(0), 4.0, None, new),
        ("ok2", "ml", 1, 11, t(1), None, 1, new),
        ("dup_new", "ml", 2, 10, t(2), 5.0, None, new),  # same event twice: the latest import survives
        ("dup_old", "ml", 2, 10, t(2), 4.0, None, old),
        ("null_user", "ml", None, 10, t(3), 3.0, None, new),
        ("null_ts", "ml", 3, 10, None, 3.0, None, new),
        ("future", "ml", 3, 11, dt.datetime(1998, 5, 1, 0, 0, 1, tzinfo=dt.UTC), 3.0, None, new),
        ("ancient", "ml", 3, 12, dt.datetime(1990, 1, 1, tzinfo=dt.UTC), 3.0, None, new),
        ("rating_high", "ml", 4, 10, t(4), 6.0, None, new),
        ("rating_nan", "ml", 4, 11, t(4), float("nan"), None, new),
        ("label_bad", "ml", 4, 12, t(4), None, 7, new),
        ("no_feedback", "ml", 5, 10, t(5), None, None, new),
        ("unknown_item", "ml", 5, 999, t(5), 2.0, None, new),
        ("multi", "ml", 6, 998, t(6), 0.0, None, new),  # unknown item AND rating out of range
        ("other_catalogue", "amz", 6, 12, t(6), 4.0, None, new),  # item 12 exists only in "ml"
    ]
    return spark.createDataFrame(rows, INTERACTIONS)


def test_interactions_every_bad_type_is_quarantined_with_its_reason(spark, tmp_path) -> None:
    reimport = [  # a corrupt re-import of a good event: the bad row is not the good one's newer duplicate
        ("good_older", "ml", 7, 10, T0 + dt.timedelta(days=7), 4.0, None, dt.date(1998, 4, 1)),
        ("bad_reimport", "ml", 7, 10, T0 + dt.timedelta(days=7), 9.0, None, dt.date(1998, 4, 2)),
    ]
    df = interactions(spark).unionByName(spark.createDataFrame(reimport, INTERACTIONS))
    items = spark.createDataFrame([("ml", i) for i in (10, 11, 12)], "dataset string, item_id long")
    cfg = quiet(tmp_path)
    suite = interactions_suite(df, cfg, items=items)
    valid, quarantine, report = run_quality_gate(df, suite, cfg, validate_with_gx=False)  # GX: below
    got = reasons_by_row(quarantine)
    assert {k: v[0] for k, v in got.items()} == {
        "dup_old": "duplicate",
        "null_user": "null_user_id",
        "null_ts": "null_event_ts",
        "future": "timestamp_in_future",
        "ancient": "timestamp_before_floor",
        "rating_high": "rating_out_of_range",
        "rating_nan": "rating_out_of_range",
        "label_bad": "label_not_binary",
        "no_feedback": "missing_rating_and_label",
        "unknown_item": "unknown_item",
        "multi": "rating_out_of_range",
        "other_catalogue": "unknown_item",
        "bad_reimport": "rating_out_of_range",
    }
    assert got["multi"][1] == ["rating_out_of_range", "unknown_item"]  # every reason, rule order
    valid_rows = [r["row"] for r in valid.collect()]
    assert sorted(valid_rows) == ["dup_new", "good_older", "ok1", "ok2"]
    check_reconciles(17, valid_rows, got, report)
    assert report.all_reason_counts["unknown_item"] == 3 and report.reason_counts["unknown_item"] == 2
    bronze = to_bronze_quarantine(quarantine, "silver.interactions", DAY)
    check_schema(bronze.schema, "bronze.quarantine")
    stored = {json.loads(r["raw"])["row"]: r for r in bronze.collect()}  # the whole row, as JSON
    assert set(stored) == set(got) and stored["multi"]["reason"] == "rating_out_of_range; unknown_item"
    multi = json.loads(stored["multi"]["raw"])
    assert (multi["item_id"], multi["rating"], stored["multi"]["dataset"]) == (998, 0.0, "ml")
    assert (stored["multi"]["target_table"], stored["multi"]["logical_date"]) == ("silver.interactions", DAY)


def test_a_fractional_label_is_no_label_for_the_rule_and_for_gx(spark, tmp_path) -> None:
    """The suite takes any label type: 0.5 is not a 0 (a cast to int would truncate it and keep the
    row, while GX counted it as unexpected)."""
    labels = (0.0, 1.0, 0.5, 1.7)
    rows = [(f"r{i}", "ml", 1, 10 + i, T0, None, label, DAY) for i, label in enumerate(labels)]
    df = spark.createDataFrame(rows, INTERACTIONS.replace("label int", "label double"))
    cfg = quiet(tmp_path, result_format="BASIC")
    valid, quarantine, report = run_quality_gate(df, interactions_suite(df, cfg), cfg)
    assert sorted(r["row"] for r in valid.collect()) == ["r0", "r1"]
    assert {r: v[0] for r, v in reasons_by_row(quarantine).items()} == dict.fromkeys(
        ("r2", "r3"), "label_not_binary"
    )
    gx = {e.rule: e.unexpected_count for e in report.expectations if e.rule == "label_not_binary"}
    assert gx == {"label_not_binary": 2}


def test_an_event_is_in_the_future_only_after_the_day_it_was_imported(spark, tmp_path) -> None:
    """A rerun of an older date sees rows imported since: each is judged by its own import day, so
    the rerun neither quarantines them nor fails; without an import date the run's date bounds all."""
    imported = dt.date(1998, 5, 2)
    rows = [
        ("on_time", "ml", 1, 10, dt.datetime(1998, 5, 2, 23, 59, 59, tzinfo=dt.UTC), 4.0, None, imported),
        ("ahead", "ml", 1, 11, dt.datetime(1998, 5, 3, tzinfo=dt.UTC), 4.0, None, imported),
    ]
    df = spark.createDataFrame(rows, INTERACTIONS)
    cfg = quiet(tmp_path)  # the run's logical date, DAY, is before the import day
    _, quarantine, _ = run_quality_gate(df, interactions_suite(df, cfg), cfg, validate_with_gx=False)
    assert reasons_by_row(quarantine) == {"ahead": ("timestamp_in_future", ["timestamp_in_future"])}
    by_run = quiet(tmp_path, interactions={"import_date_col": None})
    _, quarantine, _ = run_quality_gate(df, interactions_suite(df, by_run), by_run, validate_with_gx=False)
    assert set(reasons_by_row(quarantine)) == {"on_time", "ahead"}


def test_a_timestamp_that_names_no_instant_or_a_row_without_import_day_is_judged(spark, tmp_path) -> None:
    """A NaN, infinite or out-of-range timestamp (seconds as a double) is no instant: quarantined as
    ``timestamp_invalid``, by the rule and by GX alike (the sequence build would drop it as a null key).
    A row whose import day is null is bounded by the run's date, not let through."""
    seconds = T0.timestamp()
    rows = [
        ("ok", "ml", 1, 10, seconds, 4.0, None, DAY),
        ("nan", "ml", 1, 11, float("nan"), 4.0, None, DAY),
        ("inf", "ml", 1, 12, float("inf"), 4.0, None, DAY),
        ("huge", "ml", 1, 13, 1e300, 4.0, None, DAY),
        ("null", "ml", 1, 14, None, 4.0, None, DAY),
        ("undated_ok", "ml", 2, 10, seconds, 4.0, None, None),
        ("undated_ahead", "ml", 2, 11, dt.datetime(1998, 5, 1, tzinfo=dt.UTC).timestamp(), 4.0, None, None),
    ]
    df = spark.createDataFrame(rows, INTERACTIONS.replace("event_ts timestamp", "event_ts double"))
    cfg = quiet(tmp_path, result_format="BASIC")
    valid, quarantine, report = run_quality_gate(df, interactions_suite(df, cfg), cfg)
    got = {r: v[0] for r, v in reasons_by_row(quarantine).items()}
    assert got == {
        "nan": "timestamp_invalid",
        "inf": "timestamp_invalid",
        "huge": "timestamp_invalid",
        "null": "null_event_ts",
        "undated_ahead": "timestamp_in_future",
    }
    check_reconciles(len(rows), [r["row"] for r in valid.collect()], got, report)
    gx = {
        e.rule: e.unexpected_count
        for e in report.expectations
        if e.rule in ("timestamp_invalid", "timestamp_in_future")
    }
    assert gx == {"timestamp_invalid": 3, "timestamp_in_future": 1}


def test_embeddings_and_semantic_ids_quarantine(spark, tmp_path) -> None:
    cfg = quiet(tmp_path, embeddings={"expected_dims": {"text": 3}}, semantic_ids={"codebook_size": 8})
    nan, inf = float("nan"), float("inf")
    emb = spark.createDataFrame(
        [
            ("ok", "ml", "text", "m", "1", 1, 3, [0.1, 0.2, 0.3]),
            ("nan", "ml", "text", "m", "1", 2, 3, [0.1, nan, 0.3]),
            ("inf", "ml", "text", "m", "1", 3, 3, [inf, 0.2, 0.3]),
            ("short", "ml", "text", "m", "1", 4, 3, [0.1, 0.2]),  # shorter than its dim column
            ("expected", "ml", "text", "m", "1", 5, 4, [0.1, 0.2, 0.3, 0.4]),  # dim 4, text must be 3
            ("null", "ml", "text", "m", "1", 6, 3, None),
            ("x_dup", "ml", "text", "m", "1", 1, 3, [0.1, 0.2, 0.3]),
            ("image_ok", "ml", "image", "m", "1", 1, 2, [0.5, 0.5]),
        ],
        "row string, dataset string, modality string, encoder string, encoder_version string, item_id long, "
        "dim int, embedding array<float>",
    )
    valid, quarantine, report = run_quality_gate(emb, embeddings_suite(emb, cfg), cfg, validate_with_gx=False)
    got = reasons_by_row(quarantine)
    assert {k: v[0] for k, v in got.items()} == {
        "nan": "embedding_not_finite",
        "inf": "embedding_not_finite",
        "short": "embedding_wrong_dim",
        "expected": "embedding_wrong_dim",
        "null": "embedding_null",
        "x_dup": "duplicate",
    }
    check_reconciles(8, [r["row"] for r in valid.collect()], got, report)

    sem = spark.createDataFrame(
        [
            ("ok", "ml", "v1", 1, [0, 1, 2, 3, 4, 7], 8),
            ("high", "ml", "v1", 2, [0, 1, 2, 3, 4, 8], 8),  # 8 is outside [0, 8)
            ("negative", "ml", "v1", 3, [-1, 1, 2, 3, 4, 5], 8),
            ("short", "ml", "v1", 4, [0, 1, 2], 8),
            ("null", "ml", "v1", 5, None, 8),
            ("null_item", "ml", "v1", None, [0, 1, 2, 3, 4, 5], 8),
            ("k", "ml", "v1", 6, [0, 1, 2, 3, 4, 5], 16),
            ("other_version", "ml", "v2", 1, [0, 1, 2, 3, 4, 5], 8),
            ("x_dup", "ml", "v1", 1, [0, 1, 2, 3, 4, 7], 8),
        ],
        "row string, dataset string, tokenizer_version string, item_id long, semantic_ids array<bigint>, "
        "codebook_size int",
    )
    valid, quarantine = split_valid_quarantine(sem, semantic_ids_suite(sem, cfg))
    got = reasons_by_row(quarantine)
    assert {k: v[0] for k, v in got.items()} == {
        "high": "semantic_ids_out_of_codebook",
        "negative": "semantic_ids_out_of_codebook",
        "short": "semantic_ids_wrong_length",
        "null": "semantic_ids_null",
        "null_item": "null_item_id",
        "k": "codebook_size_mismatch",
        "x_dup": "duplicate",
    }
    assert len(valid.collect()) + len(got) == 9


SAMPLES = (
    "row string, dataset string, split string, user_id long, item_id long, event_ts timestamp, label int, "
    "history_len int, is_cold_user boolean, history_item_ids array<bigint>, history_semantic_ids array<int>, "
    "history_actions array<int>, target_semantic_ids array<int>"
)


def sample(row, split, user, item, day, n, *, label=1, codes=None, target=None, actions=None, items=None):
    hist_codes = codes if codes is not None else [1] * (6 * n)
    acts = actions if actions is not None else [1] * n
    hist_items = items if items is not None else list(range(n))
    tgt = target if target is not None else [2] * 6
    ts = T0 + dt.timedelta(days=day)
    return (row, "ml", split, user, item, ts, label, n, False, hist_items, hist_codes, acts, tgt)


def test_samples_gate_checks_budget_alignment_codes_and_chronology(spark, tmp_path) -> None:
    rows = [
        sample("ok", "train", 1, 10, 1, 2),
        sample("ok_long", "train", 1, 11, 2, 36),  # 4 + 36 * 8 + 8 = 300 tokens: fits
        sample("too_long", "train", 1, 12, 3, 37),  # 308 tokens
        sample("misaligned", "train", 1, 13, 4, 2, actions=[1]),
        sample("short_codes", "train", 1, 19, 4, 2, codes=[1] * 11),  # 2 items need 12 codes
        sample("short_items", "train", 1, 20, 4, 2, items=[5]),
        sample("bad_code", "train", 1, 14, 5, 1, codes=[0, 1, 2, 3, 4, 256]),
        sample("bad_target", "train", 1, 15, 6, 0, target=[1, 2, 3]),
        (*sample("no_target", "train", 1, 21, 6, 0)[:12], None),  # an item never tokenised
        sample("target_code", "train", 1, 22, 6, 0, target=[0, 1, 2, 3, 4, 256]),
        sample("bad_split", "valid", 1, 16, 7, 0),
        sample("bad_label", "train", 1, 17, 8, 0, label=2),
        sample("test_ok", "test", 2, 10, 20, 0),
        sample("test_early", "test", 2, 11, 0, 0),  # a test sample before the last train one
        sample("test_tie", "test", 2, 12, 2, 0),  # at the instant of the last valid train one (ok_long)
        (*sample("null_history", "train", 1, 18, 9, 0)[:9], None, None, None, [2] * 6),  # null arrays
        sample("negative", "train", 1, 23, 10, -2, codes=[], actions=[], items=[]),  # -4 tokens
    ]
    df = spark.createDataFrame(rows, SAMPLES)
    cfg = quiet(tmp_path, result_format="BASIC")
    with pytest.raises(DataQualityError) as err:
        run_quality_gate(df, samples_suite(df, cfg), cfg)
    report = err.value.report
    failed = [(e.expectation_type, e.observed_value) for e in err.value.failed_expectations]
    assert failed == [("unexpected_rows_expectation", 2)]  # exactly the early and the tied test rows
    assert "test_before_train" in str(err.value)
    assert report.reason_counts == {
        "sequence_over_budget": 1,
        "history_misaligned": 5,  # misaligned, short_codes, short_items, null_history, negative
        "target_semantic_ids_wrong_length": 1,
        "target_semantic_ids_null": 1,
        "semantic_ids_out_of_codebook": 2,  # bad_code, target_code
        "split_invalid": 1,
        "label_not_binary": 1,
    }
    assert report.n_input == 17 and report.reconciled
    # GX counts what each rule counts: the negative history is misaligned, not over budget
    gx = {e.rule: e.unexpected_count for e in report.expectations if e.rule in report.all_reason_counts}
    assert gx == {rule: report.all_reason_counts[rule] for rule in gx}
    assert gx["sequence_over_budget"] == 1 and gx["label_not_binary"] == 1


def test_counts_are_independent_of_the_rules(spark, tmp_path) -> None:
    """The input is counted before the suite runs: a prepare step that loses or duplicates rows
    fails the batch on its counts, even when every expectation passes."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(i,) for i in range(6)], "x long")
    rule = RowRule("x_negative", F.col("x") < 0)
    cfg = quiet(tmp_path)
    good = run_quality_gate(df, QualitySuite("identity", [rule]), cfg, validate_with_gx=False)[2]
    assert (good.n_input, good.n_valid, good.n_quarantined, good.success) == (6, 6, 0, True)
    for prepare, seen in ((lambda b: b.unionByName(b.filter("x = 0")), 7), (lambda b: b.filter("x > 0"), 5)):
        suite = QualitySuite("lossy", [rule], prepare=prepare)
        with pytest.raises(DataQualityError, match="COUNTS DO NOT RECONCILE") as err:
            run_quality_gate(df, suite, cfg, validate_with_gx=False)
        report = err.value.report
        assert (report.n_input, report.n_valid + report.n_quarantined) == (6, seen)
        assert not report.reconciled and not report.failed_expectations


def test_the_quarantine_budget_is_a_share_of_all_rows_also_for_a_sparse_column(spark, tmp_path) -> None:
    """GX measures a rule's bad values among the column's non-null ones. Of 1000 events only 50 are
    rated: 2 bad ratings (0.2 % of the batch) pass a 1 % budget, though they are 4 % of the ratings;
    11 (1.1 %) fail it."""
    t = T0 + dt.timedelta(days=1)
    cfg = quiet(tmp_path, max_quarantine_fraction=0.01)
    for bad, passes in ((2, True), (11, False)):
        rows = [(f"r{i}", "ml", i, 10, t, 9.0 if i < bad else (4.0 if i < 50 else None), 1, DAY)
                for i in range(1000)]  # fmt: skip
        df = spark.createDataFrame(rows, INTERACTIONS)
        _, _, report = run_quality_gate(df, interactions_suite(df, cfg), cfg, raise_on_failure=False)
        assert (report.n_quarantined, report.success) == (bad, passes), report.summary()
        between = next(e for e in report.expectations if e.rule == "rating_out_of_range")
        assert between.success is passes and between.kwargs["mostly"] == (50 - 10) / 50  # 10 of 1000 allowed


def test_gx_counts_an_unknown_item_as_the_row_rule_does(spark, tmp_path) -> None:
    """A row without an item fails its own rule; GX counted it as an unknown item too, so its results
    (and Data Docs, alerts) listed an unknown item the quarantine did not."""
    t = T0 + dt.timedelta(days=1)
    rows = [(f"r{i}", "ml", i, 10, t, 4.0, None, DAY) for i in range(20)]
    rows += [("no_item", "ml", 21, None, t, 4.0, None, DAY), ("ghost", "ml", 22, 999, t, 4.0, None, DAY)]
    df = spark.createDataFrame(rows, INTERACTIONS)
    items = spark.createDataFrame([("ml", 10)], "dataset string, item_id long")
    cfg = quiet(tmp_path, max_quarantine_fraction=0.05)  # 1 bad row of the 22 tolerated per rule
    suite = interactions_suite(df, cfg, items=items)
    _, quarantine, report = run_quality_gate(df, suite, cfg, raise_on_failure=False)
    assert {k: v[0] for k, v in reasons_by_row(quarantine).items()} == {
        "no_item": "null_item_id",
        "ghost": "unknown_item",
    }
    rules = {e.rule: e for e in report.expectations if e.rule in ("unknown_item", "null_item_id")}
    assert rules["unknown_item"].success and rules["null_item_id"].success  # one bad row each, not two


def test_an_expectation_gx_cannot_compute_reports_its_error_not_a_count(spark, tmp_path) -> None:
    """GX 1.x files a failed metric under its metric id; the outcome, the report and the alert carry
    the error, and no count is made up for the rule it mirrors."""
    from spark_jobs.quality.gate import _with_rule_count
    from spark_jobs.quality.gx import validate
    from spark_jobs.quality.rules import GxSpec

    cfg = QualityConfig(docs_dir=str(tmp_path / "docs"), logical_date=DAY)
    spec = GxSpec(
        "ExpectColumnValuesToBeBetween", {"column": "no_such_column", "min_value": 0, "max_value": 5}, "x"
    )
    (outcome,), _ = validate(interactions(spark), "crashing", [spec], cfg, [1.0])
    assert not outcome.success and "no_such_column" in outcome.exception
    assert _with_rule_count(outcome, {"x": 0}, 0).unexpected_count is None
    text = Alert.from_quality_report({"expectations": [outcome.__dict__]}).text
    assert f"error={outcome.exception}" in text


def test_batch_failure_raises_naming_the_expectation_and_writes_data_docs(spark, tmp_path) -> None:
    df = interactions(spark)
    cfg = QualityConfig.from_yaml(ROOT / "configs" / "quality.yaml").model_copy(
        update={"docs_dir": str(tmp_path / "docs"), "logical_date": DAY, "max_quarantine_fraction": 0.1}
    )
    with pytest.raises(DataQualityError) as err:
        run_quality_gate(df, interactions_suite(df, cfg, name="interactions_strict"), cfg)
    failed = {(e.expectation_type, e.kwargs.get("column")) for e in err.value.failed_expectations}
    assert ("expect_column_values_to_be_between", "rating") in failed  # 3 of 15 rows: 20 % > 10 %
    assert ("expect_column_values_to_not_be_null", "user_id") not in failed  # 1 of 15: tolerated
    # the duplicate pair is unique among the valid rows, the ones the row condition keeps
    unique = [e for e in err.value.report.expectations if e.expectation_type.endswith("_to_be_unique")]
    assert len(unique) == 1 and unique[0].success
    message = str(err.value)
    assert "expect_column_values_to_be_in_set(column='dq_row_valid'" in message
    assert "quality gate 'interactions_strict': FAILED" in message
    share = next(e for e in err.value.failed_expectations if e.rule == "quarantined_share")
    assert share.unexpected_count == 10 and round(share.unexpected_percent) == 67  # BASIC: GX's own count
    index = Path(err.value.report.data_docs_index)
    assert index.name == "index.html" and index.exists()
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert pages and "interactions_strict" in index.read_text()
    alert = Alert.from_quality_report(json.loads(json.dumps(err.value.report.to_dict())))
    assert alert.severity == "error" and "dq_row_valid" in alert.text


@pytest.mark.parametrize("mode", ["ephemeral", "file"])
def test_data_docs_keep_another_processs_pages_only_in_file_mode(spark, tmp_path, mode) -> None:
    """Each pipeline step runs in its own process. An ephemeral context holds its own results only,
    and its Data Docs rebuild deletes the pages of the others' (an alerted failure's among them): the
    pipeline runs GX in file mode, whose results persist."""
    from spark_jobs.quality import gx
    from spark_jobs.quality.rules import GxSpec

    cfg = QualityConfig(docs_dir=str(tmp_path / "docs"), gx_mode=mode, gx_project_dir=str(tmp_path / "gx"))
    for bound in (1.0, 5.0):  # the first run fails (ratings above 1), the second passes
        gx._CONTEXTS.clear()  # a new process
        spec = GxSpec(
            "ExpectColumnValuesToBeBetween", {"column": "rating", "min_value": 0, "max_value": bound}
        )
        gx.validate(interactions(spark), "docs_check", [spec], cfg, [1.0])
    gx._CONTEXTS.clear()
    pages = list((tmp_path / "docs" / "validations" / "docs_check").rglob("*.html"))
    assert len(pages) == (2 if mode == "file" else 1)


def test_logical_date_bounds_and_config_file() -> None:
    from spark_jobs.quality.suites import logical_end_seconds

    end_of_day = dt.datetime(1998, 4, 30, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    assert logical_end_seconds(QualityConfig(logical_date="1998-04-30").logical_date) == end_of_day
    instant = QualityConfig(logical_date="1998-04-30T12:00:00Z").logical_date
    assert logical_end_seconds(instant) == dt.datetime(1998, 4, 30, 12, tzinfo=dt.UTC).timestamp()
    cfg = QualityConfig.from_yaml(ROOT / "configs" / "quality.yaml")
    assert cfg.samples.profile_tokens == 4 and cfg.semantic_ids.codebook_size == 256


def test_boolean_only_results_take_each_rules_count_from_the_quarantine() -> None:
    """GX's BOOLEAN_ONLY results carry no counts: a rule's mirror takes the rows that failed that
    rule (any of its reasons), the share check the quarantined rows, a rule no row failed 0; the
    chronology check (no row rule behind it) and counts GX gave stay as they are."""
    from spark_jobs.quality.gate import _with_rule_count
    from spark_jobs.quality.report import ExpectationOutcome

    every, quarantined = {"rating_out_of_range": 3, "unknown_item": 2}, 4

    def count(rule: str | None, given: int | None = None) -> int | None:
        outcome = ExpectationOutcome("expect_x", {}, True, rule=rule, unexpected_count=given)
        return _with_rule_count(outcome, every, quarantined).unexpected_count

    assert count("rating_out_of_range") == 3 and count("unknown_item") == 2
    assert count("quarantined_share") == 4 and count("null_user_id") == 0
    assert count("test_before_train") is None and count(None) is None and count("unknown_item", 7) == 7


def test_a_budget_allows_exactly_its_share_of_rows() -> None:
    """The import budget and the gates share one count: 0.29 of 100 rows is 29 (the float product is
    28.999999999999996, which a ``<=`` against it would refuse)."""
    from spark_jobs.quality.gate import allowed_rejects

    assert 0.29 * 100 < 29 and allowed_rejects(0.29, 100) == 29
    assert [allowed_rejects(0.01, n) for n in (0, 99, 100, 250)] == [0, 0, 1, 2]


def test_duplicates_that_differ_only_in_nested_columns_keep_the_same_row_in_any_input_order(spark) -> None:
    """The last tie between duplicates of one key is broken on their nested columns (arrays, maps),
    so which row is kept does not depend on the order or partitioning of the input."""
    from pyspark.sql import functions as F

    from spark_jobs.quality.rules import annotate

    rows = [
        (1, 5, [3, 1], {"a": "1"}),
        (1, 5, [1, 2], {"a": "1"}),
        (1, 5, [2], {"a": "1"}),
        (2, 5, [9], {"a": "1"}),
        (2, 5, [9], {"b": "2"}),  # differs only in a map, which Spark does not hash
        (2, 5, [9], None),
        (3, 5, None, {"a": "1"}),
        (3, 5, [], {"a": "1"}),
    ]
    suite = QualitySuite("nested", [RowRule("never", F.lit(False))], dedup_keys=["k"])
    kept = set()
    for order in (rows, rows[::-1], rows[2:] + rows[:2], rows[4:] + rows[:4], rows[6:] + rows[:6]):
        schema = "k long, x long, history array<long>, attributes map<string,string>"
        df = spark.createDataFrame(order, schema).repartition(3)
        df = df.withColumn("nested", F.struct(F.array("attributes").alias("maps")))  # a map within
        valid = annotate(df, suite).filter(F.col("dq_row_valid")).collect()
        assert len(valid) == 3  # one per key
        kept.add(tuple(sorted((r.k, str(r.history), str(r.attributes)) for r in valid)))
    assert len(kept) == 1


def test_great_expectations_imports_in_a_process_whose_main_has_no_file() -> None:
    """GX imports ``pyspark.sql.connect``, which without Spark Connect's dependencies (the ``connect``
    extra) takes a ``__main__`` without a file for a doctest run and exits with status 0: a gate
    started from ``python -c`` (or a pytest-xdist worker) would end as if it had passed."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import great_expectations as gx; print(gx.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "1.24.1"), done.stderr

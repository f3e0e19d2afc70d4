"""Importers: every format lands in bronze/silver, bad records are quarantined, counts reconcile."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from pyspark.sql import functions as F

from spark_jobs.importers.amazon import AmazonImportConfig, import_amazon
from spark_jobs.importers.generic import GenericImportConfig, import_generic
from spark_jobs.importers.movielens import MovieLensImportConfig, import_movielens
from spark_jobs.importers.silver import SilverConfig, clean_interactions, promote_to_silver
from spark_jobs.importers.synthetic import SyntheticConfig, affinity_matrix, generate
from spark_jobs.lake import Lake
from spark_jobs.tables import HASHED_ID_BASE, get_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DAY = dt.date(2024, 1, 1)
logger = logging.getLogger(__name__)


@pytest.fixture
def lake(spark, tmp_path) -> Lake:
    return Lake(spark, tmp_path / "lake")


def reasons(lake: Lake, dataset: str) -> Counter:
    rows = lake.read("bronze.quarantine", partitions={"dataset": dataset}).collect()
    return Counter((r.target_table, r.reason) for r in rows)


def counts(report) -> dict[str, tuple[int, int, int]]:
    return {Path(s.source).name: (s.records_in, s.imported, s.quarantined) for s in report.sources}


def snapshot(lake: Lake, table: str, dataset: str) -> list[tuple]:
    return sorted(
        tuple(r) for r in lake.read(table, partitions={"dataset": dataset}).drop("source_file").collect()
    )


# ---------------------------------------------------------------------------------------------
# MovieLens
# ---------------------------------------------------------------------------------------------


def test_movielens_bundle_imports_completely(spark, lake, movielens_dir):
    start = time.perf_counter()
    bronze = import_movielens(spark, lake, MovieLensImportConfig(data_dir=str(movielens_dir)), DAY)
    bronze_s = time.perf_counter() - start
    silver = promote_to_silver(lake, "movielens-100k", DAY)
    logger.info("MovieLens import: bronze %.1f s, total %.1f s", bronze_s, time.perf_counter() - start)
    assert counts(bronze) == {
        "u.data": (100_000, 100_000, 0),
        "u.item": (1_682, 1_682, 0),
        "u.user": (943, 943, 0),
        "item_extra.tsv": (1_397, 1_397, 0),
    }
    assert {Path(s.source).name for s in bronze.sources if s.merged} == {"item_extra.tsv"}  # into u.item
    assert bronze.imported("bronze.items") == 1_682 and "1397 merged into its rows" in bronze.summary()
    assert (silver.imported("silver.interactions"), silver.imported("silver.items")) == (100_000, 1_682)
    assert (silver.imported("silver.users"), silver.quarantined()) == (943, 0)
    items = lake.read("silver.items")
    assert items.filter(F.col("image_path").isNotNull()).count() == 1_398  # one poster per file
    toy = items.filter(F.col("item_id") == 1).first()
    assert toy.title == "Toy Story (1995)" and toy.categories == ["Animation", "Children's", "Comedy"]
    assert toy.attributes["director"] == "John Lasseter" and toy.image_path.endswith("posters/1.jpg")
    text = items.select("item_id", F.explode("attributes")).filter(F.col("value").rlike("Ã[\\x80-\\xBF]"))
    assert text.count() == 0  # 178 item_extra rows were encoded twice: repaired
    assert "La Jetée" in items.filter(F.col("item_id") == 7).first().attributes["writer"]
    stats = (
        lake.read("silver.interactions")
        .agg(
            F.avg("label").alias("pos"),
            F.countDistinct("user_id").alias("users"),
            F.min("event_ts").alias("t0"),
        )
        .first()
    )
    assert stats.users == 943 and round(stats.pos, 3) == 0.554  # SOURCES.md: ratings > 3 are 55.4%
    assert stats.t0.date() == dt.date(1997, 9, 20)


def test_movielens_layout_with_defects_is_quarantined_exactly(spark, lake, tmp_path):
    bundle = tmp_path / "ml"
    # hand-written files; stored as *.fixture so nothing tracked is named like the licensed bundle
    shutil.copytree(FIXTURES / "movielens_mini", bundle)
    for fixture in bundle.rglob("*.fixture"):
        fixture.rename(fixture.with_suffix(""))
    (bundle / "posters").mkdir()
    (bundle / "posters" / "1.jpg").write_bytes(b"not really a jpeg")  # listed, never read
    report = import_movielens(spark, lake, MovieLensImportConfig(data_dir=str(bundle), dataset="mini"), DAY)
    assert counts(report) == {
        "u.data": (11, 4, 7),
        "u.item": (6, 2, 4),
        "u.user": (4, 2, 2),
        "item_extra.tsv": (6, 2, 4),
    }
    assert reasons(lake, "mini") == Counter(
        {
            ("bronze.interactions", "rating 6 outside [1, 5]"): 1,
            ("bronze.interactions", "item_id 'x' is not an integer"): 1,
            ("bronze.interactions", "expected 4 tab-separated fields, got 3"): 1,
            ("bronze.interactions", "timestamp 'soon' is not unix seconds"): 1,
            # milliseconds and past Spark's timestamp range: a quarantine row each, not a failed import
            ("bronze.interactions", "timestamp '881250950000' is not unix seconds (1e11 or later)"): 1,
            ("bronze.interactions", "timestamp '9999999999999' is not unix seconds (1e11 or later)"): 1,
            ("bronze.interactions", "timestamp '-5' is not unix seconds"): 1,
            # 19 fields, and their 19 characters are 0/1: each field is checked, not their join
            ("bronze.items", "genre flags must be 0/1, got 0|0|0|0|0|0|0|0|11||0|0|0|0|0|0|0|0|0"): 1,
            ("bronze.items", "item_id 'x' is not an integer"): 1,
            ("bronze.items", "expected 24 pipe-separated fields, got 3"): 1,
            ("bronze.items", "duplicate item_id 2 with other values"): 1,
            ("bronze.items", "duplicate item_extra row for item_id 2 with other values"): 1,
            ("bronze.items", "no valid u.item row for item_id 99"): 1,
            ("bronze.items", "no valid u.item row for item_id 3"): 1,
            ("bronze.items", "item_id 'abc' is not an integer"): 1,
            ("bronze.users", "age 'abc' is not an integer"): 1,
            ("bronze.users", "expected 5 pipe-separated fields, got 3"): 1,
        }
    )
    items = {r.item_id: r for r in lake.read("bronze.items").collect()}
    assert sorted(items) == ["1", "2"]
    assert items["2"].title == "Café Noir (1996)"  # latin-1 decoded, first occurrence kept
    assert items["2"].categories == ["Crime", "Drama"] and items["2"].attributes["director"] == "Bob Director"
    assert items["1"].attributes["plot"] == 'Robots "learn" to love.'
    assert items["1"].image_path == str(bundle / "posters" / "1.jpg") and items["2"].image_path is None
    raw = {r.reason: r.raw for r in lake.read("bronze.quarantine").collect()}
    assert raw["timestamp 'soon' is not unix seconds"] == "3\t2\t4\tsoon"


def mini_bundle(tmp_path: Path, name: str = "ml") -> Path:
    bundle = tmp_path / name
    shutil.copytree(FIXTURES / "movielens_mini", bundle)
    for fixture in bundle.rglob("*.fixture"):
        fixture.rename(fixture.with_suffix(""))
    return bundle


def test_item_extra_header_a_quoted_newline_and_double_utf8(spark, lake, tmp_path):
    """Spark took a missing header's first row as the header (one item lost, uncounted) and a
    reordered one silently swapped columns; a quoted newline cut the plot and made a phantom row.
    Text encoded twice (as 178 rows of the real file are) is repaired, before duplicates are compared;
    text that only looks so is not."""
    bundle = mini_bundle(tmp_path)
    extra = bundle / "item_extra.tsv"
    header, *rows = extra.read_text().splitlines()
    rows[0] = rows[0].replace('"Robots ""learn"" to love."', '"Robots ""learn""\nto love."')
    rows[0] = rows[0].replace("Ann Director", "Ann DirectÃ¶r").replace("W One", "Café, Ã, 日本")
    repeated = rows[0].replace("DirectÃ¶r", "Directör")  # the same record, but for the double encoding
    extra.write_text("\n".join([header, *rows, repeated]) + "\n")
    report = import_movielens(spark, lake, MovieLensImportConfig(data_dir=str(bundle), dataset="mini"), DAY)
    assert counts(report)["item_extra.tsv"] == (7, 2, 5)  # as without the newline, plus the repeat
    assert reasons(lake, "mini")[("bronze.items", "duplicate item_extra row for item_id 1")] == 1
    item = lake.read("bronze.items").filter(F.col("item_id") == "1").first()
    assert item.attributes["plot"] == 'Robots "learn"\nto love.'
    assert (item.attributes["director"], item.attributes["writer"]) == ("Ann Directör", "Café, Ã, 日本")

    for bad in ([], list(reversed(header.split("\t")))):
        extra.write_text("\n".join(["\t".join(bad), *rows[1:]]) if bad else "\n".join(rows[1:]))
        with pytest.raises(
            ValueError, match=r"item_extra.tsv: the header must be \['item_id', 'ml1m_item_id'"
        ):
            import_movielens(spark, lake, MovieLensImportConfig(data_dir=str(bundle), dataset="mini"), DAY)
    without = MovieLensImportConfig(data_dir=str(bundle), dataset="mini", include_extra=False)
    assert "item_extra.tsv" not in counts(
        import_movielens(spark, lake, without, DAY)
    )  # not read: not checked
    with pytest.raises(ValueError, match=r"reads \[\]\*\?\{\} in a path as a glob"):
        import_movielens(spark, lake, MovieLensImportConfig(data_dir=str(tmp_path / "ml[1]")), DAY)


def test_a_parse_that_loses_or_duplicates_records_stops_before_writing(spark, lake):
    """ "In" is counted on the records as read: a parse step that drops or repeats a record (a join
    on a non-unique key, say) fails the import, and no table is written."""
    from spark_jobs.importers.common import ImportReport, Parsed, read_lines, write_bronze
    from spark_jobs.importers.movielens import parse_ratings

    lines = read_lines(spark, str(FIXTURES / "movielens_mini" / "raw" / "u.data.fixture"))
    parsed = parse_ratings(lines, "mini", DAY)
    n = lines.count()
    for rows, seen in ((parsed.unionByName(parsed.limit(1)), n + 1), (parsed.limit(n - 2), n - 2)):
        report = ImportReport("mini", DAY)
        with pytest.raises(ValueError, match=rf"u.data -> bronze.interactions: {n} records read, "):
            write_bronze(lake, "mini", DAY, [Parsed("u.data", "bronze.interactions", rows, lines)], report)
        source = report.sources[0]
        assert (source.records_in, source.imported + source.quarantined) == (n, seen)
        assert not lake.exists("bronze.interactions") and not lake.exists("bronze.quarantine")


# ---------------------------------------------------------------------------------------------
# Amazon Reviews 2023
# ---------------------------------------------------------------------------------------------


def test_amazon_jsonl_fixture(spark, lake):
    config = AmazonImportConfig(
        reviews=str(FIXTURES / "amazon" / "Movies_and_TV.jsonl"),
        meta=str(FIXTURES / "amazon" / "meta_Movies_and_TV.jsonl"),
        dataset="amazon-fixture",
    )
    report = import_amazon(spark, lake, config, DAY)
    # 13 lines, one blank: 12 reviews; 7 metadata lines
    assert counts(report) == {"Movies_and_TV.jsonl": (12, 7, 5), "meta_Movies_and_TV.jsonl": (7, 3, 4)}
    assert reasons(lake, "amazon-fixture") == Counter(
        {
            ("bronze.interactions", "malformed JSON"): 2,
            ("bronze.interactions", "missing user_id"): 1,
            ("bronze.interactions", "rating 7.0 outside [1, 5]"): 1,
            ("bronze.interactions", "timestamp 'yesterday' is not unix milliseconds"): 1,
            ("bronze.items", "malformed JSON"): 1,
            ("bronze.items", "missing parent_asin"): 1,
            ("bronze.items", "duplicate parent_asin B0FIXP0003 with other values"): 1,
            # Spark fails the whole job on a map with a repeated key; here only the line is held back
            ("bronze.items", "repeated keys in details: Director, Studio"): 1,
        }
    )
    reviews = lake.read("bronze.interactions").orderBy("event_ts").collect()
    assert [r.item_id for r in reviews[:2]] == ["B0FIXP0004", "B0FIXT0005"]  # no parent_asin: asin
    first = next(r for r in reviews if r.extra and '"review_title":"A classic"' in r.extra)
    assert first.event_ts == dt.datetime(2020, 5, 5, 14, 8, 48, 923000)  # ms precision kept (UTC)
    assert '"verified_purchase":true' in first.extra and '"helpful_vote":2' in first.extra
    items = {r.item_id: r for r in lake.read("bronze.items").collect()}
    keeper = items["B0FIXP0001"]
    assert keeper.image_url == "https://example.invalid/h1.jpg"  # MAIN image, hi_res
    assert items["B0FIXP0002"].image_url == "https://example.invalid/l2.jpg"  # no hi_res: large
    assert keeper.attributes["Director"] == "A. Example" and keeper.attributes["Number of discs"] == "1"
    assert keeper.attributes["description"] == "A young girl befriends a dragon. Includes bonus shorts."
    assert items["B0FIXP0003"].title == "Oceans of the World"  # first of the duplicates
    silver = promote_to_silver(lake, "amazon-fixture", DAY)
    assert silver.imported("silver.interactions") == 7
    ids = [r.item_id for r in lake.read("silver.interactions").collect()]
    assert all(i >= HASHED_ID_BASE for i in ids)  # ASINs are hashed into the high range


def test_amazon_metadata_values_of_another_type_are_kept_not_dropped(spark, lake, tmp_path):
    """A list field given as a plain value, or a ``details`` that is not an object, lost its text
    without a reason: it is now kept (a one-item list; the attribute ``details``). So did a ``details``
    entry named like a main field (``store``) the item does not have; one the item has loses to it."""
    review = {"rating": 5.0, "user_id": "U1", "parent_asin": "B1", "timestamp": 1588687728923}
    (tmp_path / "reviews.jsonl").write_text(json.dumps(review) + "\n")
    meta = [
        {"parent_asin": "B1", "title": "Plain", "description": "A plain string.", "features": 4,
         "categories": "Movies", "details": "n/a"},
        {"parent_asin": "B2", "title": "Lists", "description": ["One.", "Two."], "features": [],
         "categories": ["Movies", "Drama"], "details": {"Format": "DVD", "store": "Criterion", "description": "Other."}},
        {"parent_asin": "B3", "title": "Looks like a list", "categories": "[Adult Swim] Cartoons",
         "description": {"text": "An object."}},
    ]  # fmt: skip
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    config = AmazonImportConfig(
        reviews=str(tmp_path / "reviews.jsonl"), meta=str(tmp_path / "meta.jsonl"), dataset="typed"
    )
    assert counts(import_amazon(spark, lake, config, DAY))["meta.jsonl"] == (3, 3, 0)
    items = {r.item_id: r for r in lake.read("bronze.items", partitions={"dataset": "typed"}).collect()}
    assert items["B1"].categories == ["Movies"]
    assert items["B1"].attributes == {"features": "4", "description": "A plain string.", "details": "n/a"}
    assert items["B2"].categories == ["Movies", "Drama"]
    assert items["B2"].attributes == {"description": "One. Two.", "Format": "DVD", "store": "Criterion"}
    assert items["B3"].categories == ["[Adult Swim] Cartoons"]
    assert items["B3"].attributes == {"description": '{"text":"An object."}'}


def test_an_amazon_drop_with_files_in_a_subfolder_is_refused(spark, lake, tmp_path):
    """Spark reads a folder's own files: a reviews file one level down would be skipped unseen."""
    drop = tmp_path / "reviews"
    (drop / "late").mkdir(parents=True)
    shutil.copy(FIXTURES / "amazon" / "Movies_and_TV.jsonl", drop / "part-0.jsonl")
    shutil.copy(FIXTURES / "amazon" / "Movies_and_TV.jsonl", drop / "late" / "part-1.jsonl")
    before = lake.history("bronze.interactions")
    with pytest.raises(ValueError, match=r"1 data file\(s\) in subfolders Spark does not read .*late/part-1"):
        import_amazon(spark, lake, AmazonImportConfig(reviews=str(drop), dataset="amazon-sub"), DAY)
    assert lake.history("bronze.interactions") == before


def test_a_json_line_is_one_object_with_distinct_keys(spark, lake, tmp_path):
    """``from_json`` reads a line's first value and ignores the rest: two records glued on one line
    lost the second and still reconciled, and a repeated key kept its last value. Each is now a
    quarantine row, in the Amazon and the generic JSON-lines readers alike."""
    good = '{"user_id": "U%d", "parent_asin": "P1", "rating": 5.0, "timestamp": 1588687728923}'
    lines = {
        good % 1: None,
        good % 2 + good % 3: "malformed JSON (text after the object)",  # glued
        good % 4 + " garbage": "malformed JSON (text after the object)",
        good % 5 + "," + good % 6: "more than one JSON value on one line",
        good % 7 + '] x [{"b": 2}': "malformed JSON (text after the object)",  # closes [...] itself
        good % 8 + '} x {"b": 2': "malformed JSON (text after the object)",  # closes {"_": ...} itself
        '{"user_id": "U9", "rating": 5.0, "parent_asin": "P1", "rating": 1.0, "timestamp": 1}': (
            "repeated keys: rating"
        ),
        (good % 10).replace("1588687728923", "1588687728"): (  # seconds: 19 January 1970 as ms
            "timestamp '1588687728' looks like unix seconds, not milliseconds"
        ),
        (good % 11).replace("1588687728923", "1588687728923.0"): None,  # a whole float is fine
        (good % 12).replace(
            "1588687728923", "1e19"
        ): "timestamp '1.0E19' is not unix milliseconds",  # no overflow
    }
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    report = import_amazon(
        spark, lake, AmazonImportConfig(reviews=str(tmp_path / "reviews.jsonl"), dataset="az"), DAY
    )
    assert counts(report) == {"reviews.jsonl": (10, 2, 8)}
    rows = lake.read("bronze.quarantine", partitions={"dataset": "az"}).collect()
    assert sorted((r.raw, r.reason) for r in rows) == sorted((k, v) for k, v in lines.items() if v)
    times = {r.user_id: r.event_ts for r in lake.read("bronze.interactions").collect()}
    assert times["U1"] == times["U11"] == dt.datetime(2020, 5, 5, 14, 8, 48, 923000)

    (tmp_path / "events.jsonl").write_text(
        '{"user_id": "u1", "item_id": "i1", "timestamp": 1, "label": 1}{"user_id": "u2", "item_id": "i1", '
        '"timestamp": 2, "label": 1}\n{"user_id": "u3", "item_id": "i1", "timestamp": 3, "label": 1, "label": 0}\n'
    )
    config = GenericImportConfig(dataset="gj", interactions=str(tmp_path / "events.jsonl"))
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.jsonl": (2, 0, 2)}
    assert reasons(lake, "gj") == Counter(
        {
            ("bronze.interactions", "malformed JSON (text after the object)"): 1,
            ("bronze.interactions", "repeated keys: label"): 1,
        }
    )


def test_an_id_that_is_a_null_marker_or_not_a_json_string_or_number_is_quarantined(spark, lake, tmp_path):
    """An id was taken as whatever text it read as: ``\\N`` (a MySQL dump's null) or ``NULL`` gathered
    every record without an id into one user, a JSON object or list became its JSON text, and every
    JSON number beyond a double's range (``1e400``) the one id ``"Infinity"``. Each is
    a quarantine row with its reason, in the generic (CSV, JSON lines) and the Amazon readers; a
    Parquet id column of such a type is refused by name."""
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,timestamp,label\nu1,i1,1,1\n\\N,i1,2,1\nu2, null ,3,1\nNone,i2,4,1\nnanny,i2,5,1\n"
    )
    config = GenericImportConfig(dataset="gn", interactions=str(tmp_path / "events.csv"))
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.csv": (5, 2, 3)}
    assert reasons(lake, "gn") == Counter(
        {
            ("bronze.interactions", "user_id '\\N' is a null marker, not an id"): 1,
            ("bronze.interactions", "item_id 'null' is a null marker, not an id"): 1,
            ("bronze.interactions", "user_id 'None' is a null marker, not an id"): 1,
        }
    )
    assert sorted(
        r.user_id for r in lake.read("bronze.interactions", partitions={"dataset": "gn"}).collect()
    ) == [
        "nanny",
        "u1",
    ]

    (tmp_path / "events.jsonl").write_text(
        '{"uid": "u1", "item_id": 7, "timestamp": 1, "label": 1}\n'
        '{"uid": {"id": "u2"}, "item_id": 7, "timestamp": 2, "label": 1}\n'
        '{"uid": "u3", "item_id": ["i1"], "timestamp": 3, "label": 1}\n'
        '{"uid": "u4", "item_id": true, "timestamp": 4, "label": 1}\n'
        '{"uid": "[\\"u5\\"]", "item_id": "NaN", "timestamp": 5, "label": 1}\n'
        '{"uid": "[\\"u6\\"]", "item_id": 7, "timestamp": 6, "label": 1}\n'
        '{"uid": 1e400, "item_id": 7, "timestamp": 7, "label": 1}\n'
        '{"uid": "u8", "item_id": -2e400, "timestamp": 8, "label": 1}\n'
        '{"uid": "Infinity", "item_id": 7, "timestamp": 9, "label": 1}\n'
    )
    config = GenericImportConfig(
        dataset="gk", interactions=str(tmp_path / "events.jsonl"), rename={"uid": "user_id"}
    )
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.jsonl": (9, 3, 6)}
    assert reasons(lake, "gk") == Counter(
        {
            ("bronze.interactions", "user_id is a JSON object, not a string or number"): 1,
            ("bronze.interactions", "item_id is a JSON array, not a string or number"): 1,
            ("bronze.interactions", "item_id is a JSON boolean, not a string or number"): 1,
            ("bronze.interactions", "item_id 'NaN' is a null marker, not an id"): 1,
            ("bronze.interactions", "user_id is a JSON number beyond a double's range"): 1,
            ("bronze.interactions", "item_id is a JSON number beyond a double's range"): 1,
        }
    )
    kept = lake.read("bronze.interactions", partitions={"dataset": "gk"}).collect()
    assert sorted((r.user_id, r.item_id) for r in kept) == [  # a string is an id
        ("Infinity", "7"),
        ('["u6"]', "7"),
        ("u1", "7"),
    ]

    # in rating, label or action a null marker is no value (a rating of \N was "not a number", and
    # nan a NaN rating), so the record is judged on the feedback it has
    (tmp_path / "feedback.csv").write_text(
        "user_id,item_id,timestamp,rating,label,action\n"
        "u1,i1,1,\\N,1,NULL\nu2,i1,2,NULL,\\N,click\nu3,i1,3,nan,,\nu4,i1,4,4,None,\n"
    )
    config = GenericImportConfig(dataset="gf", interactions=str(tmp_path / "feedback.csv"))
    assert counts(import_generic(spark, lake, config, DAY)) == {"feedback.csv": (4, 2, 2)}
    assert reasons(lake, "gf") == Counter({("bronze.interactions", "neither rating nor label"): 2})
    kept = lake.read("bronze.interactions", partitions={"dataset": "gf"}).collect()
    assert sorted((r.user_id, r.rating, r.label, r.action) for r in kept) == [
        ("u1", None, 1, None),
        ("u4", 4.0, None, None),
    ]

    pd.DataFrame({"user_id": [{"id": "u1"}], "item_id": ["i1"], "timestamp": [1], "label": [1]}).to_parquet(
        tmp_path / "events.parquet"
    )
    config = GenericImportConfig(dataset="gp", interactions=str(tmp_path / "events.parquet"))
    before = lake.history("bronze.interactions")
    with pytest.raises(
        ValueError, match=r"events.parquet: id column 'user_id' is struct<id:string>; an id is"
    ):
        import_generic(spark, lake, config, DAY)
    assert lake.history("bronze.interactions") == before

    review = '{"user_id": %s, "parent_asin": %s, "rating": 5.0, "timestamp": 1588687728923}'
    (tmp_path / "reviews.jsonl").write_text(
        "\n".join(
            [
                review % ('"U1"', '"P1"'),
                review % ('["U2"]', '"P1"'),
                review % ('"U3"', '{"asin": "P1"}'),
                review % ('"U4"', '"NULL"'),
                review % ('"NULL"', '"P1"'),
                (review % ('"U6"', '""')).replace("}", ', "asin": "\\\\N"}'),
                (review % ('"U7"', '"null"')).replace("}", ', "asin": "A7"}'),  # the variant is the item
                (review % ('"U8"', '"P1"')).replace("}", ', "asin": {"v": 1}}'),  # unused: not checked
                (review % ('"U9"', '""')).replace("}", ', "asin": ["A9"]}'),
                review % ("1e400", '"P1"'),
            ]
        )
        + "\n"
    )
    (tmp_path / "meta.jsonl").write_text(
        '{"parent_asin": "P1"}\n{"parent_asin": 17.5}\n{"parent_asin": "none"}\n{"parent_asin": 2e400}\n'
    )
    config = AmazonImportConfig(
        reviews=str(tmp_path / "reviews.jsonl"), meta=str(tmp_path / "meta.jsonl"), dataset="az-ids"
    )
    assert counts(import_amazon(spark, lake, config, DAY)) == {
        "reviews.jsonl": (10, 3, 7),
        "meta.jsonl": (4, 2, 2),
    }
    assert reasons(lake, "az-ids") == Counter(
        {
            ("bronze.interactions", "user_id is a JSON array, not a string or number"): 1,
            ("bronze.interactions", "parent_asin is a JSON object, not a string or number"): 1,
            ("bronze.interactions", "parent_asin 'NULL' is a null marker, not an id"): 1,
            ("bronze.interactions", "user_id 'NULL' is a null marker, not an id"): 1,
            ("bronze.interactions", "asin '\\N' is a null marker, not an id"): 1,
            ("bronze.interactions", "asin is a JSON array, not a string or number"): 1,
            ("bronze.items", "parent_asin 'none' is a null marker, not an id"): 1,
            ("bronze.interactions", "user_id is a JSON number beyond a double's range"): 1,
            ("bronze.items", "parent_asin is a JSON number beyond a double's range"): 1,
        }
    )
    kept = lake.read("bronze.interactions", partitions={"dataset": "az-ids"}).collect()
    assert sorted((r.user_id, r.item_id) for r in kept) == [("U1", "P1"), ("U7", "A7"), ("U8", "P1")]


# ---------------------------------------------------------------------------------------------
# generic format
# ---------------------------------------------------------------------------------------------

CSV_REASONS = Counter(
    {
        ("bronze.interactions", "missing user_id"): 1,
        ("bronze.interactions", "missing item_id"): 1,
        (
            "bronze.interactions",
            "timestamp 'notatime' is not a unix time (s, ms, us or ns) or ISO-8601 date-time",
        ): 1,
        ("bronze.interactions", "rating 'abc' is not a number"): 1,
        ("bronze.interactions", "neither rating nor label"): 1,
        ("bronze.interactions", "label '2' is not 0 or 1"): 1,
        ("bronze.interactions", "malformed record (field count, quoting or JSON)"): 2,
        ("bronze.items", "missing item_id"): 1,
        ("bronze.items", "duplicate item_id i1 with other values"): 1,
    }
)


def generic_csv(dataset: str = "shop") -> GenericImportConfig:
    g = FIXTURES / "generic"
    return GenericImportConfig(
        dataset=dataset,
        interactions=str(g / "interactions.csv"),
        items=str(g / "items.csv"),
        users=str(g / "users.csv"),
    )


def test_generic_csv_rerun_is_idempotent_through_silver(spark, lake):
    """The same logical date twice: identical contents and counts; every write is a new version."""
    config = generic_csv()
    first = import_generic(spark, lake, config, DAY)
    assert counts(first) == {"interactions.csv": (13, 5, 8), "items.csv": (5, 3, 2), "users.csv": (4, 4, 0)}
    assert reasons(lake, "shop") == CSV_REASONS
    silver1 = promote_to_silver(lake, "shop", DAY)
    tables = ["bronze.interactions", "bronze.items", "bronze.users", "bronze.quarantine"]
    tables += ["silver.interactions", "silver.items", "silver.users"]
    before = {t: snapshot(lake, t, "shop") for t in tables}
    versions = {t: lake.version(t) for t in tables}

    second = import_generic(spark, lake, config, DAY)
    silver2 = promote_to_silver(lake, "shop", DAY)
    assert counts(second) == counts(first) and counts(silver2) == counts(silver1)
    assert {t: snapshot(lake, t, "shop") for t in tables} == before
    assert all(lake.version(t) > versions[t] for t in tables)  # reruns commit new versions
    # time travel: the first run's versions read back the same contents
    assert (
        snapshot_at(lake, "bronze.interactions", first.versions["bronze.interactions"])
        == before["bronze.interactions"]
    )

    got = {(r.user_key, r.item_key): (r.label, r.rating) for r in lake.read("silver.interactions").collect()}
    assert got == {
        ("u1", "i1"): (1, 5.0),
        ("u1", "i2"): (0, 2.0),
        ("u2", "i1"): (1, None),  # label given, no rating
        ("u2", "i3"): (1, 4.0),
        ("u3", "i2"): (1, 3.5),
    }
    items = {r.item_key: r for r in lake.read("silver.items").collect()}
    assert items["i1"].image_path == str(FIXTURES / "generic" / "images" / "i1.png")  # resolved
    assert items["i3"].image_path == "/data/images/i3.png" and items["i3"].title == 'Ocean "Deep" Blue'
    assert items["i1"].categories == ["Sci-Fi", "Adventure"]
    assert items["i1"].attributes == {
        "description": "A crew travels to a distant galaxy, far away.",
        "director": "Jane Doe",
    }

    # the date again without the users file: that input's rows of the date go, in bronze and silver
    fewer = import_generic(spark, lake, config.model_copy(update={"users": None}), DAY)
    assert "users.csv" not in counts(fewer) and fewer.versions["bronze.users"] > versions["bronze.users"]
    assert snapshot(lake, "bronze.users", "shop") == []
    assert promote_to_silver(lake, "shop", DAY).retracted["silver.users"] == 4
    assert lake.read("silver.users", partitions={"dataset": "shop"}).count() == 0
    assert snapshot(lake, "bronze.items", "shop") == before["bronze.items"]


def test_generic_paths_name_the_days_drop(spark, lake, tmp_path):
    """``{logical_date}`` in a path: each date imports its own files, and a rerun of an earlier date
    after a later one reads that date's files again (the same tables), not the latest drop."""
    from spark_jobs.importers.generic import dated

    day2 = DAY + dt.timedelta(days=1)
    assert dated("/raw/{logical_date}/e.csv", DAY) == "/raw/2024-01-01/e.csv"
    assert dated("/raw/{logical_date:%Y/%m/%d}/{a,b}*.csv", day2) == "/raw/2024/01/02/{a,b}*.csv"
    assert dated("/raw/{logical_date-1}/{logical_date-31:%Y%m%d}", day2) == "/raw/2024-01-01/20231202"
    drops = {DAY: ["u1,i1,1704067200,5", "u1,i2,1704067300,2"], day2: ["u2,i1,1704153600,4"]}
    for day, lines in drops.items():
        folder = tmp_path / "events" / f"date={day:%Y%m%d}"
        folder.mkdir(parents=True)
        (folder / "part-0.csv").write_text("user_id,item_id,timestamp,rating\n" + "\n".join(lines) + "\n")
    config = GenericImportConfig(
        dataset="drops", interactions=str(tmp_path / "events" / "date={logical_date:%Y%m%d}")
    )

    def events() -> list[tuple]:
        rows = lake.read("silver.interactions", partitions={"dataset": "drops"}).collect()
        return sorted((r.user_key, r.item_key, r.logical_date) for r in rows)

    for day in (DAY, day2):
        report = import_generic(spark, lake, config, day)
        assert counts(report) == {f"date={day:%Y%m%d}": (len(drops[day]), len(drops[day]), 0)}  # the day's
        promote_to_silver(lake, "drops", day)
    expected = [("u1", "i1", DAY), ("u1", "i2", DAY), ("u2", "i1", day2)]
    assert events() == expected
    bronze = snapshot(lake, "bronze.interactions", "drops")
    import_generic(spark, lake, config, DAY)  # the earlier date again, after the later one
    assert promote_to_silver(lake, "drops", DAY).retracted["silver.interactions"] == 0
    assert events() == expected and snapshot(lake, "bronze.interactions", "drops") == bronze


def test_a_drop_is_pending_until_its_files_and_its_marker_land(spark, lake, tmp_path):
    """``pending_inputs``, what the daily DAG waits on: an input is pending while its path names
    nothing and, with ``ready_marker``, while a dated input's directory (the input itself when it is
    one; each directory a glob names files in) lacks the marker; the marker is never read as a record."""
    from spark_jobs.importers.generic import pending_inputs

    events = tmp_path / "events" / f"date={DAY:%Y%m%d}"
    catalogue = tmp_path / "catalogue"
    config = GenericImportConfig(
        dataset="landed",
        interactions=str(tmp_path / "events" / "date={logical_date:%Y%m%d}"),  # a directory
        items=str(catalogue / "items-*.csv"),  # a glob of files, a snapshot: needs no marker
        ready_marker="_SUCCESS",
    )
    assert pending_inputs(spark, config, DAY) == {
        "interactions": f"nothing at {events}",
        "items": f"nothing at {catalogue / 'items-*.csv'}",
    }
    events.mkdir(parents=True)
    (events / "part-0.csv").write_text(
        "user_id,item_id,timestamp,rating\nu1,i1,1704067200,5\nu2,i1,1704067300,2\n"
    )
    catalogue.mkdir()
    (catalogue / "items-0.csv").write_text("item_id,title\ni1,Film\n")
    assert pending_inputs(spark, config, DAY) == {  # the snapshot is ready once there
        "interactions": f"no _SUCCESS in {events} (the drop is still being written)",
    }
    assert pending_inputs(spark, config.model_copy(update={"ready_marker": None}), DAY) == {}
    with pytest.raises(
        FileNotFoundError, match=r"landed's drop for 2024-01-01 has not landed: interactions: no _SUCCESS"
    ):
        import_generic(spark, lake, config, DAY)  # nor does the import read it
    assert not (tmp_path / "lake").exists()
    (events / "_SUCCESS").touch()
    assert pending_inputs(spark, config, DAY) == {}
    assert set(pending_inputs(spark, config, DAY + dt.timedelta(days=1))) == {"interactions"}  # its own drop
    assert counts(import_generic(spark, lake, config, DAY)) == {
        events.name: (2, 2, 0),
        "items-*.csv": (1, 1, 0),
    }
    # a glob over several directories waits for the marker in each of them, not in any one
    regions = tmp_path / "regions" / f"date={DAY:%Y%m%d}"
    glob = str(tmp_path / "regions" / "date={logical_date:%Y%m%d}" / "*" / "part-*.csv")
    by_region = config.model_copy(update={"interactions": glob, "items": None})
    for region in ("eu", "us"):
        (regions / region).mkdir(parents=True)
        (regions / region / "part-0.csv").write_text("user_id,item_id,timestamp,rating\nu1,i1,1704067200,5\n")
    (regions / "eu" / "_SUCCESS").touch()
    assert pending_inputs(spark, by_region, DAY) == {
        "interactions": f"no _SUCCESS in {regions / 'us'} (the drop is still being written)",
    }
    (regions / "us" / "_SUCCESS").touch()
    assert pending_inputs(spark, by_region, DAY) == {}
    # Spark's partitioned write: one marker at the top, which the glob also names (never a record)
    written = tmp_path / "written" / f"date={DAY:%Y%m%d}"
    partitioned = config.model_copy(
        update={"interactions": str(tmp_path / "written" / "date={logical_date:%Y%m%d}" / "*"), "items": None}
    )
    for region in ("region=eu", "region=us"):
        (written / region).mkdir(parents=True)
        (written / region / "part-0.csv").write_text("user_id,item_id,timestamp,rating\nu1,i1,1704067200,5\n")
    (written / "_temporary").mkdir()  # hidden: neither an input nor a directory to wait for
    assert pending_inputs(spark, partitioned, DAY) == {
        "interactions": f"no _SUCCESS in {written / 'region=eu'}, {written / 'region=us'} (the drop is "
        "still being written)"
    }
    (written / "_SUCCESS").touch()
    assert pending_inputs(spark, partitioned, DAY) == {}
    for marker in ("done/_SUCCESS", "DONE"):  # a path, or a name Spark would read as data
        with pytest.raises(ValidationError, match="ready_marker"):
            GenericImportConfig(dataset="landed", interactions="x", ready_marker=marker)


def snapshot_at(lake: Lake, table: str, version: int) -> list[tuple]:
    return sorted(tuple(r) for r in lake.read(table, version=version).drop("source_file").collect())


def test_generic_columns_may_take_any_name_and_csv_fields_line_breaks(spark, lake, tmp_path):
    """A JSON key named like the reader's working column (``value``) is an ordinary field; one named
    like a column the import adds (``source_file``, in any case) is refused by name until renamed (it
    crashed, or was overwritten), as are two that become one name; with ``csv_multiline`` a CSV's
    quoted field may hold line breaks (RFC 4180: one record, the whole text), and whitespace-only
    lines are no records."""
    import json

    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"user_id": "u1", "item_id": "i1", "timestamp": 1700000000, "rating": 5, "value": 19.99, "source_file": "pos-7"}\n'
        "\t \n"
        '{"user_id": "u2", "item_id": "i2", "timestamp": 1700000100, "rating": 2, "value": 5}\n'
    )
    items = tmp_path / "items.csv"
    items.write_text('item_id,title,plot\ni1,Heat,"A heist.\nMann, 1995"\ni2,Up,Balloons\n')
    config = GenericImportConfig(
        dataset="names", interactions=str(events), items=str(items), csv_multiline=True
    )
    with pytest.raises(
        ValueError, match=r"events.jsonl: column\(s\) \['source_file'\] have names the import"
    ):
        import_generic(spark, lake, config, DAY)
    with pytest.raises(ValueError, match=r"column\(s\) \['Source_File'\] have names the import"):
        import_generic(spark, lake, config.model_copy(update={"rename": {"source_file": "Source_File"}}), DAY)
    # two columns that become one name (renamed onto another, or in another case) name both
    onto = config.model_copy(update={"rename": {"source_file": "pos", "value": "Rating"}})
    with pytest.raises(ValueError, match=r"events.jsonl: columns 'rating' and 'value' both become 'Rating'"):
        import_generic(spark, lake, onto, DAY)
    renamed = config.model_copy(update={"rename": {"source_file": "pos"}})
    assert counts(import_generic(spark, lake, renamed, DAY)) == {
        "events.jsonl": (2, 2, 0),
        "items.csv": (2, 2, 0),
    }
    rows = {r.user_id: r for r in lake.read("bronze.interactions", partitions={"dataset": "names"}).collect()}
    assert json.loads(rows["u1"].extra) == {"pos": "pos-7", "value": "19.99"}
    assert json.loads(rows["u2"].extra) == {"value": "5"} and rows["u2"].source_file.endswith("events.jsonl")
    plots = {
        r.item_id: r.attributes["plot"]
        for r in lake.read("bronze.items", partitions={"dataset": "names"}).collect()
    }
    assert plots == {"i1": "A heist.\nMann, 1995", "i2": "Balloons"}
    line_by_line = renamed.model_copy(update={"csv_multiline": False})  # the default, Spark's
    # it would split i1 in two: "A heist." imported as the whole plot, the rest quarantined
    with pytest.raises(ValueError, match=r"items.csv: 1 line\(s\) end inside a quoted field, e.g. 'i1,Heat,"):
        import_generic(spark, lake, line_by_line, DAY)
    # escaped quotes (one before a separator), an inch mark in an unquoted field, a quoted separator
    # and a 20,000-character field are whole lines (the check walks fields, one step per field)
    long = "x" * 20_000
    items.write_text(
        'item_id,title,plot\ni1,"Heat, ""the"" film","12"" pizza"\ni2,12" Up,"a,\tb"\n'
        f'i3,"Say ""Hi,""","{long}"\n'
    )
    assert counts(import_generic(spark, lake, line_by_line, DAY))["items.csv"] == (3, 3, 0)
    titles = {
        r.item_id: r.title for r in lake.read("bronze.items", partitions={"dataset": "names"}).collect()
    }
    assert titles == {"i1": 'Heat, "the" film', "i2": '12" Up', "i3": 'Say "Hi,"'}
    items.write_text(f'item_id,title,plot\ni1,Heat,"{long}\nMann"\n')  # a long field, cut
    with pytest.raises(ValueError, match=r"items.csv: 1 line\(s\) end inside a quoted field"):
        import_generic(spark, lake, line_by_line, DAY)
    # a separator of two characters: one of them alone, or both inside quotes, separate nothing
    two = line_by_line.model_copy(update={"csv_sep": "::"})
    items.write_text('item_id::title::plot\ni1::"Heat:: the film"::12: "pizza"\ni2::Up::"Mann, ""1995"""\n')
    assert counts(import_generic(spark, lake, two, DAY))["items.csv"] == (2, 2, 0)
    titles = {
        r.item_id: r.title for r in lake.read("bronze.items", partitions={"dataset": "names"}).collect()
    }
    assert titles == {"i1": "Heat:: the film", "i2": "Up"}
    items.write_text('item_id::title::plot\ni1::Heat::"A heist.\nMann"\n')
    with pytest.raises(ValueError, match=r"items.csv: 1 line\(s\) end inside a quoted field, e.g. 'i1::Heat"):
        import_generic(spark, lake, two, DAY)


def test_generic_csv_bytes_that_are_not_its_encoding_are_quarantined(spark, lake, tmp_path):
    """A latin-1 file read as UTF-8 had its bytes replaced with U+FFFD and imported as such; with
    ``encoding`` set it reads right. JSON lines are UTF-8 by definition."""
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp,label\nu1,i1,1,1\n", encoding="utf-8")
    items = tmp_path / "items.csv"
    items.write_bytes("item_id,title\ni1,Café Noir\ni2,Plain\n".encode("latin-1"))
    config = GenericImportConfig(dataset="enc", interactions=str(events), items=str(items))
    assert counts(import_generic(spark, lake, config, DAY))["items.csv"] == (2, 1, 1)
    assert reasons(lake, "enc") == Counter(
        {
            (
                "bronze.items",
                "U+FFFD in the text: bytes that are not UTF-8 (set the input's encoding), or a replacement "
                "character already in the data (repair it upstream)",
            ): 1
        }
    )
    for unsupported in ("latin-1", "UTF-16"):  # UTF-16: Spark's reader splits lines on one byte
        with pytest.raises(ValidationError, match="latin-1 is iso-8859-1"):
            GenericImportConfig(dataset="enc", interactions=str(events), encoding=unsupported)
    latin1 = config.model_copy(update={"encoding": "ISO-8859-1"})
    assert counts(import_generic(spark, lake, latin1, DAY))["items.csv"] == (2, 2, 0)
    assert sorted(r.title for r in lake.read("bronze.items").collect()) == ["Café Noir", "Plain"]
    jsonl = tmp_path / "events.jsonl"  # JSON lines are UTF-8: a latin-1 line is quarantined, not mangled
    jsonl.write_bytes('{"user_id": "Zoë", "item_id": "i1", "timestamp": 1, "label": 1}\n'.encode("latin-1"))
    assert counts(
        import_generic(spark, lake, config.model_copy(update={"interactions": str(jsonl)}), DAY)
    ) == {
        "events.jsonl": (1, 0, 1),
        "items.csv": (2, 1, 1),
    }
    assert ("bronze.interactions", "not valid UTF-8 text: JSON lines must be UTF-8") in reasons(lake, "enc")
    with pytest.raises(ValueError, match="JSON lines are UTF-8"):
        import_generic(
            spark,
            lake,
            GenericImportConfig(dataset="enc", interactions=str(jsonl), encoding="ISO-8859-1"),
            DAY,
        )


def test_generic_ratings_outside_the_declared_range_are_quarantined_with_the_value(spark, lake, tmp_path):
    """``rating_range`` bounds the ratings at import (inclusive): each row outside it is one
    quarantine row naming the value, counted in = imported + quarantined; read from a gzipped CSV
    with millisecond timestamps declared (``timestamp_unit: ms``)."""
    import gzip

    events = tmp_path / "events.csv.gz"
    lines = ["user_id,item_id,timestamp,rating"]
    lines += [f"u{n},i1,{1_700_000_000_000 + n},{r}" for n, r in enumerate(["0.5", "1", "3", "5", "6"])]
    events.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    config = GenericImportConfig(
        dataset="rr", interactions=str(events), rating_range=(1, 5), timestamp_unit="ms"
    )
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.csv.gz": (5, 3, 2)}
    assert reasons(lake, "rr") == Counter(
        {
            ("bronze.interactions", "rating 0.5 outside [1, 5]"): 1,
            ("bronze.interactions", "rating 6 outside [1, 5]"): 1,
        }
    )
    rows = lake.read("bronze.interactions", partitions={"dataset": "rr"}).collect()
    assert sorted((r.user_id, r.rating) for r in rows) == [("u1", 1.0), ("u2", 3.0), ("u3", 5.0)]
    assert {r.event_ts for r in rows} == {  # read as milliseconds, not seconds
        dt.datetime.fromtimestamp(1_700_000_000 + n / 1000, dt.UTC).replace(tzinfo=None) for n in (1, 2, 3)
    }


def test_generic_config_refuses_a_repeated_text_column():
    with pytest.raises(ValueError, match=r"text_columns lists \['title'\] more than once"):
        GenericImportConfig(dataset="d", interactions="i.csv", text_columns=["title", "plot", "title"])


def test_generic_jsonl(spark, lake):
    g = FIXTURES / "generic"
    config = GenericImportConfig(
        dataset="jsonl", interactions=str(g / "interactions.jsonl"), items=str(g / "items.jsonl")
    )
    report = import_generic(spark, lake, config, DAY)
    assert counts(report) == {"interactions.jsonl": (6, 3, 3), "items.jsonl": (3, 2, 1)}  # blank line skipped
    assert reasons(lake, "jsonl") == Counter(
        {
            ("bronze.interactions", "rating 'great' is not a number"): 1,
            ("bronze.interactions", "malformed record (field count, quoting or JSON)"): 1,
            ("bronze.interactions", "missing user_id"): 1,
            ("bronze.items", "missing item_id"): 1,
        }
    )
    events = {r.user_id: r for r in lake.read("bronze.interactions").collect()}
    assert events["2"].extra == '{"device":"mobile"}' and events["2"].action == "purchase"
    assert events["u3"].event_ts == dt.datetime(2023, 11, 14, 22, 20)  # 1700000400000 ms
    items = {r.item_id: r for r in lake.read("bronze.items").collect()}
    assert items["i1"].categories == ["Sci-Fi", "Adventure"] and items["3"].categories == [
        "Documentary",
        "Nature",
    ]
    assert items["i1"].attributes == {"plot": "A crew travels to a distant galaxy.", "year": "1999"}


def test_generic_items_with_both_categories_and_genres_keep_both(spark, lake, tmp_path):
    """Only the first of ``categories`` and ``genres`` was read: the other column's values were lost
    without a word (both are reserved names, so neither became an attribute)."""
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp,label\nu1,i1,1,1\n")
    (tmp_path / "items.csv").write_text(
        "item_id,title,categories,genres\ni1,Heat,Crime|Drama,Drama| Thriller\ni2,Up,,Animation\ni3,Ran,,\n"
    )
    config = GenericImportConfig(
        dataset="both", interactions=str(tmp_path / "events.csv"), items=str(tmp_path / "items.csv")
    )
    assert counts(import_generic(spark, lake, config, DAY))["items.csv"] == (3, 3, 0)
    items = {r.item_id: r for r in lake.read("bronze.items", partitions={"dataset": "both"}).collect()}
    assert {i: r.categories for i, r in items.items()} == {
        "i1": ["Crime", "Drama", "Thriller"],
        "i2": ["Animation"],
        "i3": [],
    }
    assert all(r.attributes == {} for r in items.values())


def test_generic_categories_that_only_look_like_a_json_list_are_split_not_dropped(spark, lake, tmp_path):
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp,label\nu1,i1,1,1\n")
    (tmp_path / "items.csv").write_text(
        'item_id,title,categories\ni1,A,"[""Drama"",""Comedy""]"\ni2,B,[Adult Swim] Cartoons|Kids\n'
        "i3,C,[Documentary]\n"
    )
    config = GenericImportConfig(
        dataset="brackets", interactions=str(tmp_path / "events.csv"), items=str(tmp_path / "items.csv")
    )
    assert counts(import_generic(spark, lake, config, DAY))["items.csv"] == (3, 3, 0)
    items = lake.read("bronze.items", partitions={"dataset": "brackets"}).collect()
    assert {r.item_id: r.categories for r in items} == {
        "i1": ["Drama", "Comedy"],
        "i2": ["[Adult Swim] Cartoons", "Kids"],
        "i3": ["[Documentary]"],
    }


def test_a_reason_quotes_at_most_60_characters_of_a_value_and_raw_keeps_it_whole(spark, lake, tmp_path):
    """Reasons are counted, grouped and sent in alerts: a huge bad value is cut there, not in raw."""
    long = "great " * 2000
    (tmp_path / "events.csv").write_text(f"user_id,item_id,timestamp,rating\nu1,i1,1,{long}\nu2,i1,1,4\n")
    config = GenericImportConfig(dataset="long", interactions=str(tmp_path / "events.csv"))
    assert counts(import_generic(spark, lake, config, DAY))["events.csv"] == (2, 1, 1)
    (row,) = lake.read("bronze.quarantine", partitions={"dataset": "long"}).collect()
    assert row.reason == f"rating '{long[:60]}...' is not a number" and long in row.raw


def test_generic_parquet_with_nulls_in_keys(spark, lake, tmp_path):
    events = pd.DataFrame(
        {
            "user_id": pd.array([1, 2, None, 4], dtype="Int64"),
            "item_id": ["a", "b", "c", None],
            "timestamp": pd.to_datetime(
                ["2024-01-01 10:00", "2024-01-02 00:00", "2024-01-03 00:00", "2024-01-04 00:00"], utc=True
            ),
            "rating": [4.0, float("nan"), 3.0, 5.0],
            "label": pd.array([None, 1, None, None], dtype="Int64"),
        }
    )
    path = tmp_path / "events.parquet"
    events.to_parquet(path)
    report = import_generic(spark, lake, GenericImportConfig(dataset="pq", interactions=str(path)), DAY)
    assert counts(report) == {"events.parquet": (4, 2, 2)}
    assert reasons(lake, "pq") == Counter(
        {("bronze.interactions", "missing user_id"): 1, ("bronze.interactions", "missing item_id"): 1}
    )
    rows = {r.user_id: r for r in lake.read("bronze.interactions").collect()}
    assert rows["1"].event_ts == dt.datetime(2024, 1, 1, 10) and rows["1"].rating == 4.0
    assert rows["2"].rating is None and rows["2"].label == 1  # NaN is no rating


def test_a_quarantined_parquet_record_keeps_its_timestamps_to_the_microsecond(spark, lake, tmp_path):
    """``raw`` is the record as JSON: a typed timestamp, with a time zone or without, keeps its
    microseconds (Spark's JSON keeps milliseconds by default), so the record can be rebuilt exactly."""
    when = pd.Timestamp("2024-01-01 10:00:00.123456")
    events = pd.DataFrame({"user_id": pd.array([None], dtype="Int64"), "item_id": ["a"], "label": [1],
                           "timestamp": [when.tz_localize("UTC")], "seen_at": [when]})  # fmt: skip
    events = events.astype({"timestamp": "datetime64[us, UTC]", "seen_at": "datetime64[us]"})  # not ns
    events.to_parquet(tmp_path / "events.parquet")
    config = GenericImportConfig(dataset="us", interactions=str(tmp_path / "events.parquet"))
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.parquet": (1, 0, 1)}
    (row,) = lake.read("bronze.quarantine", partitions={"dataset": "us"}).collect()
    raw = json.loads(row.raw)
    assert raw["timestamp"] == "2024-01-01T10:00:00.123456Z"
    assert raw["seen_at"].startswith("2024-01-01T10:00:00.123456")


def test_a_boolean_label_is_implicit_feedback(spark, lake, tmp_path):
    """A Parquet (or JSON) boolean column reads as true/false: 1/0, not a quarantined label."""
    events = pd.DataFrame(
        {"user_id": ["u1", "u2", "u3"], "item_id": ["i1"] * 3, "timestamp": [1_700_000_000] * 3}
    ).assign(label=pd.array([True, False, None], dtype="boolean"))
    events.to_parquet(tmp_path / "events.parquet")
    config = GenericImportConfig(dataset="bl", interactions=str(tmp_path / "events.parquet"))
    assert counts(import_generic(spark, lake, config, DAY)) == {"events.parquet": (3, 2, 1)}
    rows = lake.read("bronze.interactions", partitions={"dataset": "bl"}).collect()
    assert {(r.user_id, r.label) for r in rows} == {("u1", 1), ("u2", 0)}
    assert reasons(lake, "bl") == Counter({("bronze.interactions", "neither rating nor label"): 1})


def test_generic_ids_lose_unicode_spaces_and_invisible_characters_at_their_ends(spark, lake, tmp_path):
    """A spreadsheet export's no-break space, a tab, a zero-width space or a byte-order mark around an
    id would make it another id than the clean one; an id of nothing but those is missing, and a NaN
    or infinite float id is missing too (not the id "NaN"). Titles, categories and attributes lose them
    as well, and a category that is another's after trimming is that one."""
    events = pd.DataFrame(
        {
            "user_id": ["u1\u00a0", "\tu1", "\u200bu1\ufeff", "\u00a0\u200b", "u2", "u3"],
            "item_id": [1.0, 1.0, 1.0, 1.0, float("nan"), float("inf")],
            "timestamp": [1.7e9 + k for k in range(6)],
            "rating": [4.0] * 6,
        }
    )
    events.to_parquet(tmp_path / "events.parquet")
    items = pd.DataFrame({"item_id": ["1\u00a0"], "title": ["Film\u00a0"], "genres": ["Drama\u00a0|\tComedy|Drama"],
                          "plot": ["\u200bA plot.\ufeff"], "tagline": ["\u00a0"]})  # fmt: skip
    items.to_parquet(tmp_path / "items.parquet")
    config = GenericImportConfig(
        dataset="uni", interactions=str(tmp_path / "events.parquet"), items=str(tmp_path / "items.parquet")
    )
    assert counts(import_generic(spark, lake, config, DAY)) == {
        "events.parquet": (6, 3, 3),
        "items.parquet": (1, 1, 0),
    }
    (item,) = lake.read("bronze.items", partitions={"dataset": "uni"}).collect()
    assert (item.item_id, item.title, item.categories) == ("1", "Film", ["Drama", "Comedy"])
    assert item.attributes == {"plot": "A plot."}  # an attribute of nothing but spaces is left out
    rows = lake.read("bronze.interactions", partitions={"dataset": "uni"}).collect()
    assert {(r.user_id, r.item_id) for r in rows} == {("u1", "1")}
    assert reasons(lake, "uni") == Counter(
        {("bronze.interactions", "missing user_id"): 1, ("bronze.interactions", "missing item_id"): 2}
    )


def test_generic_float_ids_dotted_columns_and_reordered_csv_headers(spark, lake, tmp_path):
    """pandas stores an integer id column with a gap as float64: 42.0 is still the id 42 (not a
    hash of "42.0"), and 12345678.0 not "1.2345678E7", from Parquet and JSON lines alike. A dotted column name is read literally (into
    ``extra``). A CSV directory whose files order their columns differently is refused, not read
    by position into the wrong columns, and nothing is written."""
    events = pd.DataFrame(
        {
            "user_id": [1.0, 12345678.0, None],
            "item_id": [42.0, 7.0, 8.5],
            "timestamp": [1.7e9, 1.7e9 + 1, 1.7e9 + 2],
            "rating": [4.0, 5.0, 3.0],
            "page.url": ["a", "b", "c"],
        }
    )
    events.to_parquet(tmp_path / "events.parquet")
    events.to_json(tmp_path / "events.jsonl", orient="records", lines=True)  # 42.0 there too
    for dataset, name in (("fl", "events.parquet"), ("fj", "events.jsonl")):
        config = GenericImportConfig(dataset=dataset, interactions=str(tmp_path / name))
        assert counts(import_generic(spark, lake, config, DAY)) == {name: (3, 2, 1)}
        rows = lake.read("bronze.interactions", partitions={"dataset": dataset}).collect()
        assert {(r.user_id, r.item_id, r.extra) for r in rows} == {
            ("1", "42", '{"page.url":"a"}'),
            ("12345678", "7", '{"page.url":"b"}'),
        }
    quoted = tmp_path / "quoted.jsonl"  # a quoted id is text, as written; an exponent is a number
    quoted.write_text('{"user_id": "7.0", "item_id": 4.2e1, "timestamp": 1.7e9, "rating": 4}\n')
    config = GenericImportConfig(dataset="fq", interactions=str(quoted))
    assert counts(import_generic(spark, lake, config, DAY)) == {"quoted.jsonl": (1, 1, 0)}
    (row,) = lake.read("bronze.interactions", partitions={"dataset": "fq"}).collect()
    assert (row.user_id, row.item_id, row.event_ts) == (
        "7.0",
        "42",
        dt.datetime.fromtimestamp(1.7e9, dt.UTC).replace(tzinfo=None),
    )
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_text("user_id,item_id,timestamp,rating\nu1,i1,1700000000,4\n")
    (folder / "b.csv").write_text("item_id,user_id,timestamp,rating\ni2,u2,1700000001,5\n")
    before = lake.history("bronze.interactions")
    with pytest.raises(
        ValueError, match=r"CSV file \S*b\.csv: its header differs .*Expected: user_id but found"
    ):
        import_generic(spark, lake, GenericImportConfig(dataset="cs", interactions=str(folder)), DAY)
    (folder / "b.csv").write_text("user_id,item_id,timestamp,rating,x\nu2,i2,1700000001,5,1\n")
    with pytest.raises(ValueError, match=r"CSV file \S*[ab]\.csv: its header differs .*Number of column"):
        import_generic(spark, lake, GenericImportConfig(dataset="cs", interactions=str(folder)), DAY)
    assert lake.history("bronze.interactions") == before
    indexed = tmp_path / "indexed.csv"  # pandas' to_csv writes its index under an empty header
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [1700000000], "rating": [4]})
    frame.to_csv(indexed)
    report = import_generic(spark, lake, GenericImportConfig(dataset="ix", interactions=str(indexed)), DAY)
    assert counts(report) == {"indexed.csv": (1, 1, 0)}


def test_a_float_reads_as_the_text_a_csv_would_carry_whatever_its_magnitude(spark):
    """Whole floats lose ``.0`` up to 38 digits (exactly: 1e30 is the double's own value), others
    keep Spark's text; NaN and infinities are missing. A magnitude past 2**63 once overflowed
    ``floor`` and failed the whole import."""
    from spark_jobs.importers.generic import _float_text

    values = [42.0, -0.0, -7.0, 42.5, 1e30, 1e40, 1700000000.5, float("nan"), float("inf"), None]
    frame = spark.createDataFrame([(v,) for v in values], "x double")
    assert [r.t for r in frame.select(_float_text(F.col("x")).alias("t")).collect()] == [
        "42",
        "0",
        "-7",
        "42.5",
        "1000000000000000000000000000000",
        "1.0E40",
        "1.7000000005E9",
        None,
        None,
        None,
    ]


def test_every_file_of_a_drop_is_read_with_its_own_columns_or_the_drop_is_refused(spark, lake, tmp_path):
    """Spark reads a directory's own files only (and key=value partitions): a file in another
    subfolder is refused by name, not skipped. A Parquet drop's files may carry different columns
    (Spark's default reads only one file's), or one column in two types (Spark cannot merge them). A CSV drop whose header Spark cannot check per file
    (pandas' empty index name) must still start every file with the same line."""

    def rows_of(dataset: str) -> set[tuple]:
        rows = lake.read("bronze.interactions", partitions={"dataset": dataset}).collect()
        return {(r.user_id, r.rating, r.label, r.action) for r in rows}

    drop = tmp_path / "pq"
    (drop / "_temporary").mkdir(parents=True)  # hidden: Spark skips it, and so does the check
    (drop / "_temporary" / "x.parquet").write_bytes(b"")
    (drop / "posters").mkdir()  # image_root defaults to the input's folder: its images are no records
    (drop / "posters" / "1.jpg").write_bytes(b"not a record")
    base = {"item_id": ["i1"], "timestamp": [1_700_000_000]}
    pd.DataFrame({**base, "user_id": ["u1"], "rating": [4.0]}).to_parquet(drop / "a.parquet")
    pd.DataFrame({**base, "user_id": ["u2"], "label": [1], "action": ["buy"]}).to_parquet(drop / "b.parquet")
    report = import_generic(spark, lake, GenericImportConfig(dataset="mp", interactions=str(drop)), DAY)
    assert counts(report) == {"pq": (2, 2, 0)}
    assert rows_of("mp") == {("u1", 4.0, None, None), ("u2", None, 1, "buy")}

    mixed = tmp_path / "mixed"  # pandas writes an integer id column with a gap as float64
    (mixed / "region=eu").mkdir(parents=True)
    (mixed / "region=us").mkdir()
    pd.DataFrame({"user_id": ["u1"], "item_id": [7], "timestamp": [1_700_000_000], "label": [1]}).to_parquet(
        mixed / "region=eu" / "a.parquet"
    )
    pd.DataFrame(
        {"user_id": ["u2", "u3"], "item_id": [7.0, None], "timestamp": [1_700_000_001] * 2, "label": [1, 1]}
    ).to_parquet(mixed / "region=us" / "b.parquet")
    config = GenericImportConfig(dataset="mt", interactions=str(mixed))
    assert counts(import_generic(spark, lake, config, DAY)) == {"mixed": (3, 2, 1)}
    rows = lake.read("bronze.interactions", partitions={"dataset": "mt"}).collect()
    assert sorted((r.user_id, r.item_id, json.loads(r.extra)["region"]) for r in rows) == [
        ("u1", "7", "eu"),
        ("u2", "7", "us"),
    ]  # one item, with the partition column of each file
    assert reasons(lake, "mt") == Counter({("bronze.interactions", "missing item_id"): 1})

    (drop / "late").mkdir()
    pd.DataFrame({**base, "user_id": ["u3"], "rating": [2.0]}).to_parquet(drop / "late" / "c.parquet")
    before = lake.history("bronze.interactions")
    with pytest.raises(
        ValueError, match=r"1 data file\(s\) in subfolders Spark does not read .*late/c\.parquet"
    ):
        import_generic(spark, lake, GenericImportConfig(dataset="mp", interactions=str(drop)), DAY)
    assert lake.history("bronze.interactions") == before

    folder = tmp_path / "indexed"
    folder.mkdir()
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [1_700_000_000], "rating": [4]})
    frame.to_csv(folder / "a.csv")  # header ",user_id,item_id,timestamp,rating"
    frame.assign(user_id="u2").to_csv(folder / "b.csv")
    report = import_generic(spark, lake, GenericImportConfig(dataset="ic", interactions=str(folder)), DAY)
    assert counts(report) == {"indexed": (2, 2, 0)}
    frame.assign(user_id="u3")[["item_id", "user_id", "timestamp", "rating"]].to_csv(folder / "b.csv")
    with pytest.raises(ValueError, match=r"start with different header lines .*',item_id,user_id,"):
        import_generic(spark, lake, GenericImportConfig(dataset="ic", interactions=str(folder)), DAY)
    frame.assign(user_id="u3").to_csv(folder / "b.csv", header=False)  # its record would be the header
    with pytest.raises(ValueError, match=r"start with different header lines .*'0,u3,i1,"):
        import_generic(spark, lake, GenericImportConfig(dataset="ic", interactions=str(folder)), DAY)
    assert {r[0] for r in rows_of("ic")} == {"u1", "u2"}


def test_timestamps_by_magnitude_and_format(spark):
    from spark_jobs.importers.generic import parse_timestamp

    t = dt.datetime(2023, 11, 14, 22, 13, 20, 123456)
    values = [
        "1700000000.123456",  # seconds (fractional)
        "1700000000123",  # ms
        "1700000000123456",  # us
        "1700000000123456789",  # ns (beyond 2**53: kept exact)
        "2023-11-14T22:13:20.123456Z",
        "2023-11-14 22:13:20",
        "-5",
        "soon",
        None,
    ]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    got = [r.t for r in df.select(parse_timestamp(F.col("v"), "auto").alias("t")).collect()]
    assert got[:5] == [t, t.replace(microsecond=123000), t, t, t]
    assert got[5:] == [t.replace(microsecond=0), None, None, None]
    as_ms = [r.t for r in df.select(parse_timestamp(F.col("v"), "ms").alias("t")).collect()]
    assert as_ms[1] == t.replace(microsecond=123000) and as_ms[2] is None  # out of range for ms


def test_generic_rejects_inputs_without_required_columns(spark, lake, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user,item_id,timestamp,rating\n1,2,3,4\n")
    with pytest.raises(
        ValueError, match=r"no 'user_id' column \(has \['user', 'item_id', 'timestamp', 'rating'\]\)"
    ):
        import_generic(spark, lake, GenericImportConfig(dataset="x", interactions=str(path)), DAY)


def test_an_input_that_names_no_column_is_empty_or_its_lines_are_quarantined(spark, lake, tmp_path):
    """A day's drop with no records (an empty JSON-lines or CSV file) imports none, as a CSV with only
    its header does; one whose every line is unreadable has no column names to read either, and its
    lines are quarantined as malformed (not refused for a missing ``user_id`` column)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "items.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('["u1", "i1", 1, 1]\nnot json\n{"user_id": "u2", "item_id"\n')
    for name, rows in (("empty.jsonl", 0), ("empty.csv", 0), ("broken.jsonl", 3)):
        config = GenericImportConfig(
            dataset="none",
            interactions=str(tmp_path / name),
            items=str(tmp_path / "items.jsonl") if name == "empty.jsonl" else None,
        )
        report = import_generic(spark, lake, config, DAY)
        expected = {name: (rows, 0, rows)} | ({"items.jsonl": (0, 0, 0)} if name == "empty.jsonl" else {})
        assert counts(report) == expected
        assert lake.read("bronze.interactions", partitions={"dataset": "none"}).count() == 0
        quarantined = lake.read("bronze.quarantine", partitions={"dataset": "none"}).collect()
        assert sorted(r.raw for r in quarantined) == (
            sorted(["not json", '["u1", "i1", 1, 1]', '{"user_id": "u2", "item_id"']) if rows else []
        )
        assert {r.reason for r in quarantined} <= {"malformed record (field count, quoting or JSON)"}


def test_records_of_one_event_conflict_only_in_their_feedback(spark, lake, tmp_path):
    """One review listed under two variants (``asin``) with its helpful votes at two crawls is one event
    recorded twice: a repeated record, the first in the file kept. Another rating is a conflict, and a
    conflict of a later record is never kept over the first (by raw text, the lower rating would be)."""
    review = {"rating": 5.0, "title": "t", "text": "x", "asin": "A1", "parent_asin": "P1", "user_id": "U1",
              "timestamp": 1588687728923, "helpful_vote": 2, "verified_purchase": True}  # fmt: skip
    rows = [
        review,
        {**review, "asin": "A2", "helpful_vote": 3},
        {**review, "rating": 3.0},
        {**review, "user_id": "U2"},
    ]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = import_amazon(spark, lake, AmazonImportConfig(reviews=str(path), dataset="amazon-dup"), DAY)
    assert counts(report) == {"reviews.jsonl": (4, 2, 2)}
    flagged = sorted(reason for _, reason in reasons(lake, "amazon-dup").elements())
    assert [r.startswith("duplicate event (user, item, time) U1, P1, ") for r in flagged] == [True, True]
    assert [r.endswith(" with other values") for r in flagged] == [False, True]
    kept = lake.read("bronze.interactions", partitions={"dataset": "amazon-dup"}).filter("user_id = 'U1'")
    assert [(r.rating, '"asin":"A1"' in r.extra) for r in kept.collect()] == [(5.0, True)]


# ---------------------------------------------------------------------------------------------
# silver rules
# ---------------------------------------------------------------------------------------------


def bronze_events(spark, rows, day=DAY):
    """rows: (user, item, second, rating, label)."""
    data = [
        ("ds", day, u, i, r, lab, "rating", dt.datetime(2024, 1, 1, 0, 0, s), None, "f")
        for u, i, s, r, lab in rows
    ]
    return spark.createDataFrame(data, get_table("bronze.interactions").schema)


def test_silver_labels_duplicates_and_backfill(spark, lake):
    day2 = dt.date(2024, 1, 2)
    rows = [
        ("u1", "1", 0, 4.0, None),
        ("u1", "1", 0, 2.0, None),
        ("u1", "2", 1, 3.0, None),
        ("u2", "1", 2, None, None),
        ("u2", "2", 3, float("nan"), None),  # no rating: NaN is not above the threshold
    ]
    clean = clean_interactions(bronze_events(spark, rows), SilverConfig()).collect()
    assert Counter((r._reason or "").split(" ds,")[0] for r in clean) == Counter(
        {"": 2, "duplicate event (user, item, time)": 1, "neither rating nor label": 2}
    )
    # rating > 3 is positive; of two identical events the first by raw text (rating 2.0) is kept
    assert {(r.item_id, r.rating, r.label) for r in clean if r._reason is None} == {(1, 2.0, 0), (2, 3.0, 0)}
    # merge semantics: a newer run wins, a backfill of an older date does not overwrite it
    lake.write(bronze_events(spark, [("u1", "1", 0, 2.0, None)]), "bronze.interactions",
               mode="replace_partition", partition_values={"dataset": "ds", "logical_date": DAY})  # fmt: skip
    lake.write(bronze_events(spark, [("u1", "1", 0, 5.0, None)], day2), "bronze.interactions",
               mode="replace_partition", partition_values={"dataset": "ds", "logical_date": day2})  # fmt: skip
    promote_to_silver(lake, "ds", day2)
    report = promote_to_silver(lake, "ds", DAY)  # backfill of an older date after a newer one
    assert report.imported("silver.interactions") == 1  # offered, but day2 holds the row:
    assert report.written["silver.interactions"] == 0  # not written
    (row,) = lake.read("silver.interactions").collect()
    assert (row.rating, row.label, row.logical_date) == (5.0, 1, day2)


def test_silver_refuses_a_date_whose_import_stopped_before_it_finished(spark, lake, tmp_path, monkeypatch):
    """An import writes bronze.interactions, .items and .users, then bronze.quarantine last. A run that
    died after the interactions left the date's items an earlier run's: promoting that date apart
    (the spark-submit ``promote_silver``) would merge the new interactions with the old catalogue, so
    it is refused by name until the import is rerun. A rerun with an input left out writes that
    table empty: one finished import again; another importer that writes no users leaves a finished
    run's. (Bronze written without an import record, as other tests here do, is not checked.)"""
    events, items = tmp_path / "events.csv", tmp_path / "items.csv"
    events.write_text("user_id,item_id,timestamp,label\nu1,i1,1,1\n")
    items.write_text("item_id,title\ni1,One\n")
    config = GenericImportConfig(dataset="crash", interactions=str(events), items=str(items))
    import_generic(spark, lake, config, DAY)
    assert promote_to_silver(lake, "crash", DAY).imported("silver.interactions") == 1
    events.write_text("user_id,item_id,timestamp,label\nu1,i1,1,1\nu1,i2,2,1\n")
    items.write_text("item_id,title\ni1,One\ni2,Two\n")
    write = Lake.write

    def dies_at_the_items(self, df, table, **kwargs):
        if getattr(table, "name", table) == "bronze.items":
            raise RuntimeError("executor lost")
        return write(self, df, table, **kwargs)

    monkeypatch.setattr(Lake, "write", dies_at_the_items)
    with pytest.raises(RuntimeError, match="executor lost"):
        import_generic(spark, lake, config, DAY)
    monkeypatch.undo()
    silver = lake.history("silver.interactions")
    with pytest.raises(
        ValueError,
        match=rf"bronze.interactions of 'crash' at {DAY} was written by import \w+, which never wrote "
        r"bronze.quarantine .*; rerun the import",
    ):
        promote_to_silver(lake, "crash", DAY)
    assert lake.history("silver.interactions") == silver
    import_generic(spark, lake, config, DAY)
    assert promote_to_silver(lake, "crash", DAY).imported("silver.interactions") == 2
    import_generic(spark, lake, config.model_copy(update={"items": None}), DAY)
    assert promote_to_silver(lake, "crash", DAY).imported("silver.interactions") == 2
    # another importer for the date, which writes no users: the users are still a finished run's
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"user_id": "U1", "parent_asin": "P1", "rating": 5.0, "timestamp": 1588687728923}\n')
    import_amazon(spark, lake, AmazonImportConfig(reviews=str(reviews), dataset="crash"), DAY)
    assert promote_to_silver(lake, "crash", DAY).imported("silver.interactions") == 1


class _Log:
    """The commit logs :func:`unfinished_import` reads (``Lake.history``'s shape, newest first),
    written by hand: a log whose old commits have left it cannot be made on a fresh table."""

    def __init__(self, logs: dict[str, list[tuple[str | None, int]]]) -> None:
        at = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
        self.logs = {
            table: [
                {
                    "version": version,
                    "timestamp": at + dt.timedelta(seconds=second),
                    "metadata": self.record(run),
                }
                for version, (run, second) in reversed(list(enumerate(sorted(commits, key=lambda c: c[1]))))
            ]
            for table, commits in logs.items()
        }
        self.reads: list[str] = []

    @staticmethod
    def record(run: str | None) -> dict[str, str]:
        return {} if run is None else {"job": "import", "dataset": "ds", "logical_date": DAY.isoformat(),
                                       "import_id": run}  # fmt: skip

    def history(self, table: str, limit: int | None = None) -> list[dict]:
        self.reads.append(table)
        return self.logs.get(table, [])[:limit]


def test_an_import_is_unfinished_when_its_run_never_wrote_the_quarantine_still_in_the_log():
    """Each table's newest import of the date must have written ``bronze.quarantine``, its last
    commit; one search of the quarantine's log answers for every table (and none when every run
    is found on its first page). A run older than the quarantine's oldest commit still in the log
    cannot be checked: it passes."""
    from spark_jobs.importers.common import unfinished_import

    tables = ["bronze.interactions", "bronze.items"]
    finished = _Log({"bronze.interactions": [("a", 1), ("b", 5)], "bronze.items": [("b", 6)],
                     "bronze.quarantine": [("a", 2), ("b", 7)] + [(None, 10 + k) for k in range(5)]})  # fmt: skip
    assert unfinished_import(finished, "ds", DAY, tables) is None
    assert finished.reads.count("bronze.quarantine") == 1
    stopped = _Log({"bronze.interactions": [("a", 1), ("b", 5)], "bronze.items": [("a", 2)],
                    "bronze.quarantine": [("a", 3)]})  # fmt: skip
    why = unfinished_import(stopped, "ds", DAY, tables)
    assert why is not None and why.startswith(
        "bronze.interactions of 'ds' at 2024-01-01 was written by import b"
    )
    assert stopped.reads.count("bronze.quarantine") == 1  # read whole once: b is not in it
    assert unfinished_import(_Log({"bronze.items": [("c", 4)]}), "ds", DAY, tables).startswith("bronze.items")
    aged = _Log(
        {"bronze.interactions": [("b", 5)], "bronze.quarantine": [(None, 6)]}
    )  # b's commit left the log
    assert unfinished_import(aged, "ds", DAY, tables) is None
    other_date = _Log({"bronze.interactions": [(None, 5)], "bronze.quarantine": []})
    assert unfinished_import(other_date, "ds", DAY, tables) is None and other_date.reads == tables


def test_silver_rerun_retracts_what_the_corrected_date_no_longer_contains(spark, lake):
    day2 = dt.date(2024, 1, 2)

    def run(day, rows):
        lake.write(bronze_events(spark, rows, day), "bronze.interactions", mode="replace_partition",
                   partition_values={"dataset": "ds", "logical_date": day})  # fmt: skip
        return promote_to_silver(lake, "ds", day)

    def events():
        return sorted((r.user_key, r.item_key, r.event_ts.second, r.logical_date)
                      for r in lake.read("silver.interactions").collect())  # fmt: skip

    run(DAY, [("u1", "1", 0, 4.0, None), ("u1", "2", 5, 3.0, None), ("u2", "1", 1, 5.0, None)])
    run(day2, [("u2", "1", 1, 5.0, None), ("u3", "3", 2, 2.0, None)])  # u2's event imported again
    # DAY is corrected: u1's second event had the wrong time (5 s, really 7 s), u2's is gone
    report = run(DAY, [("u1", "1", 0, 4.0, None), ("u1", "2", 7, 3.0, None)])
    assert report.retracted == {"silver.interactions": 1, "silver.items": 0, "silver.users": 0}
    assert report.written["silver.interactions"] == 2  # u1's first event updated, its second inserted
    assert events() == [
        ("u1", "1", 0, DAY),
        ("u1", "2", 7, DAY),  # the corrected event only, not both times
        ("u2", "1", 1, day2),  # day2 still has it: kept
        ("u3", "3", 2, day2),
    ]
    corrected = events()
    again = run(DAY, [("u1", "1", 0, 4.0, None), ("u1", "2", 7, 3.0, None)])
    assert again.retracted["silver.interactions"] == 0 and events() == corrected  # a no-op rerun


# ---------------------------------------------------------------------------------------------
# synthetic generator (no Spark)
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_has_planted_structure(tmp_path):
    config = SyntheticConfig(num_events=5_000, chunk_rows=2_000, image_size=4)
    a = generate(config, tmp_path / "a")
    b = generate(config, tmp_path / "b")
    other = generate(config.model_copy(update={"seed": 1}), tmp_path / "c")
    assert sorted(p.name for p in a.interactions.iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    ta, tb = pq.read_table(a.interactions), pq.read_table(b.interactions)
    assert ta.num_rows == 5_000 and ta.equals(tb)
    assert pq.read_table(a.items).equals(pq.read_table(b.items))
    assert not ta.equals(pq.read_table(other.interactions))
    ts = ta.column("timestamp").to_numpy()
    assert (np.diff(ts) >= 0).all()  # increasing through the files
    user_c = pq.read_table(tmp_path / "a/truth/user_clusters.parquet").column("cluster").to_numpy()
    item_c = pq.read_table(tmp_path / "a/truth/item_clusters.parquet").column("cluster").to_numpy()
    users, items = ta.column("user_id").to_numpy(), ta.column("item_id").to_numpy()
    ratings = ta.column("rating").to_numpy()
    same = user_c[users] == item_c[items]
    assert 0.75 < same.mean() < 0.9  # p_in_cluster 0.8 plus chance hits
    assert ratings[same].mean() > ratings[~same].mean() + 1.0  # affinity drives ratings
    assert (np.diag(affinity_matrix(config)) == 1).all()
    catalogue = pq.read_table(a.items).to_pandas()
    from spark_jobs.importers.synthetic import _vocabulary

    own_words = [
        sum(w.strip(".").lower() in _vocabulary(c) for w in d.split()) / len(d.split())
        for d, c in zip(catalogue["description"], item_c, strict=True)
    ]
    assert np.mean(own_words) > 0.6  # item text reflects the cluster
    assert (tmp_path / "a/images/0.png").stat().st_size > 0 and catalogue["image_path"][0] == "images/0.png"


def test_a_repeated_record_and_a_conflicting_one_are_told_apart(spark):
    """The first row of a key is kept; a later one with the same values (spaces at the ends, a map's
    key order aside) is a repeated record, one with other values a conflict, said in its reason."""
    from spark_jobs.importers.common import LINE, OTHER_VALUES, RAW, REASON, flag_duplicates

    rows = (
        spark.createDataFrame(
            [
                ("i1", "Film", {"a": "1", "b": "2"}, 0, "r0"),
                ("i1", " Film\u00a0", {"b": "2", "a": "1"}, 1, "r1"),  # the same record again
                ("i1", "Other", {"a": "1", "b": "2"}, 2, "r2"),  # the same id, another title
                ("i2", "Solo", None, 3, "r3"),
            ],
            f"item_id string, title string, attributes map<string,string>, {LINE} long, {RAW} string",
        )
        .withColumn(REASON, F.lit(None).cast("string"))
        .withColumn("source_file", F.lit("f"))
    )
    got = {r[LINE]: r[REASON] for r in flag_duplicates(rows, ["item_id"], "item_id").collect()}
    assert got == {0: None, 1: "duplicate item_id i1", 2: f"duplicate item_id i1{OTHER_VALUES}", 3: None}

"""Content job: item documents and user profile features, as transforms and as an idempotent job."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from spark_jobs.content import ContentConfig, age_bucket, build_content, item_documents, user_profiles
from spark_jobs.lake import Lake
from spark_jobs.tables import get_table

DAY = dt.date(2024, 1, 1)


def silver_items(spark, rows):
    """rows: (item_id, title, categories, attributes, image_path)."""
    data = [("ds", i, str(i), t, c, a, p, None, DAY) for i, t, c, a, p in rows]
    return spark.createDataFrame(data, get_table("silver.items").schema)


def silver_users(spark, rows):
    return spark.createDataFrame(
        [("ds", u, str(u), a, DAY) for u, a in rows], get_table("silver.users").schema
    )


ITEMS = [
    (
        1,
        "Toy Robots (1995)",
        ["Animation", "Comedy"],
        {
            "plot": "Robots learn to love.",
            "zeta": "last",
            "director": "Ann",
            "video_release_date": "x",
            "rated": " ",
        },
        "/p/1.jpg",
    ),
    (2, None, [], {}, None),
    (3, "Only A Title", None, None, None),
]


def test_item_documents_order_labels_and_hash(spark):
    docs = {r.item_id: r for r in item_documents(silver_items(spark, ITEMS), ContentConfig()).collect()}
    # title, categories, then field_order (director before plot), then the rest alphabetically;
    # excluded (video_release_date) and blank (rated) fields dropped
    assert docs[1].document == (
        "Title: Toy Robots (1995)\nGenres: Animation, Comedy\nDirector: Ann\nPlot: Robots learn to love.\nZeta: last"
    )
    assert docs[1].num_text_fields == 5 and docs[1].image_path == "/p/1.jpg"
    assert docs[1].document_hash == hashlib.sha256(docs[1].document.encode()).hexdigest()
    assert (docs[2].document, docs[2].num_text_fields) == ("", 0)  # no text at all: empty, counted
    assert docs[3].document == "Title: Only A Title"
    custom = ContentConfig(field_order=["zeta"], exclude_fields=["plot"], max_field_chars=16)
    doc = item_documents(silver_items(spark, ITEMS[:1]), custom).first().document
    assert doc.splitlines()[2:] == ["Zeta: last", "Director: Ann", "Video release date: x"]
    assert doc != docs[1].document  # a config change changes the hash, so embeddings are redone
    long = silver_items(spark, [(4, "T", [], {"tagline": "0123456789" * 4}, None)])
    assert item_documents(long, custom).first().document == "Title: T\nTagline: 0123456789012345"
    # a field named in another case is the same field; blank genres and line breaks go
    odd = [(5, " Heat\n(1995) ", ["Action", " ", "", " Crime"], {"Genre": "Thriller", "Plot": "A heist.\n\nDirector: Nobody", "Director": "Mann"}, None)]  # fmt: skip
    assert item_documents(silver_items(spark, odd), ContentConfig()).first().document == (
        "Title: Heat (1995)\nGenres: Action, Crime\nGenre: Thriller\nDirector: Mann\nPlot: A heist. Director: Nobody"
    )


def test_age_buckets_and_profile_tokens(spark):
    users = silver_users(
        spark,
        [
            (1, {"age": "17", "gender": "M", "occupation": "Student", "zip_code": "55455"}),
            (2, {"age": "18", "gender": "F", "occupation": "other"}),
            (3, {"age": "56", "zip_code": ""}),
            (4, {"age": "unknown", "hobby": "chess"}),
            (5, None),
            (6, {"age": "30", "age_bucket": "adult", "zip_region": "x"}),  # the source's own keys
            (7, {"age_bucket": "adult"}),
            (8, {"age": "NaN"}),
            (9, {"age": "Infinity"}),
            (10, {"age": "1e9"}),
            (11, {"age": "-3"}),
        ],
    )
    got = {r.user_id: r for r in user_profiles(users, ContentConfig()).collect()}
    assert [got[u].age_bucket for u in (1, 2, 3, 4, 5)] == ["<18", "18-24", "56+", None, None]
    assert [got[u].age_bucket for u in (8, 9, 10, 11)] == [None] * 4  # not ages: no bucket
    assert got[6].profile_tokens == ["age_bucket=25-34", "zip_region=x"]  # derived wins where derived
    assert (got[6].age_bucket, got[7].age_bucket, got[7].profile_tokens) == (
        "25-34",
        "adult",
        ["age_bucket=adult"],
    )
    assert got[1].profile_tokens == ["age_bucket=<18", "gender=m", "occupation=student", "zip_region=5"]
    assert (got[1].gender, got[1].occupation) == ("m", "student")
    assert got[4].profile_tokens == ["hobby=chess"] and got[5].profile_tokens == []
    ages = spark.createDataFrame([(str(a),) for a in (0, 24, 25, 34, 35, 44, 45, 49, 50, 55)], "age string")
    buckets = [r.b for r in ages.select(age_bucket(ages.age, [18, 25, 35, 45, 50, 56]).alias("b")).collect()]
    assert buckets == ["<18", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55", "50-55"]
    with pytest.raises(ValueError, match="increasing"):
        ContentConfig(age_buckets=[18, 18])


def test_build_content_is_idempotent(spark, tmp_path):
    lake = Lake(spark, tmp_path / "lake")
    lake.write(silver_items(spark, ITEMS), "silver.items", mode="merge")
    lake.write(silver_users(spark, [(1, {"age": "30"}), (2, {"gender": "F"})]), "silver.users", mode="merge")
    first = build_content(lake, "ds")
    assert (first.items, first.users, first.items_without_text) == (3, 2, 1)

    def rows(table):
        return sorted(repr(tuple(r)) for r in lake.read(table).collect())

    docs, profiles = rows("gold.item_documents"), rows("gold.user_profiles")
    second = build_content(lake, "ds")
    assert second.versions["gold.item_documents"] == first.versions["gold.item_documents"] + 1
    assert rows("gold.item_documents") == docs and rows("gold.user_profiles") == profiles
    assert len(profiles) == 2

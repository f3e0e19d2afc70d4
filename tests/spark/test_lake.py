"""Lake: declared schemas enforced, idempotent partition replace and merge, versions and time travel."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.lake import Lake, LakeConfig, SchemaDriftError, history_pages, resolve_root
from spark_jobs.tables import TABLES, get_table, stable_id

D1 = dt.date(2024, 1, 1)
D2 = dt.date(2024, 1, 2)
D3 = dt.date(2024, 1, 3)


def users(spark, dataset: str, day: dt.date, ids: list[str], age: str = "30"):
    rows = [(dataset, day, uid, {"age": age, "gender": "F"}, "u.user") for uid in ids]
    return spark.createDataFrame(rows, get_table("bronze.users").schema)


def interactions(spark, rows):
    """rows: (user_id, item_id, second, rating, label)."""
    spec = get_table("silver.interactions")
    data = [
        ("ds", u, i, dt.datetime(2024, 1, 1, 0, 0, s, tzinfo=dt.UTC), str(u), str(i), r, lab, None, D1)
        for u, i, s, r, lab in rows
    ]
    return spark.createDataFrame(data, spec.schema)


def contents(df) -> list[tuple]:
    return sorted(tuple(r) for r in df.collect())


@pytest.fixture
def lake(spark, tmp_path) -> Lake:
    return Lake(spark, tmp_path / "lake")


def test_backend_and_paths(spark, lake, tmp_path, monkeypatch):
    assert lake.backend == "delta-rs"  # no delta-spark jars here
    assert lake.path("silver.items") == f"{(tmp_path / 'lake').resolve()}/silver/items"
    monkeypatch.setenv("HISAM_LAKE_ROOT", str(tmp_path / "env-root"))
    assert resolve_root() == str((tmp_path / "env-root").resolve())
    assert Lake.from_config(spark, LakeConfig()).root == str((tmp_path / "env-root").resolve())
    assert resolve_root("s3://bucket/lake/") == "s3://bucket/lake"
    monkeypatch.delenv("HISAM_LAKE_ROOT")
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))  # the entry points find the steps' lake
    assert resolve_root() == str((tmp_path / "home" / "lake").resolve())
    with pytest.raises(ValueError, match="delta-spark"):
        Lake(spark, tmp_path, backend="spark")
    with pytest.raises(ValueError, match=r"unknown lake table 'silver\.nope'"):
        lake.path("silver.nope")


def test_every_declared_table_creates_as_declared(spark, lake):
    """Every declaration is a valid Delta table: created with the declared schema and partitions,
    which read back as declared (no column seen as retyped)."""
    from deltalake import DeltaTable

    from spark_jobs.lake import _arrow_schema

    for name, spec in TABLES.items():
        assert lake.version(name) is None and lake.history(name) == []
        assert lake.read(name).schema.fieldNames() == spec.columns
        lake._impl.ensure(spec, lake.path(name))
        table = DeltaTable(lake.path(name))
        assert table.metadata().partition_columns == list(spec.partition_by), name
        stored = pa.schema(table.schema().to_arrow())
        declared = _arrow_schema(spec)
        assert [(f.name, str(f.type), f.nullable) for f in stored] == [
            (f.name, str(f.type), f.nullable) for f in declared
        ], name
        assert spec.added_since(lake._impl.schema(lake.path(name))) == []  # types read back as declared
        assert lake.version(name) == 0


def test_native_delta_tables_declare_no_not_null_inside_arrays_or_maps() -> None:
    """Delta on Spark refuses NOT NULL nested in arrays and maps (DELTA_NESTED_NOT_NULL_CONSTRAINT):
    the schema it creates relaxes exactly those, keeps every column's and struct field's NOT NULL,
    and holds the same column types as the declaration."""
    from spark_jobs.lake import delta_spark_schema
    from spark_jobs.tables import type_name

    def nested_not_null(dtype: T.DataType) -> bool:
        if isinstance(dtype, T.StructType):
            return any(nested_not_null(f.dataType) for f in dtype)
        if isinstance(dtype, T.ArrayType):
            return not dtype.containsNull or nested_not_null(dtype.elementType)
        if isinstance(dtype, T.MapType):
            return not dtype.valueContainsNull or nested_not_null(dtype.valueType)
        return False

    assert any(nested_not_null(spec.schema) for spec in TABLES.values())  # or the check is vacuous
    for spec in TABLES.values():
        native = delta_spark_schema(spec.schema)
        assert not nested_not_null(native), spec.name
        assert [(f.name, type_name(f.dataType), f.nullable) for f in native] == [
            (f.name, type_name(f.dataType), f.nullable) for f in spec.schema
        ], spec.name
    nested = T.StructType(
        [T.StructField("s", T.StructType([T.StructField("x", T.LongType(), False)]), False)]
    )
    assert delta_spark_schema(nested) == nested  # struct fields keep NOT NULL


def test_replace_partition_is_idempotent_and_time_travels(spark, lake):
    v1 = lake.write(
        users(spark, "ds", D1, ["1", "2", "3"]),
        "bronze.users",
        mode="replace_partition",
        partition_values={"dataset": "ds", "logical_date": D1},
    )
    v2 = lake.write(
        users(spark, "ds", D2, ["4"]),
        "bronze.users",
        mode="replace_partition",
        partition_values={"dataset": "ds", "logical_date": D2},
    )
    before = contents(lake.read("bronze.users"))
    # rerun of D1 with the same input: same contents and counts, a new version
    v3 = lake.write(
        users(spark, "ds", D1, ["1", "2", "3"]),
        "bronze.users",
        mode="replace_partition",
        partition_values={"dataset": "ds", "logical_date": D1},
    )
    assert (v1, v2, v3) == (1, 2, 3) and lake.version("bronze.users") == 3
    assert contents(lake.read("bronze.users")) == before and len(before) == 4
    # rerun of D1 with other input replaces only D1
    v4 = lake.write(
        users(spark, "ds", D1, ["1", "5"], age="40"),
        "bronze.users",
        mode="replace_partition",
        partition_values={"dataset": "ds", "logical_date": D1},
    )
    now = lake.read("bronze.users")
    assert sorted(r.user_id for r in now.collect()) == ["1", "4", "5"]
    # time travel: every returned version reads back as it was
    assert contents(lake.read("bronze.users", version=v3)) == before
    assert contents(lake.read("bronze.users", version=v1)) == contents(
        users(spark, "ds", D1, ["1", "2", "3"])
    )
    assert lake.read("bronze.users", version=0).count() == 0
    history = lake.history("bronze.users")
    assert [h["version"] for h in history] == [v4, v3, v2, v1, 0]
    assert history[0]["operation"] == "WRITE" and "logical_date" in history[0]["parameters"]["predicate"]
    with pytest.raises(ValueError, match=r"versions 0\.\.4, not 9"):
        lake.read("bronze.users", version=9)


def test_a_write_returns_its_own_commit_and_records_its_metadata(spark, lake):
    """Two writers commit concurrently, each to its own partition (delta-rs retries on conflict):
    each write's returned version is the commit carrying its own metadata, never the other writer's
    later one."""
    from concurrent.futures import ThreadPoolExecutor

    def write(writer: str, n: int) -> tuple[str, int]:
        day = D1 if writer == "a" else D2
        frame = users(spark, "ds", day, [f"{writer}{n}"])
        version = lake.write(
            frame,
            "bronze.users",
            mode="replace_partition",
            partition_values={"dataset": "ds", "logical_date": day},
            metadata={"writer": writer, "n": n},
        )
        return f"{writer}{n}", version

    lake.write(users(spark, "ds", D1, []), "bronze.users", mode="append")  # create the table first
    with ThreadPoolExecutor(2) as pool:  # one thread per writer: a writer's own writes never overlap
        runs = [pool.submit(lambda w=w: [write(w, n) for n in range(4)]) for w in "ab"]
        returned = dict(pair for run in runs for pair in run.result())
    by_version = {h["version"]: h["metadata"] for h in lake.history("bronze.users")}
    assert len(set(returned.values())) == 8
    for key, version in returned.items():
        assert by_version[version]["writer"] + by_version[version]["n"] == key


def test_a_write_finds_its_commit_when_another_lands_while_it_reads_the_log(spark, lake, monkeypatch):
    """Another writer commits between the write's look at the latest version and its read of the
    newest commits: its own commit, one older than the window it first read, is still returned."""
    from deltalake import DeltaTable, write_deltalake

    lake.write(users(spark, "ds", D1, ["1"]), "bronze.users", mode="append")
    history, raced = lake._impl.history, []

    def racing(path: str, limit: int | None) -> list:
        if not raced:
            raced.append(True)
            write_deltalake(path, DeltaTable(path).to_pyarrow_table().slice(0, 0), mode="append")
        return history(path, limit)

    monkeypatch.setattr(lake._impl, "history", racing)
    version = lake.write(
        users(spark, "ds", D2, ["2"]), "bronze.users", mode="append", metadata={"writer": "me"}
    )
    by_version = {h["version"]: h["metadata"] for h in lake.history("bronze.users")}
    assert raced and max(by_version) == version + 1  # the other commit came after it
    assert by_version[version].get("writer") == "me"


def test_a_write_derived_from_an_older_version_is_refused_only_when_its_rows_changed(spark, lake):
    """``read_version``: a later commit to the same partition refuses the write (its rows would
    overwrite newer ones); a later commit to another partition does not conflict."""
    from spark_jobs.lake import ConcurrentWriteError

    def write(day, ids, read_version=None):
        part = {"dataset": "ds", "logical_date": day}
        frame = users(spark, "ds", day, ids)
        return lake.write(
            frame, "bronze.users", mode="replace_partition", partition_values=part, read_version=read_version
        )

    read = write(D1, ["1"])
    write(D1, ["2"])  # a newer build of the same partition
    with pytest.raises(
        ConcurrentWriteError, match=f"after version {read}, which this write was derived from"
    ):
        write(D1, ["1"], read_version=read)
    assert [r.user_id for r in lake.read("bronze.users").collect()] == ["2"]  # the newer rows stay
    read = lake.version("bronze.users")
    write(D2, ["9"])  # another partition only
    assert write(D1, ["3"], read_version=read) == read + 2
    assert sorted(r.user_id for r in lake.read("bronze.users").collect()) == ["3", "9"]
    with pytest.raises(ValueError, match="read_version needs mode 'replace_partition' or 'merge'"):
        lake.write(users(spark, "ds", D1, ["4"]), "bronze.users", mode="append", read_version=read)


def test_commit_metadata_reads_back_from_either_engines_field(tmp_path):
    """delta-rs keeps custom metadata as commit-info keys, Spark as the ``userMetadata`` JSON;
    the lake writes both and reads either."""
    from deltalake import CommitProperties, write_deltalake

    from spark_jobs.lake import delta_history

    path = str(tmp_path / "t")
    table = pa.table({"a": [1]})
    write_deltalake(path, table, commit_properties=CommitProperties(custom_metadata={"hisam.step": "x"}))
    spark_style = {"userMetadata": '{"hisam.step": "y", "hisam.write_id": "w"}'}
    write_deltalake(
        path, table, mode="append", commit_properties=CommitProperties(custom_metadata=spark_style)
    )
    assert [h["metadata"] for h in delta_history(path)] == [{"step": "y", "write_id": "w"}, {"step": "x"}]


def test_both_backends_give_a_commits_time_in_utc_whatever_the_drivers_time_zone(spark, lake, monkeypatch):
    """The native backend reads Delta's history as Spark rows, whose timestamps PySpark gives as naive
    datetimes in the driver's local zone; delta-rs's are UTC. Its table (which needs the delta-spark
    jars) is stood in for by the same log as a Spark frame of Delta's history columns."""
    import time

    from spark_jobs.lake import _SparkDelta

    for day in (D1, D2):
        lake.write(users(spark, "ds", day, ["1"]), "bronze.users", mode="replace_partition",
                   partition_values={"dataset": "ds", "logical_date": day})  # fmt: skip
    expected = lake.history("bronze.users")
    log = spark.createDataFrame(
        [
            (e["version"], e["timestamp"], e["operation"], {}, {}, json.dumps({"hisam.step": "x"}))
            for e in expected
        ],
        "version long, timestamp timestamp, operation string, operationParameters map<string,string>, "
        "operationMetrics map<string,string>, userMetadata string",
    )

    class Table:
        def history(self, limit=None):
            return log.limit(limit) if limit else log

    native = _SparkDelta(spark)
    monkeypatch.setattr(native, "_table", lambda path: Table())
    try:
        with monkeypatch.context() as zone:
            zone.setenv("TZ", "America/Los_Angeles")  # the driver's zone, not the session's (UTC)
            time.tzset()
            got = native.history(lake.path("bronze.users"), None)
    finally:
        time.tzset()
    assert [e["timestamp"] for e in got] == [e["timestamp"] for e in expected]
    assert all(e["timestamp"].tzinfo is not None for e in got) and len(got) == len(expected) == 3
    assert [e["metadata"] for e in got] == [{"step": "x"}] * 3


def test_history_pages_yield_every_commit_once_newest_first_while_others_commit():
    log = [{"version": v} for v in range(2500)]  # grows as pages are read
    reads: list[int | None] = []

    def history(limit: int | None) -> list[dict]:
        reads.append(limit)
        newest_first = log[::-1]
        log.extend({"version": len(log) + i} for i in range(3))  # three commits land after each read
        return newest_first[:limit] if limit is not None else newest_first

    pages = list(history_pages(history, first=20))
    assert reads == [20, 200, 2000, 20_000]  # the last read is short: the whole history
    seen = [e["version"] for page in pages for e in page]
    assert seen == list(range(2499, -1, -1))  # each commit of the first read's log once, newest first
    assert [len(p) for p in pages] == [20, 177, 1797, 506]  # a page starts below the last one yielded

    reads.clear()
    assert [len(p) for p in history_pages(history, first=None)] == [len(log) - 3] and reads == [None]


def test_partition_reads_take_lists_and_text_as_the_sql_predicate_does(spark, lake):
    """``partitions`` values as :func:`partition_predicate` takes them (a list is ``IN``; text is cast
    to the column's type, ``'2024-01-02'`` to a date) read the same rows on every backend."""
    for day, ids in ((D1, ["1", "2"]), (D2, ["3"]), (D3, ["4"])):
        part = {"dataset": "ds", "logical_date": day}
        lake.write(
            users(spark, "ds", day, ids), "bronze.users", mode="replace_partition", partition_values=part
        )

    def ids(partitions):
        return sorted(r.user_id for r in lake.read("bronze.users", partitions=partitions).collect())

    assert ids({"logical_date": [D1, D3]}) == ["1", "2", "4"]
    assert ids({"logical_date": D2.isoformat()}) == ids({"logical_date": D2}) == ["3"]
    assert ids({"dataset": ["ds", "other"], "logical_date": (D2.isoformat(),)}) == ["3"]


def test_partition_values_survive_odd_characters(spark, lake):
    """Partition values come from the Delta log, not from re-parsed directory names."""
    name = "café dataset/ü=1%"
    lake.write(
        users(spark, name, D1, ["1"]),
        "bronze.users",
        mode="replace_partition",
        partition_values={"dataset": name, "logical_date": D1},
    )
    row = lake.read("bronze.users").collect()[0]
    assert (row.dataset, row.logical_date, row.attributes["age"]) == (name, D1, "30")


@pytest.mark.parametrize("file_name", ["part-00000.parquet", "part {i} é%.parquet"])
def test_a_converted_hive_layout_reads_each_file_once_with_its_own_partition(spark, lake, file_name):
    """Parquet files converted in place (``CONVERT TO DELTA``) may share a name across partition
    directories, or have names that need URL-encoding (Spark's file names are encoded, the log's are
    decoded): every row still reads once, with the partition values of its own file."""
    from deltalake import Schema, convert_to_deltalake

    from spark_jobs.lake import _arrow_schema

    spec = get_table("bronze.users")
    declared = _arrow_schema(spec)
    data = pa.schema([declared.field(c) for c in spec.data_columns])
    written = {("a", D1): ["1", "2"], ("b", D1): ["3"], ("a", D2): ["4"]}
    for i, ((dataset, day), ids) in enumerate(written.items()):
        folder = Path(lake.path(spec)) / f"dataset={dataset}" / f"logical_date={day}"
        folder.mkdir(parents=True)
        attributes = [[("age", "30")]] * len(ids)
        pq.write_table(
            pa.table([ids, attributes, ["u.user"] * len(ids)], schema=data), folder / file_name.format(i=i)
        )
    partitions = Schema.from_arrow(pa.schema([declared.field(c) for c in spec.partition_by]))
    convert_to_deltalake(lake.path(spec), partition_by=partitions, partition_strategy="hive")

    def rows(**partitions):
        return sorted(
            (r.dataset, r.logical_date, r.user_id) for r in lake.read(spec, partitions=partitions).collect()
        )

    every = sorted((ds, day, uid) for (ds, day), ids in written.items() for uid in ids)
    assert rows() == every
    assert rows(dataset="a") == [r for r in every if r[0] == "a"]
    assert rows(logical_date=D1) == [r for r in every if r[1] == D1]


def test_a_blank_partition_value_is_refused_before_any_commit(spark, lake):
    """Delta stores ``''`` as a null partition value: once committed, the NOT NULL ``dataset`` column
    holds a null and no read of the table (any dataset) succeeds. So no row is committed."""
    lake.write(users(spark, "ok", D1, ["1"]), "bronze.users", mode="replace_partition",
               partition_values={"dataset": "ok", "logical_date": D1})  # fmt: skip
    version = lake.version("bronze.users")
    for dataset, partition in (("", ""), (" ", " "), ("", ["ok", ""])):
        with pytest.raises(ValueError, match="blank dataset partition value"):
            lake.write(users(spark, dataset, D1, ["2"]), "bronze.users", mode="replace_partition",
                       partition_values={"dataset": partition, "logical_date": D1})  # fmt: skip
    with pytest.raises(ValueError, match="1 rows have a blank dataset"):  # rows, in a merge
        lake.write(interactions(spark, [(1, 10, 0, 4.0, 1)]).withColumn("dataset", F.lit("")),
                   "silver.interactions", mode="merge")  # fmt: skip
    assert lake.version("bronze.users") == version and lake.read("silver.interactions").count() == 0
    assert [r.user_id for r in lake.read("bronze.users").collect()] == ["1"]


def test_a_quote_in_a_partition_value_replaces_that_partition_only(spark, lake):
    """``o'brien`` is escaped in the replace predicate: a rerun rewrites its own rows and never
    touches ``o`` (a predicate cut at the quote would match it)."""
    for name, ids in (("o", ["1", "2"]), ("o'brien", ["3"]), ("o'brien", ["4", "5"])):
        lake.write(
            users(spark, name, D1, ids),
            "bronze.users",
            mode="replace_partition",
            partition_values={"dataset": name, "logical_date": D1},
        )
    rows = {(r.dataset, r.user_id) for r in lake.read("bronze.users").collect()}
    assert rows == {("o", "1"), ("o", "2"), ("o'brien", "4"), ("o'brien", "5")}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_non_finite_partition_value_is_refused(value):
    from spark_jobs.lake import partition_predicate

    with pytest.raises(ValueError, match=r"cannot use .* as a partition value"):
        partition_predicate({"score": value})


@pytest.mark.parametrize("value", ["a\\b", "c:\\x", "a\\'b"])
def test_a_backslash_in_a_partition_value_is_refused(value):
    """Spark SQL reads ``'a\\b'`` as ``a``, backspace; DataFusion as ``a\\b``: a read or replace of
    that partition would match different partitions on the two backends."""
    from spark_jobs.lake import partition_predicate

    with pytest.raises(ValueError, match="it has a backslash"):
        partition_predicate({"dataset": ["ok", value]})


def test_numpy_numbers_are_plain_sql_literals():
    """numpy 2 reprs ``np.int64(3)``, which no SQL engine reads: values from pandas are numpy."""
    from spark_jobs.lake import partition_predicate

    assert (
        partition_predicate({"a": np.int64(3), "b": np.float64(1.5), "c": True})
        == "a = 3 AND b = 1.5 AND c = true"
    )


def test_replace_partition_refuses_rows_outside_it(spark, lake):
    with pytest.raises(ValueError, match=r"1 rows have logical_date outside datetime\.date\(2024, 1, 2\)"):
        lake.write(
            users(spark, "ds", D1, ["1"]).union(users(spark, "ds", D2, ["2"])),
            "bronze.users",
            mode="replace_partition",
            partition_values={"dataset": "ds", "logical_date": D2},
        )
    with pytest.raises(ValueError, match="needs partition_values"):
        lake.write(users(spark, "ds", D1, ["1"]), "bronze.users", mode="replace_partition")
    with pytest.raises(ValueError, match=r"\['user_id'\] are not partition columns"):
        lake.write(
            users(spark, "ds", D1, ["1"]),
            "bronze.users",
            mode="replace_partition",
            partition_values={"user_id": "1"},
        )


def test_merge_upserts_on_keys_and_reruns_identically(spark, lake):
    first = interactions(spark, [(1, 10, 0, 4.0, 1), (1, 11, 1, 2.0, 0), (2, 10, 2, 5.0, 1)])
    v1 = lake.write(first, "silver.interactions", mode="merge")
    update = interactions(spark, [(1, 11, 1, 5.0, 1), (3, 12, 3, 1.0, 0)])  # one changed, one new
    v2 = lake.write(update, "silver.interactions", mode="merge", partition_values={"dataset": "ds"})
    after = contents(lake.read("silver.interactions"))
    v3 = lake.write(update, "silver.interactions", mode="merge")
    assert v1 < v2 < v3
    assert contents(lake.read("silver.interactions")) == after
    assert len(after) == 4
    got = {(r.user_id, r.item_id): r.rating for r in lake.read("silver.interactions").collect()}
    assert got == {(1, 10): 4.0, (1, 11): 5.0, (2, 10): 5.0, (3, 12): 1.0}
    assert contents(lake.read("silver.interactions", version=v1)) == contents(first)
    # empty merge: nothing committed
    assert lake.write(update.limit(0), "silver.interactions", mode="merge") == v3


def test_merge_deletes_only_unmatched_rows_that_meet_the_condition(spark, lake):
    from pyspark.sql import functions as F

    first = interactions(spark, [(1, 10, 0, 4.0, 1), (1, 11, 1, 2.0, 0), (2, 10, 2, 5.0, 1)])
    other = first.withColumn("dataset", F.lit("other"))
    lake.write(first.unionByName(other), "silver.interactions", mode="merge")
    # keep (1, 10), drop (1, 11); (2, 10) fails the condition: all three are absent from the source
    source = interactions(spark, [(1, 10, 0, 3.0, 0)])
    cond, part = "t.user_id = 1 OR t.item_id = 11", {"dataset": "ds"}
    v = lake.write(source, "silver.interactions", mode="merge", partition_values=part, delete_unmatched=cond)
    got = {(r.dataset, r.user_id, r.item_id): r.rating for r in lake.read("silver.interactions").collect()}
    assert got == {
        ("ds", 1, 10): 3.0,
        ("ds", 2, 10): 5.0,
        **{("other", u, i): r for u, i, r in ((1, 10, 4.0), (1, 11, 2.0), (2, 10, 5.0))},  # outside
    }
    assert lake.merge_counts("silver.interactions", v)["deleted"] == 1
    # an empty source still retracts (and commits); without delete_unmatched it commits nothing
    v = lake.write(source.limit(0), "silver.interactions", mode="merge", partition_values=part,
                   delete_unmatched=cond)  # fmt: skip
    assert (
        lake.merge_counts("silver.interactions", v)["deleted"] == 1
        and lake.read("silver.interactions").count() == 4
    )
    with pytest.raises(ValueError, match="delete_unmatched only applies to mode 'merge'"):
        lake.write(source, "silver.interactions", mode="append", delete_unmatched=cond)


def test_merge_refuses_rows_outside_its_partitions(spark, lake):
    """Restricted to dataset ``ds``, a source row of ``other`` never matches its target row: it would
    be inserted again on every run. Refused, and nothing is committed."""
    from pyspark.sql import functions as F

    first = interactions(spark, [(1, 10, 0, 4.0, 1)])
    lake.write(
        first.unionByName(first.withColumn("dataset", F.lit("other"))), "silver.interactions", mode="merge"
    )
    before = lake.version("silver.interactions")
    mixed = first.unionByName(interactions(spark, [(2, 10, 0, 5.0, 1)]).withColumn("dataset", F.lit("other")))
    with pytest.raises(
        ValueError,
        match=r"merge of silver.interactions \{'dataset': 'ds'\}: 1 rows have dataset outside 'ds'",
    ):
        lake.write(mixed, "silver.interactions", mode="merge", partition_values={"dataset": "ds"})
    assert lake.version("silver.interactions") == before


def test_nullable_columns_declared_at_the_end_are_added_and_read_as_null_before(spark, lake):
    """Schema evolution (spark_jobs/tables.py): a table written under an older declaration reads
    the new nullable column as null, the next write adds it (each write mode), and every older
    version reads it as null too. Any other change is refused before a commit."""
    from spark_jobs.lake import ConcurrentWriteError
    from spark_jobs.tables import TableSpec

    base = [T.StructField("dataset", T.StringType(), False), T.StructField("id", T.LongType(), False)]
    v1 = TableSpec("silver.evolving", T.StructType(base), ("dataset",), ("dataset", "id"), "test")
    v2 = TableSpec(
        "silver.evolving", T.StructType([*base, T.StructField("note", T.StringType())]), ("dataset",),
        ("dataset", "id"), "test",
    )  # fmt: skip
    first = lake.write(spark.createDataFrame([("ds", 1)], v1.schema), v1, mode="append")
    assert [tuple(r) for r in lake.read(v2).collect()] == [("ds", 1, None)]
    rows = spark.createDataFrame([("ds", 2, "x")], v2.schema)
    lake.write(spark.createDataFrame([("ds", 9)], v1.schema), v1, mode="append")
    with pytest.raises(ConcurrentWriteError, match="derived from version 1"):  # an older read: refused
        lake.write(rows, v2, mode="merge", read_version=first)
    assert lake.history(v2)[0]["operation"] != "ADD COLUMN"
    lake.write(rows, v2, mode="merge", read_version=lake.version(v2))  # derived from the latest: fine
    assert lake.history(v2)[1]["operation"] == "ADD COLUMN"
    lake.write(rows.withColumn("id", F.lit(3).cast("long")), v2, mode="append")
    assert sorted(tuple(r) for r in lake.read(v2).collect()) == [
        ("ds", 1, None),
        ("ds", 2, "x"),
        ("ds", 3, "x"),
        ("ds", 9, None),
    ]
    assert [tuple(r) for r in lake.read(v2, version=first).collect()] == [("ds", 1, None)]
    before = lake.version(v2)
    renamed = TableSpec(
        "silver.evolving", T.StructType([*base, T.StructField("remark", T.StringType())]), ("dataset",),
        ("dataset", "id"), "test",
    )  # fmt: skip
    with pytest.raises(
        SchemaDriftError, match=r"stores columns \['dataset', 'id', 'note'\].*needs a migration"
    ):
        lake.write(spark.createDataFrame([("ds", 4, "y")], renamed.schema), renamed, mode="append")
    required = TableSpec(
        "silver.evolving",
        T.StructType([*base, T.StructField("note", T.StringType()), T.StructField("n", T.LongType(), False)]),
        ("dataset",), ("dataset", "id"), "test",
    )  # fmt: skip
    with pytest.raises(SchemaDriftError, match="needs a migration"):
        lake.write(spark.createDataFrame([("ds", 4, "y", 1)], required.schema), required, mode="append")
    with pytest.raises(SchemaDriftError, match=r"lacks the declared NOT NULL columns \['n'\]"):
        lake.read(required)
    assert lake.version(v2) == before
    retyped = TableSpec(
        "silver.evolving", T.StructType([*base, T.StructField("note", T.IntegerType())]), ("dataset",),
        ("dataset", "id"), "test",
    )  # fmt: skip
    for attempt in (lambda: lake.read(retyped), lambda: lake.write(spark.createDataFrame([("ds", 4, 1)], retyped.schema), retyped, mode="append")):  # fmt: skip
        with pytest.raises(SchemaDriftError, match=r"note \(stored string, declared int\): migrate it"):
            attempt()
    assert lake.version(v2) == before


def test_merge_refuses_duplicate_keys(spark, lake):
    dupes = interactions(spark, [(1, 10, 0, 4.0, 1), (1, 10, 0, 3.0, 0), (2, 10, 0, 3.0, 0)])
    with pytest.raises(ValueError, match=r"1 duplicate keys .*'user_id': 1, 'item_id': 10"):
        lake.write(dupes, "silver.interactions", mode="merge")


def test_schema_drift_names_the_columns(spark, lake):
    good = users(spark, "ds", D1, ["1"])
    with pytest.raises(SchemaDriftError, match=r"missing columns \['source_file'\]"):
        lake.write(good.drop("source_file"), "bronze.users", mode="append")
    with pytest.raises(SchemaDriftError, match=r"unexpected columns \['zip'\]"):
        lake.write(good.withColumn("zip", F.lit("x")), "bronze.users", mode="append")
    with pytest.raises(SchemaDriftError, match=r"user_id \(declared string, got bigint\)"):
        lake.write(good.withColumn("user_id", F.lit(1).cast("long")), "bronze.users", mode="append")
    with pytest.raises(ValueError, match=r"NOT NULL columns contain nulls: user_id \(1 nulls\)"):
        lake.write(good.withColumn("user_id", F.lit(None).cast("string")), "bronze.users", mode="append")
    assert lake.version("bronze.users") in (None, 0)  # nothing was committed
    # column order does not matter
    cols = list(reversed(good.columns))
    assert lake.write(good.select(*cols), "bronze.users", mode="append") == 1


def test_arrow_batches_are_to_arrows_rows_in_its_order(spark):
    """The stream a delta-rs write reads equals ``df.toArrow()``: every type the tables declare (time
    zones, maps, structs, nested nulls), a Variant (binaries the JVM writes large under Arrow's large
    types, toArrow small), in partition order; with large types too and in a session whose time zone
    is not UTC (toArrow's timestamps are UTC); an empty frame gives no rows."""
    from spark_jobs.lake import arrow_batches

    schema = (
        "id long, name string, ts timestamp, ntz timestamp_ntz, day date, x double, "
        "codes array<int>, attrs map<string,string>, pair struct<a:int,b:string>, "
        "vec array<float>, flag boolean, raw binary"
    )
    rows = [
        (
            i,
            None if i % 4 == 0 else f"n{i}",
            dt.datetime(2024, 1, 1, 0, 0, i % 60, i, tzinfo=dt.UTC),
            dt.datetime(2024, 1, 1, 0, 0, i % 60, i),
            D1 + dt.timedelta(days=i),
            float("-inf") if i == 3 else i / 7,  # (NaN != NaN in Arrow's equals)
            None if i % 5 == 0 else [i, None, i + 1],
            {"k": str(i)} if i % 2 else None,
            (i, None),
            None if i % 6 == 0 else [i / 3, float("inf")],
            None if i % 7 == 0 else i % 2 == 0,
            None if i % 8 == 0 else bytes([i, 0, 255]),
        )
        for i in range(40)
    ]
    # in 2 partitions, no shuffle: a fixed order
    df = spark.createDataFrame(rows, schema).withColumn(
        "doc", F.parse_json(F.format_string('{"i":%d}', "id"))
    )
    for large_types, zone in (("false", "UTC"), ("true", "UTC"), ("false", "America/New_York")):
        spark.conf.set("spark.sql.execution.arrow.useLargeVarTypes", large_types)
        spark.conf.set("spark.sql.session.timeZone", zone)
        try:
            reference = df.toArrow()
            streamed = pa.Table.from_batches(list(arrow_batches(df)))
        finally:
            spark.conf.unset("spark.sql.execution.arrow.useLargeVarTypes")
            spark.conf.set("spark.sql.session.timeZone", "UTC")
        assert pa.types.is_large_string(reference.schema.field("name").type) == (large_types == "true")
        assert streamed.num_rows == 40
        assert streamed.equals(reference)
    assert list(arrow_batches(df.limit(0))) == []


def test_a_write_refused_midstream_counts_every_batch_and_commits_nothing(spark, lake):
    """A delta-rs write streams batches; its checks total over all of them and refuse at the end,
    before delta-rs can commit, raising the lake's own error (not delta-rs's wrapping of it)."""
    lake.write(users(spark, "ds", D1, ["1"]), "bronze.users", mode="append")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
    try:
        nulls = users(spark, "ds", D2, [str(i) for i in range(10)]).withColumn(  # 4 nulls in 5 batches
            "user_id", F.when(F.col("user_id").cast("int") % 3 != 0, F.col("user_id"))
        )
        with pytest.raises(ValueError, match=r"NOT NULL columns contain nulls: user_id \(4 nulls\)") as err:
            lake.write(nulls, "bronze.users", mode="replace_partition", partition_values={"logical_date": D2})
        assert err.type is ValueError  # the lake's own, not delta-rs's wrapping of it
        outside = users(spark, "ds", D2, [str(i) for i in range(6)]).union(users(spark, "ds", D3, ["7", "8"]))
        with pytest.raises(ValueError, match="2 rows have logical_date outside"):
            lake.write(
                outside, "bronze.users", mode="replace_partition", partition_values={"logical_date": D2}
            )
        dupes = interactions(spark, [(u % 3, 10, 0, 4.0, 1) for u in range(7)])  # 3 keys repeated
        with pytest.raises(ValueError, match=r"3 duplicate keys"):
            lake.write(dupes, "silver.interactions", mode="merge")
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert lake.version("bronze.users") == 1 and lake.version("silver.interactions") == 0
    assert contents(lake.read("bronze.users").select("user_id")) == [("1",)]


def test_a_failed_job_raises_its_own_error_through_the_stream_and_the_write(spark, lake):
    """A task that fails while a write streams its rows raises what ``toArrow`` raises (Spark's
    error, not the ``Py4JJavaError`` of the fetch), and the write commits nothing."""
    from pyspark.errors import PythonException, SparkRuntimeException

    from spark_jobs.lake import arrow_batches

    lake.write(users(spark, "ds", D1, ["1"]), "bronze.users", mode="append")
    failing = users(spark, "ds", D2, [str(i) for i in range(10)]).withColumn(
        "user_id", F.when(F.col("user_id") != "7", F.col("user_id")).otherwise(F.raise_error(F.lit("no 7")))
    )
    with pytest.raises(SparkRuntimeException, match=r"\[USER_RAISED_EXCEPTION\] no 7") as expected:
        failing.toArrow()
    with pytest.raises(SparkRuntimeException, match=r"\[USER_RAISED_EXCEPTION\] no 7") as streamed:
        list(arrow_batches(failing))
    with pytest.raises(SparkRuntimeException, match=r"\[USER_RAISED_EXCEPTION\] no 7") as written:
        lake.write(failing, "bronze.users", mode="replace_partition", partition_values={"logical_date": D2})
    assert type(streamed.value) is type(written.value) is type(expected.value)
    udf_failing = users(spark, "ds", D2, ["1"]).withColumn("user_id", F.udf(lambda u: str(1 / 0))("user_id"))
    with pytest.raises(PythonException, match="ZeroDivisionError"):
        list(arrow_batches(udf_failing))
    assert lake.version("bronze.users") == 1  # the first append's
    assert contents(lake.read("bronze.users").select("user_id")) == [("1",)]


def test_a_write_larger_than_the_drivers_result_cap_is_written_whole(tmp_path):
    """``df.toArrow()`` fails past ``spark.driver.maxResultSize``; the lake's write of the same rows
    does not (it fetches one partition per job), and every row reads back. Streaming the rows again
    leaves nothing on the JVM heap (classic ``DataFrame.toLocalIterator`` kept all it fetched). A
    session of its own: the cap is fixed when a session starts."""
    import subprocess
    import sys

    script = f"""
from pyspark.sql import functions as F
from spark_jobs.lake import Lake
from spark_jobs.session import get_spark
spark = get_spark("result-cap", conf={{"spark.driver.maxResultSize": "16m"}})
df = spark.range(40000, numPartitions=8).select(
    F.lit("ds").alias("dataset"), F.lit("2024-01-01").cast("date").alias("logical_date"),
    F.col("id").cast("string").alias("user_id"),
    F.create_map(F.lit("bio"), F.repeat(F.lit("x"), 1000)).alias("attributes"),
    F.lit("u.user").alias("source_file"))
try:
    df.toArrow()
    print("toArrow ok")
except Exception as err:
    print("toArrow refused:", "maxResultSize" in str(err))
lake = Lake(spark, {str(tmp_path / "lake")!r})
version = lake.write(df, "bronze.users", mode="append")
print("written", version, lake.read("bronze.users").count())
import gc
from spark_jobs.lake import arrow_batches
runtime = spark._jvm.java.lang.Runtime.getRuntime()
def heap_mib():
    gc.collect()
    spark._jvm.java.lang.System.gc()
    return (runtime.totalMemory() - runtime.freeMemory()) / 2**20
before = heap_mib()
for _ in range(3):  # about 40 MB a pass
    sum(batch.num_rows for batch in arrow_batches(df))
print("heap kept under 20 MiB:", heap_mib() - before < 20)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-3:] == [
        "toArrow refused: True",
        "written 1 40000",
        "heap kept under 20 MiB: True",
    ]


def test_stable_id_keeps_numbers_and_hashes_strings(spark):
    keys = ["242", "0", "7", "0007", "B00ABC", "B00ABD", "1" * 19]
    df = spark.createDataFrame([(k,) for k in keys], "k string")
    got = {r.k: r.id for r in df.select("k", stable_id(F.col("k")).alias("id")).collect()}
    assert (got["242"], got["0"], got["7"]) == (242, 0, 7)  # canonical decimals keep their value
    hashed = [got["0007"], got["B00ABC"], got["B00ABD"], got["1" * 19]]  # "0007" must not meet "7"
    assert len(set(hashed)) == 4 and all(2**62 <= h < 2**63 for h in hashed)
    again = {r.k: r.id for r in df.select("k", stable_id(F.col("k")).alias("id")).collect()}
    assert again == got


def test_a_table_maintained_without_vacuum_keeps_old_versions_readable_past_the_log_retention(spark, lake):
    """Skipping VACUUM keeps a version's files; a checkpoint would still delete its commit once older
    than the log retention (30 days), and the version with it. Without VACUUM the log keeps every
    commit; a maintenance that vacuums again lets checkpoints drop the expired ones."""
    import os
    import time

    from deltalake import DeltaTable

    day = dt.date(2024, 1, 1)
    write = lambda ids: lake.write(  # noqa: E731
        users(spark, "ds", day, ids), "bronze.users", mode="replace_partition",
        partition_values={"dataset": "ds", "logical_date": day},
    )  # fmt: skip
    first = write(["u1"])
    path = lake.path("bronze.users")
    DeltaTable(path).alter.set_table_properties({"delta.checkpointInterval": "2"})

    def age_log() -> None:
        old = time.time() - 40 * 86400
        for name in os.listdir(f"{path}/_delta_log"):
            os.utime(f"{path}/_delta_log/{name}", (old, old))

    lake.maintain("bronze.users", dt.timedelta(days=7), vacuum=False)
    age_log()
    for k in range(4):  # past two checkpoints
        write([f"u{k}"])
    assert contents(lake.read("bronze.users", first)) == contents(users(spark, "ds", day, ["u1"]))
    lake.maintain("bronze.users", dt.timedelta(days=7))
    age_log()
    for k in range(4):
        write([f"v{k}"])
    with pytest.raises(Exception, match=r"No files in log segment"):  # not Lake's out-of-range error
        lake.read("bronze.users", first).count()


def test_maintenance_compacts_then_vacuums_past_the_retention_and_changes_no_contents(spark, lake):
    """``Lake.maintain``: a partition's small files become one, the latest contents and every
    version younger than the retention read as before, the replaced files are deleted once only
    versions older than the retention read them (then every data file on disk is the latest
    version's), and a rerun with nothing to do commits nothing."""
    import os
    import shutil
    import time
    from pathlib import Path

    from deltalake import DeltaTable

    assert lake.maintain("bronze.users", dt.timedelta(days=7)) == {
        "files_compacted": 0, "files_written": 0, "files_deleted": 0, "version": -1}  # fmt: skip
    for k in range(3):  # three small files in one partition, one in another
        lake.write(users(spark, "ds", D1, [f"u{k}"]), "bronze.users", mode="append")
    lake.write(users(spark, "ds", D2, ["v1", "v2"]), "bronze.users", mode="append")
    path = lake.path("bronze.users")
    versions = {
        v: contents(lake.read("bronze.users", version=v)) for v in range(lake.version("bronze.users") + 1)
    }
    latest = versions[max(versions)]

    def data_files() -> set[str]:
        return {f.name for f in Path(path).rglob("*.parquet") if "_delta_log" not in f.parts}

    def live_files() -> set[str]:
        return {Path(uri).name for uri in DeltaTable(path).file_uris()}

    report = lake.maintain("bronze.users", dt.timedelta(days=7))
    assert report == {
        "files_compacted": 3,
        "files_written": 1,
        "files_deleted": 0,
        "version": max(versions) + 2,
    }  # fmt: skip  (the retention property, then OPTIMIZE)
    assert len(live_files()) == 2 and len(data_files()) == 4 + 1  # the replaced files are kept...
    assert contents(lake.read("bronze.users")) == latest
    assert {v: contents(lake.read("bronze.users", version=v)) for v in versions} == versions  # ...for them
    assert lake.maintain("bronze.users", dt.timedelta(days=7)) == {
        **report,
        "files_compacted": 0,
        "files_written": 0,
    }
    properties = DeltaTable(path).metadata().configuration
    assert (properties["delta.deletedFileRetentionDuration"], properties["delta.logRetentionDuration"]) == (
        "interval 168 hours",
        "interval 720 hours",  # commits stay at least Delta's 30 days
    )
    # a file no version names (a crashed writer's, or one whose tombstone a checkpoint dropped) goes
    # once it is older than the retention, but only after the retention has held as long: until then
    # a checkpoint under Delta's default may have dropped the tombstone of a file a version still reads
    data = next(f for f in Path(path).rglob("*.parquet") if "_delta_log" not in f.parts)
    stray = data.with_name("stray.parquet")
    shutil.copy(data, stray)
    os.utime(stray, (time.time() - 40 * 86400,) * 2)
    assert lake.maintain("bronze.users", dt.timedelta(days=7))["files_deleted"] == 0 and stray.exists()
    held = {"hisam.retentionSetAt": str(int(time.time() - 8 * 86400))}  # as if set 8 days ago
    DeltaTable(path).alter.set_table_properties(held, raise_if_not_exists=False)
    assert lake.maintain("bronze.users", dt.timedelta(days=7))["files_deleted"] == 1
    assert not stray.exists() and len(data_files()) == 4 + 1
    assert lake.maintain("bronze.users", dt.timedelta(days=7), vacuum=False)["files_deleted"] == 0

    vacuumed = lake.maintain("bronze.users", dt.timedelta(0))  # every replaced file is past a zero retention
    assert (vacuumed["files_compacted"], vacuumed["files_deleted"]) == (0, 3)
    assert data_files() == live_files() and contents(lake.read("bronze.users")) == latest
    again = lake.maintain("bronze.users", dt.timedelta(0))
    assert again == {**vacuumed, "files_deleted": 0}  # nothing left to do: no commit either
    with pytest.raises(Exception, match=r"PATH_NOT_FOUND.*\.parquet"):
        lake.read("bronze.users", version=max(versions) - 1).collect()  # an old version's files are gone

"""Benchmark of the sequence job (spark_jobs.sequences): MovieLens end to end and 10M synthetic events.

(a) MovieLens-100K on ``local[2]``: import (bronze) -> silver -> content -> quality gate -> sequences,
    wall seconds per step (the colleagues' importer, silver promotion and content job, the GX gate
    on silver interactions, then this job with a stand-in semantic-ID table: no trained tokenizer is
    part of this benchmark) and the gold tables written to a scratch lake.
(b) Synthetic events (``spark_jobs.importers.synthetic``, vectorised numpy -> Parquet): the Spark
    build (labels, exact chronological cut, split, cold flag, per-user sequences; then the per-sample
    histories with semantic IDs) against a single-process Polars build of the same protocol in the
    same run; both write their user sequences and per-sample history checksums to Parquet. Spark's
    time is its build with a ``noop`` sink (it materialises every history); its checksums are computed
    again in a step of their own, ``spark_checksums``, outside that time. Polars materialises no
    history, only the per-sample bounds and sums, and its time includes them. Reports
    events/s of both, their ratio, peak RSS of the Python driver (and what Polars added to it) and
    of the JVM (psutil over the process tree), and checks that both produce identical per-user sequences
    (hash of every user's item/label/timestamp lists) and the same sample histories: per sample its
    length, oldest and newest item, and position-weighted sums (``sum (k + 1) * x_k`` over the
    history's items ``k``, so a reordered history changes them) of its item ids and actions, and of
    its semantic IDs over their flat positions (so do codes reordered within one item).

Writes ``benchmarks/results/sequences.json`` (``--out``); a run with a failed part (exit 1) or a
skipped one (``--skip-*``, or no bundle) writes ``sequences.incomplete.json`` beside it instead. Example::

    .venv/bin/python benchmarks/sequences.py                      # both parts, 10M events
    .venv/bin/python benchmarks/sequences.py --events 1000000 --skip-movielens
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.environment import run_environment  # noqa: E402

logger = logging.getLogger("benchmarks.sequences")
MB = 1024 * 1024


# --------------------------------------------------------------------------- measurement


class PeakMemory:
    """Samples RSS of this Python process and of its child processes (the JVM) every ``interval`` s."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.start_python = 0
        self.peak_python = 0
        self.peak_jvm = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> tuple[int, int]:
        me = psutil.Process()
        python = me.memory_info().rss
        jvm = 0
        for child in me.children(recursive=True):
            try:
                jvm += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return python, jvm

    def _run(self) -> None:
        while not self._stop.is_set():
            python, jvm = self.sample()
            self.peak_python = max(self.peak_python, python)
            self.peak_jvm = max(self.peak_jvm, jvm)
            self.peak_total = max(self.peak_total, python + jvm)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_python = self.sample()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        python, jvm = self.sample()
        self.peak_python = max(self.peak_python, python)
        self.peak_jvm = max(self.peak_jvm, jvm)
        self.peak_total = max(self.peak_total, python + jvm)

    def to_dict(self) -> dict[str, float]:
        return {
            "peak_rss_python_mb": round(self.peak_python / MB, 1),
            "rss_python_at_start_mb": round(self.start_python / MB, 1),
            "peak_rss_jvm_mb": round(self.peak_jvm / MB, 1),
            "peak_rss_total_mb": round(self.peak_total / MB, 1),
        }


@contextmanager
def step(record: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Time a step (wall seconds) and its peak memory into ``record[name]``."""
    entry: dict[str, Any] = {}
    start = time.perf_counter()
    with PeakMemory() as mem:
        yield entry
    entry["seconds"] = round(time.perf_counter() - start, 2)
    entry.update(mem.to_dict())
    record[name] = entry
    logger.info("%s: %.1fs %s", name, entry["seconds"], {k: v for k, v in entry.items() if k != "seconds"})


def stand_in_semantic_ids(spark: Any, items: Any, version: str, k: int = 256) -> Any:
    """Deterministic pseudo codes per item (a stand-in: no trained tokenizer in this benchmark)."""
    from pyspark.sql import functions as F

    codes = [F.pmod(F.xxhash64(F.col("item_id"), F.lit(p)), F.lit(k)) for p in range(6)]
    return items.select(
        F.col("item_id").cast("long"),
        F.array(*codes).alias("semantic_ids"),
        F.lit(version).alias("tokenizer_version"),
    )


# --------------------------------------------------------------------------- (a) MovieLens


def movielens_pipeline(spark: Any, data_dir: Path, work: Path) -> dict[str, Any]:
    """import -> silver -> content -> sequences on the team's MovieLens bundle."""
    from pyspark.sql import functions as F

    from spark_jobs.content import build_content
    from spark_jobs.importers.movielens import MovieLensImportConfig, import_movielens
    from spark_jobs.importers.silver import promote_to_silver
    from spark_jobs.lake import Lake
    from spark_jobs.quality import QualityConfig, interactions_suite, run_quality_gate
    from spark_jobs.sequences import (
        SequenceConfig,
        build_sequences,
        build_user_sequences,
        to_gold_samples,
        to_gold_user_sequences,
    )
    from spark_jobs.tables import SILVER_INTERACTIONS, SILVER_ITEMS

    lake_root = work / "lake"
    shutil.rmtree(lake_root, ignore_errors=True)
    lake = Lake(spark, lake_root)
    dataset, day = "movielens-100k", dt.date(1998, 4, 23)
    steps: dict[str, Any] = {}
    with step(steps, "import_bronze") as e:
        report = import_movielens(
            spark, lake, MovieLensImportConfig(data_dir=str(data_dir), dataset=dataset), day
        )
        e["report"] = _jsonable(report)
    with step(steps, "promote_silver") as e:
        e["report"] = _jsonable(promote_to_silver(lake, dataset, day))
    with step(steps, "content") as e:
        e["report"] = _jsonable(build_content(lake, dataset))
    interactions = lake.read(SILVER_INTERACTIONS).filter(F.col("dataset") == dataset).cache()
    items = lake.read(SILVER_ITEMS).filter(F.col("dataset") == dataset)
    with step(steps, "quality_gate_silver_interactions") as e:  # GX over 100k rows, Data Docs on
        qcfg = QualityConfig(docs_dir=str(work / "data_docs"), logical_date=day, result_format="BASIC")
        _valid, _quarantine, report = run_quality_gate(
            interactions, interactions_suite(interactions, qcfg, items=items), qcfg
        )
        e.update(
            {
                "success": report.success,
                "n_input": report.n_input,
                "n_quarantined": report.n_quarantined,
                "expectations": len(report.expectations),
            }
        )
    with step(steps, "sequences") as e:
        cfg = SequenceConfig(dataset=dataset)
        result = build_sequences(
            interactions, stand_in_semantic_ids(spark, items, "stand-in"), cfg, persist=True
        )
        samples = result.samples.cache()
        stats = samples.agg(
            F.count(F.lit(1)).alias("samples"),
            F.sum((F.col("split") == "test").cast("int")).alias("test"),
            F.countDistinct(F.when(F.col("split") == "test", F.col("user_id"))).alias("test_users"),
            F.countDistinct(
                F.when((F.col("split") == "test") & F.col("is_cold_user"), F.col("user_id"))
            ).alias("cold_test_users"),
        ).first()
        versions = {
            "gold.user_sequences": lake.write(
                to_gold_user_sequences(build_user_sequences(result.interactions, cfg)),
                "gold.user_sequences",
                mode="replace_partition",
                partition_values={"dataset": dataset},
            ),
            "gold.samples": lake.write(
                to_gold_samples(samples),
                "gold.samples",
                mode="replace_partition",
                partition_values={"dataset": dataset},
            ),
        }
        e.update(
            {
                "cut_utc": dt.datetime.fromtimestamp(result.cut.cut_seconds(), dt.UTC).isoformat(),
                "quarantined": result.quarantine.count(),
                **{k: int(v) for k, v in stats.asDict().items()},
                "lake_versions": versions,
            }
        )
        samples.unpersist()
        result.unpersist()
        interactions.unpersist()
    total = round(sum(s["seconds"] for s in steps.values()), 2)
    return {"dataset": dataset, "steps": steps, "total_seconds": total}


def _jsonable(obj: Any) -> Any:
    try:
        from dataclasses import asdict, is_dataclass

        if is_dataclass(obj):
            return json.loads(json.dumps(asdict(obj), default=str))
    except TypeError:
        pass
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- (b) synthetic


def generate_events(out: Path, events: int, users: int, items: int, seed: int) -> dict[str, Any]:
    """The colleagues' vectorised generator; a minimal numpy fallback if it is unavailable."""
    try:
        from spark_jobs.importers.synthetic import SyntheticConfig, generate

        cfg = SyntheticConfig(
            num_users=users, num_items=items, num_events=events, seed=seed, image_size=0, chunk_rows=1_000_000
        )
        result = generate(cfg, out)
        return {"generator": "spark_jobs.importers.synthetic", "interactions": str(result.interactions)}
    except ImportError:  # pragma: no cover - fallback when the importer package changes
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = np.random.default_rng(seed)
        inter = out / "interactions"
        inter.mkdir(parents=True, exist_ok=True)
        p = 1.0 / np.arange(1, users + 1) ** 0.8
        p /= p.sum()
        for c, start in enumerate(range(0, events, 1_000_000)):
            n = min(1_000_000, events - start)
            table = pa.table(
                {
                    "user_id": rng.choice(users, n, p=p).astype(np.int64),
                    "item_id": rng.integers(0, items, n, dtype=np.int64),
                    "timestamp": np.sort(rng.integers(1_577_836_800, 1_593_388_800, n)),
                    "rating": rng.integers(1, 6, n).astype(np.float32),
                }
            )
            pq.write_table(table, inter / f"part-{c:05d}.parquet")
        return {"generator": "benchmarks.sequences (numpy fallback)", "interactions": str(inter)}


def write_semantic_ids(path: Path, items: int, seed: int, k: int = 256) -> None:
    """A stand-in semantic-ID table (random codes in [0, K)) that both engines read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    codes = np.random.default_rng([seed, 7]).integers(0, k, size=(items, 6), dtype=np.int32)
    table = pa.table(
        {
            "item_id": np.arange(items, dtype=np.int64),
            "semantic_ids": pa.FixedSizeListArray.from_arrays(codes.ravel(), 6).cast(pa.list_(pa.int32())),
            "tokenizer_version": pa.array(["stand-in"] * items),
        }
    )
    pq.write_table(table, path)


def polars_build(
    interactions: Path, semantic_ids: Path, train_fraction: float, cold: int, max_hist: int, out: Path
) -> dict[str, Any]:
    """The same protocol in one process: label, exact cut (ties -> test), split, cold flag,
    per-user order (timestamp, item, label, action = label), user sequences, and per sample the
    history bounds (length, oldest and newest item: the last L rows of earlier instants) and
    position-weighted sums of its items and actions and, by flat position, of its semantic IDs
    (:data:`BOUND_COLUMNS`);
    both written to Parquet under ``out``, as the Spark build writes its own."""
    import polars as pl

    from hisam_core.evaluation.protocol import cut_rank

    df = pl.read_parquet(
        str(interactions / "*.parquet"), columns=["user_id", "item_id", "timestamp", "rating"]
    )
    df = df.with_columns((pl.col("rating") > 3).cast(pl.Int32).alias("label"))
    n = df.height
    k = cut_rank(train_fraction, n)  # as the Spark job
    cut = int(df["timestamp"].sort()[k]) if k < n else int(df["timestamp"].max()) + 1
    split = pl.when(pl.col("timestamp") < cut).then(pl.lit("train")).otherwise(pl.lit("test"))
    df = df.with_columns(split.alias("split")).sort(["user_id", "timestamp", "item_id", "label"])
    codes = pl.col("semantic_ids")
    sem = pl.read_parquet(str(semantic_ids)).select(
        pl.col("item_id"),
        codes.list.sum().cast(pl.Int64).alias("sem_sum"),
        pl.sum_horizontal([codes.list.get(j).cast(pl.Int64) * (j + 1) for j in range(6)]).alias("sem_wcodes"),
    )
    df = df.join(sem, on="item_id", how="left", maintain_order="left")
    by_user = "user_id"
    df = df.with_columns(
        pl.int_range(pl.len()).over(by_user).alias("seq_pos"),
        (pl.col("split") == "train").sum().over(by_user).cast(pl.Int32).alias("n_train"),
        pl.int_range(pl.len()).alias("_row"),  # rows are in (user, order): one index over all users
    )
    # a sample's history: the min(L, earlier) rows before the first row of its instant
    instant = df.select(pl.col("_row").min().over([by_user, "timestamp"])).to_series().to_numpy()
    user_start = (df["_row"] - df["seq_pos"]).to_numpy()
    length = np.minimum(instant - user_start, max_hist)
    oldest = instant - length

    rows = np.arange(len(instant), dtype=np.int64)

    def window_sum(values: Any) -> np.ndarray:
        """``sum v_r`` over rows ``[oldest, instant)``, from a prefix sum."""
        plain = np.concatenate([[0], np.cumsum(values.to_numpy().astype(np.int64))])
        return plain[instant] - plain[oldest]

    def weighted_sum(values: Any) -> np.ndarray:
        """``sum (r - oldest + 1) * v_r`` over rows ``[oldest, instant)``, from two prefix sums."""
        v = values.to_numpy().astype(np.int64)
        by_row = np.concatenate([[0], np.cumsum(rows * v)])
        return (by_row[instant] - by_row[oldest]) - (oldest - 1) * window_sum(values)

    # code j of the history's item q sits at flat position 6q + j: sum (6q + j + 1) * c_qj
    # = 6 sum q * S_q + sum_q sum_j (j + 1) c_qj, with S_q the item's code sum
    sem_sum = df["sem_sum"]

    items, some = df["item_id"].to_numpy(), length > 0
    bounds = pl.DataFrame(
        {
            by_user: df[by_user],
            "seq_pos": df["seq_pos"],
            "history_len": length,
            "first": pl.Series(items[np.where(some, oldest, 0)]).set(pl.Series(~some), None),
            "last": pl.Series(items[np.where(some, instant - 1, 0)]).set(pl.Series(~some), None),
            "item_wsum": weighted_sum(df["item_id"]),
            "sem_wsum": 6 * (weighted_sum(sem_sum) - window_sum(sem_sum)) + window_sum(df["sem_wcodes"]),
            "action_wsum": weighted_sum(df["label"]),
        }
    )
    sequences = df.group_by(by_user).agg(
        pl.col("item_id").alias("item_ids"),
        pl.col("label").alias("labels"),
        pl.col("timestamp").alias("timestamps"),
        pl.col("n_train").first(),
        (pl.col("n_train").first() < cold).alias("is_cold_user"),
    )
    out.mkdir(parents=True, exist_ok=True)
    sequences.write_parquet(out / "user_sequences.parquet")
    bounds.write_parquet(out / "bounds.parquet")
    return {
        "cut": cut,
        "n": n,
        "n_train": int((df["split"] == "train").sum()),
        "sequences": sequences,
        "bounds": bounds,
    }


def sequence_hashes(frame: Any) -> Any:
    """Per-user hash of (item_ids, labels, timestamps, n_train, is_cold_user), sorted by user."""
    import polars as pl

    return frame.select(
        pl.col("user_id").cast(pl.Int64),
        pl.struct(
            pl.col("item_ids").cast(pl.List(pl.Int64)),
            pl.col("labels").cast(pl.List(pl.Int32)),
            pl.col("timestamps").cast(pl.List(pl.Int64)),
            pl.col("n_train").cast(pl.Int32),
            pl.col("is_cold_user"),
        )
        .hash()
        .alias("h"),
    ).sort("user_id")


#: Per sample: its history's length, oldest and newest item, and ``sum (k + 1) * x_k`` over its items
#: ``k`` of the item id, the sum of the item's semantic IDs, and the action.
BOUND_COLUMNS = [
    "user_id", "seq_pos", "history_len", "first", "last", "item_wsum", "sem_wsum", "action_wsum",
]  # fmt: skip


def synthetic_benchmark(spark: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Spark vs Polars on ``args.events`` synthetic events."""
    import polars as pl
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from spark_jobs.sequences import (
        SequenceConfig,
        build_samples,
        build_user_sequences,
        join_semantic_ids,
        prepare_interactions,
    )

    data = work / "synthetic"
    out: dict[str, Any] = {"events": args.events, "users": args.users, "items": args.items}
    steps: dict[str, Any] = {}
    with step(steps, "generate") as e:
        e.update(generate_events(data, args.events, args.users, args.items, args.seed))
        write_semantic_ids(data / "semantic_ids.parquet", args.items, args.seed)
    inter = data / "interactions"
    cfg = SequenceConfig(timestamp_col="timestamp")
    spark_out = work / "spark_out"
    shutil.rmtree(spark_out, ignore_errors=True)

    with step(steps, "spark_cut") as e:  # labels + the exact chronological cut (2 passes)
        prepared, _quarantine, cut = prepare_interactions(spark.read.parquet(str(inter)), cfg)
        prepared = prepared.persist(StorageLevel.MEMORY_AND_DISK)  # read by both outputs
        e.update({"cut": cut.cut_key, "rank": cut.rank, "n_total": cut.n_total})
    with step(steps, "spark_user_sequences"):  # split, cold flag, positions (cached) + sequences
        build_user_sequences(prepared, cfg).write.mode("overwrite").parquet(str(spark_out / "user_sequences"))
    with step(steps, "spark_samples") as e:  # semantic-ID join + per-sample histories
        sem = spark.read.parquet(str(data / "semantic_ids.parquet"))
        known, _unknown = join_semantic_ids(prepared, sem, cfg, selected=True)
        samples = build_samples(known, cfg)
        sink = "noop" if args.samples_sink == "checksums" else args.samples_sink  # the build alone
        samples.write.format(sink).mode("overwrite").save(str(spark_out / "samples"))
        e["sink"] = args.samples_sink
    if args.samples_sink == "checksums":
        with step(steps, "spark_checksums"):  # verification, built again: not in the Spark time

            def weighted(column: str) -> Any:  # sum (k + 1) * x_k over the array's elements k
                return F.expr(  # one pass, integer arithmetic
                    f"aggregate({column}, named_struct('s', 0L, 'i', 0L), (acc, x) -> named_struct("
                    "'s', acc.s + (acc.i + 1) * x, 'i', acc.i + 1), acc -> acc.s)"
                )

            samples.select(
                "user_id",
                "seq_pos",
                "history_len",
                F.try_element_at("history_item_ids", F.lit(1)).alias("first"),
                F.try_element_at("history_item_ids", F.lit(-1)).alias("last"),
                weighted("history_item_ids").alias("item_wsum"),
                weighted("history_semantic_ids").alias("sem_wsum"),  # flat: codes within an item too
                weighted("history_actions").alias("action_wsum"),
                (F.size("history_semantic_ids") == F.col("history_len") * 6).alias("sem_aligned"),
            ).write.mode("overwrite").parquet(str(spark_out / "bounds"))
    prepared.unpersist()

    with step(steps, "polars_build") as e:
        built = polars_build(
            inter,
            data / "semantic_ids.parquet",
            cfg.train_fraction,
            cfg.cold_start_threshold,
            cfg.max_history_items,
            work / "polars_out",
        )
        e.update({"cut": built["cut"], "n_train": built["n_train"]})

    with step(steps, "verify") as e:
        spark_seq = pl.read_parquet(str(spark_out / "user_sequences" / "*.parquet"))
        same_seq = sequence_hashes(spark_seq).equals(sequence_hashes(built["sequences"]))
        e.update({"users": spark_seq.height, "identical_user_sequences": bool(same_seq)})
        if args.samples_sink == "checksums":
            spark_bounds = pl.read_parquet(str(spark_out / "bounds" / "*.parquet"))
            e["semantic_ids_aligned"] = bool(spark_bounds["sem_aligned"].all())
            cast = [pl.col(c).cast(pl.Int64) for c in BOUND_COLUMNS]
            a = spark_bounds.select(cast).sort(["user_id", "seq_pos"])
            b = built["bounds"].select(cast).sort(["user_id", "seq_pos"])
            e.update({"samples": a.height, "identical_sample_histories": bool(a.equals(b))})
        e["same_cut"] = steps["spark_cut"]["cut"] == built["cut"]
    spark_s = sum(steps[s]["seconds"] for s in ("spark_cut", "spark_user_sequences", "spark_samples"))
    polars_s = steps["polars_build"]["seconds"]
    v = steps["verify"]
    out.update(
        {
            "steps": steps,
            "spark_seconds": round(spark_s, 2),
            "spark_events_per_s": round(args.events / spark_s),
            "polars_seconds": polars_s,
            "polars_events_per_s": round(args.events / polars_s),
            "spark_over_polars_time_ratio": round(spark_s / polars_s, 1),
            "peak_rss_spark_mb": {
                k: max(steps[s][k] for s in ("spark_cut", "spark_user_sequences", "spark_samples"))
                for k in ("peak_rss_python_mb", "peak_rss_jvm_mb", "peak_rss_total_mb")
            },
            "peak_rss_polars_python_mb": steps["polars_build"]["peak_rss_python_mb"],
            "rss_polars_python_added_mb": round(
                steps["polars_build"]["peak_rss_python_mb"] - steps["polars_build"]["rss_python_at_start_mb"],
                1,
            ),
            "identical": bool(
                v["identical_user_sequences"]
                and v.get("identical_sample_histories", True)
                and v.get("semantic_ids_aligned", True)
                and v["same_cut"]
            ),
        }
    )
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000, help="synthetic events (default 10M)")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--movielens-dir", default=str(ROOT.parent / "shared" / "data" / "movielens-100k"))
    p.add_argument("--skip-movielens", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument(
        "--samples-sink",
        default="checksums",
        choices=["checksums", "noop", "parquet"],
        help="checksums: the samples built without writing (timed), then again, untimed, into per-sample "
        "history bounds and position-weighted sums verified against Polars (default); noop: build only; "
        "parquet: write the full samples",
    )
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--shuffle-partitions", type=int, default=8)
    p.add_argument("--workdir", default=str(ROOT / ".hisam" / "bench" / "sequences"))
    p.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sequences.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from spark_jobs.session import get_spark

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "sequences",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            **run_environment(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "spark": {
            "master": args.master,
            "driver_memory": args.driver_memory,
            "shuffle_partitions": args.shuffle_partitions,
        },
    }
    started = time.perf_counter()
    with step(result, "spark_start"):
        spark = get_spark(
            "bench-sequences",
            master=args.master,
            conf={
                "spark.driver.memory": args.driver_memory,
                "spark.sql.shuffle.partitions": str(args.shuffle_partitions),
            },
        )
    result["spark"]["version"] = spark.version
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    ml_dir = Path(args.movielens_dir)
    if args.skip_synthetic:
        result["synthetic"] = {"skipped": "--skip-synthetic"}
    else:
        parts.append(("synthetic", lambda: synthetic_benchmark(spark, args, work)))
    if args.skip_movielens:
        result["movielens"] = {"skipped": "--skip-movielens"}
    elif (ml_dir / "raw" / "u.data").exists():
        parts.append(("movielens", lambda: movielens_pipeline(spark, ml_dir, work)))
    else:
        result["movielens"] = {"skipped": f"bundle not found at {ml_dir}"}
    failed = []
    for name, run in parts:
        try:
            result[name] = run()
        except Exception as exc:  # record and go on: one part failing must not lose the other's figures
            logger.exception("%s part failed", name)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    spark.stop()
    if not args.keep:
        shutil.rmtree(work / "synthetic", ignore_errors=True)
        shutil.rmtree(work / "spark_out", ignore_errors=True)
        shutil.rmtree(work / "polars_out", ignore_errors=True)
    out = Path(args.out)
    incomplete = failed or any("skipped" in result.get(p, {}) for p in ("synthetic", "movielens"))
    if incomplete:  # beside the results, never over them: a committed complete run stays
        out = out.with_name(f"{out.stem}.incomplete.json")
        logger.error("parts failed %s or skipped: the results go to %s", failed, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    logger.info("wrote %s", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

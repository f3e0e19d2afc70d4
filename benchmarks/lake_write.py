"""Benchmark: a delta-rs lake write larger than ``spark.driver.maxResultSize`` (``spark_jobs.lake``).

Without delta-spark jars every write goes through the driver. ``df.toArrow()`` would collect it in
one Spark job, which ``spark.driver.maxResultSize`` caps (1 GiB by default); the lake instead streams
it one partition per job (:func:`spark_jobs.lake.arrow_batches`). This writes ``--rows`` synthetic
``gold.samples`` rows (histories of ``--history`` items, as the sequence step builds them) into a
fresh lake under a session whose cap is ``--max-result-size``, merges the same rows again (a rerun:
delta-rs holds a merge's source in memory), and records for each the wall seconds, the driver's peak
resident memory so far (the Python process; the JVM is not counted) and the rows read back, then
what ``df.toArrow()`` of the same rows does under the same cap. Writes
``benchmarks/results/lake_write.json`` (``--output``). Example::

    .venv/bin/python benchmarks/lake_write.py --rows 1000000 --max-result-size 256m
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.environment import run_environment  # noqa: E402

logger = logging.getLogger("benchmarks.lake_write")
PARTITION = {"dataset": "bench", "tokenizer_version": "v1", "split": "train"}


def samples(spark: Any, rows: int, history: int, partitions: int) -> Any:
    """``rows`` gold.samples rows: user ``id % 1000``, a history of ``history`` items with 6 codes each."""
    from pyspark.sql import functions as F

    codes = F.transform(F.sequence(F.lit(1), F.lit(6 * history)), lambda c: (c * 7 % 256).cast("int"))
    return spark.range(rows, numPartitions=partitions).select(
        F.lit(PARTITION["dataset"]).alias("dataset"),
        F.lit(PARTITION["split"]).alias("split"),
        (F.col("id") % 1000).alias("user_id"),
        F.col("id").alias("item_id"),
        F.timestamp_seconds(F.lit(1_700_000_000) + F.col("id")).alias("event_ts"),
        (F.col("id") % 2).cast("int").alias("label"),
        (F.col("id") % 5 + 1).cast("double").alias("rating"),
        F.lit(history).alias("history_len"),
        F.lit(False).alias("is_cold_user"),
        F.lit(PARTITION["tokenizer_version"]).alias("tokenizer_version"),
        (F.col("id") % 2).cast("int").alias("action"),
        F.sequence(F.col("id"), F.col("id") + history - 1).alias("history_item_ids"),
        codes.alias("history_semantic_ids"),
        F.transform(F.sequence(F.lit(1), F.lit(history)), lambda a: (a % 2).cast("int")).alias(
            "history_actions"
        ),
        F.transform(F.sequence(F.lit(1), F.lit(6)), lambda c: (c * 11 % 256).cast("int")).alias(
            "target_semantic_ids"
        ),
    )


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=50, help="history items per sample")
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--max-result-size", default="256m", help="spark.driver.maxResultSize of the session")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/lake_write.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from spark_jobs.lake import Lake
    from spark_jobs.session import get_spark
    from spark_jobs.tables import GOLD_SAMPLES

    result: dict[str, Any] = {**run_environment(), "args": {k: str(v) for k, v in vars(args).items()}}
    spark = get_spark("lake-write-benchmark", conf={"spark.driver.maxResultSize": args.max_result_size})
    with tempfile.TemporaryDirectory(prefix="hisam-lake-bench-") as root:
        lake = Lake(spark, root, backend="delta-rs")
        df = samples(spark, args.rows, args.history, args.partitions)
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        version = lake.write(df, GOLD_SAMPLES, mode="replace_partition", partition_values=PARTITION)
        seconds = time.perf_counter() - start
        files = list(Path(lake.path(GOLD_SAMPLES)).rglob("*.parquet"))
        result["stream_write"] = {
            "version": version,
            "seconds": round(seconds, 2),
            "rows_written": args.rows,
            "rows_read_back": lake.read(GOLD_SAMPLES).count(),
            "parquet_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "driver_peak_rss_mib_before": rss_before,
            "driver_peak_rss_mib_after": peak_rss_mib(),
        }
        logger.info("stream write: %s", result["stream_write"])
        start = time.perf_counter()
        version = lake.write(df, GOLD_SAMPLES, mode="merge", partition_values=PARTITION)
        result["merge_rerun"] = {
            "version": version,
            "seconds": round(time.perf_counter() - start, 2),
            "rows_read_back": lake.read(GOLD_SAMPLES).count(),
            "driver_peak_rss_mib_after": peak_rss_mib(),
        }
        logger.info("merge of the same rows: %s", result["merge_rerun"])
        start = time.perf_counter()
        try:
            arrow = df.toArrow()
            collected: dict[str, Any] = {"ok": True, "arrow_mib": round(arrow.nbytes / 2**20, 1)}
            del arrow
        except Exception as err:  # the cap's refusal, as Spark words it
            reason = next((line for line in str(err).splitlines() if "maxResultSize" in line), str(err)[:300])
            collected = {"ok": False, "error": reason.strip()}
        collected["seconds"] = round(time.perf_counter() - start, 2)
        result["to_arrow"] = collected
        logger.info("df.toArrow(): %s", collected)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", args.output)
    return result


if __name__ == "__main__":
    main()

"""Import one Amazon Reviews 2023 category (reviews + item metadata JSONL) into bronze and silver.

Example::

    python -m spark_jobs.entrypoints.import_amazon --dataset amazon-movies \\
        --reviews data/Movies_and_TV.jsonl.gz --meta data/meta_Movies_and_TV.jsonl.gz \\
        --logical-date 2024-01-01

No import budget is applied here: ``hisam run ingest`` (what the DAGs run) stops a day whose
quarantine exceeds ``quality.max_quarantine_fraction`` before silver, this job promotes whatever
bronze kept. Read the summary's quarantine counts, or pass --skip-silver and run promote_silver after.
"""

from __future__ import annotations

import sys

from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup
from spark_jobs.importers.amazon import AmazonImportConfig, import_amazon
from spark_jobs.importers.silver import SilverConfig, promote_to_silver


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--reviews", required=True, help="reviews JSONL file, directory or glob (.gz is fine)")
    p.add_argument("--meta", help="item metadata JSONL file, directory or glob")
    p.add_argument("--dataset", type=dataset_name, default="amazon", help="dataset name in the lake")
    p.add_argument("--skip-silver", action="store_true", help="stop after bronze")
    p.add_argument("--positive-threshold", type=float, default=3.0, help="rating > this is a positive label")
    args = p.parse_args(argv)
    spark, lake = setup(args, "hisam-import-amazon")
    config = AmazonImportConfig(reviews=args.reviews, meta=args.meta, dataset=args.dataset)
    summary = {"bronze": import_amazon(spark, lake, config, args.logical_date)}
    if not args.skip_silver:
        silver = SilverConfig(positive_threshold=args.positive_threshold)
        summary["silver"] = promote_to_silver(lake, args.dataset, args.logical_date, silver)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Import MovieLens-100K (+ posters, item_extra.tsv) into bronze, then promote to silver.

Example::

    python -m spark_jobs.entrypoints.import_movielens \\
        --data-dir ../shared/data/movielens-100k --logical-date 2024-01-01

No import budget is applied here: ``hisam run ingest`` (what the DAGs run) stops a day whose
quarantine exceeds ``quality.max_quarantine_fraction`` before silver, this job promotes whatever
bronze kept. Read the summary's quarantine counts, or pass --skip-silver and run promote_silver after.
"""

from __future__ import annotations

import sys

from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup
from spark_jobs.importers.movielens import MovieLensImportConfig, check_bundle, import_movielens
from spark_jobs.importers.silver import SilverConfig, promote_to_silver


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--data-dir", required=True, help="bundle directory holding raw/u.data, raw/u.item, raw/u.user"
    )
    p.add_argument("--dataset", type=dataset_name, default="movielens-100k", help="dataset name in the lake")
    p.add_argument("--no-extra", action="store_true", help="ignore item_extra.tsv")
    p.add_argument("--no-posters", action="store_true", help="ignore posters/")
    p.add_argument(
        "--encoding", default="ISO-8859-1", help="of raw/u.item and raw/u.user (default ISO-8859-1)"
    )
    p.add_argument("--skip-silver", action="store_true", help="stop after bronze")
    p.add_argument("--positive-threshold", type=float, default=3.0, help="rating > this is a positive label")
    args = p.parse_args(argv)
    check_bundle(args.data_dir, include_extra=not args.no_extra)  # before Spark starts
    spark, lake = setup(args, "hisam-import-movielens")
    config = MovieLensImportConfig(
        data_dir=args.data_dir,
        dataset=args.dataset,
        include_extra=not args.no_extra,
        include_posters=not args.no_posters,
        encoding=args.encoding,
    )
    bronze = import_movielens(spark, lake, config, args.logical_date)
    summary = {"bronze": bronze}
    if not args.skip_silver:
        silver = SilverConfig(positive_threshold=args.positive_threshold)
        summary["silver"] = promote_to_silver(lake, args.dataset, args.logical_date, silver)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Re-run bronze -> silver for one dataset and logical date (the importers do this by default).
Refused when that date's import stopped before it finished: rerun the import instead.

Example::

    python -m spark_jobs.entrypoints.promote_silver --dataset movielens-100k --logical-date 2024-01-01
"""

from __future__ import annotations

import datetime as dt
import sys

from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup
from spark_jobs.importers.silver import SilverConfig, promote_to_silver
from spark_jobs.lake import Lake
from spark_jobs.tables import BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", type=dataset_name, required=True, help="dataset name in the lake")
    p.add_argument("--positive-threshold", type=float, default=3.0, help="rating > this is a positive label")
    args = p.parse_args(argv)
    _spark, lake = setup(args, "hisam-promote-silver")
    imported = _imported_dates(lake, args.dataset)
    if args.logical_date not in imported:  # a typo would promote nothing and mark the day as done
        shown = ", ".join(map(str, imported[-10:])) or "none"
        raise SystemExit(
            f"no bronze rows of {args.dataset!r} at {args.logical_date}: dates imported: {shown}"
        )
    config = SilverConfig(positive_threshold=args.positive_threshold)
    emit({"silver": promote_to_silver(lake, args.dataset, args.logical_date, config)})
    return 0


def _imported_dates(lake: Lake, dataset: str) -> list[dt.date]:
    """The logical dates with bronze rows of ``dataset``, oldest first."""
    dates: set[dt.date] = set()
    for table in (BRONZE_INTERACTIONS, BRONZE_ITEMS, BRONZE_USERS):
        rows = lake.read(table.name, partitions={"dataset": dataset}).select("logical_date").distinct()
        dates.update(r.logical_date for r in rows.collect())
    return sorted(dates)


if __name__ == "__main__":
    sys.exit(main())

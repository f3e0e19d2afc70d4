"""Re-run bronze -> silver for one dataset and logical date (the importers do this by default).

Example::

    python -m spark_jobs.entrypoints.promote_silver --dataset movielens-100k --logical-date 2024-01-01
"""

from __future__ import annotations

import sys

from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup
from spark_jobs.importers.silver import SilverConfig, promote_to_silver


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", type=dataset_name, required=True, help="dataset name in the lake")
    p.add_argument("--positive-threshold", type=float, default=3.0, help="rating > this is a positive label")
    args = p.parse_args(argv)
    _spark, lake = setup(args, "hisam-promote-silver")
    config = SilverConfig(positive_threshold=args.positive_threshold)
    emit({"silver": promote_to_silver(lake, args.dataset, args.logical_date, config)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

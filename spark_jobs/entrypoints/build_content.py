"""Build gold item documents and user profile features of one dataset from silver.

Example::

    python -m spark_jobs.entrypoints.build_content --dataset movielens-100k
"""

from __future__ import annotations

import sys

from spark_jobs.content import ContentConfig, build_content
from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, date=False)
    p.add_argument("--dataset", type=dataset_name, required=True, help="dataset name in the lake")
    p.add_argument("--config", help="YAML ContentConfig (field order, exclusions, age buckets)")
    args = p.parse_args(argv)
    config = ContentConfig.from_yaml(args.config) if args.config else ContentConfig()
    _spark, lake = setup(args, "hisam-build-content")
    emit(build_content(lake, args.dataset, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

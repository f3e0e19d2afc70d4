"""Write a synthetic dataset with planted taste clusters in the generic format (no Spark).

Example (the benchmark size)::

    python -m spark_jobs.entrypoints.generate_synthetic --out .hisam/data/synthetic-10m \\
        --users 100000 --items 20000 --events 10000000 --clusters 20 --image-size 0
"""

from __future__ import annotations

import sys

from spark_jobs.entrypoints.common import configure_logging, emit, parser
from spark_jobs.importers.synthetic import SyntheticConfig, generate


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, spark=False, date=False)
    defaults = SyntheticConfig()
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML SyntheticConfig (flags win)")
    p.add_argument("--users", type=int, help=f"number of users (default {defaults.num_users})")
    p.add_argument("--items", type=int, help=f"number of items (default {defaults.num_items})")
    p.add_argument("--events", type=int, help=f"number of interactions (default {defaults.num_events})")
    p.add_argument("--clusters", type=int, help=f"latent taste clusters (default {defaults.num_clusters})")
    p.add_argument("--seed", type=int, help=f"random seed (default {defaults.seed})")
    p.add_argument(
        "--image-size", type=int, help=f"PNG side in pixels, 0 = no images (default {defaults.image_size})"
    )
    p.add_argument(
        "--chunk-rows", type=int, help=f"events per Parquet part file (default {defaults.chunk_rows})"
    )
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    base = SyntheticConfig.from_yaml(args.config).model_dump() if args.config else {}
    flags = {
        "num_users": args.users,
        "num_items": args.items,
        "num_events": args.events,
        "num_clusters": args.clusters,
        "seed": args.seed,
        "image_size": args.image_size,
        "chunk_rows": args.chunk_rows,
    }
    config = SyntheticConfig.model_validate({**base, **{k: v for k, v in flags.items() if v is not None}})
    out = generate(config, args.out)
    emit({"out_dir": out.out_dir, "num_events": out.num_events, "config": config.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

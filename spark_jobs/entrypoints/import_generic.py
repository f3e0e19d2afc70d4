"""Import bring-your-own data (generic format: CSV, Parquet or JSONL) into bronze and silver.

The format is documented in :mod:`spark_jobs.importers.generic`. Options come from ``--config``
(a YAML ``GenericImportConfig``) and/or the flags, flags winning. Example::

    python -m spark_jobs.entrypoints.import_generic --dataset shop --logical-date 2024-01-01 \\
        --interactions data/events/ --items data/items.csv --users data/users.parquet

No import budget is applied here: ``hisam run ingest`` (what the DAGs run) stops a day whose
quarantine exceeds ``quality.max_quarantine_fraction`` before silver, this job promotes whatever
bronze kept. Read the summary's quarantine counts, or pass --skip-silver and run promote_silver after.
"""

from __future__ import annotations

import sys
from typing import get_args

from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup
from spark_jobs.importers.generic import GenericImportConfig, import_generic
from spark_jobs.importers.silver import SilverConfig, promote_to_silver


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", help="YAML GenericImportConfig")
    p.add_argument("--dataset", type=dataset_name, help="dataset name in the lake")
    p.add_argument("--interactions", help="interactions file, directory or glob")
    p.add_argument("--items", help="items file, directory or glob")
    p.add_argument("--users", help="users file, directory or glob")
    p.add_argument(
        "--format", choices=["auto", "csv", "parquet", "jsonl"], help="input format (default auto)"
    )
    p.add_argument(
        "--timestamp-unit",
        choices=list(get_args(GenericImportConfig.model_fields["timestamp_unit"].annotation)),
        help="how timestamps are written: unix seconds, ms, us, ns, ISO-8601 text, or auto (numbers by "
        "magnitude, text as ISO-8601)",
    )
    p.add_argument("--encoding", help="of CSV inputs (default UTF-8; latin-1 is ISO-8859-1)")
    p.add_argument("--skip-silver", action="store_true", help="stop after bronze")
    p.add_argument("--positive-threshold", type=float, default=3.0, help="rating > this is a positive label")
    args = p.parse_args(argv)
    base = GenericImportConfig.from_yaml(args.config).model_dump() if args.config else {}
    flags = {
        "dataset": args.dataset,
        "interactions": args.interactions,
        "items": args.items,
        "users": args.users,
        "format": args.format,
        "timestamp_unit": args.timestamp_unit,
        "encoding": args.encoding,
    }
    try:
        config = GenericImportConfig.model_validate(
            {**base, **{k: v for k, v in flags.items() if v is not None}}
        )
    except ValueError as err:
        p.error(f"invalid configuration (need --dataset and --interactions, or --config): {err}")
    spark, lake = setup(args, "hisam-import-generic")
    summary = {"bronze": import_generic(spark, lake, config, args.logical_date)}
    if not args.skip_silver:
        silver = SilverConfig(positive_threshold=args.positive_threshold)
        summary["silver"] = promote_to_silver(lake, config.dataset, args.logical_date, silver)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embed the items of one dataset for one modality into gold.item_embeddings (resumable).

Examples::

    python -m spark_jobs.entrypoints.embed_items --dataset movielens-100k --modality text
    python -m spark_jobs.entrypoints.embed_items --dataset movielens-100k --modality image
    python -m spark_jobs.entrypoints.embed_items --dataset synthetic --modality text --kind hashing
"""

from __future__ import annotations

import json
import sys

from spark_jobs.embeddings import EmbeddingJobConfig, EncoderSpec, embed_items
from spark_jobs.entrypoints.common import dataset_name, emit, parser, setup


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, date=False)
    p.add_argument("--dataset", type=dataset_name, required=True, help="dataset name in the lake")
    p.add_argument("--modality", required=True, choices=["text", "image"])
    p.add_argument(
        "--kind", default="default", help="'default' (hisam_core encoder), 'hashing' or 'module:factory'"
    )
    p.add_argument("--encoder-name", help="name recorded in the table (default: derived from the model)")
    p.add_argument("--encoder-version", default="1", help="bump when the model or its settings change")
    p.add_argument(
        "--encoder-config", default="{}", help="JSON settings for the encoder, e.g. '{\"max_length\": 128}'"
    )
    p.add_argument("--job-config", help="YAML EmbeddingJobConfig (batch size, commit slices, threads)")
    p.add_argument("--batch-size", type=int, help="inputs per encode call")
    args = p.parse_args(argv)
    try:
        encoder_config = json.loads(args.encoder_config)
    except json.JSONDecodeError as err:
        p.error(f"--encoder-config is not JSON: {err}")
    spec = EncoderSpec(
        modality=args.modality,
        kind=args.kind,
        name=args.encoder_name,
        version=args.encoder_version,
        config=encoder_config,
    )
    job = EmbeddingJobConfig.from_yaml(args.job_config) if args.job_config else EmbeddingJobConfig()
    if args.batch_size:
        job.batch_size = args.batch_size
    _spark, lake = setup(args, "hisam-embed-items")
    emit(embed_items(lake, args.dataset, spec, job))
    return 0


if __name__ == "__main__":
    sys.exit(main())

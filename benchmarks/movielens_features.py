"""Build (or load from cache) the three MovieLens-100K modality embeddings and write the build's
timings to ``benchmarks/results/movielens_features.json``; the builder is
:mod:`hisam_core.evaluation.features`.

Usage: ``python benchmarks/movielens_features.py --help``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import cpu_capability
from hisam_core.encoders import EncodersConfig
from hisam_core.evaluation.features import build_movielens_features
from hisam_core.evaluation.semantic import features_fingerprint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT / "../shared/data/movielens-100k"
DEFAULT_CACHE_DIR = ROOT / "benchmarks" / ".cache"
RESULTS_PATH = ROOT / "benchmarks" / "results" / "movielens_features.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MovieLens-100K bundle")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the .npz cache goes")
    parser.add_argument(
        "--cutoff-quantile", type=float, default=0.9, help="behaviour trains on this first share"
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="encoders YAML (e.g. configs/encoders.yaml)"
    )
    parser.add_argument(
        "--image-model", default=None, help="local transformers vision model dir (default: descriptor)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cache exists")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); the behaviour encoder's training differs in the "
        "last bits between thread counts, which the cache key does not record (the JSON does)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="JSON with timings of a build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EncodersConfig.from_yaml(args.config) if args.config else EncodersConfig()
    if args.image_model is not None:
        config.image.model_path = args.image_model
    t = time.perf_counter()
    result = build_movielens_features(
        args.data_dir, args.cache_dir, args.cutoff_quantile, config, args.device, args.force
    )
    wall = time.perf_counter() - t
    summary = {
        **result.meta,
        "features_fingerprint": features_fingerprint(result.features),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(),
        "wall_s_this_run": round(wall, 2),
    }
    if not result.from_cache:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=2) + "\n")
    logging.getLogger(__name__).info("features: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

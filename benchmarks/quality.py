"""Offline quality of Hi-SAM against its baselines and ablations (paper Sec. 4.1-4.3): ``hisam
evaluate`` (:mod:`pipelines.evaluation`) writing to ``benchmarks/results/`` with the feature cache in
``benchmarks/.cache``. ``python benchmarks/quality.py --help`` lists the options.

The committed MovieLens-100K results:
``python benchmarks/quality.py --run main controls ablations modalities --seeds 0 1 2 \
--scaling --scaling-layers 1 2 4 --scaling-tokens 48 80 160 300 --workers 2 --mlflow \
--cache-dir benchmarks/.cache/evaluation`` (``make quality``)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(
        main(
            results=ROOT / "benchmarks" / "results",
            features_cache=ROOT / "benchmarks" / ".cache",
            prog="python benchmarks/quality.py",
        )
    )

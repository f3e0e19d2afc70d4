"""``hisam``: the one command-line entry point.

``hisam demo`` runs the main job on the embedded default; ``hisam run <step> --config c.yaml`` runs
one pipeline step (the same function Airflow calls); ``hisam steps`` lists the steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.steps import STEPS

log = logging.getLogger("hisam")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hisam",
        description=(
            "Hi-SAM recommender pipeline: the Disentangled Semantic Tokenizer (DST) turns item "
            "text, images and behaviour into 6 semantic tokens; the Hierarchical Memory-Anchor "
            "Transformer (HMAT) ranks candidates from a user's token history."
        ),
        epilog="Each step's config is a YAML file; unknown keys are errors. See configs/ for defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("HISAM_TORCH_THREADS", "1")),
        help="torch intra-op threads (default $HISAM_TORCH_THREADS or 1: the models here are small, and "
        "on a busy 2-core machine 2 threads ran DST 13x slower than 1; raise it on large CPU nodes)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded default",
        description="Train the DST tokenizer on the synthetic catalogue; outputs and the MLflow store "
        "go under $HISAM_HOME (default .hisam).",
    )
    demo.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="run one pipeline step", description="Run one pipeline step.")
    run.add_argument("step", choices=sorted(STEPS), help="the step to run")
    run.add_argument("--config", type=Path, help="YAML config for the step (defaults if omitted)")

    sub.add_parser("steps", help="list the pipeline steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "steps":
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "steps":
            for step in STEPS.values():
                sys.stdout.write(f"{step.name:<20} {step.help}\n")
            return 0
        if args.command == "run":
            config_cls, fn = STEPS[args.step].resolve()
            config = config_cls.from_yaml(args.config) if args.config else config_cls()
            summary = fn(config)
        else:
            from pipelines.demo import run_demo

            summary = run_demo(seed=args.seed)
    except (ValueError, FileNotFoundError, KeyError) as err:
        log.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

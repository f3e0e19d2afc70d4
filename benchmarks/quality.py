"""Offline quality of Hi-SAM against its baselines and ablations (paper Sec. 4.1-4.3, Tables 2-4).

Runs :func:`hisam_core.evaluation.harness.run_evaluation` on MovieLens-100K (or any dataset in the
generic interactions format, via ``--config``) and writes ``benchmarks/results/quality.json``,
``quality.md`` (tables: mean ± sample std over seeds) and ``quality_scaling.png`` (GAUC against
HMAT depth and against the token budget). ``--workers N`` runs the (experiment, seed) jobs in N
processes of one torch thread each; ``--mlflow`` logs one MLflow run per (experiment, seed) to the
experiment ``hisam-evaluation`` (``MLFLOW_TRACKING_URI`` or ``sqlite:///.hisam/mlflow.db``), plus a
summary run with the tables and the plot as artifacts.

Usage (the committed results):
``python benchmarks/quality.py --run main ablations modalities --seeds 0 1 2 \
--set-seeds ablations=0 modalities=0 --scaling --workers 2``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.movielens_features import DEFAULT_CACHE_DIR, load_movielens_features
from hisam_core.evaluation.harness import (
    EvaluationConfig,
    ScalingConfig,
    assemble,
    collect_scaling,
    plot_scaling,
    run_evaluation,
    scaling_points,
)
from hisam_core.features import ItemFeatures

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _features(config: EvaluationConfig) -> ItemFeatures | None:
    """MovieLens features from the shared cache unless the config names a features file."""
    if config.data.features_path or config.data.dataset != "movielens":
        return None
    return load_movielens_features(config.data.path, DEFAULT_CACHE_DIR)


def _job(config: EvaluationConfig) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    return run_evaluation(config, _features(config))


def run_parallel(
    config: EvaluationConfig,
    workers: int,
    reuse: list[dict[str, Any]],
    reuse_scaling: dict[str, Any] | None,
    dataset: dict[str, Any] | None,
) -> dict[str, Any]:
    """One sub-evaluation per (experiment, seed), scaling points included, ``workers`` at a time
    (longest first), merged with :func:`assemble`; ``reuse`` runs (and ``reuse_scaling``) of an
    earlier result of this config are kept instead of re-run."""
    jobs = [(e, seed) for e, seed in config.jobs()]
    if config.scaling is not None and reuse_scaling is None:
        jobs += [(e, seed) for _, _, e in scaling_points(config) for seed in config.scaling.seeds]
    done = {(r["experiment"], r["seed"]) for r in reuse}
    subs = []
    for experiment, seed in jobs:
        if (experiment.name, seed) in done:
            continue
        done.add((experiment.name, seed))
        experiments = [*config.experiments, *([] if experiment in config.experiments else [experiment])]
        update = {"experiments": experiments, "run": [experiment.name], "seeds": [seed], "seeds_per_set": {}}
        subs.append(config.model_copy(update={**update, "scaling": None}))
    cost = {"pretrain": 3, "hmat": 2}
    subs.sort(
        key=lambda c: (
            cost["pretrain"]
            if c.experiment(c.run[0]).pretrain
            else cost.get(c.experiment(c.run[0]).model, 1),
            c.experiment(c.run[0]).max_tokens or 0,
            c.experiment(c.run[0]).hmat.get("num_layers", 0),
        ),
        reverse=True,
    )
    with ProcessPoolExecutor(max(workers, 1), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_job, subs))
    records = {(r["experiment"], r["seed"]): r for r in [*reuse, *(r for p in parts for r in p["runs"])]}
    order = {(e.name, s): k for k, (e, s) in enumerate(config.jobs())}
    runs = sorted(
        (r for key, r in records.items() if key in order), key=lambda r: order[(r["experiment"], r["seed"])]
    )
    scaling = reuse_scaling
    if config.scaling is not None and scaling is None:
        scaling = collect_scaling(config, records)
    return assemble(config, parts[0]["dataset"] if parts else dataset, runs, scaling)


def log_mlflow(result: dict[str, Any], artifacts: list[Path]) -> None:
    """One MLflow run per (experiment, seed) with its params and metrics, and a summary run."""
    import mlflow

    mlflow.set_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / '.hisam' / 'mlflow.db'}")
    )
    mlflow.set_experiment("hisam-evaluation")
    for run in result["runs"]:
        with mlflow.start_run(run_name=f"{run['experiment']}-seed{run['seed']}"):
            mlflow.log_params({k: v for k, v in run.items() if k != "metrics"})
            mlflow.log_params(
                {f"budget.{k}": v for k, v in result["budget"].items() if not isinstance(v, dict)}
            )
            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in run["metrics"].items()})
    with mlflow.start_run(run_name="summary"):
        mlflow.log_params({f"dataset.{k}": v for k, v in result["dataset"].items()})
        for name, entry in result["summary"].items():
            mlflow.log_metrics(
                {
                    f"{name}.{m.replace('@', '_at_')}.mean": v["mean"]
                    for m, v in entry.items()
                    if isinstance(v, dict)
                }
            )
        for path in artifacts:
            if path.exists():
                mlflow.log_artifact(str(path))


def markdown(result: dict[str, Any], command: str) -> str:
    """The tables, the budget and the reproduce command (findings are added by hand below them)."""
    budget = result["budget"]
    lines = [
        "# Offline quality on " + result["dataset"]["name"],
        "",
        f"Reproduce: `{command}`",
        "",
        "Protocol (Sec. 4.1): rating > 3 positive; global chronological 90/10 split; cold = fewer than "
        f"10 training interactions. Split: `{json.dumps({k: v for k, v in result['dataset'].items()})}`.",
        "",
        f"Budget (every model): {budget['window_items']} items per window (HMAT: {budget['max_tokens']} "
        f"tokens), {budget['train_steps']} steps x batch {budget['batch_size']}, PT {budget['pretrain_steps']} "
        f"steps where marked; HMAT {json.dumps(budget['hmat'])}; ID rankers {json.dumps(budget['id_ranker'])}; "
        f"DST {budget['tokenizer_epochs']} epochs, RQ-VAE {budget['rqvae_epochs']} epochs (trained once, seed 0).",
        "",
        "Values: mean ± sample std over the seeds listed per row; HR@10 = positives in the top 10 of a "
        "user's test items / min(10, positives); NDCG@10 binary relevance; both averaged over users "
        "with both classes.",
        "",
    ]
    for name, table in result["tables"].items():
        lines += [f"## {name}", "", table]
    if result["scaling"] is not None:
        lines += [
            "## scaling",
            "",
            f"`quality_scaling.png`: GAUC of `{result['scaling']['experiment']}` against HMAT depth and "
            f"against max tokens, seeds {result['scaling']['seeds']}.",
            "",
            "| axis | value | GAUC | Cold GAUC |",
            "| --- | --- | --- | --- |",
        ]
        for axis in ("num_layers", "max_tokens"):
            for point in result["scaling"][axis]:
                lines.append(
                    f"| {axis} | {point['value']} | {point['gauc']:.4f} | {point['cold_gauc']:.4f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "evaluation.yaml")
    parser.add_argument("--run", nargs="+", default=None, help="set or experiment names")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--set-seeds", nargs="*", default=[], help="SET=SEED[,SEED..] per set")
    parser.add_argument("--scaling", action="store_true", help="also run the depth / length sweep")
    parser.add_argument("--scaling-layers", nargs="+", type=int, default=None, help="depths of the sweep")
    parser.add_argument("--scaling-tokens", nargs="+", type=int, default=None, help="max_tokens of the sweep")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--features", type=Path, default=None, help="npz with item_ids and emb_<modality>")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR / "evaluation", help="semantic-ID tables, DST"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mlflow", action="store_true")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="quality.json of an earlier run: keep its runs and sweep"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s")

    config = EvaluationConfig.from_yaml(args.config)
    update: dict[str, Any] = {"cache_dir": str(args.cache_dir)}
    if args.run:
        update["run"] = args.run
    if args.seeds:
        update["seeds"] = args.seeds
    if args.set_seeds:
        update["seeds_per_set"] = {
            k: [int(s) for s in v.split(",")] for k, v in (item.split("=", 1) for item in args.set_seeds)
        }
    if args.scaling:
        scaling = config.scaling or ScalingConfig()
        if args.scaling_layers:
            scaling = scaling.model_copy(update={"num_layers": args.scaling_layers})
        if args.scaling_tokens:
            scaling = scaling.model_copy(update={"max_tokens": args.scaling_tokens})
        update["scaling"] = scaling
    if args.steps:
        update["train"] = config.train.model_copy(update={"max_steps": args.steps})
    if args.features:
        update["data"] = config.data.model_copy(update={"features_path": str(args.features.resolve())})
    config = EvaluationConfig.model_validate({**config.model_dump(), **update})
    torch.set_num_threads(config.threads)

    start = time.perf_counter()
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        result = run_parallel(config, args.workers, earlier["runs"], earlier["scaling"], earlier["dataset"])
    elif args.workers > 1:
        result = run_parallel(config, args.workers, [], None, None)
    else:
        result = run_evaluation(config, _features(config))
    result["environment"] = {
        "torch": torch.__version__,
        "threads_per_worker": config.threads,
        "workers": args.workers,
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (args.results / f"quality{s}" for s in (".json", ".md", "_scaling.png"))
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md_path.write_text(markdown(result, command))
    if result["scaling"] is not None:
        plot_scaling(result["scaling"], png_path)
    if args.mlflow:
        log_mlflow(result, [json_path, md_path, png_path])
    print(md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

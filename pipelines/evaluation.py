"""``hisam evaluate``: the offline comparison (paper Sec. 4.1-4.3, Tables 2-4) as a command.

Runs :func:`hisam_core.evaluation.harness.run_evaluation` on MovieLens-100K (features built by
:mod:`hisam_core.evaluation.features` and cached) or on any dataset in the generic interactions format
(``--config``), and writes ``quality.json``, ``quality.md`` (tables: mean ± sample std over seeds, the
target check, then the hand-written ``quality_findings.md`` if one sits beside them) and
``quality_scaling.png`` (GAUC against HMAT depth and against the token budget). ``--workers N`` runs
the (experiment, seed) jobs in N processes of ``threads`` torch threads each (``--threads``, else the
YAML's ``threads``, else ``hisam --threads`` / ``HISAM_TORCH_THREADS``); ``--reuse`` keeps the runs of an
earlier ``quality.json`` of the same data, budget and features whose experiments are defined the
same way, whose semantic IDs the same tokenizer code trained (``cache_versions``), whose HMATs
learned this code's rule for items of one instant (``mask_rule``) and whose ID rankers are this
code's (``id_ranker_version``), and runs the rest;
``--mlflow`` logs one MLflow run per (experiment, seed) to the experiment ``hisam-evaluation`` plus a
summary run with the report and the plot as artifacts. ``benchmarks/quality.py`` is the same command
with the repository's result paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from hisam_core.config import describe
from hisam_core.evaluation.baselines import ID_RANKER_VERSION
from hisam_core.evaluation.features import build_movielens_features
from hisam_core.evaluation.harness import (
    EvaluationConfig,
    ScalingConfig,
    assemble,
    collect_scaling,
    json_safe,
    plot_scaling,
    run_evaluation,
    scaling_points,
    scaling_records,
    split_summary,
)
from hisam_core.evaluation.semantic import CACHE_VERSIONS, TRAINERS, features_fingerprint, load_features_npz
from hisam_core.features import ItemFeatures
from hisam_core.ranker.attention import MASK_RULE
from pipelines.settings import LOG_LEVELS, Settings, movielens_dir, positive_int, positive_int_arg
from pipelines.steps import THREADS_ENV

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

EXPERIMENT = "hisam-evaluation"
FINDINGS = "quality_findings.md"
_LOG_FORMAT = "%(asctime)s %(processName)s %(name)s: %(message)s"


def _features(config: EvaluationConfig, features_cache: str) -> tuple[ItemFeatures | None, int | None]:
    """MovieLens features from ``features_cache`` unless the config names a features file, with the
    behaviour encoder cut where the protocol splits, and that cut-off."""
    if config.data.features_path or config.data.dataset != "movielens":
        return None, None
    built = build_movielens_features(config.data.path, features_cache, config.protocol.train_fraction)
    return built.features, built.cutoff


def _job(job: tuple[EvaluationConfig, str, int]) -> dict[str, Any]:
    config, features_cache, level = job  # level: the parent's (--log-level)
    torch.set_num_threads(config.threads)
    logging.basicConfig(level=level, format=_LOG_FORMAT)
    features, cutoff = _features(config, features_cache)
    return run_evaluation(config, features, features_cutoff=cutoff)


#: Config fields an earlier result must share for its runs to be reused.
SHARED = ("data", "protocol", "max_tokens", "test_stride", "train_stride", "hmat", "id_ranker", "train")
SHARED += ("pretrain_steps", "tokenizer", "rqvae")


def _located(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its data paths absolute: ``../shared/data/movielens-100k`` given in the clone
    and the same folder by its full path are the same data."""
    data = dict(config["data"])
    for key in ("path", "features_path"):
        if data.get(key) is not None:
            data[key] = str(Path(data[key]).resolve())
    return {**config, "data": data}


def _comparable(config: EvaluationConfig, reuse: dict[str, Any]) -> dict[str, Any]:
    """The earlier result's config (new defaults filled, paths absolute); an error when its data,
    protocol or budget differ from ``config``'s (its runs would not be comparable)."""
    current = _located(config.model_dump(mode="json"))
    earlier = EvaluationConfig.model_validate(reuse["config"]).model_dump(mode="json")  # fills new defaults
    earlier = _located(earlier)
    differ = [k for k in SHARED if earlier[k] != current[k]]
    if differ:
        raise ValueError(f"--reuse: the earlier result differs in {differ}; its runs are not comparable")
    return earlier


def _stale_trainers(reuse: dict[str, Any], experiment: dict[str, Any] | None) -> list[str]:
    """The tokenizer trainers of ``experiment``'s semantic IDs whose cache version
    (:data:`~hisam_core.evaluation.semantic.CACHE_VERSIONS`) is not the one ``reuse`` records (a
    result that records none: every one): its runs read IDs that today's code would not train."""
    tokenizer = (experiment or {}).get("tokenizer")
    recorded = reuse.get("cache_versions", {})
    return (
        [t for t in TRAINERS[tokenizer["kind"]] if recorded.get(t) != CACHE_VERSIONS[t]] if tokenizer else []
    )


def _stale_ranker(reuse: dict[str, Any], experiment: dict[str, Any] | None) -> bool:
    """Whether ``experiment``'s runs in ``reuse`` came from another version of its ranker's code: an
    HMAT under another :data:`~hisam_core.ranker.attention.MASK_RULE`, an ID ranker of another
    :data:`~hisam_core.evaluation.baselines.ID_RANKER_VERSION` (a result that records none: older)."""
    model = (experiment or {}).get("model")
    if model == "hmat":
        return reuse.get("mask_rule") != MASK_RULE
    return model is not None and reuse.get("id_ranker_version") != ID_RANKER_VERSION


def _reusable(config: EvaluationConfig, reuse: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs of ``reuse`` whose experiment is still defined the same way (:func:`_comparable` first),
    whose semantic IDs come from the same tokenizer code (:func:`_stale_trainers`) and whose ranker
    is today's code (:func:`_stale_ranker`: an HMAT's rule for items of one instant, the ID rankers'
    version)."""
    earlier = _comparable(config, reuse)
    before = {e["name"]: e for e in earlier["experiments"]}
    now = {e.name: e.model_dump(mode="json") for e in config.experiments}
    same = [r for r in reuse["runs"] if before.get(r["experiment"]) == now.get(r["experiment"])]
    kept = [
        r
        for r in same
        if not _stale_trainers(reuse, now.get(r["experiment"]))
        and not _stale_ranker(reuse, now.get(r["experiment"]))
    ]
    if len(same) < len(reuse["runs"]):
        log.info("--reuse: %d runs of redefined experiments are run again", len(reuse["runs"]) - len(same))
    if len(kept) < len(same):
        log.info(
            "--reuse: %d runs of IDs another tokenizer version trained, of HMATs under another mask "
            "rule or of ID rankers of another version, are run again",
            len(same) - len(kept),
        )
    return kept


def _reusable_points(
    config: EvaluationConfig, reuse: dict[str, Any]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Sweep points of ``reuse`` that ``config``'s sweep also has, unless its experiment was redefined,
    retokenized (:func:`_stale_trainers`) or trained by another version of its ranker
    (:func:`_stale_ranker`)."""
    if config.scaling is None:
        return {}
    name = config.scaling.experiment
    before = {e["name"]: e for e in _comparable(config, reuse)["experiments"]}
    now = config.experiment(name).model_dump(mode="json")
    if before.get(name) != now or _stale_trainers(reuse, now) or _stale_ranker(reuse, now):
        log.info(
            "--reuse: the sweep's experiment %s was redefined, retokenized or trained by another version of "
            "its ranker; its points run again",
            name,
        )
        return {}
    return scaling_records(config, reuse.get("scaling"))


def _code_version() -> str:
    from pipelines.tracking import code_version

    return code_version()


def _stamp(runs: list[dict[str, Any]]) -> None:
    """Record in each run the code it ran (:func:`pipelines.tracking.code_version`), so a result
    merged with ``--reuse`` still names each run's commit."""
    for run in runs:
        run["code_version"] = _code_version()


def run_parallel(
    config: EvaluationConfig,
    features_cache: str,
    workers: int,
    reuse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One sub-evaluation per (experiment, seed), scaling points included, ``workers`` at a time
    (longest first), merged with :func:`assemble`. Runs and sweep points of ``reuse``, an earlier
    result of the same data and budget, are kept instead of re-run."""
    kept = _reusable(config, reuse) if reuse else []
    kept_points = _reusable_points(config, reuse) if reuse else {}
    now = split_summary(config) if kept or kept_points else None
    if now is not None and now != _split(reuse):
        raise ValueError(  # the same path, another file (re-exported in place)
            f"--reuse: the earlier result was measured on the split {_split(reuse)}, this run's data "
            f"gives {now}: its runs are not comparable; run without --reuse"
        )
    jobs = list(config.jobs())
    if config.scaling is not None:
        jobs += [(e, seed) for _, _, e in scaling_points(config) for seed in config.scaling.seeds]
    table = {(e.name, seed) for e, seed in config.jobs()}  # a table row needs a whole run, not a point
    done = {(r["experiment"], r["seed"]) for r in kept} | (set(kept_points) - table)
    subs = []
    for experiment, seed in jobs:
        if (experiment.name, seed) in done:
            continue
        done.add((experiment.name, seed))
        experiments = [*config.experiments, *([] if experiment in config.experiments else [experiment])]
        update = {"experiments": experiments, "run": [experiment.name], "seeds": [seed], "seeds_per_set": {}}
        subs.append(config.model_copy(update={**update, "scaling": None}))

    def cost(sub: EvaluationConfig) -> tuple[int, int, int]:
        experiment = sub.experiment(sub.run[0])
        kind = 3 if experiment.pretrain else 2 if experiment.model == "hmat" else 1
        return kind, experiment.max_tokens or 0, experiment.hmat.get("num_layers", 0)

    subs.sort(key=cost, reverse=True)
    log.info("%d jobs to run (%d kept from an earlier result), %d workers", len(subs), len(kept), workers)
    labels = [f"{sub.run[0]} seed {sub.seeds[0]}" for sub in subs]
    level = logging.getLogger().getEffectiveLevel()
    parts = pool_map(_job, [(sub, features_cache, level) for sub in subs], workers, labels)
    _stamp([r for p in parts for r in p["runs"]])  # kept runs keep the code they record (or none)
    if now is not None and any(_split(part) != now for part in parts):
        raise ValueError(f"--reuse: the data changed while the jobs ran (it gave {now} when they started)")
    log.info("reusing %d runs and %d sweep points", len(kept), len(kept_points))
    records = {**kept_points}
    records |= {(r["experiment"], r["seed"]): r for r in [*kept, *(r for p in parts for r in p["runs"])]}
    order = {(e.name, s): k for k, (e, s) in enumerate(config.jobs())}
    runs = sorted(
        (r for key, r in records.items() if key in order), key=lambda r: order[(r["experiment"], r["seed"])]
    )
    scaling = collect_scaling(config, records) if config.scaling is not None else None
    dataset = parts[0]["dataset"] if parts else (reuse or {}).get("dataset", {})
    return assemble(config, dataset, runs, scaling)


def _split(result: dict[str, Any] | None) -> dict[str, Any]:
    """A result's split summary without the features fingerprint (:func:`_same_features` judges it)."""
    return {k: v for k, v in ((result or {}).get("dataset") or {}).items() if k != "features"}


def pool_map(fn: Callable[[T], R], items: list[T], workers: int, labels: list[str]) -> list[R]:
    """``[fn(item) for item in items]`` in ``workers`` spawned processes. The first failure (a job's
    error, or a worker that died: ``BrokenProcessPool``) is logged at once naming its job, the jobs not
    yet started are cancelled, and it is raised, noted with its label, once the running ones end."""
    with ProcessPoolExecutor(max(workers, 1), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fn, item): label for item, label in zip(items, labels, strict=True)}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                cancelled = sum(f.cancel() for f in futures)
                log.error(
                    "job %s failed (%s: %s); %d jobs not yet started are cancelled, the running ones "
                    "are awaited", futures[future], type(error).__name__, error, cancelled,
                )  # fmt: skip
                error.add_note(f"in job {futures[future]}")
                raise error
        return [future.result() for future in futures]


def _finite(metrics: dict[str, float | None]) -> dict[str, float]:
    """The measured metrics: MLflow gets no value for a cold subset that could not define one."""
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}


def log_mlflow(result: dict[str, Any], artifacts: list[Path]) -> None:
    """One MLflow run per (experiment, seed) with its params and metrics, and a summary run."""
    import mlflow

    from pipelines.tracking import configure_mlflow

    configure_mlflow(Settings.from_env().model_copy(update={"experiment": EXPERIMENT}))
    for run in result["runs"]:
        with mlflow.start_run(run_name=f"{run['experiment']}-seed{run['seed']}"):
            mlflow.log_params({k: v for k, v in run.items() if k != "metrics"})
            mlflow.log_params(
                {f"budget.{k}": v for k, v in result["budget"].items() if not isinstance(v, dict)}
            )
            mlflow.log_metrics(_finite({k.replace("@", "_at_"): v for k, v in run["metrics"].items()}))
    with mlflow.start_run(run_name="summary"):
        mlflow.log_params({f"dataset.{k}": v for k, v in result["dataset"].items()})
        for name, entry in result["summary"].items():
            mlflow.log_metrics(
                _finite(
                    {
                        f"{name}.{m.replace('@', '_at_')}.mean": v["mean"]
                        for m, v in entry.items()
                        if isinstance(v, dict)
                    }
                )
            )
        for row in result.get("target", []):
            if row["margin"] is not None:
                mlflow.log_metric(f"target.{row['metric']}.margin", row["margin"])
            mlflow.set_tag(f"target.{row['metric']}.met", str(row["met"]).lower())
        for path in artifacts:
            if path.exists():
                mlflow.log_artifact(str(path))


def _number(value: float | None, spec: str = ".4f") -> str:
    """A metric for the report; a cold subset that could not define it reads "unmeasured"."""
    return "unmeasured" if value is None or not math.isfinite(value) else format(value, spec)


def _target_section(rows: list[dict[str, Any]], baselines: list[str]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## target check",
        "",
        f"Candidate against each of the baselines {', '.join(baselines)} per metric (the other rows, "
        "controls and ablations among them, are not baselines); met when against every one the margin "
        "exceeds the sum of both sample stds (at least two seeds each). The row shows the baseline it "
        "is least clearly ahead of (one that fails first, then the smallest margin less spread); a "
        "baseline not run, or that left the metric unmeasured, is listed as missing and leaves the "
        "target not met.",
        "",
        "| metric | candidate | mean | closest baseline | mean | margin | spread (sum of stds) | missing | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['metric']} | {r['candidate']} | {_number(r['candidate_mean'])} | {r['closest_baseline']} | "
            f"{_number(r['baseline_mean'])} | {_number(r['margin'], '+.4f')} | {_number(r['spread'])} | "
            f"{', '.join(r['missing']) or '-'} | {'yes' if r['met'] else 'no'} |"
        )
    return [*lines, ""]


def _timing(env: dict[str, Any]) -> str:
    if "wall_s" not in env:
        return ""
    reused = "; runs of an earlier result were reused, see below" if env.get("reused_from") else ""
    return f" ({env['wall_s']:,.0f} s wall with {env['workers']} workers{reused})"


def markdown(result: dict[str, Any], command: str, findings: str | None = None) -> str:
    """The report: reproduce command, protocol, budget, tables, target check, sweep, findings."""
    budget = result["budget"]
    env = result.get("environment", {})
    config = EvaluationConfig.model_validate(result["config"])
    protocol = config.protocol
    train, test = round(100 * protocol.train_fraction), round(100 * (1 - protocol.train_fraction))
    lines = [
        "# Offline quality on " + result["dataset"]["name"],
        "",
        f"Reproduce: `{command}`{_timing(env)}",
        "",
        f"Protocol (Sec. 4.1): rating > {protocol.positive_threshold:g} positive (a label column wins); "
        f"global chronological {train}/{test} split; cold = fewer than {protocol.cold_start_threshold} "
        f"training interactions. Split: `{json.dumps(result['dataset'])}`.",
        "",
        f"Budget (every model): {budget['window_items']} items per window (HMAT: {budget['max_tokens']} "
        f"tokens), {budget['train_steps']} steps x batch {budget['batch_size']}, PT {budget['pretrain_steps']} "
        f"steps where marked; HMAT {json.dumps(budget['hmat'])}; ID rankers {json.dumps(budget['id_ranker'])}; "
        f"DST {budget['tokenizer_epochs']} epochs (trained once, seed {config.tokenizer.seed}), RQ-VAE "
        f"{budget['rqvae_epochs']} epochs (seed {config.rqvae.seed}).",
        "",
        "Values: mean ± sample std over the seeds listed per row; GAUC = per-user AUC over users with both "
        "classes, weighted by their test samples; HR@10 = positives in the top 10 of a "
        "user's test items / min(10, positives); NDCG@10 binary relevance; HR@10 and NDCG@10 averaged "
        "over users with both classes, a tie of scores counted as the mean over its orders.",
        "",
    ]
    for name, table in result["tables"].items():
        lines += [f"## {name}", "", table]
    lines += _target_section(result.get("target", []), result["config"]["target"]["baselines"])
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
                    f"| {axis} | {point['value']} | {_number(point['gauc'])} | {_number(point['cold_gauc'])} |"
                )
        lines.append("")
    if findings:
        lines += [findings.rstrip(), ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], results: Path) -> tuple[Path, Path, Path]:
    """``quality.md`` (with ``quality_findings.md`` appended when present) and the scaling plot (removed
    when this run has no sweep)."""
    md_path, png_path = results / "quality.md", results / "quality_scaling.png"
    findings_path = results / FINDINGS
    findings = findings_path.read_text() if findings_path.exists() else None
    md_path.write_text(markdown(result, result["environment"]["command"], findings))
    if result["scaling"] is not None:
        plot_scaling(result["scaling"], png_path)
    else:  # an earlier sweep's plot would be logged and read as this run's
        png_path.unlink(missing_ok=True)
    return results / "quality.json", md_path, png_path


def render(results: Path) -> int:
    """Rewrite the report of ``results/quality.json`` (after editing the findings, say); its target
    check is recomputed from the stored summary (a file written before the check met every baseline
    holds rows of the older rule)."""
    from hisam_core.evaluation.harness import TargetConfig, target_check

    path = results / "quality.json"
    if not path.exists():
        log.error("%s does not exist: nothing to render", path)
        return 2
    result = json.loads(path.read_text())
    result["target"] = target_check(
        result["summary"], TargetConfig.model_validate(result["config"]["target"])
    )
    paths = write_report(result, results)
    log.info("wrote %s", ", ".join(str(p) for p in paths[1:]))
    return 0


DESCRIPTION = """\
Offline comparison of Hi-SAM against baselines and ablations (paper Sec. 4.1-4.3, Tables 2-4) on
MovieLens-100K (modality features built once and cached) or on any dataset in the generic
interactions format (--config). Writes quality.json, quality.md (mean +- sample std over seeds, the
target check, then a hand-written quality_findings.md kept from beside them) and quality_scaling.png
(GAUC against HMAT depth and token budget).

--workers N runs the (experiment, seed) jobs in N processes; --reuse keeps the runs of an earlier
quality.json and runs only what is missing or changed; --mlflow logs one MLflow run per (experiment,
seed) to the experiment hisam-evaluation, plus a summary run with the report and the plot.
Not the daily pipeline step `hisam run evaluate` (candidate vs @champion)."""


def _set_seeds(value: str) -> tuple[str, list[int]]:
    name, _, seeds = value.partition("=")
    try:
        parsed = [int(s) for s in seeds.split(",")]
    except ValueError:
        parsed = []
    if not name or not parsed:
        raise argparse.ArgumentTypeError(f"expected SET=SEED[,SEED..], e.g. controls=0,1, got {value!r}")
    return name, parsed


def _figure(value: float | None, spec: str = ".4f") -> str:
    """A target-check figure for the log; ``unmeasured`` for None (no seed measured it)."""
    return "unmeasured" if value is None else format(value, spec)


def parser(results: Path, features_cache: Path, prog: str | None = None) -> argparse.ArgumentParser:
    """The command's options; ``results`` and ``features_cache`` are the defaults of the caller."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (the committed MovieLens results): --run main controls ablations modalities "
        "--seeds 0 1 2 --scaling --scaling-layers 1 2 4 --scaling-tokens 48 80 160 300 --workers 2 --mlflow",
    )
    p.add_argument("--config", type=Path, default=None, help="evaluation YAML (default: built-in defaults)")
    defaults = EvaluationConfig()
    p.add_argument(
        "--run",
        nargs="+",
        default=None,
        help=f"set or experiment names (default: {' '.join(defaults.run)}); sets: {', '.join(defaults.sets)}; "
        f"experiments: {', '.join(e.name for e in defaults.experiments)}",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help=f"seeds of every selected experiment (default: {' '.join(map(str, defaults.seeds))})",
    )
    p.add_argument(
        "--set-seeds",
        nargs="*",
        type=_set_seeds,
        default=[],
        help="SET=SEED[,SEED..]: other seeds for one set",
    )
    sweep = ScalingConfig()
    p.add_argument(
        "--scaling", action="store_true", help=f"also run the depth / length sweep of {sweep.experiment}"
    )
    p.add_argument(
        "--scaling-layers",
        nargs="+",
        type=int,
        default=None,
        help=f"depths of the sweep (default: {' '.join(map(str, sweep.num_layers))}; needs --scaling "
        "or a scaling section in --config)",
    )
    p.add_argument(
        "--scaling-tokens",
        nargs="+",
        type=int,
        default=None,
        help=f"max_tokens of the sweep (default: {' '.join(map(str, sweep.max_tokens))}; as --scaling-layers)",
    )
    p.add_argument(
        "--steps",
        type=positive_int_arg,
        default=None,
        help=f"override train.max_steps (default: {defaults.train.max_steps})",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="log level, of the workers too (default INFO, or hisam --log-level)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="override data.path (bundle or interactions file; MovieLens default: $HISAM_MOVIELENS_DIR, "
        "else ../shared/data/movielens-100k beside the clone)",
    )
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        help="npz: item_ids, emb_<modality>, optional present_<modality>; with emb_behavior a 'cutoff' "
        "(the instant its encoder trained up to), unless data.allow_uncut_behavior",
    )
    p.add_argument(
        "--features-cache",
        type=Path,
        default=features_cache,
        help="MovieLens feature cache (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="semantic-ID tables and DST checkpoints (default: cache_dir of --config, else $HISAM_HOME/evaluation)",
    )
    p.add_argument(
        "--workers",
        type=positive_int_arg,
        default=1,
        help="parallel processes, each with --threads torch threads (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=positive_int_arg,
        default=None,
        help=f"torch threads per process (default: the config's threads, else ${THREADS_ENV}, else 1)",
    )
    p.add_argument("--mlflow", action="store_true", help="log runs and the report to MLflow")
    p.add_argument("--reuse", type=Path, default=None, help="earlier quality.json: keep its runs and sweep")
    p.add_argument(
        "--results",
        type=Path,
        default=results,
        help="folder for quality.{json,md} and the plot (default: %(default)s)",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite quality.md and the plot from quality.json in --results",
    )
    return p


def configure(args: argparse.Namespace) -> EvaluationConfig:
    """The evaluation config of the parsed options (YAML, then the overrides)."""
    if args.config and not args.config.is_file():
        raise ValueError(f"evaluation config {args.config} does not exist or is not a file")
    config = EvaluationConfig.from_yaml(args.config) if args.config else EvaluationConfig()
    update: dict[str, Any] = {}
    if args.threads:
        update["threads"] = args.threads
    elif "threads" not in config.model_fields_set and os.environ.get(THREADS_ENV):
        update["threads"] = positive_int(os.environ[THREADS_ENV], f"${THREADS_ENV}")  # hisam --threads N
    if args.cache_dir:
        update["cache_dir"] = str(args.cache_dir)
    elif "cache_dir" not in config.model_fields_set:
        update["cache_dir"] = str(Settings.from_env().home / "evaluation")  # where all state goes
    if args.run:
        update["run"] = args.run
    if args.seeds:
        update["seeds"] = args.seeds
    if args.set_seeds:
        update["seeds_per_set"] = dict(args.set_seeds)
    if (args.scaling_layers or args.scaling_tokens) and not (args.scaling or config.scaling):
        raise ValueError("--scaling-layers and --scaling-tokens shape the sweep: add --scaling")
    if args.scaling or (config.scaling and (args.scaling_layers or args.scaling_tokens)):
        scaling = config.scaling or ScalingConfig()
        if args.scaling_layers:
            scaling = scaling.model_copy(update={"num_layers": args.scaling_layers})
        if args.scaling_tokens:
            scaling = scaling.model_copy(update={"max_tokens": args.scaling_tokens})
        update["scaling"] = scaling
    if args.steps is not None:
        update["train"] = config.train.model_copy(update={"max_steps": args.steps})
    data = {}
    if args.data:
        data["path"] = str(args.data)
    elif config.data.dataset == "movielens" and "path" not in config.data.model_fields_set:
        data["path"] = str(movielens_dir())  # not in --config either: wherever hisam is run from
    if args.features:
        data["features_path"] = str(args.features.resolve())
    if data:
        update["data"] = config.data.model_copy(update=data)
    try:
        return EvaluationConfig.model_validate({**config.model_dump(), **update})
    except ValidationError as err:  # an option's value (the file's own errors name it)
        raise ValueError(f"evaluation options: {describe(err)}") from None


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value, however given: ``--reuse X``, ``--reuse=X`` or an
    abbreviation argparse accepts (``--reu X``)."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 2 and option.startswith(name) and arg != "--":
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def main(
    argv: list[str] | None = None,
    results: Path | None = None,
    features_cache: Path | None = None,
    prog: str | None = None,
) -> int:
    """Defaults: results in ``$HISAM_HOME/evaluation/results``, features in ``$HISAM_HOME/cache``,
    semantic-ID tables and DST checkpoints in ``$HISAM_HOME/evaluation``. Bad options, config,
    data folder or ``--reuse`` file: the message and exit code 2, before any training."""
    home = Settings.from_env().home
    results = results or home / "evaluation" / "results"
    args = parser(results, features_cache or home / "cache", prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)  # no-op under `hisam`, which set it up
    if args.log_level:
        logging.getLogger().setLevel(args.log_level)
    if args.render:
        return render(args.results)
    try:  # the inputs only: an error while training is a bug, and keeps its traceback
        config = configure(args)
        reuse = _read_reuse(args.reuse, config) if args.reuse else None
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    if config.data.dataset == "movielens" and not (Path(config.data.path) / "raw" / "u.data").exists():
        log.error(
            "MovieLens-100K not found at %s (set data.path in --config or pass --data)", config.data.path
        )
        return 2
    if reuse is not None or args.workers > 1:
        features, _ = _features(config, str(args.features_cache))  # built once here: workers read its cache
        if reuse is not None:
            try:
                _same_features(config, features, reuse)
            except ValueError as err:
                log.error("%s", err)
                return 2
    return _evaluate(args, config, reuse, argv, prog)


def _same_features(config: EvaluationConfig, features: ItemFeatures | None, reuse: dict[str, Any]) -> None:
    """``--reuse`` keeps runs only of the features they were computed on (``dataset.features``, their
    fingerprint); ``features``: those of :func:`_features`."""
    if features is None and config.data.features_path:
        features = load_features_npz(config.data.features_path)
    now = None if features is None else features_fingerprint(features)
    earlier = reuse.get("dataset", {}).get("features")
    if earlier is None and now is not None:
        log.warning(
            "--reuse: the earlier result records no features fingerprint; its runs are kept unchecked"
        )
    elif earlier != now:
        raise ValueError(
            f"--reuse: the earlier result was computed on other features ({earlier} here {now}); "
            "its runs are not comparable"
        )


def _read_reuse(path: Path, config: EvaluationConfig) -> dict[str, Any]:
    """The earlier result of ``--reuse``, checked to be one whose runs ``config`` can keep."""
    try:
        reuse = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"--reuse {path}: cannot read it ({err.strerror or err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"--reuse {path}: not JSON ({err})") from err
    if not isinstance(reuse, dict) or not {"config", "runs"} <= set(reuse):
        raise ValueError(f"--reuse {path}: not a quality.json (it needs 'config' and 'runs')")
    _comparable(config, reuse)
    return reuse


def _evaluate(
    args: argparse.Namespace,
    config: EvaluationConfig,
    reuse: dict[str, Any] | None,
    argv: list[str] | None,
    prog: str | None,
) -> int:
    torch.set_num_threads(config.threads)
    start, load = time.perf_counter(), os.getloadavg()
    _code_version()  # cached: the code the runs start with, whatever the checkout becomes meanwhile
    if reuse is not None or args.workers > 1:
        result = run_parallel(config, str(args.features_cache), args.workers, reuse)
    else:
        features, cutoff = _features(config, str(args.features_cache))
        result = run_evaluation(config, features, features_cutoff=cutoff)
        _stamp(result["runs"])
    result["environment"] = {
        "reused_from": str(args.reuse) if args.reuse else None,
        "code_version": _code_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels' vector width: their last bits
        "threads_per_worker": config.threads,
        "workers": args.workers,
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    given = without_option(list(argv if argv is not None else sys.argv[1:]), "--reuse")
    result["environment"]["command"] = " ".join([prog or "hisam evaluate", *given])  # from scratch
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "quality.json"
    json_path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    json_path, md_path, png_path = write_report(result, args.results)
    if args.mlflow:
        log_mlflow(result, [json_path, md_path, png_path])
    for row in result["target"]:
        log.info(
            "target %s: %s %s vs %s %s (margin %s, spread %s): %s%s",
            row["metric"],
            row["candidate"],
            _figure(row["candidate_mean"]),
            row["closest_baseline"],
            _figure(row["baseline_mean"]),
            _figure(row["margin"], "+.4f"),
            _figure(row["spread"]),
            "met" if row["met"] else "not met",
            f" (not run or unmeasured: {', '.join(row['missing'])})" if row["missing"] else "",
        )
    log.info("wrote %s, %s", json_path, md_path)
    return 0

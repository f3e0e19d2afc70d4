"""Benchmark: how much of the promotion gate's comparison is noise (``pipelines.registry.decide``)?

The gate compares a candidate with ``@champion`` on one frozen test snapshot. Two fine-tunes of the
same recipe on the same data differ by their seed alone (batch order, initialisation of what PT does
not set), so a difference smaller than that spread says nothing about which model is better. This
trains the pipeline's fine-tune (the ``ranker`` section of the home's config) ``--seeds`` times from
the home's newest PT on one ``gold.samples`` snapshot, evaluates every model on the test rows the
``evaluate`` step would score (none at or before the last event PT or SFT trained on), with the
profiles they trained on, and reports:

- per metric: the spread over seeds, the std of a same-recipe difference and quantiles of |difference|;
- each gate (the home's ``gate`` section and the shipped default, ``PromotionGateConfig()``) on every
  ordered pair of seeds: how often an equally good candidate is rejected, and on which metric;
- each gate over a simulated year of daily candidates (``simulate``): the share promoted, the longest
  run of rejections, how often a candidate truly worse on every metric is rejected, and, when every
  day's candidate is a little worse than the day before, how much the champion line loses in a year;
- for a grid of tolerances: the probability that an equally good candidate is rejected, and that a
  truly worse one (by ``delta``) is, under the normal approximation with the measured std.

The daily candidates also differ by a day of data and, weekly, by their PT: the seed spread is a lower
bound on the noise the gate sees. Needs a home where ``hisam demo`` ran (MovieLens when the bundle is
present). Writes ``benchmarks/results/gate_noise.json`` (``--out``); ``--metrics-from`` reuses an earlier
report's models to judge a changed gate without training again. Example::

    .venv/bin/python benchmarks/gate_noise.py --home .hisam --seeds 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.gate_noise")
METRICS = ("auc", "gauc", "cold_gauc")
TOLERANCES = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015)
DELTAS = (0.0, 0.002, 0.005, 0.01)
DAYS, TRIALS = 365, 20
WORSE_BY = 0.01  # a truly worse candidate, on every metric
DECAY = 0.0001  # per day: the slow decline the drift budget is there to stop (0.0365 a year)


def train_seeds(home: Path, seeds: list[int]) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Fine-tune and evaluate one model per seed on the home's current tokenizer, newest PT and
    latest samples snapshot; returns each model's metrics and what they were trained on."""
    import torch
    from tqdm.auto import tqdm

    from hisam_core.ranker.train import train
    from pipelines.context import StepContext
    from pipelines.ranker import (
        _newest_pretrained,
        _pretrained_checkpoint,
        _ranker_config,
        encode_profiles,
        evaluate_model,
        histories,
        load_profiles,
        load_samples,
        tagged_until,
        trained_until,
        unseen_test,
    )
    from pipelines.steps import load_config
    from pipelines.tokenizer import current_tokenizer_version, semantic_ids_of

    os.environ["HISAM_HOME"] = str(home)
    config = load_config(home / "demo_pipeline.yaml")
    ctx = StepContext(config, dt.date.today())
    version = current_tokenizer_version(ctx)
    pt_version = _newest_pretrained(ctx, version)
    init_from, vocabulary = _pretrained_checkpoint(ctx, pt_version)
    frame, snapshot = load_samples(ctx, version)
    ids = semantic_ids_of(ctx, version)
    profile_frame, _ = load_profiles(ctx, vocabulary.fields) if vocabulary.fields else (None, None)
    profiles = encode_profiles(profile_frame, vocabulary) if profile_frame is not None else {}
    base = _ranker_config(ctx, "sft", vocabulary, init_from)
    train_windows = histories(frame, ids, base.sequence, "train", profiles)
    pt_tags = ctx.mlflow.get_model_version(config.models.pretrained, pt_version).tags
    test_frame, seen_rows = unseen_test(frame, trained_until(frame, tagged_until(pt_tags)))
    results = []
    for seed in tqdm(seeds, desc="fine-tunes", unit="seed"):
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})})
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            model = train(cfg, train_windows, out)
            with torch.no_grad():
                metrics = evaluate_model(
                    model, cfg.sequence, ids, test_frame, config.ranker.eval_batch_size, profiles
                )
        metrics = {m: float(v) for m, v in metrics.items()}
        logger.info(
            "seed %d: %s (%.0f s)",
            seed,
            {m: round(metrics[m], 4) for m in METRICS},
            time.perf_counter() - start,
        )
        results.append(metrics)
    trained_on = {
        "dataset": config.dataset,
        "tokenizer_version": version,
        "pretrained_version": pt_version,
        "samples_version": snapshot,
        "train_windows": len(train_windows),
        "seen_test_rows": seen_rows,
        "finetune": base.train.model_dump(exclude={"init_from", "seed"}),
    }
    return results, trained_on


def noise(results: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: mean and std over seeds, the std of a difference of two (sqrt 2 x), and
    quantiles of |difference| over all pairs of seeds."""
    out = {}
    for m in METRICS:
        values = np.array([r[m] for r in results])
        diffs = np.array([abs(a - b) for a, b in itertools.combinations(values, 2)])
        std = float(values.std(ddof=1))
        out[m] = {
            "mean": float(values.mean()),
            "std": std,
            "difference_std": std * math.sqrt(2),
            "abs_difference_median": float(np.median(diffs)),
            "abs_difference_p90": float(np.quantile(diffs, 0.9)),
            "abs_difference_max": float(diffs.max()),
        }
    return out


def gate_on_pairs(results: list[dict[str, float]], gate: Any) -> dict[str, Any]:
    """The configured gate on every ordered (champion, candidate) pair of seeds: all are the same
    recipe, so every rejection is a false one."""
    from pipelines.registry import decide

    rejected, by_metric = 0, dict.fromkeys(METRICS, 0)
    pairs = list(itertools.permutations(range(len(results)), 2))
    for champion, candidate in pairs:
        decision = decide(results[candidate], results[champion], gate)
        rejected += not decision.promote
        for m in METRICS:
            by_metric[m] += any(reason.startswith(f"{m}:") for reason in decision.reasons)
    return {
        "pairs": len(pairs),
        "false_reject_rate": rejected / len(pairs),
        "false_reject_rate_by_metric": {m: n / len(pairs) for m, n in by_metric.items()},
    }


def simulate(
    results: list[dict[str, float]], gate: Any, decay: float = 0.0, seed: int = 0
) -> dict[str, float]:
    """The gate over ``TRIALS`` years of daily candidates, with the real drift chain.

    Each day's candidate is a draw from the normal fitted to the seeds' metrics (their covariance:
    the metrics move together) lowered by ``decay`` per day; a promoted one becomes the champion with
    the drift ``decide`` gives it. Besides, each day a candidate ``WORSE_BY`` below a fresh draw on
    every metric is judged against the day's champion (and discarded).
    """
    from pipelines.registry import decide

    rng = np.random.default_rng(seed)
    values = np.array([[r[m] for m in METRICS] for r in results])
    mean, cov = values.mean(axis=0), np.cov(values.T)

    def draw(shift: float) -> dict[str, float]:
        return dict(zip(METRICS, rng.multivariate_normal(mean, cov) - shift, strict=True))

    promoted = worse_rejected = 0
    longest, losses = [], []
    for _ in range(TRIALS):
        champion, drift, loss, run, longest_run = draw(0.0), {}, 0.0, 0, 0
        for day in range(DAYS):
            worse_rejected += not decide(draw(WORSE_BY), champion, gate, drift).promote
            candidate = draw(decay * day)
            decision = decide(candidate, champion, gate, drift)
            if decision.promote:
                promoted += 1
                champion, drift, loss, run = candidate, decision.drift, decay * day, 0
            else:
                run += 1
                longest_run = max(longest_run, run)
        longest.append(longest_run)
        losses.append(loss)
    return {
        "promoted": round(promoted / (TRIALS * DAYS), 3),
        "longest_rejection_run_days_median": float(np.median(longest)),
        "longest_rejection_run_days_max": int(max(longest)),
        f"worse_by_{WORSE_BY}_rejected": round(worse_rejected / (TRIALS * DAYS), 3),
        "champion_true_loss_after_a_year": round(float(np.mean(losses)), 4),
    }


def judge(results: list[dict[str, float]], gate: Any) -> dict[str, Any]:
    """One gate: its thresholds, the seed pairs, and a simulated year with and without decay."""
    return {
        **gate.model_dump(),
        "seed_pairs": gate_on_pairs(results, gate),
        "year_equally_good": simulate(results, gate),
        f"year_decaying_{DECAY}_per_day": simulate(results, gate, decay=DECAY),
    }


def tradeoff(spread: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """P(reject) of a candidate truly worse by ``delta`` at tolerance ``t``: the same-snapshot
    difference is ~ N(-delta, difference_std^2), rejected below -t, so Phi((delta - t) / std)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    return {
        m: {
            f"tolerance={t}": {
                f"delta={d}": round(phi((d - t) / spread[m]["difference_std"]), 4) for d in DELTAS
            }
            for t in TOLERANCES
        }
        for m in METRICS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--home", type=Path, default=ROOT / ".hisam", help="a HISAM_HOME where `hisam demo` ran"
    )
    parser.add_argument("--seeds", type=int, default=8, help="fine-tunes to train (seeds 0..N-1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--metrics-from", type=Path, help="judge the models of this earlier report instead of training"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_noise.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.home / "demo_pipeline.yaml").is_file():
        parser.error(
            f"{args.home} has no demo_pipeline.yaml: run `hisam demo` with HISAM_HOME={args.home} first"
        )
    if args.seeds < 3:
        parser.error("--seeds must be at least 3 (a spread needs pairs)")
    import torch

    from benchmarks.environment import run_environment
    from pipelines.registry import PromotionGateConfig
    from pipelines.steps import load_config

    torch.set_num_threads(args.threads)
    environment = run_environment()
    if args.metrics_from:
        earlier = json.loads(args.metrics_from.read_text())
        results, trained_on, train_s = earlier["metrics"], earlier["trained_on"], earlier["train_s"]
    else:
        start = time.perf_counter()
        results, trained_on = train_seeds(args.home.resolve(), list(range(args.seeds)))
        train_s = round(time.perf_counter() - start, 1)
    gates = {
        "configured": load_config(args.home / "demo_pipeline.yaml").gate,
        "default": PromotionGateConfig(),
    }
    report = {
        "what": "same-recipe fine-tunes (seeds only) on one snapshot, judged by the promotion gate",
        "trained_on": trained_on,
        "metrics": [{m: r[m] for m in METRICS} for r in results],
        "noise": (spread := noise(results)),
        "gates": {name: judge(results, gate) for name, gate in gates.items()},
        "reject_probability": tradeoff(spread),
        "train_s": train_s,
        "environment": {
            **environment,
            "torch": torch.__version__,
            "threads": args.threads,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, judged in report["gates"].items():
        logger.info(
            "%s gate: rejects %.2f of equally good seed pairs; promotes %.2f of a year's candidates",
            name,
            judged["seed_pairs"]["false_reject_rate"],
            judged["year_equally_good"]["promoted"],
        )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Offline evaluation harness (Sec. 4.1-4.3): named experiments x seeds on one protocol split, with
a mean/spread table, JSON, and the GAUC scaling sweep (depth, sequence length).

:func:`run_evaluation` is the one entry point (``benchmarks/quality.py``, ``hisam evaluate``). Every
experiment of one call shares the split, the windows (at the same ``max_tokens``), the optimisation
budget (:attr:`EvaluationConfig.train`) and, for HMAT-based rankers, the decoder size
(:attr:`EvaluationConfig.hmat`); semantic-ID tables are trained once per tokenizer variant (seed of
:attr:`EvaluationConfig.tokenizer`) and cached, so seeds vary the ranker's initialisation and batch
order only. Metrics: AUC, GAUC, Cold AUC, Cold GAUC (Sec. 4.1), NDCG@10 and HR@10 (extras).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from hisam_core.config import Config
from hisam_core.evaluation.baselines import ID_RANKER_VERSION, IDRanker, IDRankerConfig, SemanticIDRanker
from hisam_core.evaluation.protocol import (
    Dataset,
    ProtocolConfig,
    Split,
    Window,
    build_windows,
    chronological_split,
    label_interactions,
    load_movielens,
    read_interactions,
    target_arrays,
)
from hisam_core.evaluation.semantic import (
    CACHE_VERSIONS,
    TokenizerVariant,
    features_fingerprint,
    load_features_npz,
    npz_cutoff,
    semantic_ids,
)
from hisam_core.features import MODALITIES, ItemFeatures
from hisam_core.metrics import hit_rate_at_k, ndcg_at_k, ranking_metrics
from hisam_core.ranker.attention import MASK_RULE
from hisam_core.ranker.model import HMATConfig
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig
from hisam_core.ranker.train import RankerConfig, TrainConfig
from hisam_core.semantic_ids import SemanticIds
from hisam_core.tokenizer.rqvae import RQVAETrainConfig
from hisam_core.tokenizer.train import TokenizerTrainConfig

logger = logging.getLogger(__name__)

METRICS = ("auc", "gauc", "cold_auc", "cold_gauc", "ndcg@10", "hr@10")
MetricsCallback = Callable[[dict[str, Any]], None]


class DataConfig(Config):
    """MovieLens-100K (``path`` = the bundle) or a generic interactions file (``path`` = CSV/TSV/
    Parquet with ``user_id, item_id, timestamp`` and ``rating`` or ``label``)."""

    dataset: Literal["movielens", "generic"] = "movielens"
    path: str = "../shared/data/movielens-100k"
    features_path: str | None = Field(
        None,
        description="npz with item_ids, emb_<modality> arrays and optional present_<modality> masks (with "
        "emb_behavior, a 'cutoff': see allow_uncut_behavior); needed by semantic-ID rankers",
    )
    allow_uncut_behavior: bool = Field(
        False,
        description="accept an emb_behavior whose file records no 'cutoff' (e.g. synthetic features): "
        "nothing then shows its encoder never saw the test interactions (App. B.2)",
    )


class ExperimentConfig(Config):
    """One row of the comparison: a ranker, its semantic IDs and its switches."""

    name: str
    description: str = ""
    model: Literal["hmat", "sasrec", "hstu"] = "hmat"
    tokenizer: TokenizerVariant | None = Field(None, description="semantic-ID table (hmat only)")
    pretrain: bool = Field(False, description="PT (causal next-token) before SFT (Sec. 3.4.1)")
    hmat: dict[str, Any] = Field(default_factory=dict, description="overrides of EvaluationConfig.hmat")
    id_ranker: dict[str, Any] = Field(
        default_factory=dict, description="overrides of EvaluationConfig.id_ranker"
    )
    max_tokens: int | None = Field(None, description="override of EvaluationConfig.max_tokens")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if (self.model == "hmat") != (self.tokenizer is not None):
            raise ValueError(f"experiment {self.name!r}: hmat needs a tokenizer, ID rankers take none")
        if self.model != "hmat" and (self.pretrain or self.hmat):
            raise ValueError(f"experiment {self.name!r}: pretrain / hmat overrides apply to hmat only")
        if self.model == "hmat" and self.id_ranker:
            raise ValueError(f"experiment {self.name!r}: id_ranker overrides apply to sasrec / hstu only")
        IDRankerConfig.model_validate(self.id_ranker)
        HMATConfig.model_validate({**_SMALL_HMAT, **self.hmat})
        return self


class ScalingConfig(Config):
    """GAUC against decoder depth and against the token budget, for one experiment."""

    experiment: str = "hisam_sft"
    num_layers: list[int] = Field(default_factory=lambda: [1, 2, 4])
    max_tokens: list[int] = Field(default_factory=lambda: [80, 160, 300])
    seeds: list[int] = Field(default_factory=lambda: [0])


_SMALL_HMAT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_size": 192}
_DST = TokenizerVariant(kind="dst")


def _hmat(name: str, description: str, **fields: Any) -> ExperimentConfig:
    return ExperimentConfig(name=name, description=description, model="hmat", **{"tokenizer": _DST, **fields})


def _dst(modalities: list[str], **fields: Any) -> TokenizerVariant:
    return TokenizerVariant(kind="dst", modalities=modalities, **fields)


DEFAULT_EXPERIMENTS: list[ExperimentConfig] = [
    ExperimentConfig(name="sasrec", description="ID-based SASRec-style ranker", model="sasrec"),
    ExperimentConfig(name="hstu", description="ID-based HSTU-style ranker", model="hstu"),
    ExperimentConfig(
        name="sasrec_no_actions",
        description="SASRec-style, past actions hidden (control for MA-Attn's anchor memory)",
        model="sasrec",
        id_ranker={"past_actions": False},
    ),
    _hmat(
        "qarm",
        "plain RQ-VAE semantic IDs + flat Transformer (1D-RoPE, causal; QARM/TIGER-like)",
        tokenizer=TokenizerVariant(kind="rqvae"),
        hmat={"position_encoding": "rope1d", "attention_mask": "causal"},
    ),
    _hmat("hisam_sft", "Hi-SAM (DST + HMAT), SFT only"),
    _hmat("hisam", "Hi-SAM (DST + HMAT), PT + SFT", pretrain=True),
    _hmat(
        "no_cga",
        "w/o CGA (concatenation, no GRAM loss)",
        tokenizer=_dst(["behavior", "image", "text"], alignment=False),
    ),
    _hmat("no_dmrq", "w/o DMRQ (CGA + plain RQ)", tokenizer=TokenizerVariant(kind="dst_rq")),
    _hmat("abs_pos", "w Abs. Pos.", hmat={"position_encoding": "absolute"}),
    _hmat("rope1d", "w 1D-RoPE", hmat={"position_encoding": "rope1d"}),
    _hmat("no_ma", "w/o MA-Attn (causal mask)", hmat={"attention_mask": "causal"}),
    _hmat(
        "action_memory",
        "MA-Attn with past actions visible (history_memory anchor_action; beyond the paper)",
        hmat={"history_memory": "anchor_action"},
    ),
    _hmat(
        "mod_behavior",
        "behaviour only (RQ-VAE, 4 codes)",
        tokenizer=TokenizerVariant(kind="rqvae", modalities=["behavior"]),
    ),
    _hmat("mod_image_text", "text + image", tokenizer=_dst(["image", "text"])),
    _hmat("mod_behavior_text", "behaviour + text", tokenizer=_dst(["behavior", "text"])),
    _hmat("mod_behavior_image", "behaviour + image", tokenizer=_dst(["behavior", "image"])),
]

DEFAULT_SETS: dict[str, list[str]] = {
    "main": ["sasrec", "hstu", "qarm", "hisam_sft", "hisam"],
    "controls": ["sasrec_no_actions", "sasrec", "hisam_sft"],
    "ablations": ["hisam_sft", "no_cga", "no_dmrq", "abs_pos", "rope1d", "no_ma", "action_memory"],
    "modalities": ["mod_behavior", "mod_image_text", "mod_behavior_text", "mod_behavior_image", "hisam_sft"],
}


class TargetConfig(Config):
    """The comparison's target: ``candidate`` ahead of every baseline on ``metrics`` beyond the spread."""

    candidate: str = "hisam"
    baselines: list[str] = Field(default_factory=lambda: ["sasrec", "hstu", "qarm"])
    metrics: list[str] = Field(default_factory=lambda: ["gauc", "cold_gauc"])


class EvaluationConfig(Config):
    """Everything :func:`run_evaluation` needs; ``configs/evaluation.yaml`` documents the defaults."""

    data: DataConfig = Field(default_factory=DataConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    max_tokens: int = Field(160, ge=16, description="HMAT token budget; sets the items per window")
    test_stride: float = Field(0.5, gt=0, le=1, description="test targets per window, share of the window")
    train_stride: float = Field(1.0, gt=0, le=1, description="training targets per window, share")
    hmat: HMATConfig = Field(default_factory=lambda: HMATConfig(**_SMALL_HMAT))
    id_ranker: IDRankerConfig = Field(default_factory=IDRankerConfig)
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            learning_rate=1e-3,
            warmup_steps=25,
            max_steps=250,
            batch_size=64,
            checkpoint_every=1_000_000,
            mixed_precision="off",
            device="cpu",
        )
    )
    pretrain_steps: int = Field(100, ge=1, description="PT steps of experiments with pretrain: true")
    tokenizer: TokenizerTrainConfig = Field(
        default_factory=lambda: TokenizerTrainConfig(epochs=30, alignment_warmup_epochs=5)
    )
    rqvae: RQVAETrainConfig = Field(default_factory=lambda: RQVAETrainConfig(epochs=30))
    experiments: list[ExperimentConfig] = Field(default_factory=lambda: list(DEFAULT_EXPERIMENTS))
    sets: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_SETS))
    run: list[str] = Field(default_factory=lambda: ["main"], description="set or experiment names")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    seeds_per_set: dict[str, list[int]] = Field(
        default_factory=dict, description="set -> seeds for the experiments that set selects first"
    )
    scaling: ScalingConfig | None = None
    target: TargetConfig = Field(default_factory=TargetConfig)
    cache_dir: str = Field(".hisam/evaluation", description="semantic-ID tables and DST checkpoints")
    threads: int = Field(1, ge=1, description="torch intra-op threads")

    @model_validator(mode="after")
    def _check(self) -> EvaluationConfig:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names repeat: {names}")
        unknown = {n for members in self.sets.values() for n in members} - set(names)
        unknown |= {n for n in self.run if n not in self.sets and n not in names}
        if self.scaling is not None and self.scaling.experiment not in names:
            unknown.add(self.scaling.experiment)
        if unknown:
            raise ValueError(
                f"unknown experiments or sets: {sorted(unknown)}; sets: {sorted(self.sets)}, "
                f"experiments: {sorted(names)}"
            )
        if self.scaling is not None and self.scaling.num_layers:
            swept = self.experiment(self.scaling.experiment)
            if swept.model != "hmat":  # its depth is id_ranker.num_layers, which the sweep does not set
                raise ValueError(
                    f"scaling.num_layers sweeps HMAT's depth; {swept.name!r} is a {swept.model} ranker "
                    "(set scaling.num_layers: [] or sweep an HMAT experiment)"
                )
        return self

    def experiment(self, name: str) -> ExperimentConfig:
        return next(e for e in self.experiments if e.name == name)

    def jobs(self) -> list[tuple[ExperimentConfig, int]]:
        """(experiment, seed) pairs named by ``run`` (sets expanded, first occurrence wins); the seeds
        are ``seeds_per_set`` of the set that selected the experiment, else ``seeds``."""
        seeds: dict[str, list[int]] = {}
        for entry in self.run:
            for name in self.sets.get(entry, [entry]):
                seeds.setdefault(name, self.seeds_per_set.get(entry, self.seeds))
        return [(self.experiment(name), seed) for name, values in seeds.items() for seed in values]


def load_dataset(config: DataConfig, protocol: ProtocolConfig) -> Dataset:
    if config.dataset == "movielens":
        return load_movielens(config.path, protocol)
    return Dataset(Path(config.path).stem, label_interactions(read_interactions(config.path), protocol))


def evaluation_metrics(
    windows: Sequence[Window], scores: np.ndarray, cold_users: frozenset[int]
) -> dict[str, float]:
    """Sec. 4.1 metrics (overall and cold-start) plus NDCG@10 and HR@10 of one model's scores."""
    targets = target_arrays(windows)
    if len(scores) != len(targets["labels"]):
        raise ValueError(f"{len(scores)} scores for {len(targets['labels'])} targets")
    cold = np.isin(targets["users"], list(cold_users))
    metrics = ranking_metrics(targets["labels"], scores, targets["users"], cold)  # NaN when none is cold
    metrics["ndcg@10"] = ndcg_at_k(targets["labels"], scores, targets["users"], 10)
    metrics["hr@10"] = hit_rate_at_k(targets["labels"], scores, targets["users"], 10)
    return metrics


class _Context:
    """Split, windows per budget and semantic-ID tables, built once per :func:`run_evaluation`."""

    def __init__(
        self, config: EvaluationConfig, dataset: Dataset, split: Split, features: ItemFeatures | None
    ):
        self.config, self.dataset, self.split, self.features = config, dataset, split, features
        self.item_ids = np.unique(dataset.interactions["item_id"].to_numpy())
        self._windows: dict[int, tuple[list[Window], list[Window]]] = {}
        self._ids: dict[str, SemanticIds] = {}

    def sequence_config(self, max_tokens: int, num_positions: int, codebook_size: int) -> SequenceConfig:
        return SequenceConfig(
            num_positions=num_positions,
            codebook_size=codebook_size,
            profile_fields=dict(self.dataset.profile_fields),
            max_tokens=max_tokens,
        )

    def window_size(self, max_tokens: int) -> int:
        """Items per window: what HMAT fits in ``max_tokens`` with the paper's codes per item (6,
        Sec. 3.3), or with more where a configured semantic-ID table has more modalities, used by every
        model so all see the same histories, however many of them a run selects."""
        shared = self.config.tokenizer.model.shared_layers
        positions = max(
            [shared + len(MODALITIES)]
            + [shared + len(e.tokenizer.modalities) for e in self.config.experiments if e.tokenizer]
        )
        return SequenceBuilder(self.sequence_config(max_tokens, positions, 2)).max_items()

    def windows(self, max_tokens: int) -> tuple[list[Window], list[Window]]:
        if max_tokens not in self._windows:
            size = self.window_size(max_tokens)
            if size < 2:
                raise ValueError(f"max_tokens={max_tokens} fits {size} items per window, need 2")
            train, _ = build_windows(
                self.split, size, max(1, round(self.config.train_stride * size)), self.dataset.profiles
            )
            _, test = build_windows(
                self.split, size, max(1, round(self.config.test_stride * size)), self.dataset.profiles
            )
            self._windows[max_tokens] = (train, test)
        return self._windows[max_tokens]

    def semantic_ids(self, variant: TokenizerVariant) -> SemanticIds:
        key = variant.model_dump_json()
        if key not in self._ids:
            if self.features is None:
                raise ValueError("semantic-ID experiments need item features (data.features_path)")
            c = self.config
            self._ids[key] = semantic_ids(variant, self.features, c.tokenizer, c.rqvae, c.cache_dir)
        return self._ids[key]


def _ranker(
    ctx: _Context, experiment: ExperimentConfig, seed: int, max_tokens: int
) -> SemanticIDRanker | IDRanker:
    c = ctx.config
    train = c.train.model_copy(update={"seed": seed})
    if experiment.model != "hmat":
        id_config = IDRankerConfig.model_validate(
            {**c.id_ranker.model_dump(), **experiment.id_ranker, "block": experiment.model}
        )
        window = ctx.window_size(max_tokens)
        return IDRanker(id_config, train, ctx.item_ids, ctx.dataset.profile_fields, window)
    ids = ctx.semantic_ids(experiment.tokenizer)
    ranker = RankerConfig(
        sequence=ctx.sequence_config(max_tokens, ids.num_positions, ids.codebook_size),
        model=HMATConfig.model_validate({**c.hmat.model_dump(), **experiment.hmat}),
        train=train,
    )
    return SemanticIDRanker(ranker, ids, c.pretrain_steps if experiment.pretrain else 0)


def run_experiment(ctx: _Context, experiment: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Train one experiment with one seed on the training windows and score the test windows."""
    max_tokens = experiment.max_tokens or ctx.config.max_tokens
    train_windows, test_windows = ctx.windows(max_tokens)
    start = time.perf_counter()
    ranker = _ranker(ctx, experiment, seed, max_tokens)
    ranker.fit(train_windows)
    metrics = evaluation_metrics(test_windows, ranker.score(test_windows), ctx.split.cold_users)
    record = {
        "experiment": experiment.name,
        "seed": seed,
        "metrics": metrics,
        "num_parameters": ranker.num_parameters(),
        "max_tokens": max_tokens,
        "window_items": ctx.window_size(max_tokens),
        "num_layers": (
            experiment.hmat.get("num_layers", ctx.config.hmat.num_layers)
            if experiment.model == "hmat"
            else experiment.id_ranker.get("num_layers", ctx.config.id_ranker.num_layers)
        ),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    logger.info("%s seed %d: %s", experiment.name, seed, {k: round(v, 4) for k, v in metrics.items()})
    return record


def measured(values: Sequence[float | None]) -> np.ndarray:
    """The finite values of ``values``: a cold subset that cannot define a metric is NaN in memory and
    ``null`` in JSON (:func:`hisam_core.metrics.ranking_metrics`), and is left out of every mean."""
    array = np.array([np.nan if v is None else v for v in values], dtype=float)
    return array[np.isfinite(array)]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, for ``json.dumps(allow_nan=False)``."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per experiment: seeds, and mean / sample std (ddof 1; 0 with one seed) of every metric over the
    seeds that measured it; ``measured_seeds`` counts them when some did not, and a metric no seed
    measured has mean and std ``None``."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["experiment"] for r in runs):
        rows = [r for r in runs if r["experiment"] == name]
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in rows],
            "num_parameters": rows[0]["num_parameters"],
        }
        for metric in rows[0]["metrics"]:
            values = measured([r["metrics"][metric] for r in rows])
            entry[metric] = {
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else None),
            }
            if len(values) < len(rows):
                entry[metric]["measured_seeds"] = len(values)
        out[name] = entry
    return out


def _cell(stats: dict[str, Any] | None, spread: bool) -> str:
    if stats is None:
        return "n/a"
    if stats["mean"] is None:
        return "unmeasured"
    cell = f"{stats['mean']:.4f} ± {stats['std']:.4f}" if spread else f"{stats['mean']:.4f}"
    return cell + (f" ({stats['measured_seeds']} seeds)" if "measured_seeds" in stats else "")


def markdown_table(summary: dict[str, dict[str, Any]], descriptions: dict[str, str] | None = None) -> str:
    """Mean ± sample std over seeds (the mean alone for one seed), one row per experiment."""
    descriptions = descriptions or {}
    header = (
        "| experiment | " + " | ".join(m.upper().replace("_", " ") for m in METRICS) + " | params | seeds |"
    )
    lines = [header, "|" + " --- |" * (len(METRICS) + 3)]
    for name, entry in summary.items():
        spread = len(entry["seeds"]) > 1  # one seed has no spread to show
        cells = [_cell(entry.get(m), spread) for m in METRICS]
        label = f"{name} ({descriptions[name]})" if descriptions.get(name) else name
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {entry['num_parameters']:,} | {len(entry['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


#: A metric no run reported (``summarise`` gives a metric no seed measured the same shape).
_UNMEASURED: dict[str, Any] = {"mean": None, "std": None}


def target_check(summary: dict[str, dict[str, Any]], target: TargetConfig) -> list[dict[str, Any]]:
    """Per metric: the candidate against every baseline. ``met`` when, for each, the margin exceeds
    the sum of both sample stds and both measured it with at least two seeds; the row shows the
    baseline the candidate is least clearly ahead of (one that fails first, then the smallest margin
    less spread), and ``missing`` the baselines not run or that left the metric unmeasured, which
    leave it not met. No rows when the candidate is missing."""
    rows = []
    ran = [b for b in target.baselines if b in summary]
    if target.candidate not in summary:
        return rows
    candidate = summary[target.candidate]
    for metric in target.metrics:
        mine = candidate.get(metric, _UNMEASURED)
        scored = [b for b in ran if summary[b].get(metric, _UNMEASURED)["mean"] is not None]
        missing = [b for b in target.baselines if b not in scored]
        compared = []
        for baseline in scored if mine["mean"] is not None else []:
            theirs = summary[baseline][metric]
            margin, spread = mine["mean"] - theirs["mean"], mine["std"] + theirs["std"]
            seeds = min(
                mine.get("measured_seeds", len(candidate["seeds"])),
                theirs.get("measured_seeds", len(summary[baseline]["seeds"])),
            )
            compared.append(
                {"closest_baseline": baseline, "baseline_mean": theirs["mean"], "margin": margin,
                 "spread": spread, "seeds": seeds, "beaten": seeds >= 2 and margin > spread}
            )  # fmt: skip
        if compared:  # one that fails first, then the smallest margin less spread
            closest = min(compared, key=lambda c: (c["beaten"], c["margin"] - c["spread"]))
        else:
            best = max(scored, key=lambda b: summary[b][metric]["mean"]) if scored else None
            closest = {"closest_baseline": best, "baseline_mean": summary[best][metric]["mean"] if best else None,
                       "margin": None, "spread": None, "seeds": 0}  # fmt: skip
        rows.append(
            {
                "metric": metric,
                "candidate": target.candidate,
                "candidate_mean": mine["mean"],
                **{k: v for k, v in closest.items() if k != "beaten"},
                "missing": missing,
                "met": bool(compared) and not missing and all(c["beaten"] for c in compared),
            }
        )
    return rows


def scaling_points(config: EvaluationConfig) -> list[tuple[str, int, ExperimentConfig]]:
    """``(axis, value, experiment)`` of the depth and ``max_tokens`` sweeps of ``config.scaling``; the
    point equal to the base experiment is the base experiment itself (its runs are reused)."""
    if config.scaling is None:
        return []
    base = config.experiment(config.scaling.experiment)
    points = []
    for value in config.scaling.num_layers:
        default = value == base.hmat.get("num_layers", config.hmat.num_layers)
        update = {"hmat": {**base.hmat, "num_layers": value}, "name": f"{base.name}[num_layers={value}]"}
        points.append(("num_layers", value, base if default else base.model_copy(update=update)))
    for value in config.scaling.max_tokens:
        default = value == (base.max_tokens or config.max_tokens)
        update = {"max_tokens": value, "name": f"{base.name}[max_tokens={value}]"}
        points.append(("max_tokens", value, base if default else base.model_copy(update=update)))
    return points


def collect_scaling(
    config: EvaluationConfig, records: dict[tuple[str, int], dict[str, Any]]
) -> dict[str, Any]:
    """The sweep's metrics from the runs of its points, keyed by ``(experiment, seed)``."""
    if config.scaling is None:
        raise ValueError("config.scaling is not set")
    sweeps: dict[str, list[dict[str, Any]]] = {"num_layers": [], "max_tokens": []}
    for axis, value, experiment in scaling_points(config):
        for seed in config.scaling.seeds:
            sweeps[axis].append({"value": value, "seed": seed, **records[(experiment.name, seed)]["metrics"]})
    return {"experiment": config.scaling.experiment, "seeds": config.scaling.seeds, **sweeps}


def scaling_records(
    config: EvaluationConfig, scaling: dict[str, Any] | None
) -> dict[tuple[str, int], dict[str, Any]]:
    """Records ``{(experiment, seed): {"metrics": ...}}`` of the points of an earlier sweep that
    ``config``'s sweep also has (the inverse of :func:`collect_scaling`), so a rerun skips them."""
    if config.scaling is None or not scaling or scaling.get("experiment") != config.scaling.experiment:
        return {}
    names = {(axis, value): experiment.name for axis, value, experiment in scaling_points(config)}
    records = {}
    for axis in ("num_layers", "max_tokens"):
        for point in scaling.get(axis, []):
            name = names.get((axis, point["value"]))
            if name is not None:
                metrics = {k: v for k, v in point.items() if k not in ("value", "seed")}
                records[(name, point["seed"])] = {"metrics": metrics}
    return records


def run_scaling(ctx: _Context, done: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """GAUC (and Cold GAUC) of ``config.scaling.experiment`` against depth and against
    ``max_tokens``; runs already in ``done`` are reused."""
    records = dict(done)
    for _, _, experiment in scaling_points(ctx.config):
        for seed in ctx.config.scaling.seeds:
            if (experiment.name, seed) not in records:
                records[(experiment.name, seed)] = run_experiment(ctx, experiment, seed)
    return collect_scaling(ctx.config, records)


def _mean(values: Sequence[float | None]) -> float:
    """Mean of the measured values; NaN (a gap in the plotted line) when none is."""
    values = measured(values)
    return float(values.mean()) if len(values) else float("nan")


def plot_scaling(scaling: dict[str, Any], path: str | Path) -> None:
    """Two panels: GAUC and Cold GAUC against depth, and against the token budget (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, axis, label in zip(
        axes, ("num_layers", "max_tokens"), ("HMAT layers", "max tokens"), strict=True
    ):
        points = scaling[axis]
        values = sorted({p["value"] for p in points})
        for metric in ("gauc", "cold_gauc"):
            means = [_mean([p[metric] for p in points if p["value"] == v]) for v in values]
            ax.plot(values, means, marker="o", label=metric.upper().replace("_", " "))
        ax.set_xlabel(label)
        ax.set_xticks(values)
        ax.set_ylabel("GAUC")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{scaling['experiment']}: GAUC vs depth and sequence length (seeds {scaling['seeds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_evaluation(
    config: EvaluationConfig,
    features: ItemFeatures | None = None,
    callback: MetricsCallback | None = None,
    features_cutoff: int | None = None,
) -> dict[str, Any]:
    """Run the experiments selected by ``config.run`` for every seed (and the scaling sweep when
    configured). ``features`` overrides ``config.data.features_path``; ``callback(record)`` gets
    every finished run. Returns ``dataset`` (split summary), ``budget``, ``runs``, ``summary``
    (mean/std per experiment), ``table`` (markdown), ``scaling`` and ``config``.

    ``features_cutoff``: the instant before which the behaviour encoder of ``features`` trained
    (features read from ``config.data.features_path`` use the file's ``cutoff``, when it has one).
    Past the split's cut it saw test interactions, and every semantic ID with it (App. B.2): a
    ValueError."""
    torch.set_num_threads(config.threads)
    dataset = load_dataset(config.data, config.protocol)
    split = chronological_split(dataset.interactions, config.protocol)
    if features is None and config.data.features_path:
        features = load_features_npz(config.data.features_path)
        features_cutoff = npz_cutoff(config.data.features_path)
    if features is not None and features_cutoff is None and "behavior" in features.modalities:
        if not config.data.allow_uncut_behavior:
            raise ValueError(
                "the features record no behaviour cut-off: nothing shows their behaviour encoder never "
                "saw the test interactions (App. B.2); write the instant it trained up to as 'cutoff' in "
                "the features file, or set data.allow_uncut_behavior: true"
            )
        logger.warning("the features record no behaviour cut-off (data.allow_uncut_behavior): unchecked")
    if features_cutoff is not None and features_cutoff > split.cut:
        raise ValueError(
            f"the features' behaviour encoder trained on interactions up to {features_cutoff}, past the "
            f"split's cut {split.cut} (train_fraction {config.protocol.train_fraction}): rebuild them "
            "with that cut-off"
        )
    semantic = config.scaling is not None or any(e.model == "hmat" for e, _ in config.jobs())
    if features is not None and semantic:  # before any training: a semantic-ID lookup would fail mid-run
        missing = np.setdiff1d(dataset.interactions["item_id"].unique(), features.item_ids)
        if missing.size:
            raise ValueError(
                f"{missing.size} item(s) of the interactions have no features (first: "
                f"{missing[:5].tolist()}): HMAT needs a row in the features file for every item"
            )
    ctx = _Context(config, dataset, split, features)
    runs: list[dict[str, Any]] = []
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for experiment, seed in config.jobs():
        record = run_experiment(ctx, experiment, seed)
        runs.append(record)
        done[(experiment.name, seed)] = record
        if callback is not None:
            callback(record)
    scaling = run_scaling(ctx, done) if config.scaling is not None else None
    summary = {
        **_split_summary(ctx),
        "features": None if features is None else features_fingerprint(features),
    }
    return assemble(config, summary, runs, scaling)


def split_summary(config: EvaluationConfig) -> dict[str, Any]:
    """The ``dataset`` summary :func:`run_evaluation` reports, less the features fingerprint: the
    data's name, its split and the items per window, read without training anything."""
    dataset = load_dataset(config.data, config.protocol)
    return _split_summary(
        _Context(config, dataset, chronological_split(dataset.interactions, config.protocol), None)
    )


def _split_summary(ctx: _Context) -> dict[str, Any]:
    return {
        "name": ctx.dataset.name,
        **ctx.split.summary(),
        "window_items": ctx.window_size(ctx.config.max_tokens),
    }


def assemble(
    config: EvaluationConfig,
    dataset: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    scaling: dict[str, Any] | None,
) -> dict[str, Any]:
    """The result of :func:`run_evaluation` from its parts (also used to merge parallel runs):
    ``summary`` over all runs, ``tables`` per selected set (and ``other`` for loose experiments)."""
    summary = summarise(runs) if runs else {}
    descriptions = {e.name: e.description for e in config.experiments}
    tables: dict[str, str] = {}
    for entry in config.run:
        members = config.sets.get(entry)
        key = entry if members else "other"
        chosen = {n: summary[n] for n in (members or [entry]) if n in summary}
        if chosen:
            tables[key] = tables.get(key, "") + markdown_table(chosen, descriptions)
    return {
        "dataset": dataset,
        "budget": {
            "window_items": dataset.get("window_items"),
            "max_tokens": config.max_tokens,
            "train_steps": config.train.max_steps,
            "batch_size": config.train.batch_size,
            "pretrain_steps": config.pretrain_steps,
            "hmat": config.hmat.model_dump(mode="json"),
            "id_ranker": config.id_ranker.model_dump(mode="json"),
            "tokenizer_epochs": config.tokenizer.epochs,
            "rqvae_epochs": config.rqvae.epochs,
        },
        "runs": list(runs),
        "summary": summary,
        "tables": tables,
        "target": target_check(summary, config.target),
        "scaling": scaling,
        "config": config.model_dump(mode="json"),
        "cache_versions": dict(CACHE_VERSIONS),  # the tokenizer code of the runs (``--reuse`` checks)
        "mask_rule": MASK_RULE,  # the HMAT rule of the runs (``--reuse`` checks)
        "id_ranker_version": ID_RANKER_VERSION,  # and the ID rankers' code
    }

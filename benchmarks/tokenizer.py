"""DST vs a plain RQ-VAE on MovieLens-100K item features (Sec. 3.2, App. B.2; Figure 3 of Sec. 4.4).

Both tokenizers get the same catalogue (behaviour, image, text features from
``benchmarks/movielens_features.py``) and the same code budget, 6 codebooks of K=256:
DST = 3 shared + 1 per modality, RQ-VAE = 6 residual layers over the concatenated modalities.
``dst`` uses ``configs/tokenizer.yaml``; ``dst_all_present`` is the same trained as if every fallback row
(``present`` False: no poster, no interaction before the cut-off) were the item's feature, as before
DST left them out; ``dst_psgr_consensus`` is the same with PSGR unfolding the
literal shared residual (``psgr_residual: consensus``), for comparison; ``dst_input_recon`` is the same
with ``input_reconstruction_weight`` > 0 (beyond the paper): a decoder per modality maps h_hat + q_m
back to the standardised, L2-normalised input, exactly the RQ-VAE's target, so its
``input_reconstruction`` compares with the RQ-VAE's ``reconstruction`` like for like; ``dst_no_mi``
drops the vCLUB term (``mi_weight: 0``); ``dst_tau05_no_mi`` also floors the GRAM temperature at 0.5 (it starts there and
may rise to 1.0; looser alignment), which shows what the own-target measure rewards. Each DST entry also has
``diagnostics`` per modality (mean cosine of a_m to the consensus, FVU of a_m by the shared codes
alone, FVU of a_m - h_hat by the specific code) and its last epoch's losses. ``rqvae_4`` (4 codes over all modalities) and
``rqvae_4_<modality>`` (4 codes over one modality: the codes DST reconstructs one modality from) are
capacity references. ``held_out`` trains ``dst`` and ``rqvae`` again on 80% of the items and measures
both reconstructions on the 20% neither saw: in-sample, 6 x 256 codewords for 1,682 items can
largely memorise the catalogue, and new items are what a tokenizer must generalise to.
``seeds`` trains ``dst`` and ``rqvae`` again (in-sample and held out) with each further seed of
``--seeds`` and reports every target, the Figure 3 specific positions and their mean and spread over
the seeds: one seed's win or loss is not a finding when seeds move a modality's FVU by 0.1 or more.
Writes ``benchmarks/results/tokenizer.json`` and the Figure 3 heatmap ``tokenizer_figure3.png``.

Reconstruction error, per modality, is defined the same way for both: the mean over items of the
squared L2 error in reconstructing a unit-norm target vector, and its fraction of variance unexplained
(FVU = SSE / total sum of squares around the catalogue mean). The targets are each model's own:
DST reconstructs the aligned feature a_m with h_hat + q_m (Eq. 2, first term); the RQ-VAE reconstructs
the standardised, L2-normalised input block of the modality with its decoder. Because the targets
differ, a common-target probe is also reported: ridge regression (5-fold cross-validated FVU) from each
model's per-modality reconstruction to the standardised, L2-normalised raw modality feature.

Usage: ``python benchmarks/tokenizer.py --data-dir ../shared/data/movielens-100k``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import run_environment
from benchmarks.movielens_features import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR
from hisam_core.evaluation.features import load_movielens_features
from hisam_core.evaluation.semantic import features_fingerprint
from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.dst import DST
from hisam_core.tokenizer.figure import position_modality_similarity, save_similarity_figure
from hisam_core.tokenizer.metrics import code_perplexity, code_utilisation, collision_rate, unique_id_rate
from hisam_core.tokenizer.rqvae import RQVAE, RQVAEConfig, RQVAETrainConfig, train_rqvae
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from pipelines.settings import positive_int_arg

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOSS_KEYS = ("recon_", "input_recon_", "alignment", "quantization", "mi_", "total")
RECON_DEFINITION = (
    "mse: mean over items of ||target_m - reconstruction_m||^2 with unit-norm targets; fvu: SSE / SST "
    "of the target around its catalogue mean. DST: target a_m (aligned feature), reconstruction "
    "h_hat + q_m (Eq. 2). RQ-VAE: target = standardised, L2-normalised input block of modality m, "
    "reconstruction = its decoder output block. probe_fvu: 5-fold ridge (alpha=1) from each model's "
    "per-modality reconstruction to the standardised, L2-normalised raw feature (a common target). "
    "probe_fvu_of_aligned (DST): the same probe from the unquantised a_m, what a lossless quantiser "
    "of the aligned space would give. Every measure of modality m is over the items whose m is "
    "present (ItemFeatures.present: a poster, an interaction before the cut-off); the others hold "
    "a fallback row, not the item's feature."
)

HELD_OUT_DEFINITION = (
    "dst and rqvae retrained on the train items only, measured on the test items: recon fvu of each "
    "model's own target with SST around the train items' mean; probe_fvu: ridge (alpha=1) from the "
    "reconstruction to the normalised raw feature, fitted on train items, scored on test items; "
    "both over the items whose modality is present."
)

SEEDS_DEFINITION = (
    "dst and rqvae retrained with each seed (TokenizerTrainConfig.seed and RQVAETrainConfig.seed), "
    "everything else as above, the held-out item split fixed; the first seed's figures are the ones "
    "above. figure3_diagonal: each specific position's similarity to its own modality; "
    "figure3_max_off_diagonal: the largest similarity of a specific position to another modality; "
    "figure3_shared_min: the smallest similarity of a shared position to a modality. "
    "summary: mean and population sd over the seeds; holds_on_every_seed: each target_check entry, "
    "true only if it holds for every seed (and every modality)."
)


def ridge_probe_fvu(x: np.ndarray, y: np.ndarray, folds: int = 5, alpha: float = 1.0, seed: int = 0) -> float:
    """Cross-validated fraction of variance of ``y`` unexplained by a ridge regression on ``x``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    sse = sst = 0.0
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        x_mean, y_mean = x[train].mean(0), y[train].mean(0)
        xt, yt = x[train] - x_mean, y[train] - y_mean
        weights = np.linalg.solve(xt.T @ xt + alpha * np.eye(x.shape[1]), xt.T @ yt)
        pred = (x[fold] - x_mean) @ weights + y_mean
        sse += ((y[fold] - pred) ** 2).sum()
        sst += ((y[fold] - y_mean) ** 2).sum()
    return float(sse / sst)


def reconstruction_stats(
    target: np.ndarray, reconstruction: np.ndarray, mean: np.ndarray | None = None
) -> dict[str, float]:
    """MSE and FVU; ``mean`` (default: the target's own) is what the total sum of squares is around."""
    sse = ((target - reconstruction) ** 2).sum(-1)
    sst = ((target - (target.mean(0) if mean is None else mean)) ** 2).sum()
    return {"mse": float(sse.mean()), "fvu": float(sse.sum() / sst)}


def ridge_transfer_fvu(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, alpha: float = 1.0
) -> float:
    """FVU on the test rows of a ridge regression fitted on the training rows (SST around the train mean)."""
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xt, yt = x_train - x_mean, y_train - y_mean
    weights = np.linalg.solve(xt.T @ xt + alpha * np.eye(x_train.shape[1]), xt.T @ yt)
    pred = (x_test - x_mean) @ weights + y_mean
    return float(((y_test - pred) ** 2).sum() / ((y_test - y_mean) ** 2).sum())


def split_items(features: ItemFeatures, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices of a seeded random item split."""
    order = np.random.default_rng(seed).permutation(len(features))
    cut = round(len(features) * test_fraction)
    return np.sort(order[cut:]), np.sort(order[:cut])


def held_out_report(
    model: DST | RQVAE,
    features: ItemFeatures,
    raw_targets: dict[str, np.ndarray],
    train: np.ndarray,
    test: np.ndarray,
) -> dict[str, Any]:
    """Reconstruction of items the tokenizer never saw: own target and the common-target probe.

    Own target: DST's a_m, the RQ-VAE's normalised input block, FVU around the training items' mean.
    Probe: ridge from the model's reconstruction to the normalised raw feature, fitted on the training
    items and scored on the held-out ones.
    """
    is_dst = isinstance(model, DST)
    with torch.no_grad():
        out_train, out_test = (
            model(*model.tensors(part)) for part in (features.subset(train), features.subset(test))
        )
    targets = (lambda out: out.aligned) if is_dst else (lambda out: out.targets)
    report: dict[str, Any] = {"reconstruction": {}, "probe_fvu": {}}
    for m in model.modalities:
        seen, unseen = features.present[m][train], features.present[m][test]
        target_train, target_test = targets(out_train)[m].numpy()[seen], targets(out_test)[m].numpy()[unseen]
        recon_train = out_train.reconstructed[m].numpy()[seen]
        recon_test = out_test.reconstructed[m].numpy()[unseen]
        report["reconstruction"][m] = reconstruction_stats(target_test, recon_test, target_train.mean(0))
        report["probe_fvu"][m] = ridge_transfer_fvu(
            recon_train, raw_targets[m][train][seen], recon_test, raw_targets[m][test][unseen]
        )
    return report


def normalised_raw(features: ItemFeatures) -> dict[str, np.ndarray]:
    """The common probe target: each modality standardised per dimension (statistics of the rows where
    it is present, as DST's heads), then L2-normalised."""
    out = {}
    for m, x in features.modalities.items():
        x = torch.as_tensor(x, dtype=torch.float64)
        real = x[torch.as_tensor(features.present[m])]
        x = (x - real.mean(0)) / real.std(0, unbiased=False).clamp_min(1e-6)
        out[m] = F.normalize(x, dim=-1).numpy()
    return out


def code_report(codes: np.ndarray, codebook_size: int, names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "positions": {
            name: {"utilisation": float(u), "perplexity": float(p)}
            for name, u, p in zip(
                names,
                code_utilisation(codes, codebook_size),
                code_perplexity(codes, codebook_size),
                strict=True,
            )
        },
        "unique_id_rate": unique_id_rate(codes),
        "collision_rate": collision_rate(codes),
    }


def evaluate_dst(
    model: DST, features: ItemFeatures, raw_targets: dict[str, np.ndarray], rows: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Codes and reconstruction of ``features``; each modality's measures over its ``rows`` (a mask)."""
    ids = model.encode(features, "benchmark")
    num = model.config.shared_layers + len(model.modalities)  # the 6 codes, without a dedup suffix
    report = code_report(ids.codes[:, :num], model.config.codebook_size, ids.position_names[:num])
    with torch.no_grad():
        out = model(*model.tensors(features))
        codewords = model.codewords(out.codes).numpy()
    full = {m: out.aligned[m].numpy() for m in model.modalities}
    aligned = {m: full[m][rows[m]] for m in model.modalities}
    recon = {m: out.reconstructed[m].numpy()[rows[m]] for m in model.modalities}
    targets = {m: raw_targets[m][rows[m]] for m in model.modalities}
    report["reconstruction"] = {m: reconstruction_stats(aligned[m], recon[m]) for m in model.modalities}
    report["probe_fvu"] = {m: ridge_probe_fvu(recon[m], targets[m]) for m in model.modalities}
    # The same probe from the unquantised a_m: what even a lossless quantiser of the aligned space keeps.
    report["probe_fvu_of_aligned"] = {m: ridge_probe_fvu(aligned[m], targets[m]) for m in model.modalities}
    consensus = model.consensus(out.aligned, out.present)
    h_hat = out.shared.quantized.numpy()
    report["diagnostics"] = {
        m: {
            "cos_to_consensus": float(F.cosine_similarity(out.aligned[m], consensus)[rows[m]].mean()),
            "fvu_of_a_by_shared": reconstruction_stats(aligned[m], h_hat[rows[m]])["fvu"],
            "fvu_of_deviation_by_specific": reconstruction_stats(
                aligned[m] - h_hat[rows[m]], out.specific[m].quantized.numpy()[rows[m]]
            )["fvu"],
        }
        for m in model.modalities
    }
    if out.decoded:
        report["input_reconstruction"] = {
            m: reconstruction_stats(out.inputs[m].numpy()[rows[m]], out.decoded[m].numpy()[rows[m]])
            for m in out.decoded
        }
    report["figure3"] = {
        "measure": "mean over items of cos(codeword_p - mean, a_m - mean) (hisam_core.tokenizer.figure)",
        "rows": list(ids.position_names[:num]),
        "columns": model.modalities,
        "matrix": position_modality_similarity(codewords, full, rows).round(4).tolist(),
    }
    return report


def evaluate_rqvae(
    model: RQVAE, features: ItemFeatures, raw_targets: dict[str, np.ndarray]
) -> dict[str, Any]:
    ids = model.encode(features, "benchmark")
    report = code_report(ids.codes, model.config.codebook_size, ids.position_names)
    with torch.no_grad():
        out = model(*model.tensors(features))
    rows = features.present
    targets = {m: out.targets[m].numpy()[rows[m]] for m in model.modalities}
    recon = {m: out.reconstructed[m].numpy()[rows[m]] for m in model.modalities}
    report["reconstruction"] = {m: reconstruction_stats(targets[m], recon[m]) for m in model.modalities}
    report["probe_fvu"] = {m: ridge_probe_fvu(recon[m], raw_targets[m][rows[m]]) for m in model.modalities}
    return report


def check_targets(
    dst: dict[str, Any], rqvae: dict[str, Any], held_dst: dict[str, Any], held_rqvae: dict[str, Any]
) -> dict[str, Any]:
    """The issue's targets for one seed: ``dst`` and ``rqvae`` are ``evaluate_*`` reports, ``held_*``
    the ``held_out_report`` of the same models retrained on the training items."""
    names = list(dst["reconstruction"])
    return {
        "utilisation_shared_0>=0.9": dst["positions"]["shared_0"]["utilisation"] >= 0.9,
        "unique_id_rate>=0.99": dst["unique_id_rate"] >= 0.99,
        "recon_fvu_dst<rqvae": {
            m: dst["reconstruction"][m]["fvu"] < rqvae["reconstruction"][m]["fvu"] for m in names
        },
        "probe_fvu_dst<rqvae": {m: dst["probe_fvu"][m] < rqvae["probe_fvu"][m] for m in names},
        "held_out_probe_fvu_dst<rqvae": {
            m: held_dst["probe_fvu"][m] < held_rqvae["probe_fvu"][m] for m in names
        },
    }


def seed_measures(
    dst: dict[str, Any], rqvae: dict[str, Any], held_dst: dict[str, Any], held_rqvae: dict[str, Any]
) -> dict[str, Any]:
    """The figures one seed contributes to the spread: targets, reconstruction, Figure 3's specific rows."""
    names = list(dst["reconstruction"])
    figure3 = np.array(dst["figure3"]["matrix"])
    shared, matrix = figure3[: -len(names)], figure3[-len(names) :]  # specific rows in modality order
    off = matrix - np.diag(np.full(len(names), np.inf))
    measures: dict[str, Any] = {
        "dst": {
            "utilisation_shared_0": dst["positions"]["shared_0"]["utilisation"],
            "unique_id_rate": dst["unique_id_rate"],
            "figure3_diagonal": dict(zip(names, np.diag(matrix).tolist(), strict=True)),
            "figure3_max_off_diagonal": float(off.max()),
            "figure3_shared_min": float(shared.min()),
        },
        "rqvae": {"unique_id_rate": rqvae["unique_id_rate"]},
    }
    for name, report, held in (("dst", dst, held_dst), ("rqvae", rqvae, held_rqvae)):
        measures[name]["recon_fvu"] = {m: v["fvu"] for m, v in report["reconstruction"].items()}
        measures[name]["probe_fvu"] = dict(report["probe_fvu"])
        measures[name]["held_out_probe_fvu"] = dict(held["probe_fvu"])
    return measures


def spread(per_seed: list[Any]) -> Any:
    """Mean and population sd of each numeric leaf over seeds (the same nested keys in every seed)."""
    if isinstance(per_seed[0], dict):
        return {k: spread([seed[k] for seed in per_seed]) for k in per_seed[0]}
    values = np.asarray(per_seed, dtype=float)
    return {"mean": float(values.mean()), "sd": float(values.std())}


def every(per_seed: list[Any]) -> Any:
    """``True`` per target_check entry only where it holds for every seed."""
    if isinstance(per_seed[0], dict):
        return {k: every([seed[k] for seed in per_seed]) for k in per_seed[0]}
    return all(per_seed)


def seed_spread(
    features: ItemFeatures,
    raw_targets: dict[str, np.ndarray],
    dst_config: TokenizerTrainConfig,
    rq_config: RQVAETrainConfig,
    seeds: list[int],
    results: dict[str, Any],
    train: np.ndarray,
    test: np.ndarray,
) -> dict[str, Any]:
    """``results``' dst and rqvae (the first seed) and both retrained with each further seed."""
    held = results["held_out"]
    reports = [(results["models"]["dst"], results["models"]["rqvae"], held["dst"], held["rqvae"])]
    for seed in seeds[1:]:
        dst_seeded = dst_config.model_copy(update={"seed": seed})
        rq_seeded = rq_config.model_copy(update={"seed": seed})
        t = time.perf_counter()
        reports.append(
            (
                evaluate_dst(train_tokenizer(features, dst_seeded), features, raw_targets, features.present),
                evaluate_rqvae(train_rqvae(features, rq_seeded), features, raw_targets),
                held_out_report(
                    train_tokenizer(features.subset(train), dst_seeded), features, raw_targets, train, test
                ),
                held_out_report(
                    train_rqvae(features.subset(train), rq_seeded), features, raw_targets, train, test
                ),
            )
        )
        logger.info(
            "seed %d: dst and rqvae, in-sample and held out, in %.1f s", seed, time.perf_counter() - t
        )
    measures = [seed_measures(*r) for r in reports]
    checks = [check_targets(*r) for r in reports]
    return {
        "definition": SEEDS_DEFINITION,
        "seeds": list(seeds),
        "per_seed": {
            str(seed): {"measures": m, "target_check": c}
            for seed, m, c in zip(seeds, measures, checks, strict=True)
        },
        "summary": spread(measures),
        "holds_on_every_seed": every(checks),
    }


def fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (argparse type): both sides of the split need items."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MovieLens-100K bundle")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tokenizer.yaml", help="DST config")
    parser.add_argument(
        "--epochs", type=positive_int_arg, default=None, help="override the epochs of both models"
    )
    parser.add_argument("--threads", type=positive_int_arg, default=None, help="torch CPU threads")
    parser.add_argument(
        "--input-reconstruction-weight", type=float, default=1.0, help="weight of dst_input_recon's decoders"
    )
    parser.add_argument(
        "--held-out-fraction", type=fraction, default=0.2, help="items held out of the held_out comparison"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of dst and rqvae for the spread; the first is the one of every other section",
    )
    parser.add_argument("--results", type=Path, default=RESULTS / "tokenizer.json")
    parser.add_argument("--figure", type=Path, default=RESULTS / "tokenizer_figure3.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    features = load_movielens_features(args.data_dir, args.cache_dir)
    raw_targets = normalised_raw(features)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    dst_config = TokenizerTrainConfig.from_yaml(args.config)
    if args.epochs is not None:
        if args.epochs <= dst_config.alignment_warmup_epochs:
            parser.error(
                f"--epochs must exceed alignment_warmup_epochs ({dst_config.alignment_warmup_epochs})"
            )
        dst_config.epochs = args.epochs
    dst_config.seed = args.seeds[0]
    rq_config = RQVAETrainConfig(
        model=RQVAEConfig(
            dim=dst_config.model.dim,
            hidden_dim=dst_config.model.hidden_dim,
            num_layers=dst_config.model.shared_layers + len(features.modalities),
            codebook_size=dst_config.model.codebook_size,
            beta=dst_config.model.beta,
            rotation_trick=dst_config.model.rotation_trick,
        ),
        epochs=dst_config.epochs,
        batch_size=dst_config.batch_size,
        lr=dst_config.lr,
        dead_code_threshold=dst_config.dead_code_threshold,
        seed=dst_config.seed,
    )

    results: dict[str, Any] = {
        "dataset": {
            "items": len(features),
            "dims": features.dims,
            "absent": {m: int((~present).sum()) for m, present in features.present.items()},
            "features": features_fingerprint(features),  # as quality.json's dataset.features
        },
        "reconstruction_definition": RECON_DEFINITION,
        "environment": {
            **run_environment(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "targets": {"utilisation_shared_0": 0.9, "unique_id_rate_without_suffix": 0.99},
        "models": {},
    }
    literal = dst_config.model_copy(
        update={"model": dst_config.model.model_copy(update={"psgr_residual": "consensus"})}
    )
    decoded = dst_config.model_copy(
        update={
            "model": dst_config.model.model_copy(
                update={"input_reconstruction_weight": args.input_reconstruction_weight}
            )
        }
    )
    no_mi = dst_config.model_copy(update={"model": dst_config.model.model_copy(update={"mi_weight": 0.0})})
    loose = dst_config.model_copy(
        update={
            "model": dst_config.model.model_copy(
                update={"mi_weight": 0.0, "temperature_init": 0.5, "temperature_min": 0.5}
            )
        }
    )
    # dst_all_present trains as if every fallback row (no poster, no interaction before the cut-off)
    # were the item's feature: the paper's setting, whose items have every modality.
    all_present = ItemFeatures(features.item_ids, features.modalities)
    variants = {
        "dst": (features, dst_config),
        "dst_all_present": (all_present, dst_config),
        "dst_psgr_consensus": (features, literal),
        "dst_input_recon": (features, decoded),
        "dst_no_mi": (features, no_mi),
        "dst_tau05_no_mi": (features, loose),
    }
    for name, (trained_on, config) in variants.items():
        last: dict[str, float] = {}
        t = time.perf_counter()
        dst = train_tokenizer(trained_on, config, callback=lambda _, metrics, last=last: last.update(metrics))
        wall = time.perf_counter() - t
        mi = config.model.mi_weight * sum(last[f"mi_{m}"] for m in dst.modalities)
        results["models"][name] = {
            "wall_s": round(wall, 1),
            "config": config.model_dump(mode="json"),
            **evaluate_dst(dst, trained_on, raw_targets, features.present),
            "last_epoch_losses": {k: v for k, v in last.items() if k.startswith(LOSS_KEYS)},
            "mi_share_of_total_loss": mi / last["total"],
        }
        logger.info("%s trained in %.1f s", name, wall)

    # The plain RQ-VAE at the same budget (6 codes), and capacity references: 4 codes over all
    # modalities, and 4 codes over each modality alone (the codes DST reconstructs one modality from).
    references = {"rqvae": (features, rq_config)}
    four = rq_config.model_copy(update={"model": rq_config.model.model_copy(update={"num_layers": 4})})
    references["rqvae_4"] = (features, four)
    for m in features.names:
        one = ItemFeatures(features.item_ids, {m: features.modalities[m]}, {m: features.present[m]})
        references[f"rqvae_4_{m}"] = (one, four)
    for name, (subset, config) in references.items():
        t = time.perf_counter()
        rqvae = train_rqvae(subset, config)
        wall = time.perf_counter() - t
        results["models"][name] = {
            "wall_s": round(wall, 1),
            "config": config.model_dump(mode="json"),
            **evaluate_rqvae(rqvae, subset, raw_targets),
        }
        logger.info("%s trained in %.1f s", name, wall)

    train, test = split_items(features, args.held_out_fraction, dst_config.seed)
    held_out: dict[str, Any] = {
        "items": {"train": len(train), "test": len(test)},
        "definition": HELD_OUT_DEFINITION,
    }
    for name, fit in (
        ("dst", lambda: train_tokenizer(features.subset(train), dst_config)),
        ("rqvae", lambda: train_rqvae(features.subset(train), rq_config)),
    ):
        t = time.perf_counter()
        model = fit()
        held_out[name] = {"wall_s": round(time.perf_counter() - t, 1)}
        held_out[name].update(held_out_report(model, features, raw_targets, train, test))
    results["held_out"] = held_out

    dst_r, rq_r = results["models"]["dst"], results["models"]["rqvae"]
    results["target_check"] = check_targets(dst_r, rq_r, held_out["dst"], held_out["rqvae"])
    decoded_r = results["models"]["dst_input_recon"]
    results["target_check"]["input_recon_fvu_dst_input_recon<rqvae"] = {
        m: decoded_r["input_reconstruction"][m]["fvu"] < rq_r["reconstruction"][m]["fvu"]
        for m in features.names
    }
    results["seeds"] = seed_spread(
        features, raw_targets, dst_config, rq_config, args.seeds, results, train, test
    )
    fig3 = results["models"]["dst"]["figure3"]
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    save_similarity_figure(np.array(fig3["matrix"]), fig3["rows"], fig3["columns"], args.figure)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    summary = {
        name: {
            "wall_s": r["wall_s"],
            "unique_id_rate": round(r["unique_id_rate"], 4),
            "utilisation_first": round(next(iter(r["positions"].values()))["utilisation"], 3),
            "mi_share_of_total_loss": round(r.get("mi_share_of_total_loss", 0.0), 3),
            "recon_mse": {m: round(v["mse"], 4) for m, v in r["reconstruction"].items()},
            "recon_fvu": {m: round(v["fvu"], 4) for m, v in r["reconstruction"].items()},
            "probe_fvu": {m: round(v, 4) for m, v in r["probe_fvu"].items()},
            "probe_fvu_of_aligned": {m: round(v, 4) for m, v in r.get("probe_fvu_of_aligned", {}).items()},
            "input_recon_fvu": {m: round(v["fvu"], 4) for m, v in r.get("input_reconstruction", {}).items()},
        }
        for name, r in results["models"].items()
    }
    summary["held_out"] = {
        name: {
            "recon_fvu": {m: round(v["fvu"], 4) for m, v in held_out[name]["reconstruction"].items()},
            "probe_fvu": {m: round(v, 4) for m, v in held_out[name]["probe_fvu"].items()},
        }
        for name in ("dst", "rqvae")
    }
    summary["seeds"] = results["seeds"]["summary"]
    output = {"models": summary, "target_check": results["target_check"]}
    output["holds_on_every_seed"] = results["seeds"]["holds_on_every_seed"]
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

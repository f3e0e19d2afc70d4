"""Harness: the config catalogue, ablation switches that change exactly what they claim, the cached
semantic-ID variants, and a tiny end-to-end run where signal-bearing rankers beat random scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hisam_core.evaluation.harness import (
    DEFAULT_SETS,
    EvaluationConfig,
    ExperimentConfig,
    ScalingConfig,
    TargetConfig,
    evaluation_metrics,
    json_safe,
    markdown_table,
    run_evaluation,
    scaling_points,
    split_summary,
    summarise,
    target_check,
)
from hisam_core.evaluation.protocol import (
    ProtocolConfig,
    build_windows,
    chronological_split,
    label_interactions,
)
from hisam_core.evaluation.semantic import TokenizerVariant, load_features_npz, npz_cutoff, semantic_ids
from hisam_core.features import ItemFeatures
from hisam_core.ranker.model import HMATConfig
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig
from hisam_core.tokenizer.dst import DST
from hisam_core.tokenizer.rqvae import RQVAEConfig, RQVAETrainConfig
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer

ROOT = Path(__file__).resolve().parents[3]


def test_configs_evaluation_yaml_documents_the_defaults():
    assert EvaluationConfig.from_yaml(ROOT / "configs" / "evaluation.yaml") == EvaluationConfig()


def resolved(experiment: ExperimentConfig, config: EvaluationConfig) -> dict[str, Any]:
    """Everything that defines a row, flattened."""
    out: dict[str, Any] = {"model": experiment.model, "pretrain": experiment.pretrain}
    if experiment.tokenizer is not None:
        out |= {f"tokenizer.{k}": v for k, v in experiment.tokenizer.model_dump().items()}
    hmat = HMATConfig.model_validate({**config.hmat.model_dump(), **experiment.hmat})
    out |= {f"hmat.{k}": v for k, v in hmat.model_dump().items()}
    return out


CLAIMS = {
    "hisam": {"pretrain": True},
    "no_cga": {"tokenizer.alignment": False},
    "no_dmrq": {"tokenizer.kind": "dst_rq"},
    "abs_pos": {"hmat.position_encoding": "absolute"},
    "rope1d": {"hmat.position_encoding": "rope1d"},
    "no_ma": {"hmat.attention_mask": "causal"},
    "action_memory": {"hmat.history_memory": "anchor_action"},
    "mod_behavior": {"tokenizer.kind": "rqvae", "tokenizer.modalities": ["behavior"]},
    "mod_image_text": {"tokenizer.modalities": ["image", "text"]},
    "mod_behavior_text": {"tokenizer.modalities": ["behavior", "text"]},
    "mod_behavior_image": {"tokenizer.modalities": ["behavior", "image"]},
    "qarm": {"tokenizer.kind": "rqvae", "hmat.position_encoding": "rope1d", "hmat.attention_mask": "causal"},
}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_each_variant_differs_from_hisam_sft_in_exactly_its_switch(name):
    config = EvaluationConfig()
    reference = resolved(config.experiment("hisam_sft"), config)
    variant = resolved(config.experiment(name), config)
    assert {k: v for k, v in variant.items() if reference.get(k) != v} == CLAIMS[name]


def test_sets_and_seeds_expand_in_order():
    config = EvaluationConfig(run=["main", "ablations"], seeds=[0, 1], seeds_per_set={"ablations": [5]})
    jobs = [(e.name, s) for e, s in config.jobs()]
    assert jobs[: 2 * len(DEFAULT_SETS["main"])] == [(n, s) for n in DEFAULT_SETS["main"] for s in (0, 1)]
    assert ("hisam_sft", 5) not in jobs  # already selected by main, with its seeds
    assert ("no_cga", 5) in jobs
    with pytest.raises(ValueError, match="unknown"):
        EvaluationConfig(run=["nope"])


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"experiment": "a", "seed": s, "num_parameters": 10, "metrics": {"auc": v, "gauc": v}}
        for s, v in enumerate([0.6, 0.7, 0.8])
    ]
    summary = summarise(runs)
    assert summary["a"]["gauc"]["mean"] == pytest.approx(0.7)
    assert summary["a"]["gauc"]["std"] == pytest.approx(0.1)
    assert "0.7000 ± 0.1000" in markdown_table(summary)


def test_unmeasured_cold_metrics_leave_the_mean_strict_json_and_the_target_check():
    """A seed whose cold subset cannot define a metric (NaN, ``null`` once written as JSON) is left
    out of that metric's mean and spread, and counted; a metric no seed measured is unmeasured."""

    def run(name, seed, gauc, cold):
        return {
            "experiment": name,
            "seed": seed,
            "num_parameters": 1,
            "metrics": {"gauc": gauc, "cold_gauc": cold},
        }

    runs = [run("hisam", 0, 0.70, 0.60), run("hisam", 1, 0.72, float("nan")), run("hisam", 2, 0.74, 0.64)]
    runs += [run("b", s, 0.60, float("nan")) for s in range(3)]
    summary = summarise(runs)
    assert summary["hisam"]["cold_gauc"] == {"mean": pytest.approx(0.62), "std": pytest.approx(0.02 * 2**0.5),
                                             "measured_seeds": 2}  # fmt: skip
    assert "measured_seeds" not in summary["hisam"]["gauc"]
    assert summary["b"]["cold_gauc"] == {"mean": None, "std": None, "measured_seeds": 0}
    written = json.loads(json.dumps(json_safe(runs), allow_nan=False))  # strict JSON: null, never NaN
    assert written[1]["metrics"]["cold_gauc"] is None
    assert summarise(written) == summary  # a --reuse of the written runs summarises the same
    table = markdown_table(summary)
    assert "0.6200 ± 0.0283 (2 seeds)" in table and "unmeasured" in table
    rows = target_check(summary, TargetConfig(baselines=["b"], metrics=["gauc", "cold_gauc"]))
    assert rows[0]["met"] and rows[0]["seeds"] == 3
    assert rows[1] == {"metric": "cold_gauc", "candidate": "hisam", "candidate_mean": pytest.approx(0.62),
                       "closest_baseline": None, "baseline_mean": None, "margin": None, "spread": None,
                       "seeds": 0, "missing": ["b"], "met": False}  # fmt: skip


def test_a_test_set_without_cold_users_leaves_the_cold_metrics_unmeasured(planted):
    """Every test user warm (a dense dataset): the cold metrics are NaN, as for a cold subset of one
    class, so the run summarises and the target check reports them unmeasured instead of failing
    after every model has trained."""
    frame, _, _ = planted
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    _, test = build_windows(split, 8, 2)
    scores = np.random.default_rng(0).random(sum(int(w.targets.sum()) for w in test))
    metrics = evaluation_metrics(test, scores, frozenset())
    assert np.isnan(metrics["cold_auc"]) and np.isnan(metrics["cold_gauc"])
    assert metrics["gauc"] == evaluation_metrics(test, scores, split.cold_users)["gauc"]
    runs = [
        {"experiment": name, "seed": 0, "num_parameters": 1, "metrics": metrics} for name in ("hisam", "b")
    ]
    (row,) = target_check(summarise(runs), TargetConfig(baselines=["b"], metrics=["cold_gauc"]))
    assert (row["candidate_mean"], row["baseline_mean"], row["met"]) == (None, None, False)
    (row,) = target_check(summarise(runs), TargetConfig(baselines=["b"], metrics=["not_reported"]))
    assert (row["candidate_mean"], row["closest_baseline"], row["met"]) == (None, None, False)


def test_evaluation_metrics_are_the_metric_functions_on_the_targets_and_the_cold_users(planted):
    """Each figure is its metric over the test targets in scoring order; the cold ones over the
    targets of the cold users (not of cold items), NDCG and HR at 10."""
    from hisam_core.evaluation.protocol import target_arrays
    from hisam_core.metrics import auc, gauc, hit_rate_at_k, ndcg_at_k

    frame, _, _ = planted
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    _, test = build_windows(split, 8, 2)
    targets = target_arrays(test)
    labels, users = targets["labels"], targets["users"]
    scores = np.random.default_rng(1).random(len(labels))
    cold_users = frozenset(sorted(set(users.tolist()))[::3])  # a third of the test users
    cold = np.isin(users, list(cold_users))
    metrics = evaluation_metrics(test, scores, cold_users)
    assert metrics["auc"] == auc(labels, scores) and metrics["gauc"] == gauc(labels, scores, users)
    assert metrics["cold_auc"] == auc(labels, scores, cold)
    assert metrics["cold_gauc"] == gauc(labels, scores, users, cold)
    assert metrics["ndcg@10"] == ndcg_at_k(labels, scores, users, 10)
    assert metrics["hr@10"] == hit_rate_at_k(labels, scores, users, 10)
    assert metrics["ndcg@10"] != ndcg_at_k(labels, scores, users, 5)  # the cut-off matters here


def test_target_is_met_only_beyond_the_summed_spread_of_every_baseline():
    def runs(name, values):
        return [
            {"experiment": name, "seed": s, "num_parameters": 1, "metrics": {"gauc": v, "cold_gauc": v}}
            for s, v in enumerate(values)
        ]

    summary = summarise(
        runs("hisam", [0.70, 0.71, 0.72]) + runs("a", [0.60] * 3) + runs("b", [0.685, 0.695, 0.705])
    )
    rows = target_check(summary, TargetConfig(baselines=["a", "b"], metrics=["gauc"]))
    assert [(r["closest_baseline"], r["met"]) for r in rows] == [("b", False)]  # margin 0.015 < spread 0.02
    assert rows[0]["margin"] == pytest.approx(0.015) and rows[0]["spread"] == pytest.approx(0.02)
    # ahead of the best mean beyond its spread, not of a noisier baseline just behind it
    summary = summarise(
        runs("hisam", [0.704, 0.705, 0.706])
        + runs("a", [0.699, 0.700, 0.701])
        + runs("b", [0.679, 0.699, 0.719])
    )
    (row,) = target_check(summary, TargetConfig(baselines=["a", "b"], metrics=["gauc"]))
    assert (row["closest_baseline"], row["met"], row["missing"]) == ("b", False, [])
    assert row["margin"] == pytest.approx(0.006) and row["spread"] == pytest.approx(0.021)
    (row,) = target_check(summary, TargetConfig(baselines=["a"], metrics=["gauc"]))
    assert (row["closest_baseline"], row["met"]) == ("a", True)
    (row,) = target_check(summary, TargetConfig(baselines=["a", "absent"], metrics=["gauc"]))
    assert (row["closest_baseline"], row["met"], row["missing"]) == ("a", False, ["absent"])  # not run
    (row,) = target_check(summary, TargetConfig(baselines=["absent"], metrics=["gauc"]))
    assert (row["closest_baseline"], row["met"], row["missing"]) == (None, False, ["absent"])
    one_seed_baseline = summarise(
        runs("hisam", [0.70, 0.71, 0.72]) + runs("a", [0.60] * 3) + runs("c", [0.1])
    )
    (row,) = target_check(one_seed_baseline, TargetConfig(baselines=["a", "c"], metrics=["gauc"]))
    assert (row["closest_baseline"], row["seeds"], row["met"]) == ("c", 1, False)  # the one that fails
    summary = summarise(runs("hisam", [0.70, 0.71, 0.72]) + runs("b", [0.65, 0.66, 0.67]))
    assert target_check(summary, TargetConfig(baselines=["b"], metrics=["gauc"]))[0]["met"]
    one_seed = summarise(runs("hisam", [0.9]) + runs("b", [0.1]))
    assert not target_check(one_seed, TargetConfig(baselines=["b"], metrics=["gauc"]))[0]["met"]
    assert target_check(one_seed, TargetConfig(candidate="absent")) == []


def tiny_tokenizer() -> TokenizerTrainConfig:
    return TokenizerTrainConfig.model_validate(
        {
            "model": {
                "dim": 8,
                "hidden_dim": 16,
                "shared_layers": 1,
                "codebook_size": 8,
                "psgr_heads": 2,
                "vclub_hidden_dim": 8,
            },
            "epochs": 4,
            "alignment_warmup_epochs": 1,
            "batch_size": 32,
            "init_sample_size": 60,
        }
    )


def tiny_rqvae() -> RQVAETrainConfig:
    return RQVAETrainConfig(model=RQVAEConfig(dim=8, hidden_dim=16, codebook_size=8), epochs=4, batch_size=32)


def test_a_changed_training_config_is_not_served_from_the_cache(planted, tmp_path):
    """The caches key on every setting that shapes a table: another DST config retrains DST (and a
    variant's codebook size follows it), another RQ-VAE config retrains the RQ-VAE."""
    _, modalities, item_ids = planted
    features = ItemFeatures(item_ids, modalities)
    dst, rq = (
        TokenizerVariant(kind="dst", modalities=["behavior", "text"]),
        TokenizerVariant(kind="rqvae", modalities=["text"]),
    )
    small = tiny_tokenizer()
    smaller = small.model_copy(update={"model": small.model.model_copy(update={"codebook_size": 4})})
    assert semantic_ids(rq, features, small, tiny_rqvae(), tmp_path).codebook_size == 8
    assert semantic_ids(rq, features, smaller, tiny_rqvae(), tmp_path).codebook_size == 4
    semantic_ids(rq, features, small, tiny_rqvae().model_copy(update={"epochs": 5}), tmp_path)
    assert len(list(tmp_path.glob("sids_*.parquet"))) == 3
    semantic_ids(dst, features, small, tiny_rqvae(), tmp_path)
    semantic_ids(dst, features, small.model_copy(update={"epochs": 5}), tiny_rqvae(), tmp_path)
    assert len(list(tmp_path.glob("dst_*.pt"))) == 2 and len(list(tmp_path.glob("sids_*.parquet"))) == 5


def test_semantic_id_variants_train_what_they_claim_and_are_cached(planted, tmp_path):
    _, modalities, item_ids = planted
    features = ItemFeatures(item_ids, modalities)
    tables = {}
    for variant in (
        TokenizerVariant(kind="dst", modalities=["behavior", "text"]),
        TokenizerVariant(kind="dst", modalities=["behavior", "text"], alignment=False),
        TokenizerVariant(kind="dst_rq", modalities=["behavior", "text"]),
        TokenizerVariant(kind="rqvae", modalities=["behavior"]),
    ):
        ids = semantic_ids(variant, features, tiny_tokenizer(), tiny_rqvae(), tmp_path)
        again = semantic_ids(variant, features, tiny_tokenizer(), tiny_rqvae(), tmp_path)
        np.testing.assert_array_equal(ids.codes, again.codes)
        assert again.position_names == ids.position_names  # through the cache file
        assert ids.num_positions == 1 + len(variant.modalities)  # shared layers + one per modality
        tables[(variant.kind, variant.alignment)] = ids
    models = sorted(
        (c.alignment_weight, c.fusion)
        for c in (DST.load_checkpoint(p).config for p in tmp_path.glob("dst_*.pt"))
    )
    assert models == [(0.0, "concat"), (1.0, "mean")]  # w/o CGA: concatenation, no GRAM; dst_rq reuses
    assert tables[("dst_rq", True)].position_names[0] == "rq_0"
    with pytest.raises(ValueError, match="at least two modalities"):
        TokenizerVariant(kind="dst", modalities=["behavior"])


def test_workers_that_miss_the_same_cache_entry_train_it_once(planted, tmp_path, monkeypatch):
    """``--workers 2`` starts with two seeds of one experiment: both need the same DST and table."""
    import threading

    import hisam_core.evaluation.semantic as semantic

    _, modalities, item_ids = planted
    features = ItemFeatures(item_ids, modalities)
    trained = []
    train = semantic.train_tokenizer
    monkeypatch.setattr(semantic, "train_tokenizer", lambda *a, **k: trained.append(1) or train(*a, **k))
    variant = TokenizerVariant(kind="dst", modalities=["behavior", "text"])
    tables = []

    def worker() -> None:
        tables.append(semantic_ids(variant, features, tiny_tokenizer(), tiny_rqvae(), tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1 and len(tables) == 2
    np.testing.assert_array_equal(tables[0].codes, tables[1].codes)


def test_a_cache_of_another_cache_version_is_not_read(planted, tmp_path, monkeypatch):
    """A trainer's version bump retrains exactly the models and tables that need that trainer:
    DST's, its tables (``dst``, ``dst_rq``); the RQ-VAE's, the ``rqvae`` and ``dst_rq`` tables."""
    import hisam_core.evaluation.semantic as semantic

    _, modalities, item_ids = planted
    features = ItemFeatures(item_ids, modalities)
    kinds = ("dst", "rqvae", "dst_rq")
    variants = [TokenizerVariant(kind=kind, modalities=["behavior", "text"]) for kind in kinds]

    def files() -> set[str]:
        for variant in variants:
            semantic_ids(variant, features, tiny_tokenizer(), tiny_rqvae(), tmp_path)
        return {p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")}

    first = files()
    assert len(first) == 4  # one DST model, three tables
    versions = dict(semantic.CACHE_VERSIONS)
    monkeypatch.setattr(semantic, "CACHE_VERSIONS", {**versions, "rqvae": versions["rqvae"] + 1})
    second = files()
    assert len(second - first) == 2 and all(name.startswith("sids_") for name in second - first)
    monkeypatch.setattr(semantic, "CACHE_VERSIONS", {**versions, "dst": versions["dst"] + 1})
    third = files() - second
    assert len(third) == 3 and sum(name.startswith("dst_") for name in third) == 1


def test_the_evaluation_dst_keeps_the_present_masks_from_the_npz_to_the_model(planted, tmp_path):
    """The ``present`` masks survive the .npz, the modality selection and the cache key: the table is
    that of a DST trained on the same masks, and another mask is another model."""
    _, modalities, item_ids = planted
    absent = np.arange(len(item_ids)) % 4 == 0
    behavior = np.where(absent[:, None], 0.0, modalities["behavior"]).astype(np.float32)
    image = np.random.default_rng(0).normal(size=(len(item_ids), 3)).astype(np.float32)
    arrays = {"emb_behavior": behavior, "emb_image": image, "emb_text": modalities["text"]}
    np.savez(tmp_path / "features.npz", item_ids=item_ids, present_behavior=~absent, **arrays)
    features = load_features_npz(tmp_path / "features.npz")
    np.testing.assert_array_equal(features.present["behavior"], ~absent)
    assert features.present["text"].all() and features.present["image"].all()
    variant = TokenizerVariant(kind="dst", modalities=["behavior", "text"])  # image is selected away
    ids = semantic_ids(variant, features, tiny_tokenizer(), tiny_rqvae(), tmp_path / "cache")
    pair = ItemFeatures(
        item_ids, {m: arrays[f"emb_{m}"] for m in ("behavior", "text")}, {"behavior": ~absent}
    )
    np.testing.assert_array_equal(ids.codes, train_tokenizer(pair, tiny_tokenizer()).encode(pair, "d").codes)
    all_present = ItemFeatures(features.item_ids, features.modalities)
    semantic_ids(variant, all_present, tiny_tokenizer(), tiny_rqvae(), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("dst_*.pt"))) == 2
    for bad, message in (
        ({"present_audio": ~absent}, "without an emb_"),
        ({"present_image": 1.0 * absent}, "bool"),
    ):
        np.savez(tmp_path / "bad.npz", item_ids=item_ids, **arrays, **bad)
        with pytest.raises(ValueError, match=message):
            load_features_npz(tmp_path / "bad.npz")


def test_windows_fit_the_configured_table_with_the_most_codes_whatever_the_run_selects(planted, tmp_path):
    """Every model sees the same windows, sized so that HMAT fits them: for the paper's 6 codes per
    item, or for a table with a fourth modality when one is configured, even if it is not run."""
    frame, _, _ = planted
    frame.to_csv(tmp_path / "interactions.csv", index=False)

    def window(experiments):
        config = EvaluationConfig.model_validate(
            {
                "data": {"dataset": "generic", "path": str(tmp_path / "interactions.csv")},
                "max_tokens": 96,
                "tokenizer": tiny_tokenizer().model_dump(),  # 1 shared layer
                "experiments": [{"name": "sasrec", "model": "sasrec"}, *experiments],
                "sets": {},
                "run": ["sasrec"],
            }
        )
        return split_summary(config)["window_items"]

    def fits(positions):
        return SequenceBuilder(SequenceConfig(num_positions=positions, max_tokens=96)).max_items()

    assert fits(1 + 4) < fits(1 + 3)
    assert window([]) == window([{"name": "pair", "tokenizer": {"modalities": ["text", "image"]}}]) == fits(4)
    four = {"name": "four", "tokenizer": {"modalities": ["text", "image", "behavior", "audio"]}}
    assert window([four]) == fits(5)


def test_end_to_end_rankers_beat_random_on_planted_preferences(planted, tmp_path):
    frame, modalities, item_ids = planted
    frame.to_csv(tmp_path / "interactions.csv", index=False)
    np.savez(tmp_path / "features.npz", item_ids=item_ids, **{f"emb_{m}": v for m, v in modalities.items()})
    config = EvaluationConfig.model_validate(
        {
            "data": {
                "dataset": "generic",
                "path": str(tmp_path / "interactions.csv"),
                "features_path": str(tmp_path / "features.npz"),
                "allow_uncut_behavior": True,
            },
            "max_tokens": 48,
            "hmat": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "ffn_size": 32},
            "id_ranker": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32},
            "train": {
                "learning_rate": 3e-3,
                "warmup_steps": 5,
                "max_steps": 80,
                "batch_size": 16,
                "checkpoint_every": 1000,
                "mixed_precision": "off",
                "device": "cpu",
            },
            "tokenizer": tiny_tokenizer().model_dump(),
            "rqvae": tiny_rqvae().model_dump(),
            "experiments": [
                {"name": "sasrec", "model": "sasrec"},
                {"name": "hisam_sft", "tokenizer": {"modalities": ["behavior", "text"]}},
            ],
            "sets": {},
            "run": ["sasrec", "hisam_sft"],
            "seeds": [0],
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    torch.set_num_threads(2)  # run_evaluation applies the config's threads (1)
    result = run_evaluation(config)
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    _, test = build_windows(split, result["budget"]["window_items"], 2)
    scores = np.random.default_rng(0).random(sum(int(w.targets.sum()) for w in test))
    random_gauc = evaluation_metrics(test, scores, split.cold_users)["gauc"]
    for name in ("sasrec", "hisam_sft"):
        assert result["summary"][name]["gauc"]["mean"] > max(0.65, random_gauc + 0.1), name
    assert set(result["tables"]) == {"other"}
    assert torch.get_num_threads() == 1


def test_features_whose_behaviour_encoder_saw_test_interactions_are_refused(planted, tmp_path):
    """A features file cut at a later instant than the split (e.g. built for a 90/10 split and
    used with train_fraction 0.8): its behaviour codes were trained on test rows."""
    frame, modalities, item_ids = planted
    frame.to_csv(tmp_path / "interactions.csv", index=False)
    cut = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig()).cut
    for name, cutoff in (("late", cut + 1), ("none", None)):
        extra = {} if cutoff is None else {"cutoff": np.int64(cutoff)}
        path = tmp_path / f"{name}.npz"
        np.savez(path, item_ids=item_ids, **{f"emb_{m}": v for m, v in modalities.items()}, **extra)
        data = {"dataset": "generic", "path": str(tmp_path / "interactions.csv"), "features_path": str(path)}
        config = EvaluationConfig.model_validate({"data": data, "run": ["sasrec"], "seeds": [0], "sets": {}})
        if cutoff is None:  # nothing shows the encoder's cut: refused unless the config accepts it
            assert npz_cutoff(path) is None
            with pytest.raises(ValueError, match=r"no behaviour cut-off.*allow_uncut_behavior"):
                run_evaluation(config)
            continue
        assert npz_cutoff(path) == cut + 1
        with pytest.raises(ValueError, match=rf"up to {cut + 1}, past the split's cut {cut}"):
            run_evaluation(config)


def test_interactions_with_items_the_features_lack_are_refused_before_training(
    planted, tmp_path, monkeypatch
):
    """Where a semantic-ID table is needed (HMAT), before any training; the ID baselines never look
    features up, and run."""
    import hisam_core.evaluation.harness as harness

    frame, modalities, item_ids = planted
    frame.to_csv(tmp_path / "interactions.csv", index=False)
    path = tmp_path / "features.npz"
    keep = item_ids != item_ids[3]
    np.savez(path, item_ids=item_ids[keep], **{f"emb_{m}": v[keep] for m, v in modalities.items()})
    data = {
        "dataset": "generic",
        "path": str(tmp_path / "interactions.csv"),
        "features_path": str(path),
        "allow_uncut_behavior": True,
    }
    config = EvaluationConfig.model_validate({"data": data, "run": ["hisam_sft"], "seeds": [0], "sets": {}})
    monkeypatch.setattr(harness, "run_experiment", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(
        ValueError, match=rf"^1 item\(s\) of the interactions have no features \(first: \[{item_ids[3]}\]\)"
    ):
        run_evaluation(config)

    class Trained(Exception):
        """The first experiment started: the check let the run through."""

    def first(ctx, experiment, seed):
        raise Trained(experiment.name)

    monkeypatch.setattr(harness, "run_experiment", first)
    with pytest.raises(Trained, match=r"^sasrec$"):
        run_evaluation(config.model_copy(update={"run": ["sasrec"]}))


def test_scaling_points_change_only_their_axis_and_reuse_the_base_point():
    config = EvaluationConfig(scaling=ScalingConfig(num_layers=[1, 2, 4], max_tokens=[80, 160]))
    base = config.experiment("hisam_sft")
    points = scaling_points(config)
    assert [(axis, value) for axis, value, _ in points] == [
        ("num_layers", 1),
        ("num_layers", 2),
        ("num_layers", 4),
        ("max_tokens", 80),
        ("max_tokens", 160),
    ]
    for axis, value, experiment in points:
        if (axis, value) in {("num_layers", 2), ("max_tokens", 160)}:
            assert experiment is base
            continue
        reference, variant = resolved(base, config), resolved(experiment, config)
        diff = {k: v for k, v in variant.items() if reference.get(k) != v}
        assert diff == ({"hmat.num_layers": value} if axis == "num_layers" else {})
        assert (experiment.max_tokens or config.max_tokens) == (value if axis == "max_tokens" else 160)
    # an ID ranker's depth is not HMAT's: a depth sweep of one would train one model under three labels
    with pytest.raises(ValueError, match=r"scaling\.num_layers sweeps HMAT's depth; 'sasrec' is a sasrec"):
        EvaluationConfig(scaling=ScalingConfig(experiment="sasrec", num_layers=[1, 4]))
    assert EvaluationConfig(
        scaling=ScalingConfig(experiment="sasrec", num_layers=[], max_tokens=[80])
    ).scaling

"""Rankers of the comparison: one-pass (teacher-forced) scoring equals scoring each target alone on its
prefix, and MA-Attn hides past actions where the causal ablation shows them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hisam_core.evaluation.baselines import IDRanker, IDRankerConfig, SemanticIDRanker, to_histories
from hisam_core.evaluation.protocol import (
    ProtocolConfig,
    Window,
    build_windows,
    chronological_split,
    label_interactions,
)
from hisam_core.ranker.model import HMATConfig
from hisam_core.ranker.objectives import positive_probability
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, UserHistory
from hisam_core.ranker.train import RankerConfig, TrainConfig, build_model
from hisam_core.semantic_ids import SemanticIds

WINDOW = 6
PROFILE_FIELDS = {"age": 3}


@pytest.fixture
def windows(planted) -> list[Window]:
    frame, _, _ = planted
    split = chronological_split(label_interactions(frame, ProtocolConfig()), ProtocolConfig())
    profiles = {u: {"age": u % 3} for u in split.interactions["user_id"].unique()}
    _, test = build_windows(split, WINDOW, 3, profiles)
    return test[:12]


def prefixes(windows: list[Window]) -> list[Window]:
    """Each target of each window as its own window: the prefix up to it, only it a target."""
    out = []
    for w in windows:
        for offset in np.flatnonzero(w.targets):
            targets = np.zeros(offset + 1, dtype=bool)
            targets[-1] = True
            times = None if w.timestamps is None else w.timestamps[: offset + 1]
            out.append(
                Window(w.user_id, w.item_ids[: offset + 1], w.labels[: offset + 1], targets, w.profile, times)
            )
    return out


def id_ranker(planted, block: str, **config: object) -> IDRanker:
    _, _, item_ids = planted
    return IDRanker(
        IDRankerConfig(block=block, hidden_size=16, num_heads=2, ffn_size=32, **config),
        TrainConfig(max_steps=3, batch_size=8, warmup_steps=1),
        item_ids,
        PROFILE_FIELDS,
        WINDOW,
    )


@pytest.mark.parametrize("block", ["sasrec", "hstu"])
def test_id_ranker_one_pass_equals_per_target_scoring(windows, planted, block):
    ranker = id_ranker(planted, block)
    ranker.fit(windows)
    one_pass = ranker.score(windows)
    alone = ranker.score(prefixes(windows), batch_size=1)
    np.testing.assert_allclose(one_pass, alone, rtol=1e-5, atol=1e-6)
    assert np.std(one_pass) > 0


@pytest.mark.parametrize("block", ["sasrec", "hstu"])
def test_an_id_ranker_scores_a_target_from_before_its_instant(planted, block):
    """Interactions of one second are not each other's history: a target's score is its score with
    the same-second items before it removed, so their labels (past actions are on) cannot reach it;
    a label of an earlier second does."""
    _, _, item_ids = planted
    ranker = id_ranker(planted, block)
    items, times = item_ids[:5], np.array([10, 20, 20, 20, 30])
    labels = np.array([1, 0, 1, 0, 1])
    window = Window(7, items, labels, np.ones(5, bool), {"age": 1}, times)
    ranker.fit([window] * 4)
    one_pass = ranker.score([window])
    keep = [0, 3]  # item 3 after the items of an earlier second only
    alone = Window(7, items[keep], labels[keep], np.array([False, True]), {"age": 1}, times[keep])
    np.testing.assert_allclose(one_pass[3], ranker.score([alone])[0], rtol=1e-5, atol=1e-6)
    same_second = replace(window, labels=np.array([1, 1, 0, 0, 1]))
    np.testing.assert_allclose(ranker.score([same_second])[:4], one_pass[:4], rtol=1e-5, atol=1e-6)
    earlier = replace(window, labels=np.array([0, 0, 1, 0, 1]))
    assert not np.allclose(ranker.score([earlier])[1:4], one_pass[1:4], atol=1e-6)


def semantic_id_ranker(planted, **model: object) -> SemanticIDRanker:
    _, _, item_ids = planted
    codes = np.random.default_rng(1).integers(0, 8, size=(len(item_ids), 3))
    ids = SemanticIds(item_ids, codes, 8, "test")
    config = RankerConfig(
        sequence=SequenceConfig(
            num_positions=3, codebook_size=8, profile_fields=PROFILE_FIELDS, max_tokens=64
        ),
        # init_std 0.2: scores spread enough that a leak moves them beyond the tolerances below
        model=HMATConfig(
            **{
                "hidden_size": 16,
                "num_layers": 2,
                "num_heads": 2,
                "num_kv_heads": 1,
                "ffn_size": 32,
                "init_std": 0.2,
                **model,
            }
        ),
        train=TrainConfig(max_steps=2),
    )
    ranker = SemanticIDRanker(config, ids)
    torch.manual_seed(0)
    ranker.model = build_model(config).eval()
    return ranker


@torch.no_grad()
def candidate_score(ranker: SemanticIDRanker, window: Window) -> float:
    """Reference: the last item of ``window`` scored as a one-item candidate after its history."""
    builder = SequenceBuilder(ranker.config.sequence)
    (history,) = to_histories([window], ranker.semantic_ids)
    past = UserHistory(history.user_id, history.items[:-1], history.actions[:-1], history.profile)
    batch = builder.collate([builder.build(past, candidate=history.items[-1])])
    model = ranker.model
    hidden = model(batch, model.mask(batch, model.config.attention_mask)).hidden[0, -1]
    return float(positive_probability(model.action_logits(hidden, builder.vocab.action_ids), builder.vocab))


@pytest.mark.parametrize("mask", ["memory_anchor", "causal"])
def test_hmat_teacher_forced_scoring_equals_candidate_scoring(windows, planted, mask):
    ranker = semantic_id_ranker(planted, attention_mask=mask)
    one_pass = ranker.score(windows)
    reference = [candidate_score(ranker, w) for w in prefixes(windows)]
    assert np.std(reference) > 1e-2, "scores this close would hide a small leak"
    np.testing.assert_allclose(one_pass, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "sees_actions"),
    [
        ({"attention_mask": "memory_anchor"}, False),
        ({"attention_mask": "causal"}, True),
        ({"history_memory": "anchor_action"}, True),
    ],
)
def test_past_actions_reach_the_score_only_where_the_switch_says(windows, planted, model, sees_actions):
    ranker = semantic_id_ranker(planted, **model)
    flipped = [replace(w, labels=1 - w.labels) for w in windows]
    changed = not np.allclose(ranker.score(windows), ranker.score(flipped), atol=1e-6)
    assert changed == sees_actions


@pytest.mark.parametrize(
    "model",
    [{}, {"attention_mask": "causal"}, {"history_memory": "anchor_action"}],
    ids=["ma", "causal", "action"],
)
def test_hmat_scores_a_target_from_before_its_instant(planted, model):
    """As for the ID rankers, under every mask: neither the items nor the labels of a target's second
    reach its score (other items there change nothing, exactly; without the times they would), and
    a label of an earlier second does where the mask shows past actions."""
    _, _, item_ids = planted
    ranker = semantic_id_ranker(planted, **model)
    items, times = item_ids[:5], np.array([10, 20, 20, 20, 30])
    window = Window(7, items, np.array([1, 0, 1, 0, 1]), np.ones(5, bool), {"age": 1}, times)
    one_pass = ranker.score([window])
    others = replace(window, item_ids=np.r_[items[:1], item_ids[10:12], items[3:]])  # items 1, 2 replaced
    relabelled = replace(window, labels=np.array([1, 1, 0, 0, 1]))
    for changed, seen_untimed in ((others, True), (relabelled, bool(model))):
        np.testing.assert_array_equal(ranker.score([changed])[[0, 3]], one_pass[[0, 3]])
        untimed = ranker.score([replace(w, timestamps=None) for w in (window, changed)])
        assert (abs(untimed[3] - untimed[5 + 3]) > 1e-6) == seen_untimed
    if model:
        earlier = replace(window, labels=np.array([0, 0, 1, 0, 1]))
        assert (np.abs(ranker.score([earlier])[1:4] - one_pass[1:4]) > 1e-6).all()


def own_label_flipped(windows: list[Window]) -> list[Window]:
    """Single-target windows (``prefixes``) with only the target's own label flipped."""
    return [replace(w, labels=np.r_[w.labels[:-1], 1 - w.labels[-1]]) for w in windows]


@pytest.mark.parametrize("block", ["sasrec", "hstu"])
def test_a_targets_own_label_never_reaches_its_id_ranker_score(windows, planted, block):
    """With past actions on, every earlier label moves the score, but the target's own must not."""
    ranker = id_ranker(planted, block, past_actions=True)
    ranker.fit(windows)
    alone = prefixes(windows)
    np.testing.assert_array_equal(
        ranker.score(own_label_flipped(alone), batch_size=1), ranker.score(alone, batch_size=1)
    )


@pytest.mark.parametrize("model", [{"attention_mask": "causal"}, {"history_memory": "anchor_action"}])
def test_a_targets_own_label_never_reaches_its_hmat_score(windows, planted, model):
    ranker = semantic_id_ranker(planted, **model)
    alone = prefixes(windows)
    np.testing.assert_array_equal(ranker.score(own_label_flipped(alone)), ranker.score(alone))


@pytest.mark.parametrize("block", ["sasrec", "hstu"])
@pytest.mark.parametrize("past_actions", [True, False])
def test_id_ranker_sees_past_actions_only_when_switched_on(windows, planted, past_actions, block):
    """Both blocks: the own-label test above would pass for a block that ignored labels entirely."""
    ranker = id_ranker(planted, block, past_actions=past_actions)
    ranker.fit(windows)
    flipped = [replace(w, labels=1 - w.labels) for w in windows]
    assert (not np.allclose(ranker.score(windows), ranker.score(flipped), atol=1e-6)) == past_actions


def test_hisam_fine_tunes_from_the_weights_its_pre_training_ended_with(windows, planted, monkeypatch):
    """``pretrain_steps`` (the paper's Hi-SAM, Sec. 3.4.1): a causal next-token run first, then SFT
    initialised from exactly the weights it ended with; without it SFT starts from scratch."""
    from hisam_core.evaluation import baselines

    real, calls = baselines.train_hmat, []

    def recording(config, histories, out, **kwargs):
        init = config.train.init_from
        start = torch.load(init, weights_only=True)["state_dict"] if init else None
        model = real(config, histories, out, **kwargs)
        end = {k: v.detach().clone() for k, v in model.state_dict().items()}
        calls.append((config.train.objective, config.train.max_steps, start, end))
        return model

    monkeypatch.setattr(baselines, "train_hmat", recording)
    base = semantic_id_ranker(planted)
    for pretrain_steps in (2, 0):
        calls.clear()
        SemanticIDRanker(base.config, base.semantic_ids, pretrain_steps=pretrain_steps).fit(windows)
        if pretrain_steps:
            (pt, pt_steps, pt_start, pt_end), (sft, _, sft_start, _) = calls
            assert (pt, pt_steps, pt_start, sft) == ("pt", 2, None, "sft")
            assert sft_start.keys() == pt_end.keys()
            assert all(torch.equal(sft_start[k], pt_end[k]) for k in pt_end)
        else:
            assert [(objective, start) for objective, _, start, _ in calls] == [("sft", None)]

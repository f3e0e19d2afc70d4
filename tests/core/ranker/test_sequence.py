"""Sequence construction (Sec. 3.3, Eq. 5): layout, coordinates, vocabulary, truncation, collation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hisam_core.ranker.sequence import (
    IGNORE_LABEL,
    SequenceBuilder,
    SequenceConfig,
    TokenType,
    UserHistory,
    Vocabulary,
)
from hisam_core.ranker.train import RankerConfig
from hisam_core.semantic_ids import SemanticIds


def test_stream_layout_and_coordinates(seq_config, history):
    seq = SequenceBuilder(seq_config).build(history)
    n, p, t = seq_config.num_positions, seq_config.profile_length, seq_config.item_length
    assert len(seq.tokens) == p + len(history) * t
    # profile = segment 0 with j = 0..P-1; item k = segment k with j restarting at 0
    assert seq.item_index[:p].tolist() == [0] * p and seq.intra_index[:p].tolist() == list(range(p))
    for k in range(len(history)):
        block = slice(p + k * t, p + (k + 1) * t)
        assert (seq.item_index[block] == k + 1).all()
        assert seq.intra_index[block].tolist() == list(range(t))
        expected = [TokenType.SEMANTIC] * n + [TokenType.ANCHOR, TokenType.ACTION]
        assert seq.token_type[block].tolist() == expected
        assert seq.tokens[block][n] == Vocabulary.anchor_id
        # the label sits on the anchor and names the action token that follows it
        assert seq.labels[block][n] == history.actions[k]
        assert seq.tokens[block][n + 1] == Vocabulary(seq_config).action_offset + history.actions[k]
    assert (seq.position == np.arange(len(seq.tokens))).all()
    assert (seq.labels[seq.token_type != TokenType.ANCHOR] == IGNORE_LABEL).all()


def test_vocabulary_ranges_are_disjoint_and_match_semantic_ids(seq_config, semantic_ids):
    vocab = Vocabulary(seq_config)
    ranges = [
        {vocab.pad_id},
        {vocab.anchor_id},
        set(vocab.action_ids.tolist()),
        *({vocab.profile({"age": a, "gender": g})[i] for a in range(4) for g in range(3)} for i in range(2)),
        set(vocab.semantic(semantic_ids.codes).ravel().tolist()),
    ]
    seen: set[int] = set()
    for ids in ranges:
        assert not ids & seen
        seen |= ids
    assert max(seen) < vocab.size
    assert (len(ranges[3]), len(ranges[4])) == (4, 3)  # one token per bucket of each field
    offsets = vocab.profile_offsets
    assert vocab.profile({"age": 3, "gender": 2}).tolist() == [offsets["age"] + 3, offsets["gender"] + 2]
    # semantic ids are SemanticIds.tokens() shifted by one block offset
    assert (vocab.semantic(semantic_ids.codes) - vocab.semantic_offset == semantic_ids.tokens()).all()
    assert vocab.size == vocab.semantic_offset + semantic_ids.vocab_size
    vocab.check_semantic_ids(semantic_ids)
    other = SemanticIds(semantic_ids.item_ids, semantic_ids.codes[:, :5], 16, "v-other")
    with pytest.raises(ValueError, match="5 positions"):
        vocab.check_semantic_ids(other)


def test_configs_with_the_profile_fields_in_another_order_differ():
    """The profile token ids follow the fields' order, so a reordered config is another vocabulary;
    the checks between a checkpoint's config and a run's (``==``) must see that."""
    a = SequenceConfig(profile_fields={"age": 4, "gender": 3})
    b = SequenceConfig(profile_fields={"gender": 3, "age": 4})
    assert Vocabulary(a).profile_offsets != Vocabulary(b).profile_offsets
    assert a != b and a == SequenceConfig(profile_fields={"age": 4, "gender": 3})
    assert RankerConfig(sequence=a) != RankerConfig(sequence=b)


def test_configurable_action_types():
    config = SequenceConfig(action_names=["exposure", "click", "reply"], positive_action="reply")
    vocab = Vocabulary(config)
    assert vocab.num_actions == 3 and vocab.positive_index == 2
    assert vocab.action_ids.tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="positive_action"):
        SequenceConfig(action_names=["click", "reply"], positive_action="like")


def test_truncation_drops_oldest_whole_items(seq_config, semantic_ids):
    builder = SequenceBuilder(seq_config)
    rng = np.random.default_rng(0)
    codes = semantic_ids.codes[rng.integers(0, 200, size=20)]
    history = UserHistory(1, codes, rng.integers(0, 2, size=20), {"age": 0, "gender": 0})
    seq = builder.build(history)
    keep = (seq_config.max_tokens - seq_config.profile_length) // seq_config.item_length
    assert seq.num_items == keep and seq.dropped_items == 20 - keep
    assert len(seq.tokens) <= seq_config.max_tokens
    # the kept items are the most recent ones, renumbered from i = 1
    semantic = seq.token_type == TokenType.SEMANTIC
    kept_codes = builder.vocab.semantic(codes[-keep:]).ravel()
    assert (seq.tokens[semantic] == kept_codes).all()
    assert seq.item_index.max() == keep
    # with a candidate slot the budget still holds and the candidate sits at i = kept + 1
    with_candidate = builder.build(history, candidate=codes[0])
    assert len(with_candidate.tokens) <= seq_config.max_tokens
    assert with_candidate.item_index[-1] == with_candidate.num_items + 1
    assert with_candidate.token_type[-1] == TokenType.ANCHOR


def test_each_item_carries_the_first_item_of_its_instant(seq_config, semantic_ids):
    """Profile 0; ties share the index of their first item, counted over the items kept (with a
    candidate the 64-token budget keeps 6 of these 7); a candidate is an instant of its own; no
    instants: each item its own."""
    codes = semantic_ids.codes[:7]
    history = UserHistory(
        1, codes, [0, 1, 0, 1, 1, 0, 1], {"age": 1, "gender": 2}, instants=[3, 3, 5, 5, 5, 9, 9]
    )
    assert history.instant_index().tolist() == [1, 1, 3, 3, 3, 6, 6]
    sequence = SequenceBuilder(seq_config).build(history, candidate=codes[0])
    per_item = {int(i): int(t) for i, t in zip(sequence.item_index, sequence.instant, strict=True)}
    assert sequence.dropped_items == 1
    assert per_item == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 5, 6: 5, 7: 7}
    plain = SequenceBuilder(seq_config).build(replace(history, instants=None))
    assert (plain.instant == plain.item_index).all()
    with pytest.raises(ValueError, match="instants must be one non-decreasing time per item"):
        replace(history, instants=[3, 3, 5, 4, 5, 9, 9])
    with pytest.raises(ValueError, match="instants must be integers, got float64"):  # NaT -> NaN
        replace(history, instants=[3, 3, 5, 5, 5, 9, np.nan])


def test_collate_pads_right_and_masks(seq_config, histories):
    builder = SequenceBuilder(seq_config)
    sequences = [builder.build(h) for h in histories[:4]]
    batch = builder.collate(sequences)
    lengths = [len(s.tokens) for s in sequences]
    assert batch.valid.sum(1).tolist() == lengths
    for row, seq in enumerate(sequences):
        n = lengths[row]
        assert (batch.tokens[row, :n].numpy() == seq.tokens).all()
        assert (batch.tokens[row, n:] == Vocabulary.pad_id).all()
        assert (batch.token_type[row, n:] == TokenType.PAD).all()
        assert (batch.labels[row, n:] == IGNORE_LABEL).all()
    assert (batch.position.diff(dim=1) == 1).all()
    labelled = batch.labels != IGNORE_LABEL
    assert labelled.sum() == sum(s.num_items for s in sequences)
    assert (batch.token_type[labelled] == TokenType.ANCHOR).all()
    assert batch.user_ids.tolist() == [h.user_id for h in histories[:4]]


def test_targets_select_label_positions(seq_config, history):
    targets = np.zeros(len(history), dtype=bool)
    targets[-1] = True
    seq = SequenceBuilder(seq_config).build(
        UserHistory(history.user_id, history.items, history.actions, history.profile, targets)
    )
    assert (seq.labels != IGNORE_LABEL).sum() == 1
    assert seq.labels[seq.labels != IGNORE_LABEL][0] == history.actions[-1]


@pytest.mark.parametrize(
    ("profile", "items", "actions", "match"),
    [
        ({"age": 1, "gender": 0, "city": 3}, None, None, "unknown profile fields"),
        ({"age": 1}, None, None, "missing fields"),
        ({"age": 9, "gender": 0}, None, None, "'age' value 9"),
        (None, np.full((2, 6), 16), None, r"codes must lie in \[0, 16\)"),
        (None, np.zeros((2, 5), dtype=int), None, "5 semantic codes"),
        (None, None, [0, 5], r"action indices must lie in \[0, 2\)"),
    ],
)
def test_bad_input_raises(seq_config, profile, items, actions, match):
    history = UserHistory(
        3,
        np.zeros((2, 6), dtype=int) if items is None else items,
        [0, 1] if actions is None else actions,
        {"age": 1, "gender": 0} if profile is None else profile,
    )
    with pytest.raises(ValueError, match=match):
        SequenceBuilder(seq_config).build(history)


def test_empty_history_is_rejected_for_training(seq_config):
    builder = SequenceBuilder(seq_config)
    empty = UserHistory(5, np.empty((0, 6)), [], {"age": 0, "gender": 0})
    with pytest.raises(ValueError, match="empty history"):
        builder.batch([empty])
    with pytest.raises(ValueError, match="nothing to condition on"):
        SequenceBuilder(SequenceConfig(codebook_size=16)).build(UserHistory(5, np.empty((0, 6)), []))
    with pytest.raises(ValueError, match="items must be"):
        UserHistory(5, np.zeros((3, 6)), [0, 1])


def test_budget_must_hold_one_item():
    with pytest.raises(ValueError, match="cannot hold"):
        SequenceConfig(profile_fields={"a": 2}, max_tokens=8)


@pytest.mark.parametrize("profile_fields", [{"age": 4, "gender": 3}, {}])
def test_a_stream_built_at_once_equals_its_items_blocks_one_by_one(profile_fields):
    """``build`` lays out every history item at once (``history_blocks``); the reference builds each
    item's block alone (``item_block``) and concatenates: equal on every field, with and without
    instants (some shared), targets random or all off, three actions, truncation, a candidate and an
    empty history."""
    config = SequenceConfig(
        codebook_size=16, action_names=["skip", "click", "buy"], positive_action="click",
        profile_fields=profile_fields, max_tokens=90,
    )  # fmt: skip
    builder, rng = SequenceBuilder(config), np.random.default_rng(0)
    # (items, random targets or none, instants or none): the budget holds 11 items, 10 with a candidate
    cases = [(0, True, False), (1, True, True), (3, False, True), (10, True, False), (11, True, True),
             (25, True, True), (25, False, False)]  # fmt: skip
    for user, (size, some_targets, with_instants) in enumerate(cases):
        history = UserHistory(
            user_id=user,
            items=rng.integers(0, 16, (size, 6)),
            actions=rng.integers(0, 3, size),
            profile={f: int(rng.integers(0, n)) for f, n in profile_fields.items()},
            targets=(rng.random(size) < 0.7) if some_targets else np.zeros(size, bool),
            instants=np.sort(rng.integers(0, size // 2 + 1, size)) if with_instants else None,
        )
        for cand in (None, rng.integers(0, 16, 6)):
            if size == 0 and not profile_fields and cand is None:
                continue  # nothing to condition on (test_empty_history_is_rejected_for_training)
            built = builder.build(history, cand)
            kept = builder.truncate(history, with_candidate=cand is not None)
            profile = builder.vocab.profile(history.profile)
            blocks, start = [], len(profile)
            for k, instant in enumerate(kept.instant_index()):
                blocks.append(
                    builder.item_block(
                        kept.items[k],
                        int(kept.actions[k]),
                        k + 1,
                        start,
                        "item",
                        bool(kept.targets[k]),
                        int(instant),
                    )
                )
                start += len(blocks[-1]["tokens"])
            if cand is not None:
                blocks.append(builder.item_block(cand, None, len(kept) + 1, start))
            p = len(profile)
            head = {"tokens": profile, "item_index": np.zeros(p), "intra_index": np.arange(p),
                    "position": np.arange(p), "token_type": np.full(p, TokenType.PROFILE),
                    "labels": np.full(p, IGNORE_LABEL), "instant": np.zeros(p)}  # fmt: skip
            for name, profile_part in head.items():
                expected = np.concatenate([profile_part, *(b[name] for b in blocks)])
                values = getattr(built, name)
                assert np.array_equal(values, expected) and values.dtype == np.int64, (user, cand, name)
            assert built.num_items == len(kept) and built.dropped_items == size - len(kept)

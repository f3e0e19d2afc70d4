"""Sec. 3.4.2: one-pass parallel ranking and the anchor KV cache against full recomputation."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from hisam_core.ranker.objectives import action_logits, positive_probability
from hisam_core.ranker.sequence import SequenceBuilder, TokenType, UserHistory
from hisam_core.ranker.serving import HMATRanker, rank_reference

VARIANTS = [
    {},
    {"history_memory": "anchor_action"},
    {"position_encoding": "rope1d"},
    {"position_encoding": "absolute"},
    {"attention_mask": "causal"},
    {"inter_fraction": 0.25},
    {"attention_backend": "flex"},  # the FlexAttention fast path (eager on the CPU, compiled on CUDA)
    {"attention_backend": "flex", "history_memory": "anchor_action"},
]


@pytest.fixture
def candidates(semantic_ids) -> np.ndarray:
    return semantic_ids.codes[np.random.default_rng(5).choice(200, size=12, replace=False)]


@pytest.mark.parametrize("timed", [False, True], ids=["", "ties"])
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(map(str, o.values())) or "paper")
def test_one_pass_equals_separate_forward_passes(
    seq_config, make_model, history, candidates, overrides, timed
):
    """``ties``: items 2-4 of one instant (none reads another), through the cache too."""
    history = replace(history, instants=[0, 1, 1, 1, 2]) if timed else history
    model = make_model(**overrides)
    ranker = HMATRanker(model, seq_config)
    expected = rank_reference(model, seq_config, history, candidates)
    torch.testing.assert_close(ranker.rank(history, candidates), expected, atol=1e-5, rtol=0)
    # scores do not depend on candidate order, nor on how candidates are chunked
    order = np.random.default_rng(0).permutation(len(candidates))
    torch.testing.assert_close(ranker.rank(history, candidates[order]), expected[order], atol=1e-6, rtol=0)
    torch.testing.assert_close(ranker.rank(history, candidates, chunk_size=5), expected, atol=1e-6, rtol=0)
    assert expected.std() > 1e-4, "a constant score would make these checks vacuous"


@pytest.mark.parametrize("history_memory", ["anchor", "anchor_action"])
def test_past_actions_reach_scores_only_when_the_mask_shows_them(
    seq_config, make_model, history, candidates, history_memory
) -> None:
    """Eq. 10 read literally (``anchor``, the default): later items see a past item through its
    Anchor, which comes before its Action, so flipping every past action leaves every score as it
    is; ``anchor_action`` shows the actions and the scores move."""
    ranker = HMATRanker(make_model(history_memory=history_memory), seq_config)
    flipped = UserHistory(history.user_id, history.items, 1 - np.asarray(history.actions), history.profile)
    moved = (ranker.rank(flipped, candidates) - ranker.rank(history, candidates)).abs().max().item()
    assert moved == 0.0 if history_memory == "anchor" else moved > 1e-3


def test_a_candidate_reads_every_action_of_a_history_whose_last_items_share_a_second(
    seq_config, make_model, history, candidates
) -> None:
    """A candidate is later than the whole history: with the last two items tied, the last one's
    action still reaches every score (``anchor_action``), through the cache as through the reference."""
    model = make_model(history_memory="anchor_action")
    ranker = HMATRanker(model, seq_config)
    timed = replace(history, instants=[0, 1, 2, 3, 3])
    flipped = replace(timed, actions=np.r_[timed.actions[:-1], 1 - timed.actions[-1]])
    for h in (timed, flipped):
        torch.testing.assert_close(
            ranker.rank(h, candidates), rank_reference(model, seq_config, h, candidates), atol=1e-5, rtol=0
        )
    assert (ranker.rank(flipped, candidates) - ranker.rank(timed, candidates)).abs().min() > 0  # hidden: 0


@pytest.mark.parametrize("length", [1, 3, 6, 9])  # 9 items exceed the 64-token budget: truncated
@pytest.mark.parametrize("profile", [True, False], ids=["profile", "no-profile"])
def test_one_pass_equals_the_reference_for_any_history_length(
    seq_config, semantic_ids, make_model, candidates, length, profile
):
    config = seq_config if profile else seq_config.model_copy(update={"profile_fields": {}})
    model = make_model(sequence=config, history_memory="anchor_action")  # past actions visible
    rng = np.random.default_rng(length)
    codes = semantic_ids.codes[rng.choice(200, size=length, replace=False)]
    history = UserHistory(
        2, codes, rng.integers(0, 2, size=length), {"age": 3, "gender": 0} if profile else {}
    )
    expected = rank_reference(model, config, history, candidates)
    torch.testing.assert_close(
        HMATRanker(model, config).rank(history, candidates), expected, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("overrides", VARIANTS[:2] + VARIANTS[4:5], ids=["anchor", "anchor_action", "causal"])
def test_cache_keeps_only_what_later_items_see(seq_config, make_model, history, overrides):
    history = replace(history, instants=np.array([10, 10, 20, 30, 30]))  # two shared seconds
    model = make_model(**overrides)
    ranker = HMATRanker(model, seq_config)
    cache, full = ranker.encode(history), ranker.encode(history, evict=False)
    n_items, p_len = len(history), seq_config.profile_length
    kept = {"anchor": 1, "anchor_action": 2}.get(overrides.get("history_memory", "anchor"))
    if overrides.get("attention_mask") == "causal":
        kept = seq_config.item_length  # a causal model attends to everything: nothing to evict
    assert cache.num_cached == p_len + kept * n_items
    assert full.num_cached == p_len + seq_config.item_length * n_items
    assert cache.nbytes * full.num_cached == full.nbytes * cache.num_cached
    # the logical position map holds the original coordinates of the kept tokens
    sequence = SequenceBuilder(seq_config).build(history)
    types = model.memory_types(model.config.attention_mask)  # what later tokens see, per Eq. 10
    keep = np.ones(len(sequence.token_type), bool) if types is None else np.isin(sequence.token_type, types)
    assert (cache.layout.token_type[0].numpy() == sequence.token_type[keep]).all()
    assert (cache.layout.position[0].numpy() == sequence.position[keep]).all()
    assert (cache.layout.item_index[0].numpy() == sequence.item_index[keep]).all()
    assert (cache.layout.instant[0].numpy() == sequence.instant[keep]).all()
    assert cache.layout.valid.all() and cache.length == full.length == len(sequence.tokens)
    # and evicting loses nothing
    candidates = np.random.default_rng(1).integers(0, 16, size=(6, 6))
    torch.testing.assert_close(
        ranker.rank(cache, candidates), ranker.rank(full, candidates), atol=1e-6, rtol=0
    )


def test_anchor_cache_is_the_paper_compression(seq_config, make_model, history):
    cache = HMATRanker(make_model(), seq_config).encode(history)
    types = cache.layout.token_type[0]
    assert set(types.tolist()) == {TokenType.PROFILE, TokenType.ANCHOR}
    assert int((types == TokenType.ANCHOR).sum()) == len(history)


@pytest.mark.parametrize("timed", [False, True], ids=["", "ties"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"history_memory": "anchor_action"}, {"attention_mask": "causal"}, {"attention_backend": "flex"}],
)
def test_appending_equals_full_recomputation(
    seq_config, semantic_ids, make_model, candidates, overrides, timed
):
    """Grow a history one interaction at a time, past the token budget (which forces a rebuild).
    ``ties``: interactions appended at the last one's time join its instant (none reads another),
    also across the rebuild."""
    model = make_model(**overrides)
    ranker = HMATRanker(model, seq_config)
    rng = np.random.default_rng(11)
    codes = semantic_ids.codes[rng.integers(0, 200, size=9)]
    actions = rng.integers(0, 2, size=9)
    times = np.array([10, 20, 20, 30, 30, 30, 40, 50, 50]) if timed else None
    profile = {"age": 3, "gender": 2}
    cache = ranker.encode(
        UserHistory(4, codes[:1], actions[:1], profile, instants=times[:1] if timed else None)
    )
    budget = SequenceBuilder(seq_config).max_items(with_candidate=True)
    moved = 0.0
    for n in range(2, 10):
        cache = ranker.append(cache, codes[n - 1], int(actions[n - 1]), int(times[n - 1]) if timed else None)
        history = UserHistory(4, codes[:n], actions[:n], profile, instants=times[:n] if timed else None)
        assert cache.num_items == min(n, budget)
        expected = rank_reference(model, seq_config, history, candidates)
        torch.testing.assert_close(ranker.rank(cache, candidates), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ranker.rank(history, candidates), expected, atol=1e-5, rtol=0)
        untimed = rank_reference(model, seq_config, replace(history, instants=None), candidates)
        moved = max(moved, (expected - untimed).abs().max().item())
    assert moved > 1e-4 if timed else moved == 0.0  # the ties hide items of one instant from each other


@pytest.mark.parametrize("max_tokens", range(56, 64))  # every residue of the budget mod the item length
@pytest.mark.parametrize(
    "overrides", [{}, {"history_memory": "anchor_action"}, {"position_encoding": "absolute"}]
)
def test_a_served_candidate_scores_as_the_last_item_of_a_training_window(
    seq_config, semantic_ids, make_model, max_tokens, overrides
):
    """Train/serve consistency under truncation: ``rank(h, [c])`` is the SFT probability at the
    Anchor of ``c`` labelled last in a training window of ``h + c`` (same context, same coordinates)."""
    config = seq_config.model_copy(update={"max_tokens": max_tokens})
    model = make_model(**overrides)
    ranker, builder = HMATRanker(model, config), SequenceBuilder(config)
    rng = np.random.default_rng(max_tokens)
    codes = semantic_ids.codes[rng.choice(200, size=14, replace=False)]
    history = UserHistory(3, codes[:12], rng.integers(0, 2, size=12), {"age": 1, "gender": 2})
    served = ranker.rank(history, codes[12:])
    for k, candidate in enumerate(codes[12:]):
        batch = builder.collate([builder.build(history.append(candidate, 1))])
        logits, _ = action_logits(model, batch, builder.vocab)
        trained = positive_probability(logits[-1], builder.vocab)
        torch.testing.assert_close(served[k], trained, atol=1e-5, rtol=0)


#: the variants that place items by H-RoPE's coordinates (1D-RoPE and absolute positions read the
#: flat position, which counts the hidden tokens of an item's instant)
HROPE_VARIANTS = [v for v in VARIANTS if "position_encoding" not in v]
TIES = [0, 1, 1, 1, 2, 2]  # items 2-4 and items 5-6 each logged in one second


def _timed(semantic_ids, order: list[int] | None = None) -> UserHistory:
    codes = semantic_ids.codes[np.random.default_rng(8).choice(200, size=len(TIES), replace=False)]
    actions = np.array([1, 0, 1, 1, 0, 1])
    order = order or list(range(len(TIES)))
    return UserHistory(4, codes[order], actions[order], {"age": 3, "gender": 1}, instants=TIES)


@pytest.mark.parametrize("overrides", HROPE_VARIANTS, ids=lambda o: "-".join(map(str, o.values())) or "paper")
def test_every_item_of_an_instant_scores_as_a_candidate_served_after_the_history_before_it(
    seq_config, semantic_ids, make_model, overrides
):
    """Train/serve consistency under ties: the SFT probability at each item's Anchor in a training
    window is ``rank`` of that item after the items before its instant, also for the third item of
    a second, which shares its instant's coordinate (with its own index it sat two coordinates
    further from the history it sees than a served candidate does)."""
    model = make_model(**overrides)
    ranker, builder = HMATRanker(model, seq_config), SequenceBuilder(seq_config)
    history = _timed(semantic_ids)
    with torch.no_grad():
        logits, _ = action_logits(model, builder.collate([builder.build(history)]), builder.vocab)
    trained = positive_probability(logits, builder.vocab)
    starts = history.instant_index() - 1
    for k, start in enumerate(starts):
        before = UserHistory(
            4, history.items[:start], history.actions[:start], history.profile, instants=TIES[:start]
        )
        served = ranker.rank(before, history.items[k : k + 1])
        torch.testing.assert_close(served[0], trained[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", HROPE_VARIANTS, ids=lambda o: "-".join(map(str, o.values())) or "paper")
def test_the_order_of_the_items_of_one_instant_reaches_no_score(
    seq_config, semantic_ids, make_model, candidates, overrides
):
    """Items of one instant are a set: reordering them (their order is arbitrary, item ids) leaves
    every trained item's probability and every served score as it is. Without the instants the
    order is real, and it moves them."""
    model = make_model(**overrides)
    ranker, builder = HMATRanker(model, seq_config), SequenceBuilder(seq_config)
    order = [0, 3, 1, 2, 5, 4]

    @torch.no_grad()
    def scores(history: UserHistory) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = action_logits(model, builder.collate([builder.build(history)]), builder.vocab)
        return positive_probability(logits, builder.vocab), ranker.rank(history, candidates)

    (trained, served), (reordered, reserved) = (
        scores(_timed(semantic_ids)),
        scores(_timed(semantic_ids, order)),
    )
    torch.testing.assert_close(reordered, trained[order], atol=1e-5, rtol=0)
    torch.testing.assert_close(reserved, served, atol=1e-5, rtol=0)
    untimed = [replace(_timed(semantic_ids, o), instants=None) for o in (None, order)]
    (trained, served), (reordered, reserved) = (scores(h) for h in untimed)
    assert (reserved - served).abs().max() > 1e-3 and (reordered - trained[order]).abs().max() > 1e-3


def test_cold_start_user_with_profile_only(seq_config, make_model, candidates):
    model = make_model()
    cold = UserHistory(9, np.empty((0, 6)), [], {"age": 1, "gender": 0})
    ranker = HMATRanker(model, seq_config)
    cache = ranker.encode(cold)
    assert cache.num_items == 0 and cache.num_cached == seq_config.profile_length
    expected = rank_reference(model, seq_config, cold, candidates)
    torch.testing.assert_close(ranker.rank(cold, candidates), expected, atol=1e-5, rtol=0)
    # appending the first interaction to a profile-only cache
    grown = ranker.append(cache, candidates[0], 1)
    expected = rank_reference(model, seq_config, cold.append(candidates[0], 1), candidates)
    torch.testing.assert_close(ranker.rank(grown, candidates), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("history_memory", ["anchor", "anchor_action"])
def test_a_new_user_without_profile_scores_as_the_first_item_of_a_training_window(
    seq_config, make_model, candidates, history_memory
):
    """No history and no profile (the shipped configs have none): each candidate is scored on its own
    block, as SFT labels the first item of a window, and the empty cache grows like any other."""
    config = seq_config.model_copy(update={"profile_fields": {}})
    model, builder = make_model(sequence=config, history_memory=history_memory), SequenceBuilder(config)
    ranker, new = HMATRanker(model, config), UserHistory(1, np.empty((0, 6)), [])
    cache = ranker.encode(new)
    assert (cache.num_items, cache.num_cached, cache.length) == (0, 0, 0)
    served = ranker.rank(cache, candidates)
    torch.testing.assert_close(served, rank_reference(model, config, new, candidates), atol=1e-5, rtol=0)
    for k, candidate in enumerate(candidates):
        logits, _ = action_logits(
            model, builder.collate([builder.build(new.append(candidate, 1))]), builder.vocab
        )
        torch.testing.assert_close(
            served[k], positive_probability(logits[0], builder.vocab), atol=1e-5, rtol=0
        )
    assert len(set(served.tolist())) == len(candidates)  # each scored on its own tokens
    grown = ranker.append(cache, candidates[0], 1)
    expected = rank_reference(model, config, new.append(candidates[0], 1), candidates)
    torch.testing.assert_close(ranker.rank(grown, candidates), expected, atol=1e-5, rtol=0)
    stranger = UserHistory(1, np.empty((0, 6)), [], {"age": 2})  # a field this model has no tokens for
    with pytest.raises(ValueError, match="unknown profile fields"):
        ranker.rank(stranger, candidates)


def test_a_new_user_without_the_models_profile_fields_is_refused(seq_config, make_model, candidates):
    """A model with profile tokens never saw a stream without them: a new user whose profile lacks
    its fields is an error, as the same user with one history item is, not scored without them."""
    assert seq_config.profile_fields
    ranker, new = HMATRanker(make_model(), seq_config), UserHistory(1, np.empty((0, 6)), [])
    for history in (new, new.append(candidates[0], 1)):
        with pytest.raises(ValueError, match="missing fields"):
            ranker.rank(history, candidates)


def test_bad_serving_input(seq_config, make_model, history, candidates):
    ranker = HMATRanker(make_model(), seq_config)
    with pytest.raises(ValueError, match=r"candidates must be \[C, 6\]"):
        ranker.rank(history, candidates[:, :5])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        ranker.rank(history, candidates + 16)
    for chunk_size in (0, -1):
        with pytest.raises(ValueError, match=f"chunk_size must be at least 1, got {chunk_size}"):
            ranker.rank(history, candidates, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="6 semantic codes"):
        ranker.append(ranker.encode(history), candidates[0, :4], 1)
    with pytest.raises(ValueError, match="action indices"):
        ranker.append(ranker.encode(history), candidates[0], 7)
    with pytest.raises(ValueError, match="the history has no instants"):
        ranker.append(ranker.encode(history), candidates[0], 1, instant=5)
    timed = ranker.encode(replace(history, instants=[1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ranker.append(timed, candidates[0], 1, instant=4)
    assert ranker.rank(history, candidates[:0]).numel() == ranker.rank(history, []).numel() == 0


def test_codes_are_integers_and_the_sequence_config_is_the_models(
    seq_config, make_model, history, candidates
):
    """A fractional code, action or profile value would be truncated into another id, and a sequence
    config building another vocabulary keeps ids in range but means other tokens: each is an error.
    Whole-valued floats and one item's codes as a ``[1, n]`` row are the same input as integers."""
    model = make_model()
    ranker = HMATRanker(model, seq_config)
    torch.testing.assert_close(
        ranker.rank(history, candidates.astype(float)), ranker.rank(history, candidates)
    )
    for score in (ranker.rank, partial(rank_reference, model, seq_config)):
        with pytest.raises(ValueError, match=r"candidates: semantic codes must be integers, got \[\d+\.5"):
            score(history, candidates + 0.5)
    for name, what in (("items", "semantic codes"), ("actions", "actions")):  # a history's, before any cast
        with pytest.raises(ValueError, match=rf"user {history.user_id}: history {what} must be integers"):
            replace(history, **{name: getattr(history, name) + 0.5})
    whole = replace(history, items=history.items.astype(float), actions=history.actions.astype(float))
    torch.testing.assert_close(ranker.rank(whole, candidates), ranker.rank(history, candidates))
    cache = ranker.encode(history)
    row, flat = ranker.append(cache, candidates[:1], 1), ranker.append(cache, candidates[0], 1)
    torch.testing.assert_close(ranker.rank(row, candidates), ranker.rank(flat, candidates))
    with pytest.raises(ValueError, match="expected one item's 6 semantic codes, got shape \\(2, 6\\)"):
        ranker.append(cache, candidates[:2], 1)
    with pytest.raises(ValueError, match="actions must be integers"):
        ranker.append(cache, candidates[0], 0.5)
    with pytest.raises(ValueError, match="profile field 'age' must be integers"):
        ranker.builder.vocab.profile({"age": 1.5, "gender": 0})
    with pytest.raises(ValueError, match="serve it with the sequence config it was trained with"):
        HMATRanker(model, seq_config.model_copy(update={"codebook_size": 8}))


def test_model_rejects_unknown_token_ids(seq_config, make_model, history):
    model = make_model()
    batch = SequenceBuilder(seq_config).batch([history])
    batch.tokens[0, 3] = SequenceBuilder(seq_config).vocab.size
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(batch, model.mask(batch, "memory_anchor"))


def test_absolute_positions_beyond_the_table_raise(seq_config, make_model, history):
    model = make_model(position_encoding="absolute", max_positions=16)
    batch = SequenceBuilder(seq_config).batch([history])
    with pytest.raises(ValueError, match="exceeds max_positions=16"):
        model(batch, model.mask(batch, "memory_anchor"))

"""MA-Attn (Sec. 3.3.2, Eq. 10): the predicate, its dense and FlexAttention forms, and what it isolates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from hisam_core.ranker.attention import (
    FLEX_BLOCK_SIZE,
    MemoryAnchorAttention,
    TokenLayout,
    block_mask,
    dense_mask,
    mask_mod_for,
    memory_token_types,
)
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, TokenType, UserHistory
from hisam_core.ranker.synthetic import synthetic_histories


def small_stream(history_memory: str = "anchor", mode: str = "memory_anchor") -> torch.Tensor:
    """Profile token, then two items of two semantic tokens: [P, s, s, A1, a1, s, s, A2, a2]."""
    config = SequenceConfig(num_positions=2, codebook_size=4, profile_fields={"g": 2}, max_tokens=16)
    builder = SequenceBuilder(config)
    batch = builder.batch([UserHistory(0, np.array([[1, 2], [3, 0]]), [1, 0], {"g": 1})])
    layout = TokenLayout.of(batch)
    return dense_mask(layout, layout, memory_token_types(mode, history_memory))[0, 0]


def from_rows(rows: list[set[int]]) -> torch.Tensor:
    return torch.tensor([[k in row for k in range(len(rows))] for row in rows])


def test_hand_checked_memory_anchor_mask():
    expected = from_rows(
        [
            {0},  # profile
            {0, 1},  # item 1: profile + own tokens, causally
            {0, 1, 2},
            {0, 1, 2, 3},  # anchor 1
            {0, 1, 2, 3, 4},  # action 1
            {0, 3, 5},  # item 2: profile, anchor 1, own tokens only
            {0, 3, 5, 6},
            {0, 3, 5, 6, 7},  # anchor 2
            {0, 3, 5, 6, 7, 8},  # action 2
        ]
    )
    assert torch.equal(small_stream(), expected)
    with_actions = expected.clone()
    with_actions[5:, 4] = True  # "anchor_action" also exposes action 1 to item 2
    assert torch.equal(small_stream("anchor_action"), with_actions)
    assert torch.equal(small_stream(mode="causal"), torch.ones(9, 9, dtype=torch.bool).tril())


def eq10_by_hand(
    types: list[int], items: list[int], instants: list[int], history_memory: str
) -> torch.Tensor:
    """Eq. 10 written out token by token for one unpadded stream, independently of ``visible``:
    a token sees itself, the profile, earlier tokens of its own item, and the earlier Anchors (and
    Actions under ``anchor_action``) of earlier instants only."""
    memory = {TokenType.ANCHOR} | ({TokenType.ACTION} if history_memory == "anchor_action" else set())
    n = len(types)
    rows = []
    for q in range(n):
        row = set()
        for k in range(q + 1):
            same_instant = items[k] != items[q] and instants[k] >= instants[q]
            seen = k == q or types[k] == TokenType.PROFILE or items[k] == items[q]
            if seen or (types[k] in memory and not same_instant):
                row.add(k)
        rows.append(row)
    return from_rows(rows)


@pytest.mark.parametrize("memory", ["anchor", "anchor_action"])
@pytest.mark.parametrize("profile", [True, False], ids=["profile", "no-profile"])
def test_dense_mask_is_eq10_written_out_on_a_ragged_batch(seq_config, histories, memory, profile):
    config = seq_config if profile else seq_config.model_copy(update={"profile_fields": {}})
    users = [
        h if profile else UserHistory(h.user_id, h.items, h.actions, instants=h.instants)
        for h in ragged(histories[:6])
    ]
    batch = SequenceBuilder(config).batch(users)
    layout = TokenLayout.of(batch)
    dense = dense_mask(layout, layout, memory_token_types("memory_anchor", memory))[:, 0]
    for row, history in enumerate(users):
        n = int(batch.valid[row].sum())
        expected = eq10_by_hand(
            batch.token_type[row, :n].tolist(),
            batch.item_index[row, :n].tolist(),
            batch.instant[row, :n].tolist(),
            memory,
        )
        assert n == (2 if profile else 0) + len(history) * seq_config.item_length
        assert torch.equal(dense[row, :n, :n], expected), (row, memory)


def ragged(histories: list[UserHistory]) -> list[UserHistory]:
    """Users of 1 .. 6 interactions, so a batch of them is padded; every other one rated them two
    at a time (pairs share an instant)."""
    users = [h.tail(1 + index % 6) for index, h in enumerate(histories)]
    return [replace(h, instants=np.arange(len(h)) // 2) if k % 2 else h for k, h in enumerate(users)]


@pytest.mark.parametrize(
    ("mode", "memory"),
    [("memory_anchor", "anchor"), ("memory_anchor", "anchor_action"), ("causal", "anchor")],
)
def test_mask_mod_equals_dense_mask_on_grid(seq_config, histories, mode, memory):
    layout = TokenLayout.of(SequenceBuilder(seq_config).batch(ragged(histories[:5])))
    types = memory_token_types(mode, memory)
    dense = dense_mask(layout, layout, types)[:, 0]
    batch, length = layout.position.shape
    mask_mod = mask_mod_for(layout, types)
    grid = mask_mod(
        torch.arange(batch)[:, None, None],
        torch.zeros(1, 1, 1, dtype=torch.long),
        torch.arange(length)[None, :, None],
        torch.arange(length)[None, None, :],
    )
    assert torch.equal(grid, dense)
    # FlexAttention's own (vmapped) evaluation of the mask_mod agrees too
    assert torch.equal(create_mask(mask_mod, batch, 1, length, length, device="cpu")[:, 0], dense)
    # padded keys are never seen by real queries; every query, padded or not, sees some key
    valid = layout.valid
    assert not valid.all()
    assert not (dense & valid[:, :, None] & ~valid[:, None, :]).any()
    assert (dense.sum(-1) >= 1).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("long", [False, True], ids=["one-block", "three-blocks"])
def test_flex_attention_equals_dense_sdpa(seq_config, histories, semantic_ids, make_model, long):
    """FlexAttention runs eagerly (unfused) on CPU in this torch; compiled on CUDA by the model.
    ``long``: streams of up to 290 tokens, padded across FlexAttention's 128-token blocks."""
    if long:
        seq_config = seq_config.model_copy(update={"max_tokens": 300})
        users = synthetic_histories(semantic_ids, seq_config, 3, min_items=36, max_items=36, seed=2)
        batch = SequenceBuilder(seq_config).batch(  # rated three at a time
            [replace(h.tail(n), instants=np.arange(n) // 3) for h, n in zip(users, (36, 17, 3), strict=True)]
        )
        assert batch.tokens.shape[1] > 2 * FLEX_BLOCK_SIZE
    else:
        batch = SequenceBuilder(seq_config).batch(ragged(histories[:4]))
    sdpa = make_model(attention_backend="sdpa")
    flex = make_model(attention_backend="flex")
    for mode in ("memory_anchor", "causal"):
        with torch.no_grad():
            expected = sdpa(batch, sdpa.mask(batch, mode)).hidden
            actual = flex(batch, flex.mask(batch, mode)).hidden
        valid = batch.valid
        torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["memory_anchor", "causal"])
def test_the_flex_block_tables_list_exactly_the_blocks_the_mask_needs(seq_config, semantic_ids, mode):
    """On the CPU FlexAttention runs eagerly from ``mask_mod`` alone, so the test above cannot see
    the ``BlockMask``'s tables; the compiled CUDA kernel skips every block they do not list and
    applies no mask inside a "full" one. So the tables are held to the dense mask: on a ragged batch
    of three 128-token blocks, a block is listed iff one of its pairs is visible, as full iff all are.
    Two users log several items in one second: the long one three in its first block, the next one
    every three, one such instant straddling the boundary of its blocks (pairs hidden across it)."""
    seq_config = seq_config.model_copy(update={"max_tokens": 300})
    users = synthetic_histories(semantic_ids, seq_config, 3, min_items=36, max_items=36, seed=2)
    tails = [h.tail(n) for h, n in zip(users, (36, 17, 3), strict=True)]
    tails[0] = replace(tails[0], instants=np.r_[0, 1, 2, 2, 2, np.arange(5, 36)])
    tails[1] = replace(tails[1], instants=np.arange(17) // 3)
    batch = SequenceBuilder(seq_config).batch(tails)
    types = memory_token_types(mode)
    layout = TokenLayout.of(batch)
    mask = block_mask(layout, types, torch.device("cpu"))
    padded = layout.pad_to(mask.shape[-1])
    size, blocks = FLEX_BLOCK_SIZE, mask.shape[-1] // FLEX_BLOCK_SIZE
    assert blocks == 3 and (size, size) == mask.BLOCK_SIZE  # the blocks the stream is padded to
    dense = dense_mask(padded, padded, types)[:, 0].view(len(users), blocks, size, blocks, size)
    needed, whole = dense.any(dim=(2, 4)), dense.all(dim=(2, 4))

    def listed(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(users), blocks, blocks, dtype=torch.bool)
        for b in range(len(users)):
            for q in range(blocks):
                out[b, q, indices[b, 0, q, : counts[b, 0, q]]] = True
        return out

    partial = listed(mask.kv_num_blocks, mask.kv_indices)
    full = listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert torch.equal(full, whole) and torch.equal(partial, needed & ~whole)
    assert partial.any() and not needed.all()  # blocks the kernel masks and blocks it skips occur
    assert full.any() == (mode == "causal")  # causal: the long user's blocks below the diagonal


def test_the_dense_path_is_softmax_attention_written_out() -> None:
    """The dense path (SDPA, the reference the fast paths are held to) against Eq. 10 as plain
    arithmetic in float64: grouped KV heads repeated, cached keys before the call's own, masked
    scores at -inf, on a ragged mask with rows that see one key only."""
    torch.manual_seed(0)
    hidden, heads, kv_heads, batch, length, cached = 32, 4, 2, 3, 7, 5
    head_dim = hidden // heads
    attention = MemoryAnchorAttention(hidden, heads, kv_heads).double()
    x = torch.randn(batch, length, hidden, dtype=torch.float64)
    past = tuple(torch.randn(1, kv_heads, cached, head_dim, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(batch, 1, length, cached + length) < 0.4
    mask[..., cached:] |= torch.eye(length, dtype=torch.bool)  # every query sees itself at least
    mask[0, 0, 2] = False
    mask[0, 0, 2, 0] = True  # a row that sees one cached key only
    out, (k, v) = attention(x, None, mask, past)

    def heads_of(proj: torch.nn.Linear, n: int) -> torch.Tensor:
        return proj(x).view(batch, length, n, head_dim).transpose(1, 2)

    assert torch.equal(k, heads_of(attention.k_proj, kv_heads)) and torch.equal(
        v, heads_of(attention.v_proj, kv_heads)
    )
    keys = torch.cat([past[0].expand(batch, -1, -1, -1), k], 2).repeat_interleave(heads // kv_heads, 1)
    values = torch.cat([past[1].expand(batch, -1, -1, -1), v], 2).repeat_interleave(heads // kv_heads, 1)
    scores = heads_of(attention.q_proj, heads) @ keys.transpose(-1, -2) / head_dim**0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    expected = attention.o_proj((weights @ values).transpose(1, 2).reshape(batch, length, hidden))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 2], attention.o_proj(values[0, :, 0].reshape(-1)), rtol=0, atol=1e-12)


def test_a_flex_block_mask_refuses_cached_keys():
    """A block mask indexes one call's tokens: with cached keys in front they would be misaligned."""
    attention = MemoryAnchorAttention(16, 2, 1)
    mask = create_block_mask(lambda b, h, q, k: q >= k, 1, None, 128, 128, device="cpu")
    past = (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="cannot cover cached keys"):
        attention(torch.randn(1, 3, 16), None, mask, past)


def perturbed_outputs(
    seq_config, model, history, mode, block_anchor=False, field="semantic"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states before/after changing item 1's first semantic token (or its action)."""
    builder = SequenceBuilder(seq_config)
    items, actions = history.items.copy(), history.actions.copy()
    if field == "semantic":
        items[0, 0] = (items[0, 0] + 5) % seq_config.codebook_size
    else:
        actions[0] = 1 - actions[0]
    changed = UserHistory(history.user_id, items, actions, history.profile)
    outputs = []
    for h in (history, changed):
        batch = builder.batch([h])
        mask = model.mask(batch, mode)
        if block_anchor:  # hide anchor 1 from every later item
            anchor_1 = seq_config.profile_length + seq_config.num_positions
            later = batch.item_index[0] > 1
            mask = mask.clone()
            mask[0, 0, later, anchor_1] = False
        with torch.no_grad():
            outputs.append(model(batch, mask).hidden[0])
    item_index = builder.batch([history]).item_index[0]
    return outputs, item_index


def test_history_reaches_later_items_only_through_anchors(seq_config, history, make_model):
    model = make_model()
    (before, after), item = perturbed_outputs(seq_config, model, history, "memory_anchor")
    delta = (after - before).abs().amax(-1)
    assert (delta[item == 0] == 0).all()  # the profile precedes the change
    assert (delta[item == 1] > 1e-4).any()
    assert (delta[item >= 2] > 1e-4).all()  # reachable through anchor 1
    (before, after), _ = perturbed_outputs(seq_config, model, history, "memory_anchor", block_anchor=True)
    torch.testing.assert_close(after[item >= 2], before[item >= 2], atol=0, rtol=0)
    # a plain causal mask leaks the raw tokens even with anchor 1 hidden
    (before, after), _ = perturbed_outputs(seq_config, model, history, "causal", block_anchor=True)
    assert ((after - before).abs().amax(-1)[item >= 2] > 1e-4).all()


@pytest.mark.parametrize(("memory", "reaches_later"), [("anchor", False), ("anchor_action", True)])
def test_past_action_visibility(seq_config, history, make_model, memory, reaches_later):
    """Under Eq. 10 a past Action never reaches later items (its Anchor precedes it)."""
    model = make_model(history_memory=memory)
    (before, after), item = perturbed_outputs(seq_config, model, history, "memory_anchor", field="action")
    delta = (after - before).abs().amax(-1)[item >= 2]
    assert bool((delta > 1e-4).all()) == reaches_later
    if not reaches_later:
        assert (delta == 0).all()


@pytest.mark.parametrize(
    ("mode", "memory"),
    [("memory_anchor", "anchor"), ("memory_anchor", "anchor_action"), ("causal", "anchor")],
)
@pytest.mark.parametrize("field", ["action", "semantic"])
def test_no_item_reads_another_of_its_instant(seq_config, history, make_model, mode, memory, field):
    """Items 2-4 were rated in one second, so their order is arbitrary: changing items 2 and 3 (their
    actions, or their first semantic codes) moves nothing of item 4, only their own tokens, and
    item 5, a second later, where the mask shows what changed (an Action only under anchor_action
    and causal). Without the instants, item 4 reads them (the leak the instants close)."""
    model = make_model(history_memory=memory, attention_mask=mode)
    builder = SequenceBuilder(seq_config)
    changed = replace(history, actions=history.actions.copy(), items=history.items.copy())
    if field == "action":
        changed.actions[1:3] = 1 - changed.actions[1:3]
    else:
        changed.items[1:3, 0] = (changed.items[1:3, 0] + 5) % seq_config.codebook_size
    shown = field == "semantic" or memory == "anchor_action" or mode == "causal"
    for instants, leaks in (([0, 1, 1, 1, 2], False), (None, shown)):
        outputs = []
        for h in (history, changed):
            batch = builder.batch([replace(h, instants=instants)])
            with torch.no_grad():
                outputs.append(model(batch, model.mask(batch, mode)).hidden[0])
        delta = (outputs[1] - outputs[0]).abs().amax(-1)
        item, kind = batch.item_index[0], batch.token_type[0]
        own = (item == 2) | (item == 3)
        if field == "action":
            own &= kind == TokenType.ACTION
        assert (delta[own] > 1e-4).all()
        assert bool((delta[item == 5] > 1e-4).all()) == shown and bool((delta[item == 5] == 0).all()) != shown
        assert bool((delta[(item <= 4) & ~own] > 1e-4).any()) == leaks
        if not leaks:
            assert (delta[(item <= 4) & ~own] == 0).all()


@pytest.mark.parametrize(
    ("mode", "memory"),
    [("memory_anchor", "anchor"), ("memory_anchor", "anchor_action"), ("causal", "anchor")],
)
def test_instants_hide_exactly_the_other_items_of_a_querys_instant(seq_config, histories, mode, memory):
    """Under every mask, instants take from what a token sees exactly the tokens of other items of
    its instant, and nothing else."""
    timed = ragged(histories[:6])
    plain = [replace(h, instants=None) for h in timed]
    builder = SequenceBuilder(seq_config)
    with_instants, without = (TokenLayout.of(builder.batch(users)) for users in (timed, plain))
    types = memory_token_types(mode, memory)
    masked = dense_mask(with_instants, with_instants, types)[:, 0]
    unmasked = dense_mask(without, without, types)[:, 0]
    layout = with_instants
    other_of_instant = (layout.item_index[:, None, :] != layout.item_index[:, :, None]) & (
        layout.instant[:, None, :] == layout.instant[:, :, None]
    )
    assert (unmasked & other_of_instant).any()  # the rule has something to hide
    assert torch.equal(masked, unmasked & ~other_of_instant)


def test_padding_to_flex_blocks_hides_the_pads_and_changes_nothing_else(seq_config, histories):
    layout = TokenLayout.of(SequenceBuilder(seq_config).batch(ragged(histories[:5])))
    length = layout.position.shape[1]
    padded = layout.pad_to(128)
    types = memory_token_types("memory_anchor")
    mask = dense_mask(padded, padded, types)[:, 0]
    assert mask.shape[-1] == 128
    assert torch.equal(mask[:, :length, :length], dense_mask(layout, layout, types)[:, 0])
    assert not mask[:, :length, length:].any()  # no real query sees a pad
    assert torch.equal(
        mask[:, length:, length:],
        torch.eye(128 - length, dtype=torch.bool).expand_as(mask[:, length:, length:]),
    )
    assert layout.pad_to(length) is layout

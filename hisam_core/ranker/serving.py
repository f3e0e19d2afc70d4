"""Inference optimisation of HMAT (Sec. 3.4.2): anchor KV cache and one-pass parallel ranking.

Anchor-based KV cache compression. Under MA-Attn a later item sees a past item only through its
Anchor (and the profile), so after a history is encoded once, every layer keeps only the keys and
values of profile tokens and anchors; semantic and Action tokens of past items are evicted (they are
never attended again). Keys are cached *after* H-RoPE at their logical coordinates, and the cache
keeps the logical position map ``(p, i, type, valid, instant)`` of what it holds (``j`` is already in the rotated
keys), so physical eviction changes no score. ``history_memory="anchor_action"`` also keeps Actions; a causal-mask model keeps everything.
Appending an interaction encodes only its ``n + 2`` tokens against the cache. When the history
outgrows the token budget the cache is rebuilt from the truncated history (every kept item's state
depends on the dropped anchors, so there is no lossless incremental truncation).

One-pass parallel ranking. The ``C`` candidates form a batch of blocks ``[s_1 .. s_n, Anchor]`` that
attend to the shared cache and, causally, to their own block only. Input-side position re-alignment:
every candidate sits at ``i = N + 1`` with ``N`` the *effective* history length (interactions kept
after truncation) and flat positions continuing the history stream, exactly where a single
candidate appended to the history would sit, so scores do not depend on candidate order. The paper
writes ``i = N``; with history items at ``i = 1..N`` (Sec. 3.3) that would give the candidate the last
history item's index, and the MA mask lets tokens of one index see each other, so the candidate
would read that item's semantic tokens and Action. ``N + 1`` is the next item's index.
The budget keeps room for one candidate block: history + ``n + 1`` tokens fit in ``max_tokens``.

:func:`rank_reference` is the plain PyTorch reference for both fast paths: one full forward pass per
candidate over ``[history, candidate]`` with the dense mask and no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hisam_core.features import integral
from hisam_core.ranker.attention import KVPair, TokenLayout, dense_mask
from hisam_core.ranker.model import HMAT
from hisam_core.ranker.objectives import positive_probability
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, TokenBatch, UserHistory


@dataclass(frozen=True)
class AnchorKVCache:
    """Per-layer rotated keys/values ``[1, Hkv, M, d]`` of the cached history tokens, with their
    logical position map (``layout``: flat position, item index, type, validity, instant; the keys
    are rotated already, so the within-item index is not kept). A history's instants come with it
    (a request's ``history_timestamps``); every candidate is later than all of it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layout: TokenLayout
    history: UserHistory
    length: int  # logical length of the history stream: the next flat position
    evicted: bool

    @property
    def num_items(self) -> int:
        """The effective history length ``N`` (interactions kept)."""
        return len(self.history)

    @property
    def num_cached(self) -> int:
        return int(self.layout.position.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    @property
    def past(self) -> list[KVPair]:
        return list(zip(self.keys, self.values, strict=True))


class HMATRanker:
    """Scores candidates for a user: ``rank(history or cache, candidates) -> P(positive)``."""

    def __init__(self, model: HMAT, sequence_config: SequenceConfig) -> None:
        self.model = model
        self.builder = SequenceBuilder(sequence_config)
        self.vocab = self.builder.vocab
        if self.vocab.size != model.vocab_size:  # ids in range, meaning other tokens: silently wrong
            raise ValueError(
                f"the sequence config builds {self.vocab.size} token ids, the model embeds "
                f"{model.vocab_size}: serve it with the sequence config it was trained with"
            )
        self.mode = model.config.attention_mask
        self.memory_types = model.memory_types(self.mode)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cacheable(self, token_type: torch.Tensor) -> torch.Tensor:
        if self.memory_types is None:
            return torch.ones_like(token_type, dtype=torch.bool)
        return torch.isin(token_type, torch.tensor(self.memory_types, device=token_type.device))

    def _forward(self, batch: TokenBatch, cache: AnchorKVCache | None) -> tuple[torch.Tensor, list[KVPair]]:
        """Encode ``batch`` after ``cache`` (its keys first), with the MA predicate over both."""
        query = TokenLayout.of(batch)
        if cache is None:
            out = self.model(batch, self.model.mask(batch, self.mode))
        else:
            keys = cache.layout.expand(batch.tokens.shape[0]).cat(query)
            out = self.model(batch, dense_mask(query, keys, self.memory_types), cache.past)
        return out.hidden, out.kv

    def _extend(
        self,
        cache: AnchorKVCache | None,
        batch: TokenBatch,
        kv: list[KVPair],
        history: UserHistory,
        evict: bool,
    ) -> AnchorKVCache:
        """``cache`` followed by the cacheable tokens of ``batch`` (one row)."""
        keep = batch.valid[0] & (self._cacheable(batch.token_type[0]) if evict else True)
        new_layout = TokenLayout(*(t[:, keep] for t in vars(TokenLayout.of(batch)).values()))
        new_keys = [k[:, :, keep] for k, _ in kv]
        new_values = [v[:, :, keep] for _, v in kv]
        length = int(batch.position[0, batch.valid[0]].max()) + 1
        if cache is not None:
            new_layout = cache.layout.cat(new_layout)
            new_keys = [torch.cat([a, b], dim=2) for a, b in zip(cache.keys, new_keys, strict=True)]
            new_values = [torch.cat([a, b], dim=2) for a, b in zip(cache.values, new_values, strict=True)]
        return AnchorKVCache(new_keys, new_values, new_layout, history, length, evict)

    @torch.inference_mode()
    def encode(self, history: UserHistory, evict: bool = True) -> AnchorKVCache:
        """Encode a history once and keep what later tokens can see (``evict=False``: keep all,
        the uncompressed cache, for comparison)."""
        history = self.builder.truncate(history, with_candidate=True)
        if len(history) == 0 and not self.builder.config.profile_fields:
            self.builder.vocab.profile(history.profile, f"user {history.user_id}")  # none it does not know
            return self._empty(history, evict)
        batch = self.builder.collate([self.builder.build(history)]).to(self.device)
        _, kv = self._forward(batch, None)
        return self._extend(None, batch, kv, history, evict)

    def _empty(self, history: UserHistory, evict: bool) -> AnchorKVCache:
        """The cache of a user with nothing to encode (no history, and a model without profile
        tokens): no keys, so a candidate sees only its own block, as the first item of a training
        window does. A model with profile tokens always has them: a missing profile is an error."""
        config, weight = self.model.config, next(self.model.parameters())
        empty = weight.new_zeros(1, config.num_kv_heads, 0, config.hidden_size // config.num_heads)
        none = torch.zeros(1, 0, dtype=torch.long, device=weight.device)
        layout = TokenLayout(none, none, none, none.bool(), none)
        return AnchorKVCache(
            [empty] * config.num_layers, [empty] * config.num_layers, layout, history, 0, evict
        )

    @torch.inference_mode()
    def append(
        self, cache: AnchorKVCache, codes: np.ndarray, action: int, instant: int | None = None
    ) -> AnchorKVCache:
        """A new cache with one more interaction at ``instant`` (:meth:`UserHistory.append`: default
        later than all), encoded against ``cache`` without recomputing the history; rebuilt from
        scratch when the token budget forces dropping the oldest item."""
        block = self.builder.item_block(
            codes, action, cache.num_items + 1, cache.length, f"user {cache.history.user_id} new item"
        )
        history = cache.history.append(codes, action, instant)
        if len(history) > self.builder.max_items(with_candidate=True):
            return self.encode(history, cache.evicted)
        block["instant"][:] = history.instant_index()[-1]  # the first item of its instant
        batch = self._block_batch(block, history.user_id)
        _, kv = self._forward(batch, cache)
        return self._extend(cache, batch, kv, history, cache.evicted)

    def _block_batch(self, block: dict[str, np.ndarray], user_id: int, rows: int = 1) -> TokenBatch:
        tensors = {name: torch.from_numpy(values).expand(rows, -1) for name, values in block.items()}
        return TokenBatch(
            valid=torch.ones_like(tensors["tokens"], dtype=torch.bool),
            user_ids=torch.full((rows,), user_id),
            **tensors,
        ).to(self.device)

    @torch.inference_mode()
    def rank(
        self, history: UserHistory | AnchorKVCache, candidates: np.ndarray, chunk_size: int = 1024
    ) -> torch.Tensor:
        """``P(positive action)`` for each candidate (raw codes ``[C, num_positions]``), all in one
        pass over the cache (built here when a history is given), ``chunk_size`` candidates at a time."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        cache = history if isinstance(history, AnchorKVCache) else self.encode(history)
        codes = np.asarray(candidates)
        n = self.builder.config.num_positions
        if codes.shape == (0,):  # an empty list
            codes = codes.reshape(0, n)
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"candidates must be [C, {n}] semantic codes, got shape {codes.shape}")
        tokens = self.vocab.semantic(codes, f"user {cache.history.user_id} candidates")
        if not len(tokens):
            return torch.empty(0, device=self.device)
        template = self.builder.item_block(codes[0], None, cache.num_items + 1, cache.length)
        anchors = np.full((len(tokens), 1), self.vocab.anchor_id, dtype=np.int64)
        blocks = np.concatenate([tokens, anchors], axis=1)
        scores = []
        for start in range(0, len(blocks), chunk_size):
            chunk = blocks[start : start + chunk_size]
            batch = self._block_batch(dict(template, tokens=chunk), cache.history.user_id, rows=len(chunk))
            hidden, _ = self._forward(batch, cache)
            logits = self.model.action_logits(hidden[:, -1], self.vocab.action_ids)
            scores.append(positive_probability(logits, self.vocab))
        return torch.cat(scores)


@torch.inference_mode()
def rank_reference(
    model: HMAT, sequence_config: SequenceConfig, history: UserHistory, candidates: np.ndarray
) -> torch.Tensor:
    """Reference scores: a separate full forward pass (dense mask, no cache) over
    ``[history, candidate]`` for each candidate, the candidate's Anchor output giving the score."""
    builder = SequenceBuilder(sequence_config)
    device = next(model.parameters()).device
    memory_types = model.memory_types(model.config.attention_mask)
    scores = []
    for codes in integral(candidates, "candidates: semantic codes"):
        batch = builder.collate([builder.build(history, candidate=codes)]).to(device)
        layout = TokenLayout.of(batch)
        hidden = model(batch, dense_mask(layout, layout, memory_types)).hidden
        logits = model.action_logits(hidden[0, -1], builder.vocab.action_ids)
        scores.append(positive_probability(logits, builder.vocab))
    return torch.stack(scores) if scores else torch.empty(0, device=device)

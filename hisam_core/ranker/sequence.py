"""Sequence construction and coordinate scheme of HMAT (Sec. 3.3, Eq. 5).

A user becomes one token stream ``[profile, (s_1 .. s_n, Anchor, Action) per item]`` and every
token gets a coordinate ``(i, j)``:

* profile tokens form segment ``i = 0``; their ``j`` counts ``0 .. P-1`` in field order (the paper
  leaves profile ``j`` open; treating the profile as segment 0 keeps the rule "``j`` restarts at 0
  in every segment" uniform, and the field identity is already in the token id);
* the ``k``-th kept item has ``i = k`` (1-based, renumbered after truncation so ``i`` is the
  *effective* history position), its semantic tokens ``j = 0 .. n-1``, the Anchor ``j = n`` and
  the Action ``j = n + 1``.

``i`` (``item_index``) names an item's segment for the mask. Each token also carries its
``instant``, the ``i`` of the first kept item of its instant (the items a user logged in one
second): the mask hides the other items of an instant, and H-RoPE's inter-item band rotates by it
(:mod:`~hisam_core.ranker.hrope`), so items of one instant share a coordinate. Without timestamps
each item is its own instant (``instant == i``). Each token also has its flat position ``p``
(index in the stream; used for causality, 1D-RoPE and absolute positions) and a
:class:`TokenType`.

Vocabulary layout (ids, in order): ``PAD = 0``, ``ANCHOR = 1``, one id per action type (config
order), the profile buckets (field by field, ``num_buckets`` ids each), then the semantic tokens
laid out as :meth:`hisam_core.semantic_ids.SemanticIds.tokens` (position ``p`` offset by
``p * codebook_size``), shifted by the start of the semantic block.

Truncation: a sequence keeps the profile and the most recent *whole* items that fit in
``max_tokens``; older items are dropped (never a partial item), and the count is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch
from pydantic import Field, model_validator

from hisam_core.config import Config
from hisam_core.features import integral
from hisam_core.semantic_ids import SemanticIds

logger = logging.getLogger(__name__)

#: Label value of positions that carry no action target (``F.cross_entropy``'s default ignore index).
IGNORE_LABEL = -100


class TokenType(IntEnum):
    """What a token is; MA-Attn (Eq. 10) and the anchor cache decide visibility from it."""

    PROFILE = 0
    SEMANTIC = 1
    ANCHOR = 2
    ACTION = 3
    PAD = 4


class SequenceConfig(Config):
    """Vocabulary and token budget of the unified stream (Sec. 3.3, B.2)."""

    num_positions: int = Field(6, ge=1, description="semantic codes per item (3 shared + 3 modality)")
    codebook_size: int = Field(256, ge=2, description="K: codes per position")
    action_names: list[str] = Field(default_factory=lambda: ["negative", "positive"], min_length=2)
    positive_action: str = "positive"
    profile_fields: dict[str, int] = Field(
        default_factory=dict, description="profile field -> number of value buckets (values in [0, n))"
    )
    max_tokens: int = Field(300, ge=1, description="token budget per sequence (B.2: 300)")

    @model_validator(mode="after")
    def _check(self) -> SequenceConfig:
        if len(set(self.action_names)) != len(self.action_names):
            raise ValueError(f"action_names must be unique, got {self.action_names}")
        if self.positive_action not in self.action_names:
            raise ValueError(f"positive_action {self.positive_action!r} is not in {self.action_names}")
        bad = {name: n for name, n in self.profile_fields.items() if n < 1}
        if bad:
            raise ValueError(f"profile fields need at least one bucket: {bad}")
        needed = len(self.profile_fields) + 2 * (self.num_positions + 2)
        if self.max_tokens < needed:
            raise ValueError(
                f"max_tokens={self.max_tokens} cannot hold the profile, one history item and a candidate "
                f"block ({needed})"
            )
        return self

    def __eq__(self, other: object) -> bool:
        """Field by field, and ``profile_fields`` in order too: the profile token ids follow it, so
        two configs listing the same fields in another order do not read each other's streams."""
        if not isinstance(other, SequenceConfig):
            return NotImplemented
        return super().__eq__(other) and list(self.profile_fields) == list(other.profile_fields)

    @property
    def item_length(self) -> int:
        """Tokens per history item: ``n`` semantic tokens, the Anchor and the Action."""
        return self.num_positions + 2

    @property
    def profile_length(self) -> int:
        return len(self.profile_fields)


class Vocabulary:
    """Token ids of the unified stream; see the module docstring for the layout."""

    pad_id = 0
    anchor_id = 1

    def __init__(self, config: SequenceConfig) -> None:
        self.config = config
        self.action_offset = 2
        self.num_actions = len(config.action_names)
        offset = self.action_offset + self.num_actions
        self.profile_offsets: dict[str, int] = {}
        for name, buckets in config.profile_fields.items():
            self.profile_offsets[name] = offset
            offset += buckets
        self.semantic_offset = offset
        self.size = offset + config.num_positions * config.codebook_size
        self.positive_index = config.action_names.index(config.positive_action)

    @property
    def action_ids(self) -> torch.Tensor:
        """Ids of the action tokens in ``action_names`` order (their logits give the SFT classifier)."""
        return torch.arange(self.action_offset, self.action_offset + self.num_actions)

    def check_semantic_ids(self, semantic_ids: SemanticIds) -> None:
        """Fail when a DST table does not match this vocabulary."""
        if (semantic_ids.num_positions, semantic_ids.codebook_size) != (
            self.config.num_positions,
            self.config.codebook_size,
        ):
            raise ValueError(
                f"semantic IDs {semantic_ids.version!r} have {semantic_ids.num_positions} positions x "
                f"K={semantic_ids.codebook_size}, the ranker expects {self.config.num_positions} x "
                f"K={self.config.codebook_size}"
            )

    def semantic(self, codes: np.ndarray, what: str = "item") -> np.ndarray:
        """Token ids of raw codes ``[..., num_positions]`` (``SemanticIds.tokens`` + block offset)."""
        codes = integral(codes, f"{what}: semantic codes")
        n, k = self.config.num_positions, self.config.codebook_size
        if codes.ndim == 0 or codes.shape[-1] != n:
            raise ValueError(f"{what}: expected {n} semantic codes per item, got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(
                f"{what}: semantic codes must lie in [0, {k}), got [{codes.min()}, {codes.max()}]"
            )
        return codes + np.arange(n, dtype=np.int64) * k + self.semantic_offset

    def action(self, actions: np.ndarray, what: str = "actions") -> np.ndarray:
        actions = integral(actions, f"{what}: actions")
        if actions.size and (actions.min() < 0 or actions.max() >= self.num_actions):
            raise ValueError(
                f"{what}: action indices must lie in [0, {self.num_actions}) ({self.config.action_names}), "
                f"got [{actions.min()}, {actions.max()}]"
            )
        return actions + self.action_offset

    def profile(self, values: Mapping[str, int], what: str = "profile") -> np.ndarray:
        """Profile token ids in config field order; every configured field is required."""
        unknown = sorted(set(values) - set(self.profile_offsets))
        missing = [name for name in self.profile_offsets if name not in values]
        if unknown or missing:
            raise ValueError(f"{what}: unknown profile fields {unknown}, missing fields {missing}")
        ids = []
        for name, offset in self.profile_offsets.items():
            value, buckets = (
                int(integral(values[name], f"{what}: profile field {name!r}")),
                self.config.profile_fields[name],
            )
            if not 0 <= value < buckets:
                raise ValueError(f"{what}: profile field {name!r} value {value} outside [0, {buckets})")
            ids.append(offset + value)
        return np.asarray(ids, dtype=np.int64)


def instant_starts(timestamps: np.ndarray) -> np.ndarray:
    """For each position of a chronological sequence, the (0-based) first position of its instant
    (its run of equal timestamps): nothing of that instant is its history (an ID ranker's state,
    the Actions HMAT shows it)."""
    starts = np.r_[0, np.flatnonzero(np.diff(timestamps)) + 1]
    return starts[np.searchsorted(starts, np.arange(len(timestamps)), side="right") - 1]


@dataclass(frozen=True)
class UserHistory:
    """One user's chronological interactions (oldest first), as raw semantic codes and actions."""

    user_id: int
    items: np.ndarray  # int64 [N, num_positions]: raw codes, e.g. ``SemanticIds.lookup(item_ids)``
    actions: np.ndarray  # int64 [N]: index into ``SequenceConfig.action_names``
    profile: Mapping[str, int] = field(default_factory=dict)
    targets: np.ndarray | None = None  # bool [N]: which actions are labels (default: all)
    #: int64 [N], non-decreasing: when each interaction happened. Interactions of one instant are not
    #: each other's history: no token of one sees another (:func:`~hisam_core.ranker.attention.visible`).
    #: None: each interaction its own instant.
    instants: np.ndarray | None = None

    def __post_init__(self) -> None:
        items = integral(self.items, f"user {self.user_id}: history semantic codes")
        if items.ndim == 1 and items.size == 0:
            items = items.reshape(0, 0)
        actions = integral(self.actions, f"user {self.user_id}: history actions").reshape(-1)
        if items.ndim != 2 or items.shape[0] != actions.shape[0]:
            raise ValueError(
                f"user {self.user_id}: items must be [N, positions] with N={actions.shape[0]} actions, "
                f"got {items.shape}"
            )
        targets = (
            np.ones(len(actions), dtype=bool) if self.targets is None else np.asarray(self.targets, bool)
        )
        if targets.shape != actions.shape:
            raise ValueError(f"user {self.user_id}: targets must have one flag per item, got {targets.shape}")
        if self.instants is not None:
            instants = np.asarray(self.instants)
            if instants.size and not np.issubdtype(instants.dtype, np.integer):
                raise ValueError(f"user {self.user_id}: instants must be integers, got {instants.dtype}")
            instants = instants.astype(np.int64)
            if instants.shape != actions.shape or (np.diff(instants) < 0).any():
                raise ValueError(
                    f"user {self.user_id}: instants must be one non-decreasing time per item, got "
                    f"{instants.shape} {instants[:5].tolist()}"
                )
            object.__setattr__(self, "instants", instants)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "actions", actions)
        object.__setattr__(self, "targets", targets)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def tail(self, num_items: int) -> UserHistory:
        """The most recent ``num_items`` interactions."""
        start = max(len(self) - num_items, 0)
        instants = None if self.instants is None else self.instants[start:]
        return UserHistory(
            self.user_id,
            self.items[start:],
            self.actions[start:],
            self.profile,
            self.targets[start:],
            instants,
        )

    def append(self, codes: np.ndarray, action: int, instant: int | None = None) -> UserHistory:
        """This history followed by one more interaction at ``instant`` (default: later than all;
        equal to the last item's time: of its instant). Only a history with instants (or an empty
        one) takes an instant."""
        codes = np.asarray(codes, dtype=np.int64).reshape(1, -1)
        items = codes if len(self) == 0 else np.concatenate([self.items, codes])
        if instant is not None and self.instants is None and len(self):
            raise ValueError(f"user {self.user_id}: the history has no instants, so the new item takes none")
        if instant is not None:
            known = self.instants if self.instants is not None else np.empty(0, dtype=np.int64)
            later = np.append(known, np.asarray(instant).reshape(1))
        else:
            later = (
                None if self.instants is None else np.append(self.instants, self.instants.max(initial=0) + 1)
            )
        return UserHistory(
            self.user_id,
            items,
            np.append(self.actions, action),
            self.profile,
            np.append(self.targets, True),
            later,
        )

    def instant_index(self) -> np.ndarray:
        """int64 [N]: for each interaction, the (1-based) item index of the first of its instant."""
        if self.instants is None:
            return np.arange(1, len(self) + 1, dtype=np.int64)
        return instant_starts(self.instants) + 1


@dataclass(frozen=True)
class TokenSequence:
    """One user's stream and its per-token metadata (numpy, unpadded)."""

    user_id: int
    tokens: np.ndarray  # token ids
    item_index: np.ndarray  # i: 0 for the profile, k for the k-th kept item (its segment)
    intra_index: np.ndarray  # j: position inside the segment
    position: np.ndarray  # p: flat index in the stream
    token_type: np.ndarray  # TokenType
    labels: np.ndarray  # action index at label anchors, IGNORE_LABEL elsewhere
    instant: np.ndarray  # the item index of the first item of the token's instant (0: the profile)
    num_items: int  # interactions kept (the effective history length)
    dropped_items: int  # oldest interactions dropped by the token budget


@dataclass
class TokenBatch:
    """Right-padded batch of streams; every field is ``[B, L]``. Pads have ``valid = False``."""

    tokens: torch.Tensor
    item_index: torch.Tensor
    intra_index: torch.Tensor
    position: torch.Tensor
    token_type: torch.Tensor
    valid: torch.Tensor  # bool padding mask: True on real tokens
    labels: torch.Tensor  # action targets at anchor positions (the anchor output predicts the action)
    instant: torch.Tensor  # the item index of the first item of the token's instant (0: the profile)
    user_ids: torch.Tensor  # [B]

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{name: value.to(device) for name, value in vars(self).items()})

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


class SequenceBuilder:
    """Builds token streams (Eq. 5) from :class:`UserHistory` and collates them into batches."""

    def __init__(self, config: SequenceConfig) -> None:
        self.config = config
        self.vocab = Vocabulary(config)

    def max_items(self, with_candidate: bool = False) -> int:
        """Items that fit in the budget; ``with_candidate``: history items in front of a candidate,
        one whole item fewer (not just its ``n + 1`` tokens), so a served candidate has at most the
        context, and the coordinates, of the last item of a full training window."""
        room = self.config.max_tokens - self.config.profile_length
        if with_candidate:
            room -= self.config.item_length
        return max(room // self.config.item_length, 0)

    def truncate(self, history: UserHistory, with_candidate: bool = False) -> UserHistory:
        """Keep the most recent whole items that fit in ``max_tokens`` (documented truncation)."""
        keep = self.max_items(with_candidate)
        if len(history) > keep:
            logger.debug("user %s: dropping %d oldest items (budget)", history.user_id, len(history) - keep)
            return history.tail(keep)
        return history

    def item_block(
        self,
        codes: np.ndarray,
        action: int | None,
        item_index: int,
        start: int,
        what: str = "item",
        target: bool = True,
        instant: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Tokens of one item of segment ``i = item_index`` starting at flat position ``start``:
        ``n`` semantic tokens and the Anchor, then the Action unless ``action`` is None (a candidate).
        ``instant``: the index of the first item of its instant (default: its own)."""
        n = self.config.num_positions
        codes = np.asarray(codes)
        if codes.size != n:
            raise ValueError(f"{what}: expected one item's {n} semantic codes, got shape {codes.shape}")
        semantic = self.vocab.semantic(codes.reshape(n), what)
        tokens = [semantic, [Vocabulary.anchor_id]]
        types = [np.full(n, TokenType.SEMANTIC), [TokenType.ANCHOR]]
        labels = np.full(n + 1 + (action is not None), IGNORE_LABEL, dtype=np.int64)
        if action is not None:
            tokens.append(self.vocab.action([action], what))
            types.append([TokenType.ACTION])
            if target:
                labels[n] = action
        length = len(labels)
        return {
            "tokens": np.concatenate(tokens).astype(np.int64),
            "item_index": np.full(length, item_index, dtype=np.int64),
            "intra_index": np.arange(length, dtype=np.int64),
            "position": np.arange(start, start + length, dtype=np.int64),
            "token_type": np.concatenate(types).astype(np.int64),
            "labels": labels,
            "instant": np.full(length, item_index if instant is None else instant, dtype=np.int64),
        }

    def history_blocks(self, kept: UserHistory, start: int, what: str = "item") -> dict[str, np.ndarray]:
        """The blocks of every item of ``kept`` (at least one; Eq. 5), each :meth:`item_block` with its
        action, one after another from flat position ``start``: laid out for all items at once (a
        training batch builds thousands), equal to concatenating their blocks on valid input. Codes
        are checked before actions, each over all items."""
        n, count, length = self.config.num_positions, len(kept), self.config.item_length
        tokens = np.empty((count, length), dtype=np.int64)
        tokens[:, :n] = self.vocab.semantic(kept.items, what)
        tokens[:, n] = Vocabulary.anchor_id
        tokens[:, n + 1] = self.vocab.action(kept.actions, what)
        labels = np.full((count, length), IGNORE_LABEL, dtype=np.int64)
        labels[:, n] = np.where(kept.targets, kept.actions, IGNORE_LABEL)
        kinds = np.r_[np.full(n, TokenType.SEMANTIC), TokenType.ANCHOR, TokenType.ACTION].astype(np.int64)
        return {
            "tokens": tokens.reshape(-1),
            "item_index": np.repeat(np.arange(1, count + 1, dtype=np.int64), length),
            "intra_index": np.tile(np.arange(length, dtype=np.int64), count),
            "position": np.arange(start, start + count * length, dtype=np.int64),
            "token_type": np.tile(kinds, count),
            "labels": labels.reshape(-1),
            "instant": np.repeat(kept.instant_index(), length),
        }

    def build(self, history: UserHistory, candidate: np.ndarray | None = None) -> TokenSequence:
        """The stream of one user; with ``candidate`` (raw codes) it ends with that item's block
        (semantic tokens + Anchor, no Action) at ``i = kept items + 1``. A user with no history and no
        profile has a stream only with a candidate: the candidate alone, as the first item of a
        training window is labelled with nothing before it."""
        what = f"user {history.user_id}"
        if len(history) == 0 and not self.config.profile_fields and candidate is None:
            raise ValueError(f"{what}: empty history and no profile, nothing to condition on")
        if len(history) and history.items.shape[1] != self.config.num_positions:
            raise ValueError(
                f"{what}: items have {history.items.shape[1]} semantic codes, expected {self.config.num_positions}"
            )
        kept = self.truncate(history, with_candidate=candidate is not None)
        profile = self.vocab.profile(history.profile, what)
        p_len = len(profile)
        blocks = [
            {
                "tokens": profile,
                "item_index": np.zeros(p_len, dtype=np.int64),
                "intra_index": np.arange(p_len, dtype=np.int64),
                "position": np.arange(p_len, dtype=np.int64),
                "token_type": np.full(p_len, TokenType.PROFILE, dtype=np.int64),
                "labels": np.full(p_len, IGNORE_LABEL, dtype=np.int64),
                "instant": np.zeros(p_len, dtype=np.int64),
            }
        ]
        if len(kept):
            blocks.append(self.history_blocks(kept, p_len, what))
        start = p_len + len(kept) * self.config.item_length
        if candidate is not None:
            blocks.append(self.item_block(candidate, None, len(kept) + 1, start, f"{what} candidate"))
        merged = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
        return TokenSequence(
            user_id=history.user_id,
            num_items=len(kept),
            dropped_items=len(history) - len(kept),
            **merged,
        )

    def collate(self, sequences: Sequence[TokenSequence]) -> TokenBatch:
        """Right-pad streams into one batch; pads get ``PAD`` ids/type, ``valid = False`` and flat
        positions continuing the stream (so every row's positions stay strictly increasing)."""
        if not sequences:
            raise ValueError("cannot collate an empty list of sequences")
        length = max(len(s.tokens) for s in sequences)
        batch = len(sequences)
        out = {
            "tokens": np.full((batch, length), Vocabulary.pad_id, dtype=np.int64),
            "item_index": np.zeros((batch, length), dtype=np.int64),
            "intra_index": np.zeros((batch, length), dtype=np.int64),
            "position": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
            "token_type": np.full((batch, length), TokenType.PAD, dtype=np.int64),
            "labels": np.full((batch, length), IGNORE_LABEL, dtype=np.int64),
            "instant": np.zeros((batch, length), dtype=np.int64),
        }
        valid = np.zeros((batch, length), dtype=bool)
        for row, seq in enumerate(sequences):
            n = len(seq.tokens)
            for name, values in out.items():
                values[row, :n] = getattr(seq, name)
            valid[row, :n] = True
        tensors = {name: torch.from_numpy(values) for name, values in out.items()}
        return TokenBatch(
            valid=torch.from_numpy(valid),
            user_ids=torch.tensor([s.user_id for s in sequences], dtype=torch.long),
            **tensors,
        )

    def batch(self, histories: Sequence[UserHistory]) -> TokenBatch:
        """Training/evaluation batch: build and collate, logging how many items the budget dropped.
        Every user needs at least one interaction (its action is the label)."""
        empty = [h.user_id for h in histories if len(h) == 0]
        if empty:
            raise ValueError(f"users with an empty history have no action to predict: {empty[:10]}")
        sequences = [self.build(h) for h in histories]
        dropped = sum(s.dropped_items for s in sequences)
        if dropped:
            logger.debug("token budget dropped %d oldest items across %d users", dropped, len(sequences))
        return self.collate(sequences)

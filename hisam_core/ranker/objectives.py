"""Training objectives of HMAT (Sec. 3.4.1). DST is frozen: the inputs are fixed semantic IDs.

* PT (semantic pre-training): next-token prediction with the causal mask (which still hides the
  other items of an item's instant from it, :func:`~hisam_core.ranker.attention.visible`), over the
  tokens of a window's target items, so each item of a stream is predicted once across its overlapping
  windows; an item's first token is not predicted from the Action of another item of its instant.
* SFT (Eq. 11): negative log-likelihood of each labelled Action token, predicted from the output at
  its item's Anchor (the token before it) under the model's SFT mask (MA-Attn by default). The
  softmax runs over the action tokens only, so ``P(action | context)`` is a proper distribution over
  action types and the ranking score is exactly the trained probability of the positive action.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hisam_core.ranker.model import HMAT
from hisam_core.ranker.sequence import IGNORE_LABEL, TokenBatch, TokenType, Vocabulary


def target_item_tokens(batch: TokenBatch) -> torch.Tensor:
    """``[B, L]`` True on every token of the items whose action is a label (an Anchor with a label).
    A user's windows overlap (a window's first items are context for its targets), and each item is
    a target in exactly one of them."""
    anchors = batch.labels != IGNORE_LABEL
    per_item = torch.zeros(
        batch.item_index.shape[0], int(batch.item_index.max()) + 1, dtype=torch.bool, device=anchors.device
    )
    per_item[torch.nonzero(anchors, as_tuple=True)[0], batch.item_index[anchors]] = True
    return per_item.gather(1, batch.item_index) & (batch.token_type != TokenType.PROFILE) & batch.valid


def pretrain_loss(model: HMAT, batch: TokenBatch) -> torch.Tensor:
    """Sec. 3.4.1 semantic pre-training: mean next-token cross-entropy under the causal mask, each
    token of a target item predicted from everything before it. Only target items' tokens are
    predicted, so over a user's overlapping windows every item is predicted once, with the longest
    context it has; the profile and an earlier window's items are context only."""
    hidden = model(batch, model.mask(batch, "causal")).hidden
    # an item's first token is not predicted from another item of its instant: their order is arbitrary
    # and one is not the other's history (the mask's rule, :func:`~hisam_core.ranker.attention.visible`)
    same_instant = (batch.item_index[:, 1:] != batch.item_index[:, :-1]) & (
        batch.instant[:, 1:] == batch.instant[:, :-1]
    )
    pairs = batch.valid[:, :-1] & target_item_tokens(batch)[:, 1:] & ~same_instant
    if not bool(pairs.any()):
        raise ValueError("pre-training batch has no (token, next token) pair")
    logits = model.logits(hidden[:, :-1][pairs])
    return F.cross_entropy(logits.float(), batch.tokens[:, 1:][pairs])


def action_logits(model: HMAT, batch: TokenBatch, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """Action-type logits at every labelled Anchor ``[N, num_actions]`` and the labels ``[N]``,
    rows in batch order (user-major, chronological)."""
    labelled = batch.labels != IGNORE_LABEL
    if not bool(labelled.any()):
        raise ValueError("batch has no labelled action")
    hidden = model(batch, model.mask(batch, model.config.attention_mask)).hidden
    return model.action_logits(hidden[labelled], vocab.action_ids).float(), batch.labels[labelled]


def sft_loss(model: HMAT, batch: TokenBatch, vocab: Vocabulary) -> torch.Tensor:
    """Eq. 11: mean NLL of the labelled actions given the (memory-anchored) context."""
    logits, labels = action_logits(model, batch, vocab)
    return F.cross_entropy(logits, labels)


def positive_probability(logits: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """The ranking score: ``P(positive action)`` from action-type logits ``[..., num_actions]``."""
    return logits.float().softmax(dim=-1)[..., vocab.positive_index]

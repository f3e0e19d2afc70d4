"""Training objectives of HMAT (Sec. 3.4.1). DST is frozen: the inputs are fixed semantic IDs.

* PT (semantic pre-training): next-token prediction over the whole stream with the plain causal mask.
* SFT (Eq. 11): negative log-likelihood of each labelled Action token, predicted from the output at
  its item's Anchor (the token before it) under the model's SFT mask (MA-Attn by default). The
  softmax runs over the action tokens only, so ``P(action | context)`` is a proper distribution over
  action types and the ranking score is exactly the trained probability of the positive action.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hisam_core.ranker.model import HMAT
from hisam_core.ranker.sequence import IGNORE_LABEL, TokenBatch, Vocabulary


def pretrain_loss(model: HMAT, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over every valid (token, next token) pair, causal mask."""
    hidden = model(batch, model.mask(batch, "causal")).hidden
    pairs = batch.valid[:, :-1] & batch.valid[:, 1:]
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

"""Rankers of the offline comparison (Sec. 4.1-4.3), all trained and scored on the same windows.

* :class:`IDRanker`: sparse-ID sequential rankers. One token per interaction, ``item embedding +
  action embedding``, after a profile token; the action of item ``t`` is predicted from the hidden
  state before ``t``'s instant (everything the user did before ``t``'s timestamp, actions included,
  not the interactions of the same second) and the embedding of item ``t`` (a small MLP on
  ``[h, e, h * e]``). Two blocks:

  - ``sasrec``: pre-LayerNorm softmax self-attention + GELU FFN, learned absolute positions
    (SASRec, Kang & McAuley 2018, used as a ranker);
  - ``hstu``: the HSTU block (Zhai et al. 2024): ``U, V, Q, K = SiLU(f1(x))``, pointwise
    ``SiLU(QK^T + rab)`` attention normalised by the fixed maximum length, ``f2(Norm(AV) * U)``,
    learned relative-position bias ``rab``.

  Causal attention and a fixed normaliser make the one-pass (teacher-forced) scores of a window
  equal to scoring each target alone on its own prefix (held equal in tests).

* :class:`SemanticIDRanker`: HMAT (Sec. 3.3) over one semantic-ID table, SFT only or PT then SFT
  (Sec. 3.4.1), through :mod:`hisam_core.ranker.train`. With ``attention_mask: causal`` and
  ``position_encoding: rope1d`` it is the flat Transformer over semantic IDs (the QARM/TIGER-like
  baseline, "+ Qwen2.5 block" of Table 3).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm import tqdm

from hisam_core.config import Config
from hisam_core.device import resolve_device
from hisam_core.evaluation.protocol import Window
from hisam_core.ranker.objectives import action_logits, positive_probability
from hisam_core.ranker.sequence import SequenceBuilder, UserHistory, instant_starts
from hisam_core.ranker.train import (
    CHECKPOINT_NAME,
    RankerConfig,
    TrainConfig,
    batch_indices,
    seed_everything,
    warmup_cosine,
)
from hisam_core.ranker.train import train as train_hmat
from hisam_core.semantic_ids import SemanticIds

logger = logging.getLogger(__name__)

#: Version of how :class:`IDRanker` trains and scores, which a kept result records (``--reuse`` runs
#: an ID ranker of another version again): 2 scores a target from the state before its instant.
ID_RANKER_VERSION = 2


class IDRankerConfig(Config):
    """Sparse-ID ranker; ``block`` picks SASRec-style or HSTU-style layers."""

    block: Literal["sasrec", "hstu"] = "sasrec"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    ffn_size: int = Field(256, ge=1, description="SASRec FFN width (HSTU has no FFN)")
    dropout: float = Field(0.1, ge=0, lt=1)
    past_actions: bool = Field(True, description="false: history tokens carry the item only, as HMAT's MA")


@dataclass
class IDBatch:
    """Right-padded windows as index tensors ``[B, n]`` (items 0 = pad) and profile ids ``[B, F]``."""

    items: torch.Tensor
    actions: torch.Tensor
    targets: torch.Tensor
    profile: torch.Tensor
    context: torch.Tensor  # [B, n]: the state each item is scored from, the one before its instant

    def to(self, device: torch.device) -> IDBatch:
        return IDBatch(
            *(getattr(self, f).to(device) for f in ("items", "actions", "targets", "profile", "context"))
        )


class SASRecBlock(nn.Module):
    """Pre-LayerNorm causal softmax self-attention and a GELU FFN."""

    def __init__(self, config: IDRankerConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.ffn_size),
            nn.GELU(),
            nn.Linear(config.ffn_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class HSTUBlock(nn.Module):
    """HSTU layer (Zhai et al. 2024, Eq. 1-3): pointwise SiLU attention with relative-position bias."""

    def __init__(self, config: IDRankerConfig, max_length: int) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.max_length = max_length
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.f1 = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.f2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.rab = nn.Parameter(torch.zeros(config.num_heads, max_length))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        u, v, q, k = F.silu(self.f1(self.norm1(x))).chunk(4, dim=-1)
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(0, self.max_length - 1)
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5 + self.rab[:, distance.to(x.device)]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        weights = F.silu(scores) * causal / self.max_length
        attn = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return x + self.dropout(self.f2(self.norm2(attn) * u))


class IDRankerModel(nn.Module):
    """Embeddings, blocks and the target-aware scoring head of :class:`IDRanker`."""

    def __init__(self, config: IDRankerConfig, num_items: int, profile_size: int, max_items: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.action = nn.Embedding(2, d)
        self.profile = nn.Embedding(profile_size + 1, d)  # + a start token
        length = max_items + 1
        self.position = nn.Embedding(length, d) if config.block == "sasrec" else None
        self.blocks = nn.ModuleList(
            SASRecBlock(config) if config.block == "sasrec" else HSTUBlock(config, length)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, batch: IDBatch) -> torch.Tensor:
        """Logits of ``P(positive)`` for every position ``[B, n]`` (use those at ``targets``)."""
        start = self.profile.weight[-1] + self.profile(batch.profile).sum(1)  # [B, d]
        tokens = self.item(batch.items)
        if self.config.past_actions:
            tokens = tokens + self.action(batch.actions)
        x = torch.cat([start[:, None], tokens], dim=1)
        if self.position is not None:
            x = x + self.position(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        states = self.norm(x)  # states[:, p]: after the start token and the items before p
        context = states.gather(1, batch.context[..., None].expand(-1, -1, states.shape[-1]))
        candidate = self.item(batch.items)
        return self.head(torch.cat([context, candidate, context * candidate], dim=-1)).squeeze(-1)


class IDRanker:
    """Sparse-ID baseline: :class:`IDRankerModel` trained by BCE on the targets of the windows."""

    def __init__(
        self,
        config: IDRankerConfig,
        train_config: TrainConfig,
        item_ids: np.ndarray,
        profile_fields: Mapping[str, int],
        max_items: int,
    ) -> None:
        self.config, self.train_config, self.max_items = config, train_config, max_items
        self.item_index = {int(item): k + 1 for k, item in enumerate(np.unique(item_ids))}
        self.profile_offsets: dict[str, int] = {}
        offset = 0
        for name, buckets in profile_fields.items():
            self.profile_offsets[name] = offset
            offset += buckets
        seed_everything(train_config.seed)
        self.device = resolve_device(train_config.device)
        self.model = IDRankerModel(config, len(self.item_index), offset, max_items).to(self.device)

    def batch(self, windows: Sequence[Window]) -> IDBatch:
        n = max(len(w) for w in windows)
        if n > self.max_items:
            raise ValueError(f"window of {n} items exceeds max_items={self.max_items}")
        items = np.zeros((len(windows), n), dtype=np.int64)
        actions = np.zeros((len(windows), n), dtype=np.int64)
        targets = np.zeros((len(windows), n), dtype=bool)
        profile = np.zeros((len(windows), len(self.profile_offsets)), dtype=np.int64)
        context = np.tile(np.arange(n, dtype=np.int64), (len(windows), 1))
        for row, w in enumerate(windows):
            try:
                items[row, : len(w)] = [self.item_index[int(i)] for i in w.item_ids]
            except KeyError as error:
                raise ValueError(f"user {w.user_id}: item {error} is not in the catalogue") from error
            actions[row, : len(w)] = w.labels
            targets[row, : len(w)] = w.targets
            profile[row] = [self.profile_offsets[f] + int(w.profile[f]) for f in self.profile_offsets]
            if w.timestamps is not None:
                context[row, : len(w)] = instant_starts(w.timestamps)
        return IDBatch(*(torch.from_numpy(a) for a in (items, actions, targets, profile, context)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fit(self, windows: Sequence[Window]) -> None:
        tc = self.train_config
        seed_everything(tc.seed)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        rest = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=tc.learning_rate,
            betas=tc.betas,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        )
        self.model.train()
        for step in tqdm(range(tc.max_steps), desc=self.config.block, disable=None):
            batch = self.batch(
                [windows[i] for i in batch_indices(step, tc.batch_size, len(windows), tc.seed)]
            ).to(self.device)
            logits = self.model(batch)[batch.targets]
            loss = F.binary_cross_entropy_with_logits(logits, batch.actions[batch.targets].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()

    @torch.no_grad()
    def score(self, windows: Sequence[Window], batch_size: int = 256) -> np.ndarray:
        """``P(positive)`` of every target, in :func:`~hisam_core.evaluation.protocol.target_arrays` order."""
        self.model.eval()
        out = []
        for start in range(0, len(windows), batch_size):
            batch = self.batch(windows[start : start + batch_size]).to(self.device)
            out.append(torch.sigmoid(self.model(batch)[batch.targets]))
        return torch.cat(out).cpu().numpy()


def to_histories(windows: Sequence[Window], semantic_ids: SemanticIds) -> list[UserHistory]:
    """HMAT inputs of the windows: semantic codes per item, labels as actions, targets and timestamps
    kept (items of one instant are not each other's history, as for the ID rankers)."""
    return [
        UserHistory(w.user_id, semantic_ids.lookup(w.item_ids), w.labels, w.profile, w.targets, w.timestamps)
        for w in windows
    ]


class SemanticIDRanker:
    """HMAT on one semantic-ID table; ``pretrain_steps > 0`` runs PT (causal next-token) first and
    initialises SFT from it (Sec. 3.4.1), else SFT only."""

    def __init__(self, config: RankerConfig, semantic_ids: SemanticIds, pretrain_steps: int = 0) -> None:
        SequenceBuilder(config.sequence).vocab.check_semantic_ids(semantic_ids)
        self.config, self.semantic_ids, self.pretrain_steps = config, semantic_ids, pretrain_steps
        self.model: torch.nn.Module | None = None

    def fit(self, windows: Sequence[Window]) -> None:
        histories = to_histories(windows, self.semantic_ids)
        with tempfile.TemporaryDirectory(prefix="hisam-eval-") as tmp:
            sft = self.config.train
            if self.pretrain_steps:
                pt = sft.model_copy(update={"objective": "pt", "max_steps": self.pretrain_steps})
                train_hmat(self.config.model_copy(update={"train": pt}), histories, Path(tmp) / "pt")
                sft = sft.model_copy(update={"init_from": str(Path(tmp) / "pt" / CHECKPOINT_NAME)})
            self.model = train_hmat(
                self.config.model_copy(update={"train": sft}), histories, Path(tmp) / "sft"
            )

    def num_parameters(self) -> int:
        if self.model is None:
            raise ValueError("fit the model first")
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def score(self, windows: Sequence[Window], batch_size: int = 128) -> np.ndarray:
        """``P(positive action)`` at every target Anchor, teacher-forced under the SFT mask, in
        :func:`~hisam_core.evaluation.protocol.target_arrays` order."""
        if self.model is None:
            raise ValueError("fit the model first")
        builder = SequenceBuilder(self.config.sequence)
        self.model.eval()
        histories = to_histories(windows, self.semantic_ids)
        device = next(self.model.parameters()).device  # where train_hmat put it (train.device)
        out = []
        for start in range(0, len(histories), batch_size):
            batch = builder.batch(histories[start : start + batch_size]).to(device)
            logits, _ = action_logits(self.model, batch, builder.vocab)
            out.append(positive_probability(logits, builder.vocab))
        return torch.cat(out).cpu().numpy()

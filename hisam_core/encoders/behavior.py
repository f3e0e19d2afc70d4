"""Behaviour modality encoder: a SASRec-style next-item model (App. B.2; Kang & McAuley, 2018).

The paper takes behavioural item embeddings from a SASRec-based encoder "trained on samples strictly
isolated by time from the downstream ranking data" (App. B.2). :class:`BehaviorEncoder` trains a small
causal Transformer over each user's chronological item sequence and exposes its learned item
embedding table as the behaviour modality.

Leakage: ``fit`` keeps only interactions with ``timestamp < cutoff`` (strictly before) and drops every
other row before any other processing, so events at or after the cut-off cannot influence the model,
the vocabulary or the cold-item mask.

Model (pre-LayerNorm variant of SASRec): item embedding (x sqrt(d)) + learned absolute position
embedding -> ``num_layers`` blocks of causal multi-head self-attention and a GELU MLP, each with a
residual -> final LayerNorm. The item table is shared with the output layer: the score of item j at a
step is ``<h_t, E_j>``. Loss: full softmax cross-entropy over the catalogue (``loss="ce"``, fine for
catalogues up to ~1e5 items) or binary cross-entropy against ``num_negatives`` uniformly sampled
negatives per step (``loss="bce"``, the original SASRec objective). Sequences are left-padded to
``max_len`` (index 0 = padding, never predicted); users longer than ``max_len`` are cut into windows so
every training transition is a target exactly once per epoch.

Cold items (no interaction before the cut-off, or only in a user's single-interaction history, so never
in a training window): their table rows only ever received "negative" gradient and carry no
information, so we return the mean of the warm items' rows instead, with ``present=False`` and reason
``"no interaction before cut-off"``. The mean is a fixed vector of the trained model, the centre of the
behaviour space: a cold item is equally (un)like every warm item rather than randomly like some.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from hisam_core.checkpoint import save_atomically
from hisam_core.config import Config
from hisam_core.device import resolve_device
from hisam_core.encoders.base import EncodedBatch
from hisam_core.features import integral

logger = logging.getLogger(__name__)

COLD_REASON = "no interaction before cut-off"
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")


class BehaviorEncoderConfig(Config):
    """Settings of :class:`BehaviorEncoder` (SASRec hyper-parameters and training)."""

    dim: int = Field(64, ge=2)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    max_len: int = Field(50, ge=2)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["ce", "bce"] = "ce"
    #: Negatives per step for ``loss="bce"`` (ignored for ``"ce"``).
    num_negatives: int = Field(1, ge=1)
    seed: int = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a boolean mask (True = may attend)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"behavior encoder: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
            for z in self.qkv(x).split(d, -1)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class SASRecBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class SASRec(nn.Module):
    """Causal self-attentive sequence model over item indices 1..num_items (0 = padding)."""

    def __init__(self, num_items: int, config: BehaviorEncoderConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(config.dim, config.num_heads, config.dropout) for _ in range(config.num_layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        nn.init.normal_(self.item_emb.weight, std=config.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] for left-padded index sequences [B, L] (L = max_len); pads -> 0."""
        t = seq.shape[1]
        valid = seq != 0
        pos = torch.arange(t, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.config.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid.unsqueeze(-1)
        causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=seq.device)
        # attend to real earlier-or-same steps only; a pad attends to itself so no row is all-masked
        mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * valid.unsqueeze(-1)
        return self.ln_f(x) * valid.unsqueeze(-1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over all items [.., num_items + 1]; the padding column is -inf."""
        scores = hidden @ self.item_emb.weight.T
        scores[..., 0] = float("-inf")
        return scores


def windows(seq: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Cut a chronological sequence into windows of at most ``max_len + 1`` items, newest first,
    overlapping by one item so every transition (s[i] -> s[i+1]) appears in exactly one window."""
    out, end = [], len(seq)
    while end >= 2:
        start = max(0, end - max_len - 1)
        out.append(seq[start:end])
        if start == 0:
            break
        end = start + 1
    return out


def left_pad(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Stack index sequences, keeping the last ``length`` entries of each, zero-padded on the left."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-length:]
        if len(s):
            out[i, length - len(s) :] = torch.from_numpy(s)
    return out


class BehaviorEncoder:
    """SASRec trained on interactions strictly before a cut-off; its item table is the behaviour
    modality (App. B.2). Build with ``BehaviorEncoder(config).fit(interactions, cutoff, item_ids)``."""

    def __init__(self, config: BehaviorEncoderConfig | None = None, device: str | torch.device | None = None):
        self.config = config or BehaviorEncoderConfig()
        self.device = resolve_device(device)
        self.model: SASRec | None = None
        self.item_ids: np.ndarray | None = None
        self.warm: np.ndarray | None = None
        self.cutoff: Any = None
        self.history: list[float] = []

    @property
    def dim(self) -> int:
        return self.config.dim

    # ----------------------------------------------------------------------------------- training
    def _index(self) -> pd.Series:
        assert self.item_ids is not None
        return pd.Series(np.arange(1, len(self.item_ids) + 1), index=self.item_ids)

    def training_sequences(self, interactions: pd.DataFrame, cutoff: Any) -> list[np.ndarray]:
        """Per-user chronological index sequences from rows with ``timestamp < cutoff`` only.

        Ties in timestamp are broken by item id so the order never depends on row order.
        """
        missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
        if missing:
            raise ValueError(f"behavior encoder: interactions lack column(s) {missing}")
        times = interactions["timestamp"]
        numeric = pd.api.types.is_numeric_dtype(times) and not pd.api.types.is_bool_dtype(times)
        if not (numeric or pd.api.types.is_datetime64_any_dtype(times)) or isinstance(cutoff, str | bytes):
            raise ValueError(  # text compares letter by letter: "1000" < "500" would leak the future
                f"behavior encoder: timestamp and cut-off must be numbers or datetimes, got "
                f"{times.dtype} and {type(cutoff).__name__}"
            )
        train = interactions.loc[times < cutoff, list(REQUIRED_COLUMNS)]
        if train.empty:
            raise ValueError(f"behavior encoder: no interactions before the cut-off {cutoff!r}")
        index = self._index()
        unknown = ~train["item_id"].isin(index.index)
        if unknown.any():
            raise ValueError(
                f"behavior encoder: {int(unknown.sum())} interactions before the cut-off have item_ids "
                f"outside the catalogue, e.g. {train.loc[unknown, 'item_id'].unique()[:5].tolist()}"
            )
        train = train.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        idx = index.loc[train["item_id"].to_numpy()].to_numpy()
        users = train["user_id"].to_numpy()
        bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
        return np.split(idx, bounds)

    def fit(
        self,
        interactions: pd.DataFrame,
        cutoff: Any,
        item_ids: Sequence[int] | np.ndarray,
        progress: bool = True,
    ) -> BehaviorEncoder:
        """Train on ``interactions`` (columns user_id, item_id, timestamp) with ``timestamp < cutoff``.

        ``item_ids`` is the catalogue whose embeddings are wanted (row order of the output). Every
        training interaction's item must be in it; items of rows at/after the cut-off are ignored.
        """
        cfg = self.config
        item_ids = integral(item_ids, "behavior encoder: item_ids")
        if item_ids.ndim != 1 or len(item_ids) == 0:
            raise ValueError("behavior encoder: item_ids must be a non-empty 1-D catalogue")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("behavior encoder: item_ids must be unique")
        self.model, self.warm = None, None  # a failed fit leaves the encoder unfitted, never stale
        self.item_ids, self.cutoff = item_ids, cutoff
        seqs = self.training_sequences(interactions, cutoff)
        wins = [w for s in seqs for w in windows(s, cfg.max_len)]
        if not wins:
            raise ValueError("behavior encoder: no user has two interactions before the cut-off")
        inputs = left_pad([w[:-1] for w in wins], cfg.max_len)
        targets = left_pad([w[1:] for w in wins], cfg.max_len)
        warm = np.zeros(len(item_ids) + 1, dtype=bool)
        warm[np.concatenate(wins)] = True
        logger.info(
            "behavior encoder: %d users, %d windows, %d transitions before cut-off %r; %d/%d items warm",
            len(seqs),
            len(wins),
            int((targets > 0).sum()),
            cutoff,
            int(warm[1:].sum()),
            len(item_ids),
        )
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            model = SASRec(len(item_ids), cfg).to(self.device)
            self._train(model, inputs, targets, progress)
        self.model, self.warm = model.eval(), warm[1:]  # only once training succeeded
        return self

    def _train(self, model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, progress: bool) -> None:
        cfg = self.config
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        num_items = model.item_emb.num_embeddings - 1
        model.train()
        self.history = []
        bar = tqdm(range(cfg.epochs), desc="SASRec", unit="epoch", disable=not progress)
        for _ in bar:
            perm = torch.randperm(len(inputs), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(perm), cfg.batch_size):
                batch = perm[start : start + cfg.batch_size]
                seq, tgt = inputs[batch].to(self.device), targets[batch].to(self.device)
                hidden = model(seq)
                valid = tgt > 0
                if cfg.loss == "ce":
                    loss = F.cross_entropy(model.logits(hidden[valid]), tgt[valid])
                else:
                    h, pos = hidden[valid], tgt[valid]
                    neg = torch.randint(1, num_items + 1, (len(pos), cfg.num_negatives), generator=gen)
                    neg = neg.to(self.device)
                    neg = torch.where(neg == pos[:, None], neg % num_items + 1, neg)  # never the positive
                    pos_logit = (h * model.item_emb(pos)).sum(-1)
                    neg_logit = torch.einsum("nd,nkd->nk", h, model.item_emb(neg))
                    loss = F.binary_cross_entropy_with_logits(
                        pos_logit, torch.ones_like(pos_logit)
                    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(valid.sum())
                total, count = total + loss.item() * n, count + n
            self.history.append(total / count)
            if not math.isfinite(self.history[-1]):
                raise ValueError(
                    f"behavior encoder training diverged in epoch {len(self.history) - 1}: non-finite "
                    "loss; lower lr"
                )
            bar.set_postfix(loss=f"{self.history[-1]:.4f}")
        logger.info("behavior encoder: final training loss %.4f", self.history[-1])

    # ---------------------------------------------------------------------------------- inference
    def _require_fitted(self) -> SASRec:
        if self.model is None or self.item_ids is None or self.warm is None:
            raise ValueError("behavior encoder: not fitted; call fit() or load() first")
        return self.model

    def encode(self, item_ids: Sequence[int] | np.ndarray | None = None) -> EncodedBatch:
        """Trained item-table rows for ``item_ids`` (default: the whole catalogue, in its order).

        Cold items get the mean of the warm rows, ``present=False``; an id outside the catalogue
        raises a ValueError naming it.
        """
        model = self._require_fitted()
        assert self.item_ids is not None and self.warm is not None
        ids = self.item_ids if item_ids is None else integral(item_ids, "behavior encoder: item_ids")
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("behavior encoder: empty input, expected at least one item_id")
        index = self._index()
        unknown = ~np.isin(ids, self.item_ids)
        if unknown.any():
            raise ValueError(f"behavior encoder: item_ids not in the catalogue: {ids[unknown][:5].tolist()}")
        rows = index.loc[ids].to_numpy() - 1
        table = model.item_emb.weight.detach()[1:].float().cpu().numpy()
        fallback = table[self.warm].mean(axis=0)
        warm = self.warm[rows]
        out = np.where(warm[:, None], table[rows], fallback[None, :])
        return EncodedBatch(out, warm, tuple("" if w else COLD_REASON for w in warm))

    @torch.inference_mode()
    def next_item_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Next-item scores [len(histories), catalogue] (catalogue order) after each item-id history
        (oldest first; the last ``max_len`` items are used)."""
        model = self._require_fitted()
        if len(histories) == 0:
            raise ValueError("behavior encoder: empty input, expected at least one history")
        index = self._index()
        seqs = []
        for h in histories:
            h = integral(h, "behavior encoder: history item_ids")
            if len(h) == 0:
                raise ValueError("behavior encoder: a history is empty")
            bad = ~np.isin(h, self.item_ids)
            if bad.any():
                raise ValueError(
                    f"behavior encoder: history item_ids not in the catalogue: {h[bad][:5].tolist()}"
                )
            seqs.append(index.loc[h].to_numpy())
        seq = left_pad(seqs, self.config.max_len).to(self.device)
        return model.logits(model(seq)[:, -1])[:, 1:].float().cpu().numpy()

    # ---------------------------------------------------------------------------------- checkpoint
    def save(self, path: str | Path) -> None:
        """Checkpoint ``{"config", "state_dict", "item_ids", "warm", "cutoff"}`` (weights_only-loadable,
        written atomically); the cut-off is kept as its string."""
        model = self._require_fitted()
        payload = {
            "config": self.config.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "item_ids": torch.from_numpy(self.item_ids),
            "warm": torch.from_numpy(self.warm),
            "cutoff": str(self.cutoff),
        }
        save_atomically(payload, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> BehaviorEncoder:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        enc = cls(BehaviorEncoderConfig.from_dict(ckpt["config"]), device=device)
        enc.item_ids = ckpt["item_ids"].numpy()
        enc.warm = ckpt["warm"].numpy()
        enc.cutoff = ckpt["cutoff"]
        with torch.random.fork_rng(devices=[]):  # the random init is replaced: leave the RNG as it was
            enc.model = SASRec(len(enc.item_ids), enc.config).to(enc.device)
        enc.model.load_state_dict(ckpt["state_dict"])
        enc.model.eval()
        return enc

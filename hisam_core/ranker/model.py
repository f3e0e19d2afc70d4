"""The Hierarchical Memory-Anchor Transformer, HMAT (Sec. 3.3, Eq. 3-4; sizes from B.2).

A decoder-only stack of pre-RMSNorm blocks (GQA MA-Attn with H-RoPE, then a SwiGLU FFN) over the
unified token stream. The output head is the (tied) token embedding: full-vocabulary logits serve
next-token pre-training, and the logits of the action tokens at an Anchor give the SFT classifier
``P(action | context)``, the ranking score being the probability of the positive action.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from hisam_core.config import Config
from hisam_core.ranker.attention import (
    AttentionMask,
    HistoryMemory,
    KVPair,
    MaskMode,
    MemoryAnchorAttention,
    TokenLayout,
    block_mask,
    dense_mask,
    memory_token_types,
)
from hisam_core.ranker.hrope import HierarchicalRotaryEmbedding, PositionEncoding
from hisam_core.ranker.sequence import TokenBatch


class HMATConfig(Config):
    """Decoder hyper-parameters; defaults are Hi-SAM-Small (B.2). Large: ``num_layers = 12``."""

    hidden_size: int = Field(512, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    ffn_size: int = Field(2560, ge=1)
    norm_eps: float = 1e-6
    position_encoding: PositionEncoding = "hrope"
    inter_base: float = Field(10000.0, gt=1)
    intra_base: float = Field(100.0, gt=1)
    inter_fraction: float = Field(0.5, ge=0, le=1, description="share of rotary pairs driven by i")
    max_positions: int = Field(512, ge=1, description="table size of the 'absolute' ablation")
    attention_mask: MaskMode = Field("memory_anchor", description="SFT/serving mask; 'causal' = w/o MA-Attn")
    history_memory: HistoryMemory = "anchor"
    attention_backend: Literal["auto", "sdpa", "flex"] = Field(
        "auto",
        description="sdpa: dense boolean mask into SDPA; flex: FlexAttention BlockMask (compiled on CUDA); "
        "auto: sdpa on every device, the faster of the two on an H100 and an H200 "
        "(benchmarks/results/serving_findings.md)",
    )
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> HMATConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        return self


class HMATOutput(NamedTuple):
    hidden: torch.Tensor  # [B, L, hidden], after the final norm
    kv: list[KVPair]  # per layer, this call's rotated keys and values [B, Hkv, L, head_dim]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class HMATBlock(nn.Module):
    """``h = x + MA-Attn(RMSNorm(x))``, ``out = h + SwiGLU(RMSNorm(h))`` (Eq. 3-4)."""

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MemoryAnchorAttention(config.hidden_size, config.num_heads, config.num_kv_heads)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn = SwiGLU(config.hidden_size, config.ffn_size)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        past: KVPair | None,
    ) -> tuple[torch.Tensor, KVPair]:
        attn, kv = self.attn(self.attn_norm(x), rotary, mask, past)
        h = x + attn
        return h + self.ffn(self.ffn_norm(h)), kv


class HMAT(nn.Module):
    """HMAT decoder over token ids; the vocabulary size comes from :class:`Vocabulary`."""

    def __init__(self, config: HMATConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, config.hidden_size)
        self.position_embedding = (
            nn.Embedding(config.max_positions, config.hidden_size)
            if config.position_encoding == "absolute"
            else None
        )
        self.rotary = (
            None
            if config.position_encoding == "absolute"
            else HierarchicalRotaryEmbedding(
                config.hidden_size // config.num_heads,
                config.inter_base,
                config.intra_base,
                config.inter_fraction,
                config.position_encoding,
            )
        )
        self.layers = nn.ModuleList(HMATBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def memory_types(self, mode: MaskMode) -> tuple[int, ...] | None:
        return memory_token_types(mode, self.config.history_memory)

    def mask(self, batch: TokenBatch, mode: MaskMode) -> AttentionMask:
        """Self-attention mask of ``batch``: a FlexAttention ``BlockMask`` for the flex backend, else the
        dense boolean mask (``auto``: under bf16 on an H100, SDPA's memory-efficient kernel with this
        mask ran Hi-SAM-Small 2-4x faster than compiled FlexAttention, whose MA mask leaves few
        128-token blocks to skip since anchors lie in every block)."""
        layout = TokenLayout.of(batch)
        if self.config.attention_backend == "flex":
            return block_mask(layout, self.memory_types(mode), batch.tokens.device)
        return dense_mask(layout, layout, self.memory_types(mode))

    def forward(self, batch: TokenBatch, mask: AttentionMask, past: list[KVPair] | None = None) -> HMATOutput:
        """Encode ``batch``; with ``past`` (per layer cached keys/values, rotated) the batch attends to
        them first, as ``mask`` ([B, 1, L, M + L]) allows."""
        tokens = batch.tokens
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        x = self.embed(tokens)
        rotary = None
        if self.position_embedding is not None:
            if int(batch.position.max()) >= self.config.max_positions:
                raise ValueError(
                    f"flat position {int(batch.position.max())} exceeds max_positions={self.config.max_positions}"
                )
            x = x + self.position_embedding(batch.position)
        else:
            # H-RoPE's inter-item coordinate is the item's instant (its first item's index): items of one
            # instant are a set, each placed right after the history it sees, as a served candidate is
            rotary = self.rotary(batch.instant, batch.intra_index, batch.position)
        kv = []
        for layer, layer_past in zip(self.layers, past or [None] * len(self.layers), strict=True):
            x, layer_kv = layer(x, rotary, mask, layer_past)
            kv.append(layer_kv)
        return HMATOutput(self.norm(x), kv)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the whole vocabulary (tied output head)."""
        return hidden @ self.embed.weight.T

    def action_logits(self, hidden: torch.Tensor, action_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the action tokens only, ``[..., num_actions]`` (the SFT classifier head)."""
        return hidden @ self.embed.weight[action_ids.to(hidden.device)].T

"""Memory-Anchor Attention, MA-Attn (Sec. 3.3.2, Eq. 9-10), with GQA.

A query may see a key iff ``causal(p_k <= p_q)`` and ``valid_k`` and one of: the key is a profile
token (global user context), the key is in the query's item (intra-item aggregation), or the key is
an Anchor (compressed history). Causality uses the *logical* flat position ``p``, not the physical
index, so the same predicate serves full streams, cache-evicted histories and realigned candidate
blocks (one candidate per batch row: candidates share an item index, so in one row they would see
each other). Every query also sees itself, so fully padded rows stay finite (their outputs are unused).
Within its item a query sees only the tokens up to itself: the paper's "full visibility" within the
current item comes with a causality condition the text lost ("causality (...) is implicitly
enforced"), and read as bidirectional it would show the Anchor its own Action, the label.

``history_memory="anchor_action"`` is an option beyond the paper that also lets later items see
past Action tokens (under Eq. 10 the action of a past item never reaches a later item, because the
Anchor precedes its Action). ``mode="causal"`` is the causal mask (pre-training, ablation).
Under every mask, items of one instant (a user who rated several films in one second) are not
each other's history: no token sees another item of its instant, so a target is scored from what
happened before its instant, as an ID ranker's state is (neither the label nor the item of an
event logged in the same second; the order among them is arbitrary).

Two implementations of the same predicate: a dense boolean mask for
``F.scaled_dot_product_attention`` (the reference, and the default backend: faster on an H100, see
``benchmarks/results/serving_findings.md``) and a FlexAttention ``BlockMask`` whose ``mask_mod`` calls
:func:`visible` itself (compiled on CUDA). The FlexAttention path pads the stream to a whole number
of its 128-token blocks, so that only a few shapes compile: past torch's recompile limit (8 per
process) FlexAttention falls back, with a warning, to an unfused kernel that materialises every score.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hisam_core.ranker.hrope import apply_rotary
from hisam_core.ranker.sequence import TokenBatch, TokenType

MaskMode = Literal["memory_anchor", "causal"]
HistoryMemory = Literal["anchor", "anchor_action"]
AttentionMask = torch.Tensor | BlockMask
KVPair = tuple[torch.Tensor, torch.Tensor]

#: FlexAttention's block size, passed to create_block_mask; its streams are padded to a multiple of it.
FLEX_BLOCK_SIZE = 128

#: Version of the rule for items of one instant (what :func:`visible` shows, and where H-RoPE places
#: them), recorded in every ranker checkpoint: 1 Eq. 10 as the paper writes it, 2 also hiding an
#: Action from the other items of its instant, 3 hiding those items wholly, 4 also giving them one
#: inter-item coordinate (:mod:`~hisam_core.ranker.hrope`). Weights trained under another rule load
#: and run, but learned another visibility or geometry.
MASK_RULE = 4


def memory_token_types(mode: MaskMode, history_memory: HistoryMemory = "anchor") -> tuple[int, ...] | None:
    """Token types a *later* item may attend to (None: every type, the causal mask). These are
    exactly the keys the anchor cache keeps (Sec. 3.4.2)."""
    if mode == "causal":
        return None
    types = [TokenType.PROFILE, TokenType.ANCHOR]
    if history_memory == "anchor_action":
        types.append(TokenType.ACTION)
    # plain ints: FlexAttention's traced mask_mod mis-compares tensors with IntEnum members
    return tuple(int(t) for t in types)


def visible(
    q_pos: torch.Tensor,
    q_item: torch.Tensor,
    q_instant: torch.Tensor,
    kv_pos: torch.Tensor,
    kv_item: torch.Tensor,
    kv_instant: torch.Tensor,
    kv_type: torch.Tensor,
    kv_valid: torch.Tensor,
    memory_types: tuple[int, ...] | None,
) -> torch.Tensor:
    """The MA-Attn predicate (Eq. 10), elementwise over broadcastable tensors; another item is seen
    only from a later instant (events of one instant are not each other's history: no token of
    one reaches another, as no ID ranker's state holds them)."""
    allowed = (kv_pos <= q_pos) & kv_valid
    if memory_types is not None:
        reachable = kv_item == q_item
        for token_type in memory_types:
            reachable = reachable | (kv_type == token_type)
        allowed = allowed & reachable
    same_instant = (kv_item != q_item) & (kv_instant >= q_instant)
    return (allowed & ~same_instant) | (kv_pos == q_pos)


@dataclass(frozen=True)
class TokenLayout:
    """What the mask reads about each token; every field ``[B, L]``."""

    position: torch.Tensor
    item_index: torch.Tensor
    token_type: torch.Tensor
    valid: torch.Tensor
    instant: torch.Tensor

    @classmethod
    def of(cls, batch: TokenBatch) -> TokenLayout:
        return cls(batch.position, batch.item_index, batch.token_type, batch.valid, batch.instant)

    def expand(self, batch_size: int) -> TokenLayout:
        return TokenLayout(*(t.expand(batch_size, -1) for t in vars(self).values()))

    def pad_to(self, length: int) -> TokenLayout:
        """Right-pad to ``length`` with invalid tokens whose positions continue past every real one,
        so no real query sees them; a pad (item and instant -1) sees only itself, and its output is
        dropped."""
        batch, current = self.position.shape
        extra = length - current
        if extra <= 0:
            return self
        start = self.position.amax(dim=1, keepdim=True) + 1 if current else self.position.new_zeros(batch, 1)
        steps = torch.arange(extra, device=self.position.device)
        return self.cat(
            TokenLayout(
                start + steps,
                self.item_index.new_full((batch, extra), -1),
                self.token_type.new_full((batch, extra), int(TokenType.PAD)),
                self.valid.new_zeros(batch, extra),
                self.instant.new_full((batch, extra), -1),
            )
        )

    def cat(self, other: TokenLayout) -> TokenLayout:
        """Keys of ``self`` followed by those of ``other`` (e.g. cache then new tokens)."""
        return TokenLayout(
            *(
                torch.cat([a, b], dim=1)
                for a, b in zip(vars(self).values(), vars(other).values(), strict=True)
            )
        )


def dense_mask(query: TokenLayout, key: TokenLayout, memory_types: tuple[int, ...] | None) -> torch.Tensor:
    """Boolean ``[B, 1, Lq, Lkv]`` mask (True = attend) for ``F.scaled_dot_product_attention``."""
    allowed = visible(
        query.position[:, :, None],
        query.item_index[:, :, None],
        query.instant[:, :, None],
        key.position[:, None, :],
        key.item_index[:, None, :],
        key.instant[:, None, :],
        key.token_type[:, None, :],
        key.valid[:, None, :],
        memory_types,
    )
    return allowed.unsqueeze(1)


def mask_mod_for(layout: TokenLayout, memory_types: tuple[int, ...] | None) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of self-attention over ``layout``."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(
            layout.position[b, q_idx],
            layout.item_index[b, q_idx],
            layout.instant[b, q_idx],
            layout.position[b, kv_idx],
            layout.item_index[b, kv_idx],
            layout.instant[b, kv_idx],
            layout.token_type[b, kv_idx],
            layout.valid[b, kv_idx],
            memory_types,
        )

    return mask_mod


def block_mask(layout: TokenLayout, memory_types: tuple[int, ...] | None, device: torch.device) -> BlockMask:
    """FlexAttention ``BlockMask`` of self-attention over ``layout`` on ``device``, its length padded
    to a multiple of :data:`FLEX_BLOCK_SIZE` (see :func:`flex_attend`)."""
    batch, length = layout.position.shape
    padded = -(-length // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE
    layout = TokenLayout(*(t.to(device) for t in vars(layout.pad_to(padded)).values()))
    mask_mod = mask_mod_for(layout, memory_types)
    return create_block_mask(mask_mod, batch, None, padded, padded, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """FlexAttention of ``q [B, H, Lq, d]`` over ``k, v [B, Hkv, Lkv, d]`` (GQA), zero-padded to the
    block mask's lengths and cut back to ``Lq``; compiled on CUDA, eager (unfused, and without a
    backward pass on the CPU) elsewhere."""
    query_length, key_length = mask.shape[-2:]
    length = q.shape[2]
    q = F.pad(q, (0, 0, 0, query_length - length))
    k, v = (F.pad(t, (0, 0, 0, key_length - t.shape[2])) for t in (k, v))
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=mask, enable_gqa=True)[:, :, :length]


class MemoryAnchorAttention(nn.Module):
    """Grouped-query self-attention with H-RoPE and the MA mask (Eq. 3, 9)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"hidden_size {hidden_size}, heads {num_heads}, kv heads {num_kv_heads} must divide evenly"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        past: KVPair | None = None,
    ) -> tuple[torch.Tensor, KVPair]:
        """Attend from ``x [B, L, hidden]`` to ``past`` keys (already rotated, ``[1 or B, Hkv, M, d]``)
        followed by ``x``'s own. Returns the output and this call's rotated keys and values."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        keys, values = k, v
        if past is not None and isinstance(mask, BlockMask):
            # the block mask indexes this call's tokens only: cached keys would shift or be cropped
            raise ValueError("a FlexAttention block mask cannot cover cached keys: pass a dense mask")
        if past is not None:
            keys = torch.cat([past[0].expand(batch, -1, -1, -1), k], dim=2)
            values = torch.cat([past[1].expand(batch, -1, -1, -1), v], dim=2)
        if isinstance(mask, BlockMask):
            out = flex_attend(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)

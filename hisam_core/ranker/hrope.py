"""Hierarchical Rotary Position Embedding, H-RoPE (Sec. 3.3.1, Eq. 6-8; derivation in A.3).

Each head's ``head_dim / 2`` rotation pairs (adjacent dims ``(2m, 2m + 1)``, i.e. one complex
number each) are split into two bands: the first ``round(inter_fraction * head_dim / 2)`` pairs
rotate by the inter-item coordinate ``i`` with base 10000, the rest by the intra-item coordinate
``j`` with base 100 (B.2). Within a band of ``n_b`` pairs the frequencies are the standard RoPE ones,
``base ** (-m / n_b)``, so a single band is exactly standard RoPE. Every pair lies inside one band,
hence ``<R(i,j) q, R(i',j') k>`` depends on ``(i - i', j - j')`` only (Eq. 18).

HMAT's ``i`` is the index of the first item of an item's instant (its own index unless the user
logged several items in one second): items of one instant, which do not see each other, share
one coordinate, so under H-RoPE their order (arbitrary) reaches no SFT score or served score, and
each sits right after the history it sees, as a served candidate does. (The 1D-RoPE and absolute
ablations read the flat position, which counts the hidden items; PT predicts the next instant's
first token from whichever item of the instant comes last.)

Ablations (Table 4): ``rope1d`` rotates all pairs by the flat stream position ``p`` (base 10000);
``absolute`` adds a learned embedding of ``p`` to the input instead of rotating.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Self

import torch
from torch import nn

PositionEncoding = Literal["hrope", "rope1d", "absolute"]


def rope_frequencies(num_pairs: int, base: float) -> torch.Tensor:
    """Standard RoPE angular frequencies ``base ** (-m / num_pairs)`` for ``m < num_pairs``."""
    return base ** (-torch.arange(num_pairs, dtype=torch.float64) / max(num_pairs, 1))


class HierarchicalRotaryEmbedding(nn.Module):
    """Cos/sin tables from coordinates, and the rotation of queries and keys (Eq. 6)."""

    def __init__(
        self,
        head_dim: int,
        inter_base: float = 10000.0,
        intra_base: float = 100.0,
        inter_fraction: float = 0.5,
        mode: Literal["hrope", "rope1d"] = "hrope",
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        pairs = head_dim // 2
        self.mode = mode
        self.num_inter = pairs if mode == "rope1d" else round(inter_fraction * pairs)
        inv_freq = torch.cat(
            [
                rope_frequencies(self.num_inter, inter_base),
                rope_frequencies(pairs - self.num_inter, intra_base),
            ]
        )
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """Move ``inv_freq`` with the module but keep it fp32: ``model.to(torch.bfloat16)`` would round
        the frequencies, turning angles by up to 0.016 rad at item index 37."""
        frequencies = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = frequencies.to(self.inv_freq.device)
        return self

    def angles(self, inter: torch.Tensor, intra_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Rotation angle of every pair, ``[..., head_dim / 2]``: ``i * f`` on the inter band and
        ``j * f`` on the intra band (H-RoPE; ``inter`` is ``i``, HMAT's instant), or ``p * f`` on all
        pairs (1D-RoPE)."""
        if self.mode == "rope1d":
            return position.unsqueeze(-1).float() * self.inv_freq
        return torch.cat(
            [
                inter.unsqueeze(-1).float() * self.inv_freq[: self.num_inter],
                intra_index.unsqueeze(-1).float() * self.inv_freq[self.num_inter :],
            ],
            dim=-1,
        )

    def forward(
        self, inter: torch.Tensor, intra_index: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[B, 1, L, head_dim / 2]``, ready to broadcast over heads."""
        theta = self.angles(inter, intra_index, position).unsqueeze(1)
        return theta.cos(), theta.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair ``(x_2m, x_2m+1)`` of ``x [B, H, L, D]`` by its angle (Eq. 6)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)

"""Parallel Semantically-Guided Recovery (PSGR, Sec. 3.2.2).

The residual left by the shared codebooks is unfolded into ``N_h`` subspaces by multi-head
projections, ``h_k = W_k r`` (which residual: see ``DSTConfig.psgr_residual``). Each modality's aligned feature probes them, ``alpha_m = softmax_k
<W_q^m a_m, h_k> / sqrt(d)``, and the recovered feature ``z_m = sum_k alpha_{m,k} h_k`` is quantised in
that modality's own codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hisam_core.tokenizer.quantize import VectorQuantizer


@dataclass
class Recovered:
    """PSGR output for one modality."""

    recovered: torch.Tensor  # z_m [B, d], continuous
    quantized: torch.Tensor  # q_m [B, d], codeword value with the estimator's gradient
    codes: torch.Tensor  # int64 [B]
    loss: torch.Tensor  # Eq. 16 for this modality
    commitment: torch.Tensor  # ||z_m - e||^2, detached (Quantized.commitment)
    attention: torch.Tensor  # alpha_m [B, N_h]


class PSGR(nn.Module):
    """Multi-head unfolding of the shared residual, per-modality probes and codebooks."""

    def __init__(
        self,
        modalities: list[str],
        dim: int,
        num_heads: int,
        codebook_size: int,
        beta: float,
        rotation_trick: bool,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.unfold = nn.Linear(dim, num_heads * dim, bias=False)  # linear in r: no constant offset
        with torch.no_grad():  # every W_k starts near the identity, so z_m starts as the residual itself
            self.unfold.weight.mul_(0.1).add_(torch.eye(dim).repeat(num_heads, 1))
        self.probes = nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities})
        self.codebooks = nn.ModuleDict(
            {m: VectorQuantizer(codebook_size, dim, beta, rotation_trick) for m in modalities}
        )

    def forward(
        self,
        residuals: dict[str, torch.Tensor],
        aligned: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Recovered]:
        """``residuals[m]``: what PSGR unfolds for modality ``m``; ``aligned[m]``: its probe ``a_m``;
        ``present[m]``: the rows modality ``m``'s codebook learns from (default: all)."""
        out = {}
        for name, probe in self.probes.items():
            subspaces = self.unfold(residuals[name]).view(-1, self.num_heads, self.dim)  # h_k [B, N_h, d]
            query = probe(aligned[name])  # [B, d]
            scores = torch.einsum("bd,bkd->bk", query, subspaces) / math.sqrt(self.dim)
            attention = scores.softmax(-1)
            recovered = torch.einsum("bk,bkd->bd", attention, subspaces)
            q = self.codebooks[name](recovered, None if present is None else present[name])
            out[name] = Recovered(recovered, q.quantized, q.codes, q.loss, q.commitment, attention)
        return out

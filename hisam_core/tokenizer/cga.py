"""Cross-Modal Geometric Alignment (CGA, Sec. 3.2.1).

Each modality is projected to a common ``d``-dimensional space and normalised onto the unit
hypersphere. Alignment follows GRAM (Cicchetti et al., 2025): the volume of the parallelotope spanned
by an item's modality vectors, ``sqrt(det(A A^T))``, is small when they point the same way; Eq. 1 is a
symmetric contrastive loss over volumes with one modality as the anchor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Added to ``det`` before the square root: keeps d vol / d det <= 1 / (2 sqrt(eps)) when modalities
#: coincide (det = 0), and is subtracted back so identical vectors still give volume 0.
VOLUME_EPS = 1e-8


def determinant(matrix: torch.Tensor) -> torch.Tensor:
    """``det`` of ``[..., M, M]``: closed form (cofactor expansion) for M <= 3, LU otherwise.

    The closed form is a polynomial, so its gradient exists everywhere, singular matrices included,
    and it is much faster than batched LU for the ``B^2`` small matrices of Eq. 1.
    """
    size = matrix.shape[-1]
    if size > 3:
        return torch.linalg.det(matrix)
    m = [row.unbind(-1) for row in matrix.unbind(-2)]  # unbind, not indexing: cheap backward
    if size == 1:
        return m[0][0]
    if size == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def volume_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """``sqrt(det(G))`` of Gram matrices ``[..., M, M]``, in fp32 with finite gradients at det = 0."""
    det = determinant(gram.float()).clamp_min(0.0)
    return (det + VOLUME_EPS).sqrt() - math.sqrt(VOLUME_EPS)


def gram_volume(vectors: torch.Tensor) -> torch.Tensor:
    """Volume spanned by ``M`` vectors per row, ``vectors [B, M, d] -> [B]`` (Sec. 3.2.1)."""
    vectors = vectors.float()
    return volume_from_gram(vectors @ vectors.transpose(-1, -2))


def pairwise_volumes(anchor: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``vol(anchor_i, others_j)`` for every pair, ``anchor [B, d]``, ``others [B, M-1, d] -> [B, B]``.

    The Gram matrices are assembled from dot products rather than stacking ``B^2`` vector sets.
    """
    anchor, others = anchor.float(), others.float()
    batch = others.shape[0]
    anchor_anchor = (anchor * anchor).sum(-1)  # [B]
    anchor_others = torch.einsum("id,jkd->ijk", anchor, others)  # [B, B, M-1]
    others_others = others @ others.transpose(-1, -2)  # [B, M-1, M-1]
    first_row = torch.cat([anchor_anchor[:, None, None].expand(batch, batch, 1), anchor_others], dim=-1)
    rest = torch.cat([anchor_others[..., None], others_others[None].expand(batch, -1, -1, -1)], dim=-1)
    gram = torch.cat([first_row[:, :, None], rest], dim=-2)  # [B, B, M, M]
    return volume_from_gram(gram)


class Standardize(nn.Module):
    """Per-dimension ``(x - mean) / std`` with statistics fitted on the training catalogue (buffers)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Statistics of the ``rows`` of ``x`` (bool ``[N]``: the real rows, not the fallback ones; all
        rows when fewer than two are real). A dimension that does not vary is centred and left unscaled
        (as scikit-learn's ``StandardScaler``): dividing by its ~0 spread would blow any later change up
        a millionfold."""
        if rows is not None and int(rows.sum()) >= 2:
            x = x[rows]
        mean, std = x.mean(0), x.std(0, unbiased=False)
        flat = std <= 1e-6 * mean.abs().clamp_min(1.0)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(flat, torch.ones_like(std), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ProjectionHead(nn.Module):
    """Projection head of one modality onto the unit hypersphere, ``a_m = f_m(x_m) / ||f_m(x_m)||``.

    Inputs are standardised first, so encoders of any scale can be mixed.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.standardize = Standardize(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(self.standardize(x)), dim=-1)


class CGA(nn.Module):
    """Per-modality projection heads plus the GRAM volume contrastive loss (Eq. 1)."""

    def __init__(
        self,
        modality_dims: dict[str, int],
        dim: int,
        hidden_dim: int,
        anchor: str,
        temperature_init: float,
        temperature_range: tuple[float, float],
    ) -> None:
        super().__init__()
        if anchor not in modality_dims:
            raise ValueError(f"anchor modality {anchor!r} is not one of {list(modality_dims)}")
        self.anchor = anchor
        self.heads = nn.ModuleDict(
            {name: ProjectionHead(in_dim, hidden_dim, dim) for name, in_dim in modality_dims.items()}
        )
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.log_temperature_range = (math.log(temperature_range[0]), math.log(temperature_range[1]))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.clamp(*self.log_temperature_range).exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Project ``log tau`` back into its range after an optimiser step, as CLIP does: the clamp in
        :attr:`temperature` alone would leave a parameter that stepped past a bound with no gradient
        to bring it back."""
        self.log_temperature.clamp_(*self.log_temperature_range)

    def forward(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Aligned features ``a_m`` on the unit hypersphere, one ``[B, d]`` tensor per modality."""
        return {name: head(raw[name]) for name, head in self.heads.items()}

    def alignment_loss(self, aligned: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 1: ``logits[i, j] = -vol(anchor_i, data_j) / tau``, cross-entropy in both directions;
        0 (still in the graph) for fewer than two items, which have no negative."""
        if aligned[self.anchor].shape[0] < 2:
            return aligned[self.anchor].sum() * 0.0
        others = torch.stack([v for name, v in aligned.items() if name != self.anchor], dim=1)
        logits = -pairwise_volumes(aligned[self.anchor], others) / self.temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

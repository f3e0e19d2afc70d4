"""Vector and residual quantisation with the codebook/commitment loss of App. A.2 (Eq. 15, 16).

Codebooks start from k-means on their first training inputs, codes left unused for a number of
steps are re-seeded from recent encoder outputs (dead-code restart), and gradients reach the encoder
through the straight-through estimator or, optionally, the rotation trick (Fifty et al., 2024).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class Quantized:
    """One quantisation step: ``quantized`` has the codewords' value and the estimator's gradient."""

    quantized: torch.Tensor  # [B, d]
    codewords: torch.Tensor  # [B, d], differentiable w.r.t. the codebook only
    codes: torch.Tensor  # int64 [B]
    loss: torch.Tensor  # scalar, ||sg[r] - e||^2 + beta ||r - sg[e]||^2 averaged over the (masked) rows
    commitment: torch.Tensor  # scalar, ||r - e||^2 so averaged, detached: the value of each term before beta


@dataclass
class ResidualQuantized:
    """Output of :class:`ResidualQuantizer`: codes per layer, their sum and the residual chain."""

    quantized: torch.Tensor  # [B, d], sum of the layers' codewords with the estimator's gradient
    codes: torch.Tensor  # int64 [B, L]
    residuals: list[torch.Tensor]  # L + 1 tensors [B, d]: r_0 = x, ..., r_L (what no layer captured)
    loss: torch.Tensor  # scalar, Eq. 15 summed over layers
    commitment: torch.Tensor  # scalar, the layers' ||r_l - e_l||^2 summed, detached


def rotate_to(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick: ``sg[lambda R] x`` with ``R`` rotating ``x`` onto ``q`` and ``lambda = |q|/|x|``.

    The value equals ``q``; the gradient w.r.t. ``x`` is ``lambda R^T g`` instead of the identity.
    A zero ``x`` has no direction to rotate: it takes the identity estimator.
    """
    eps = 1e-8
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (x / x_norm).detach()
    v = (q / q_norm).detach()
    w = u + v
    w = (w / w.norm(dim=-1, keepdim=True).clamp_min(eps)).detach()
    rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    rotated = rotated * (q_norm / x_norm).detach()
    return torch.where(x.norm(dim=-1, keepdim=True) > eps, rotated, x + (q - x).detach())


def straight_through(x: torch.Tensor, q: torch.Tensor, rotation_trick: bool) -> torch.Tensor:
    """Value of ``q``, gradient passed to ``x`` by the identity or by the rotation trick."""
    if rotation_trick:
        return rotate_to(x, q.detach())
    return x + (q - x).detach()


def cluster_sums(
    x: torch.Tensor, assign: torch.Tensor, k: int, by_matmul: bool | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Per-cluster sums of ``x [N, d]`` for ``assign [N]``. CUDA's ``index_add_`` adds floats in a
    racing order, so by default (``by_matmul=None``) CUDA sums by one-hot matmuls over ``chunk`` rows
    (default: a 2**24-entry one-hot), which are reproducible, and the CPU keeps ``index_add_``."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    if not (x.is_cuda if by_matmul is None else by_matmul):
        return sums.index_add_(0, assign, x)
    chunk = chunk or max(1, 2**24 // k)
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        sums += nn.functional.one_hot(assign[part], k).to(x.dtype).T @ x[part]
    return sums


def lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``codebook[codes]`` with a reproducible backward. On the CPU, indexing's backward adds the rows
    of repeated codes in a racing order across threads, so seeded runs drift apart; the embedding
    backward does not. CUDA keeps indexing, whose backward sorts (its embedding backward may use
    atomics)."""
    return codebook[codes] if codebook.is_cuda else nn.functional.embedding(codes, codebook)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B]`` over the rows where ``mask``; 0 (still in the graph) when there are none."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def kmeans(x: torch.Tensor, k: int, iterations: int = 20) -> torch.Tensor:
    """Lloyd's k-means on ``x [N, d]``; with fewer than ``k`` rows, centres repeat rows plus noise."""
    x = x.float()
    n = x.shape[0]
    if n >= k:
        centres = x[torch.randperm(n, device=x.device)[:k]].clone()
    else:
        centres = x[torch.randint(n, (k,), device=x.device)] + 1e-3 * x.std() * torch.randn(
            k, x.shape[1], device=x.device
        )
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = cluster_sums(x, assign, k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class VectorQuantizer(nn.Module):
    """A codebook of ``K`` vectors: nearest-neighbour codes, Eq. 16 loss, k-means init, restarts."""

    def __init__(self, codebook_size: int, dim: int, beta: float, rotation_trick: bool) -> None:
        super().__init__()
        self.beta = beta
        self.rotation_trick = rotation_trick
        self.codebook = nn.Parameter(torch.zeros(codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))
        self.recent_inputs: torch.Tensor | None = None

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """k-means initialisation of the codebook on a sample of encoder outputs."""
        self.codebook.copy_(kmeans(x.detach(), self.codebook_size))
        self.initialized.fill_(True)
        self.steps_since_used.zero_()

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the closest codeword (Euclidean) for every row of ``x``."""
        codebook = self.codebook.detach().float()
        x = x.detach().float()
        distances = (x * x).sum(-1, keepdim=True) - 2 * x @ codebook.t() + (codebook * codebook).sum(-1)
        return distances.argmin(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Quantized:
        """Codes of every row; the Eq. 16 loss, the k-means start and restarts use the rows where
        ``mask`` (default: all), so a fallback row is quantised but never learned from. (Only a first
        batch with no such row at all starts the codebook from its fallback rows.)"""
        real = x if mask is None else x[mask]
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError("codebook used for inference before initialisation")
            self.initialize(real if len(real) else x)
        codes = self.nearest(x)
        codewords = lookup(self.codebook, codes)
        error = ((x.detach() - codewords) ** 2).sum(-1) + self.beta * ((x - codewords.detach()) ** 2).sum(-1)
        loss = error.mean() if mask is None else masked_mean(error, mask)
        distance = ((x - codewords) ** 2).sum(-1).detach()
        commitment = distance.mean() if mask is None else masked_mean(distance, mask)
        if self.training:
            with torch.no_grad():
                self.steps_since_used += 1
                self.steps_since_used[codes if mask is None else codes[mask]] = 0
            if len(real) > 1 or (len(real) and self.recent_inputs is None):  # from one row, every
                self.recent_inputs = real.detach()  # restart would be the same vector (its std is 0)
        quantized = straight_through(x, codewords, self.rotation_trick)
        return Quantized(quantized, codewords, codes, loss, commitment)

    @torch.no_grad()
    def restart_dead_codes(self, threshold: int) -> int:
        """Re-seed codes unused for ``threshold`` training steps from the latest inputs; count them."""
        dead = (self.steps_since_used >= threshold).nonzero().squeeze(-1)
        if self.recent_inputs is None or dead.numel() == 0:
            return 0
        recent = self.recent_inputs
        picks = recent[torch.randint(recent.shape[0], (dead.numel(),), device=recent.device)]
        noise = 0.01 * recent.std(0, unbiased=False) * torch.randn_like(picks)
        self.codebook[dead] = (picks + noise).to(self.codebook.dtype)
        self.steps_since_used[dead] = 0
        return int(dead.numel())


class ResidualQuantizer(nn.Module):
    """RQ-VAE style residual quantisation (Rajput et al., 2023): ``r_{l+1} = r_l - e_l`` (Sec. 3.2.2)."""

    def __init__(
        self, num_layers: int, codebook_size: int, dim: int, beta: float, rotation_trick: bool
    ) -> None:
        super().__init__()
        self.rotation_trick = rotation_trick
        self.layers = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, beta, rotation_trick) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> ResidualQuantized:
        """Quantise every row; each layer learns only from the rows in ``mask`` (default: all)."""
        residual = x
        residuals = [x]
        codes, losses, commitments = [], [], []
        total = torch.zeros_like(x)
        for layer in self.layers:
            out = layer(residual, mask)
            codes.append(out.codes)
            losses.append(out.loss)
            commitments.append(out.commitment)
            total = total + out.codewords.detach()
            residual = residual - out.codewords.detach()
            residuals.append(residual)
        quantized = straight_through(x, total, self.rotation_trick)
        return ResidualQuantized(
            quantized,
            torch.stack(codes, 1),
            residuals,
            torch.stack(losses).sum(),
            torch.stack(commitments).sum(),
        )

    def restart_dead_codes(self, threshold: int) -> int:
        return sum(layer.restart_dead_codes(threshold) for layer in self.layers)

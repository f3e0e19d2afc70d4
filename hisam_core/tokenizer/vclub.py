"""vCLUB: variational contrastive log-ratio upper bound on mutual information (App. A.1, Eq. 12-13).

``q(z | s) = N(mu(s), diag(exp(logvar(s))))`` is fitted by maximum likelihood on detached pairs
(:meth:`VCLUB.log_likelihood`, with its own optimiser), and the encoder minimises
:meth:`VCLUB.mi_upper_bound`: mean log-likelihood of positive pairs minus that of all pairs (Eq. 13).

Both inputs are standardised per dimension with batch statistics first. MI is invariant to such maps,
and without it an encoder can lower the estimate by shrinking ``z`` below the smallest variance ``q``
can express, collapsing the representation instead of disentangling it.

With the exact conditional of jointly Gaussian ``s, z`` (per-dimension correlation ``rho``) the bound
is ``d rho^2 / (1 - rho^2)``, which is above the true ``-d/2 log(1 - rho^2)`` as an upper bound must be.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: ``logvar = LOGVAR_BOUND * tanh(...)``: keeps the likelihood finite early in training.
LOGVAR_BOUND = 10.0


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-score with batch statistics."""
    return (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)


class VCLUB(nn.Module):
    """Gaussian variational network ``q(z | s)`` with the vCLUB estimator."""

    def __init__(self, condition_dim: int, target_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mu = nn.Sequential(
            nn.Linear(condition_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, target_dim)
        )
        self.logvar = nn.Sequential(
            nn.Linear(condition_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, target_dim), nn.Tanh()
        )

    def gaussian(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``q(z | s)`` for standardised ``s``."""
        return self.mu(s), LOGVAR_BOUND * self.logvar(s)

    def _nothing(self, s: torch.Tensor) -> torch.Tensor:
        """0 in the graph of ``q``'s parameters: fewer than two rows have no batch statistics."""
        mu, logvar = self.gaussian(s)
        return (mu.sum() + logvar.sum()) * 0.0

    def log_likelihood(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mean ``log q(z_i | s_i)`` over the batch; maximise it (on detached inputs) to fit ``q``."""
        if z.shape[0] < 2:
            return self._nothing(s)
        s, z = standardize(s), standardize(z)
        mu, logvar = self.gaussian(s)
        return (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(-1).mean()

    def mi_upper_bound(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 13: ``mean_i log q(z_i|s_i) - mean_{i,j} log q(z_j|s_i)``, in nats.

        The normalising terms cancel; the all-pairs mean uses
        ``mean_j (z_j - mu_i)^2 = mean_j z_j^2 - 2 mu_i mean_j z_j + mu_i^2`` (``O(B d)``, not ``B^2``).
        """
        if z.shape[0] < 2:
            return self._nothing(s)
        s, z = standardize(s), standardize(z)
        mu, logvar = self.gaussian(s)
        precision = 0.5 * (-logvar).exp()
        positive = -((z - mu) ** 2) * precision
        mean_sq_all = (z**2).mean(0) - 2 * mu * z.mean(0) + mu**2
        negative = -mean_sq_all * precision
        return (positive - negative).sum(-1).mean()

"""vCLUB mutual-information upper bound (App. A.1, Eq. 13) on Gaussians with known MI."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from hisam_core.tokenizer.vclub import VCLUB, standardize

DIM = 4


def _pairs(n: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, DIM, generator=g)
    z = rho * s + math.sqrt(1 - rho**2) * torch.randn(n, DIM, generator=g)
    return s, z


@functools.cache
def _fitted_estimate(rho: float) -> float:
    torch.manual_seed(0)
    club = VCLUB(DIM, DIM, hidden_dim=32)
    optimizer = torch.optim.Adam(club.parameters(), lr=1e-2)
    s, z = _pairs(8192, rho, seed=1)
    for step in range(100):
        index = torch.arange(512) + 512 * (step % 16)
        loss = -club.log_likelihood(s[index], z[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    s, z = _pairs(8192, rho, seed=2)  # held-out pairs
    with torch.no_grad():
        return club.mi_upper_bound(s, z).item()


def test_near_zero_on_independent_gaussians():
    assert abs(_fitted_estimate(0.0)) < 0.05


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_correlated_gaussians_bound_the_true_mi_from_above(rho):
    """With ``q`` equal to the true conditional, Eq. 13 is ``d rho^2 / (1 - rho^2)`` (CLUB's value),
    which exceeds the true MI ``-d/2 log(1 - rho^2)``: an upper bound is not tight here."""
    estimate = _fitted_estimate(rho)
    true_mi = -DIM / 2 * math.log(1 - rho**2)
    club_value = DIM * rho**2 / (1 - rho**2)
    assert estimate > true_mi
    assert estimate == pytest.approx(club_value, rel=0.15)
    assert estimate > 10 * abs(_fitted_estimate(0.0))


def test_bound_is_invariant_to_rescaling_the_inputs():
    torch.manual_seed(0)
    club = VCLUB(DIM, DIM, hidden_dim=8)
    s, z = _pairs(256, 0.5, seed=4)
    scale = torch.tensor([1e-3, 1.0, 10.0, 0.1])
    assert club.mi_upper_bound(s * scale, z * scale + 3).item() == pytest.approx(
        club.mi_upper_bound(s, z).item(), rel=1e-3, abs=1e-4
    )


def test_all_pairs_term_equals_the_brute_force_mean():
    torch.manual_seed(0)
    club = VCLUB(DIM, DIM, hidden_dim=8)
    s, z = (standardize(x) for x in _pairs(64, 0.5, seed=3))  # the estimator standardises its inputs
    mu, logvar = club.gaussian(s)
    log_q = -0.5 * (((z[None] - mu[:, None]) ** 2) / logvar.exp()[:, None] + logvar[:, None]).sum(
        -1
    )  # [i, j]
    expected = log_q.diagonal().mean() - log_q.mean()
    assert club.mi_upper_bound(s, z).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)

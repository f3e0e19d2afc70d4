"""GRAM volume and the CGA alignment loss (Sec. 3.2.1, Eq. 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hisam_core.tokenizer.cga import CGA, determinant, gram_volume, pairwise_volumes


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_identical_vectors_span_zero_volume():
    v = _unit(5, 1, 16).expand(5, 3, 16)
    assert torch.allclose(gram_volume(v), torch.zeros(5), atol=1e-3)


def test_orthonormal_vectors_span_unit_volume():
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(1)))
    assert gram_volume(q.t()[None]).item() == pytest.approx(1.0, abs=1e-3)
    assert gram_volume(torch.eye(8)[None, :4]).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("theta", [0.05, 0.3, 1.0, math.pi / 2, 2.5])
def test_two_vectors_span_abs_sin(theta):
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(theta), math.sin(theta), 0.0])
    assert gram_volume(torch.stack([a, b])[None]).item() == pytest.approx(abs(math.sin(theta)), abs=1e-3)


def test_volume_is_invariant_to_modality_order():
    v = _unit(32, 3, 16)
    for perm in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        assert torch.allclose(gram_volume(v), gram_volume(v[:, perm]), atol=1e-5)


def test_closed_form_determinant_matches_lu():
    m = torch.randn(64, 3, 3, dtype=torch.float64)
    assert torch.allclose(determinant(m), torch.linalg.det(m))
    assert torch.allclose(determinant(m[:, :2, :2]), torch.linalg.det(m[:, :2, :2]))


def test_pairwise_volumes_equal_per_pair_volumes():
    anchor, others = _unit(6, 16, seed=2), _unit(6, 2, 16, seed=3)
    expected = torch.stack(
        [gram_volume(torch.cat([anchor[i].expand(6, 1, 16), others], dim=1)) for i in range(6)]
    )
    assert torch.allclose(pairwise_volumes(anchor, others), expected, atol=1e-5)


def _cga() -> CGA:
    """Three 8-d modalities aligned in 16 dimensions, anchored on ``a``."""
    return CGA(
        {"a": 8, "b": 8, "c": 8},
        dim=16,
        hidden_dim=16,
        anchor="a",
        temperature_init=0.07,
        temperature_range=(0.01, 1.0),
    )


def test_gradients_are_finite_when_modalities_coincide():
    """Coinciding vectors minimise det(G) >= 0, so its gradient vanishes there; the eps under the
    square root keeps the chain rule finite, so the volume's gradient is exactly zero, not NaN."""
    v = _unit(4, 1, 16).expand(4, 3, 16).clone().requires_grad_()
    gram_volume(v).sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))

    cga = _cga()
    same = _unit(8, 16).requires_grad_()
    loss = cga.alignment_loss({"a": same, "b": same, "c": same})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()


def test_alignment_loss_prefers_matched_items():
    cga = _cga()
    items = _unit(16, 16, seed=4)
    noisy = {m: F.normalize(items + 0.1 * _unit(16, 16, seed=5 + i), dim=-1) for i, m in enumerate("abc")}
    shuffled = {**noisy, "b": noisy["b"][torch.randperm(16)], "c": noisy["c"][torch.randperm(16)]}
    assert cga.alignment_loss(noisy) < cga.alignment_loss(shuffled) - 1.0


def test_alignment_loss_is_eq1_written_out():
    """Eq. 1 by hand in float64: ``l[i, j] = -sqrt(det(A A^T)) / tau`` for the anchor of item i with
    the other modalities of item j, then the mean of ``-log softmax`` of the matched pair over the
    row (anchor -> data) and over the column (data -> anchor), halved."""
    cga = _cga()
    with torch.no_grad():
        cga.log_temperature.fill_(math.log(0.3))
    items = _unit(5, 16, seed=19)  # each item's modalities near one direction: matched pairs stand out
    aligned = {m: F.normalize(items + 0.5 * _unit(5, 16, seed=20 + i), dim=-1) for i, m in enumerate("abc")}
    anchor, others = aligned[cga.anchor].double(), [aligned[m].double() for m in "abc" if m != cga.anchor]
    n, tau = 5, 0.3
    logits = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            a = torch.stack([anchor[i], *(o[j] for o in others)])
            logits[i][j] = -math.sqrt(max(torch.linalg.det(a @ a.T).item(), 0.0)) / tau
    rows = [logits[i][i] - math.log(sum(math.exp(x) for x in logits[i])) for i in range(n)]
    cols = [logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)]
    expected = 0.5 * (-sum(rows) / n - sum(cols) / n)
    assert cga.alignment_loss(aligned).item() == pytest.approx(expected, abs=1e-5)
    assert expected < math.log(n) - 0.5  # far from the uniform-logits value: the volumes matter


def test_a_temperature_past_its_bound_is_projected_back_and_gets_gradient_again():
    cga = _cga()
    aligned = {m: _unit(16, 16, seed=6 + i) for i, m in enumerate("abc")}
    with torch.no_grad():
        cga.log_temperature.fill_(math.log(5.0))  # an optimiser step overshot the upper bound
    cga.alignment_loss(aligned).backward()
    assert cga.log_temperature.grad == 0  # the forward clamp alone: stuck out there for good
    cga.clamp_temperature_()
    cga.log_temperature.grad = None
    cga.alignment_loss(aligned).backward()
    assert cga.log_temperature.item() == pytest.approx(0.0) and cga.log_temperature.grad != 0

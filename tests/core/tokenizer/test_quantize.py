"""Vector/residual quantisation: codebook loss, estimators, k-means init, dead-code restart (App. A.2)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from hisam_core.tokenizer.quantize import ResidualQuantizer, VectorQuantizer, cluster_sums, rotate_to


def _mixture(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(12, dim, generator=g)
    return centres[torch.randint(12, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)


def test_residual_norm_does_not_grow_across_layers_after_training():
    torch.manual_seed(0)
    data = _mixture(2048, 8)
    rq = ResidualQuantizer(num_layers=3, codebook_size=16, dim=8, beta=0.25, rotation_trick=False)
    optimizer = torch.optim.Adam(rq.parameters(), lr=1e-2)
    for _ in range(150):
        batch = data[torch.randint(len(data), (256,))]
        loss = rq(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rq.restart_dead_codes(50)
    rq.eval()
    with torch.no_grad():
        out = rq(data)
    norms = [r.norm(dim=-1).mean().item() for r in out.residuals]
    assert all(b <= a for a, b in itertools.pairwise(norms)), norms
    assert norms[-1] < 0.5 * norms[0]
    # the quantized sum plus the final residual is the input, exactly
    assert torch.allclose(out.quantized + out.residuals[-1], data, atol=1e-4)


def test_straight_through_passes_the_gradient_unchanged():
    vq = VectorQuantizer(16, 8, beta=0.25, rotation_trick=False)
    x = _mixture(64, 8).requires_grad_()
    out = vq(x)  # first training call: k-means initialisation
    assert torch.allclose(out.quantized, vq.codebook[out.codes], atol=1e-5)
    g = torch.randn(64, 8)
    (out.quantized * g).sum().backward()
    assert torch.allclose(x.grad, g)


def test_eq16_gradients_pull_the_codebook_to_the_input_and_commit_the_input_by_beta():
    """Eq. 16, ``||sg[x] - e||^2 + beta ||x - sg[e]||^2`` averaged over rows: the loss's gradient
    reaches the input only through the commitment term, ``2 beta (x - e) / B``, and the codebook only
    through the codebook term, row ``k`` gathering ``2 (e_k - x) / B`` over the inputs coded ``k``.
    (The value of the loss is the same wherever the stop-gradients sit; these gradients are not.)"""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, beta=0.25, rotation_trick=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(8, 4))
        vq.initialized.fill_(True)
    x = torch.randn(32, 4).requires_grad_()
    out = vq(x)
    out.loss.backward()
    e = vq.codebook.detach()[out.codes]
    torch.testing.assert_close(x.grad, 2 * 0.25 * (x.detach() - e) / 32)
    expected = torch.zeros(8, 4).index_add_(0, out.codes, 2 * (e - x.detach()) / 32)
    torch.testing.assert_close(vq.codebook.grad, expected)


def test_rotation_trick_of_a_zero_input_is_still_the_codeword():
    x = torch.zeros(2, 4, requires_grad=True)
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.0, 0.0]])
    out = rotate_to(x, q)
    torch.testing.assert_close(out, q)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rotation_trick_value_is_the_codeword_and_gradient_is_rotated_and_scaled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g).requires_grad_()
    q = torch.randn(32, 8, generator=g)
    out = rotate_to(x, q)
    assert torch.allclose(out, q, atol=1e-5)
    # d<q_hat, out>/dx = lambda R^T q_hat = lambda x_hat with lambda = |q| / |x|
    (out * F.normalize(q, dim=-1)).sum().backward()
    scale = (q.norm(dim=-1) / x.norm(dim=-1))[:, None]
    assert torch.allclose(x.grad, scale * F.normalize(x.detach(), dim=-1), atol=1e-5)


def test_gradients_reach_the_encoder_through_the_quantizer():
    """Straight-through: the encoder gets exactly the gradient it would get if the quantised sum were
    its own output, dL/dW = sum_i 2 (q_i - x_i) x_i^T; the rotation trick gives a finite nonzero one."""
    for rotation_trick in (False, True):
        torch.manual_seed(0)
        encoder = torch.nn.Linear(8, 8)
        rq = ResidualQuantizer(3, 16, 8, beta=0.25, rotation_trick=rotation_trick)
        x = _mixture(128, 8)
        out = rq(encoder(x))
        ((out.quantized - x) ** 2).sum().backward()  # reconstruction only: no commitment term
        assert encoder.weight.grad is not None
        assert torch.isfinite(encoder.weight.grad).all() and encoder.weight.grad.abs().sum() > 0
        error = 2 * (out.quantized.detach() - x)
        if not rotation_trick:
            assert torch.allclose(encoder.weight.grad, error.t() @ x, atol=1e-4)
            assert torch.allclose(encoder.bias.grad, error.sum(0), atol=1e-4)
        else:  # another gradient than straight-through's (its formula: the one-layer test below)
            assert (encoder.weight.grad - error.t() @ x).abs().max() > 0.1


def test_the_rotation_trick_sends_the_encoder_the_rotated_scaled_gradient():
    """One layer, rotation trick (Fifty et al., 2024): ``dL/de_i = lambda_i R_i^T g_i`` with
    ``R = I - 2 w w^T + 2 q_hat e_hat^T``, ``w = (e_hat + q_hat) / |e_hat + q_hat|``,
    ``lambda = |q| / |e|`` and ``g = dL/dq``; the encoder gets ``sum_i dL/de_i x_i^T``."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 8)
    rq = ResidualQuantizer(1, 16, 8, beta=0.25, rotation_trick=True)
    x = _mixture(64, 8)
    e = encoder(x)
    out = rq(e)
    ((out.quantized - x) ** 2).sum().backward()
    q, e = out.quantized.detach().double(), e.detach().double()
    g = 2 * (q - x.double())
    expected = []
    for e_i, q_i, g_i in zip(e, q, g, strict=True):
        e_hat, q_hat = e_i / e_i.norm(), q_i / q_i.norm()
        w = (e_hat + q_hat) / (e_hat + q_hat).norm()
        rotation = torch.eye(8, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(q_hat, e_hat)
        torch.testing.assert_close(rotation @ e_hat, q_hat)  # R takes e_hat onto q_hat
        expected.append(q_i.norm() / e_i.norm() * rotation.T @ g_i)
    grad_e = torch.stack(expected)
    torch.testing.assert_close(encoder.weight.grad.double(), grad_e.T @ x.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encoder.bias.grad.double(), grad_e.sum(0), atol=1e-4, rtol=1e-4)
    identity = g.T @ x.double()  # what straight-through would have sent: the trick changes it
    assert (encoder.weight.grad.double() - identity).abs().max() > 0.1


def test_kmeans_initialisation_fits_the_data():
    # seeded: Lloyd's iterations from random rows merge two of the 12 clusters for some seeds (46 of
    # 100 end above the bound here), so the test must not depend on the tests that ran before it
    torch.manual_seed(0)
    data = _mixture(1024, 8)
    vq = VectorQuantizer(12, 8, beta=0.25, rotation_trick=False)
    vq(data)
    vq.eval()
    error = ((data - vq(data).quantized) ** 2).sum(-1).mean()
    assert error < 0.1 * ((data - data.mean(0)) ** 2).sum(-1).mean()


def test_dead_code_restart_revives_an_unused_code():
    torch.manual_seed(0)
    data = _mixture(512, 8)
    vq = VectorQuantizer(8, 8, beta=0.25, rotation_trick=False)
    vq(data)  # k-means init
    with torch.no_grad():
        vq.codebook[3] = 1e3  # far from every input: never selected
    threshold = 5
    for _ in range(threshold):
        assert (vq(data[torch.randint(512, (64,))]).codes != 3).all()
        assert vq.restart_dead_codes(threshold + 1) == 0  # not dead for long enough yet
    assert vq.restart_dead_codes(threshold) >= 1
    assert vq.codebook[3].abs().max() < 100  # re-seeded near the data
    assert (vq(data).codes == 3).any()


def test_codes_restarted_after_a_batch_with_one_real_row_are_distinct():
    """An epoch's last batch can hold a single real row (the others fallback rows): restarts then
    draw from the batch before, not every dead code onto that one row."""
    torch.manual_seed(0)
    data = _mixture(512, 8)
    vq = VectorQuantizer(8, 8, beta=0.25, rotation_trick=False)
    vq(data)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[0] = True
    for _ in range(3):
        vq(data[:64], mask)  # one real row per batch: every other code goes unused
    dead = (vq.steps_since_used >= 3).nonzero().squeeze(-1)
    assert vq.restart_dead_codes(3) == len(dead) == 7
    assert len({tuple(row) for row in vq.codebook[dead].tolist()}) == 7


def test_cluster_sums_by_matmul_equal_index_add_and_total_the_data():
    """The reproducible CUDA path (one-hot matmuls, here over chunks of 7 rows) gives the CPU's
    ``index_add_`` sums, and the per-cluster sums of either add up to the column sums of ``x``."""
    torch.manual_seed(0)
    x, assign = torch.randn(50, 6), torch.randint(0, 9, (50,))
    assign[0] = 8  # the last cluster is filled; cluster 4 is empty
    assign[assign == 4] = 3
    by_add = cluster_sums(x, assign, 9)
    by_matmul = cluster_sums(x, assign, 9, by_matmul=True, chunk=7)
    torch.testing.assert_close(by_matmul, by_add)
    torch.testing.assert_close(by_add.sum(0), x.sum(0))
    assert torch.equal(by_add[4], torch.zeros(6)) and torch.equal(by_matmul[4], torch.zeros(6))
    for c in (0, 3, 8):
        torch.testing.assert_close(by_add[c], x[assign == c].sum(0))


def test_codebook_gradient_is_bitwise_reproducible_on_several_cpu_threads():
    """The tests run on one thread; training uses every core. The CPU backward of ``codebook[codes]``
    adds repeated codes' rows in a racing order across threads (seeded runs drifted apart);
    ``lookup``'s does not."""
    torch.set_num_threads(4)  # the autouse single_thread fixture restores the count
    vq = VectorQuantizer(codebook_size=64, dim=128, beta=0.25, rotation_trick=False)
    data = _mixture(16384, 128)
    vq.initialize(data)
    grads = []
    for _ in range(8):
        vq.codebook.grad = None
        vq(data).loss.backward()
        grads.append(vq.codebook.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])

"""PSGR (Sec. 3.2.2) against its formula written out, head by head, in float64."""

from __future__ import annotations

import math

import torch

from hisam_core.tokenizer.psgr import PSGR


def test_recovery_is_the_probe_weighted_sum_of_the_unfolded_residual():
    """``h_k = W_k r``, ``alpha_m = softmax_k <W_q^m a_m + b_q^m, h_k> / sqrt(d)``,
    ``z_m = sum_k alpha_{m,k} h_k``, and ``z_m`` takes its nearest codeword of modality m's codebook."""
    torch.manual_seed(0)
    dim, heads, rows = 8, 4, 6
    psgr = PSGR(["image", "text"], dim, heads, codebook_size=5, beta=0.25, rotation_trick=False)
    with torch.no_grad():
        psgr.unfold.weight.add_(0.5 * torch.randn_like(psgr.unfold.weight))  # heads far from identity
        for codebook in psgr.codebooks.values():
            codebook.codebook.copy_(torch.randn(5, dim))
            codebook.initialized.fill_(True)
    psgr.eval()
    residuals = {m: torch.randn(rows, dim) for m in ("image", "text")}
    aligned = {m: torch.randn(rows, dim) for m in ("image", "text")}
    out = psgr(residuals, aligned)
    weights = psgr.unfold.weight.detach().double().view(heads, dim, dim)  # W_k, one [d, d] per head
    for m in ("image", "text"):
        probe = psgr.probes[m]
        codebook = psgr.codebooks[m].codebook.detach().double()
        for b in range(rows):
            h = [weights[k] @ residuals[m][b].double() for k in range(heads)]
            q = probe.weight.detach().double() @ aligned[m][b].double() + probe.bias.detach().double()
            scores = [float(q @ h_k) / math.sqrt(dim) for h_k in h]
            alpha = [math.exp(s - max(scores)) for s in scores]
            alpha = [a / sum(alpha) for a in alpha]
            z = sum(a * h_k for a, h_k in zip(alpha, h, strict=True))
            torch.testing.assert_close(
                out[m].attention[b].double(), torch.tensor(alpha).double(), atol=1e-6, rtol=0
            )
            torch.testing.assert_close(out[m].recovered[b].double(), z, atol=1e-5, rtol=1e-5)
            assert int(out[m].codes[b]) == int(((codebook - z) ** 2).sum(-1).argmin())
            torch.testing.assert_close(
                out[m].quantized[b].double(), codebook[out[m].codes[b]], atol=1e-6, rtol=0
            )
        attention = out[m].attention.detach()
        assert attention.max() < 0.99 and attention.std() > 0.05  # neither one head nor uniform
        assert out[m].codes.unique().numel() > 1

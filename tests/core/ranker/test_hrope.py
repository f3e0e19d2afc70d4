"""H-RoPE (Sec. 3.3.1, Eq. 6-8, A.3): relative, decoupled, and standard RoPE on one band."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hisam_core.ranker.hrope import HierarchicalRotaryEmbedding, apply_rotary
from hisam_core.ranker.sequence import SequenceBuilder

HEAD_DIM = 16


def rotate(rope: HierarchicalRotaryEmbedding, x, i, j, p=None):
    cos, sin = rope(i, j, i if p is None else p)
    return apply_rotary(x, cos, sin)


def scores(rope, q, k, i, j, p=None):
    return rotate(rope, q, i, j, p) @ rotate(rope, k, i, j, p).transpose(-1, -2)


@pytest.fixture
def qk_coords():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, HEAD_DIM), torch.randn(2, 3, 10, HEAD_DIM)
    i = torch.randint(0, 40, (2, 10))
    j = torch.randint(0, 8, (2, 10))
    return q, k, i, j


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_scores_invariant_to_shifting_either_coordinate(qk_coords, fraction):
    q, k, i, j = qk_coords
    rope = HierarchicalRotaryEmbedding(HEAD_DIM, inter_fraction=fraction)
    reference = scores(rope, q, k, i, j)
    torch.testing.assert_close(scores(rope, q, k, i + 57, j), reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores(rope, q, k, i, j + 5), reference, atol=1e-4, rtol=1e-5)


def test_bands_are_decoupled(qk_coords):
    """Changing j only rotates the intra-band pairs; changing i only the inter-band pairs."""
    q, _, i, j = qk_coords
    rope = HierarchicalRotaryEmbedding(HEAD_DIM, inter_fraction=0.5)
    inter_dims = 2 * rope.num_inter
    base = rotate(rope, q, i, j)
    moved_j, moved_i = rotate(rope, q, i, j + 3), rotate(rope, q, i + 3, j)
    torch.testing.assert_close(moved_j[..., :inter_dims], base[..., :inter_dims])
    assert not torch.allclose(moved_j[..., inter_dims:], base[..., inter_dims:])
    torch.testing.assert_close(moved_i[..., inter_dims:], base[..., inter_dims:])
    assert not torch.allclose(moved_i[..., :inter_dims], base[..., :inter_dims])


def standard_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """LLaMA-style RoPE: adjacent pairs as complex numbers times exp(i * pos * base^(-2m/d))."""
    d = x.shape[-1]
    freqs = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    phase = torch.polar(torch.ones_like(freqs), positions.double().unsqueeze(-1) * freqs).unsqueeze(1)
    out = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * phase
    return torch.view_as_real(out).flatten(-2).float()


def test_single_band_is_standard_rope(qk_coords):
    q, _, i, j = qk_coords
    inter_only = HierarchicalRotaryEmbedding(HEAD_DIM, inter_base=10000, inter_fraction=1.0)
    torch.testing.assert_close(rotate(inter_only, q, i, j), standard_rope(q, i, 10000), atol=1e-5, rtol=1e-5)
    intra_only = HierarchicalRotaryEmbedding(HEAD_DIM, intra_base=100, inter_fraction=0.0)
    torch.testing.assert_close(rotate(intra_only, q, i, j), standard_rope(q, j, 100), atol=1e-5, rtol=1e-5)
    flat = HierarchicalRotaryEmbedding(HEAD_DIM, mode="rope1d")
    p = torch.arange(10).expand(2, -1)
    torch.testing.assert_close(rotate(flat, q, i, j, p), standard_rope(q, p, 10000), atol=1e-5, rtol=1e-5)


def test_matches_naive_complex_reference(qk_coords):
    """Pair by pair: pair m < d' turns by i * 10000^(-m/d'), the others by j * 100^(-(m-d')/(P-d'))."""
    q, _, i, j = qk_coords
    fraction = 0.375
    rope = HierarchicalRotaryEmbedding(HEAD_DIM, inter_fraction=fraction)
    pairs = HEAD_DIM // 2
    split = round(fraction * pairs)
    expected = torch.empty_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[2]):
            for m in range(pairs):
                if m < split:
                    angle = int(i[b, t]) * 10000 ** (-m / split)
                else:
                    angle = int(j[b, t]) * 100 ** (-(m - split) / (pairs - split))
                z = torch.complex(q[b, :, t, 2 * m].double(), q[b, :, t, 2 * m + 1].double())
                z = z * complex(torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle)))
                expected[b, :, t, 2 * m], expected[b, :, t, 2 * m + 1] = z.real.float(), z.imag.float()
    torch.testing.assert_close(rotate(rope, q, i, j), expected, atol=1e-5, rtol=1e-5)


def test_score_decomposes_into_inter_and_intra_terms(qk_coords):
    """Eq. 18: the score is the inter-band score (depends on i only) plus the intra-band one (j only)."""
    q, k, i, j = qk_coords
    rope = HierarchicalRotaryEmbedding(HEAD_DIM, inter_fraction=0.5)
    d = 2 * rope.num_inter
    zeros = torch.zeros_like(q)
    q_inter, k_inter = (
        torch.cat([q[..., :d], zeros[..., d:]], -1),
        torch.cat([k[..., :d], zeros[..., d:]], -1),
    )
    q_intra, k_intra = q - q_inter, k - k_inter
    total = scores(rope, q, k, i, j)
    inter, intra = scores(rope, q_inter, k_inter, i, j), scores(rope, q_intra, k_intra, i, j)
    torch.testing.assert_close(total, inter + intra, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores(rope, q_inter, k_inter, i, j + 4), inter, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores(rope, q_intra, k_intra, i * 3, j), intra, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("encoding", "fraction", "reads"),
    [
        ("hrope", 0.5, {"instant", "intra_index"}),
        ("hrope", 1.0, {"instant"}),  # every rotary pair on the inter-item band
        ("hrope", 0.0, {"intra_index"}),
        ("rope1d", 0.5, {"position"}),
    ],
)
def test_the_model_rotates_by_the_coordinates_of_its_encoding(
    seq_config, history, make_model, encoding, fraction, reads
):
    """HMAT hands the batch's coordinates to the rotary embedding: H-RoPE's inter band reads i (the
    item's instant, not its own index), its intra band j, 1D-RoPE p. Moving the last item away from
    the rest along one coordinate, under the same mask, changes the outputs exactly when the encoding
    reads that coordinate."""
    model = make_model(position_encoding=encoding, inter_fraction=fraction)
    batch = SequenceBuilder(seq_config).batch([history])
    mask = model.mask(batch, "memory_anchor")
    last = batch.item_index == batch.item_index.max()
    with torch.no_grad():
        reference = model(batch, mask).hidden
        for field in ("item_index", "instant", "intra_index", "position"):
            moved = dataclasses.replace(batch, **{field: getattr(batch, field) + 3 * last})
            changed = not torch.allclose(model(moved, mask).hidden, reference, atol=1e-5)
            assert changed == (field in reads), field


def test_a_bf16_model_keeps_fp32_rotation_frequencies():
    """Casting the model (``model.to(torch.bfloat16)``, as a bf16 serving export would) moves the
    frequencies but never rounds them: the angles stay those of the fp32 module."""
    rope = HierarchicalRotaryEmbedding(32)
    cast = HierarchicalRotaryEmbedding(32).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32
    i, j = torch.arange(40)[None], torch.arange(40)[None] % 8
    assert torch.equal(cast.angles(i, j, i), rope.angles(i, j, i))

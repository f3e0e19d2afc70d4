"""Semantic-ID metrics: utilisation, perplexity, uniqueness, collisions, dedup suffix, NMI."""

from __future__ import annotations

import numpy as np
import pytest

from hisam_core.tokenizer.metrics import (
    code_perplexity,
    code_utilisation,
    collision_rate,
    dedup_suffix,
    normalized_mutual_information,
    unique_id_rate,
)


def test_utilisation_and_perplexity():
    codes = np.stack([np.arange(64) % 8, np.zeros(64, dtype=int)], axis=1)
    assert code_utilisation(codes, 16).tolist() == [0.5, 1 / 16]
    assert code_perplexity(codes, 16) == pytest.approx([8.0, 1.0])
    skewed = np.array([[0], [0], [0], [1]])  # exp(H) of (3/4, 1/4), not the 2 codes used
    assert code_perplexity(skewed, 4) == pytest.approx([np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))])


def test_unique_and_collision_rates_count_items():
    codes = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1], [2, 2]])
    assert unique_id_rate(codes) == pytest.approx(4 / 6)  # tuples (0,0), (1,0), (1,1), (2,2)
    assert collision_rate(codes) == pytest.approx(3 / 6)  # the three (0,0) items
    for rate in (unique_id_rate, collision_rate):
        with pytest.raises(ValueError, match="no items"):
            rate(codes[:0])
    assert dedup_suffix(codes[:0]).tolist() == []


def test_dedup_suffix_separates_collisions_and_is_zero_for_unique_items():
    rng = np.random.default_rng(0)
    codes = rng.integers(3, size=(200, 2))
    suffix = dedup_suffix(codes)
    assert unique_id_rate(np.c_[codes, suffix]) == 1.0
    unique_rows = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    single = unique_rows[2][unique_rows[1].reshape(-1)] == 1
    assert (suffix[single] == 0).all()
    # within a colliding group the suffixes are 0..size-1 in row order
    group = (codes == codes[0]).all(1)
    assert suffix[group].tolist() == list(range(group.sum()))


def test_normalized_mutual_information():
    rng = np.random.default_rng(0)
    a = rng.integers(8, size=5000)
    assert normalized_mutual_information(a, (a * 7 + 3) % 8) == pytest.approx(1.0)  # a relabeling
    assert normalized_mutual_information(a, rng.integers(8, size=5000)) < 0.01
    assert normalized_mutual_information(a, np.zeros_like(a)) == 0.0
    # by hand, a coarsening: a in {0..3} uniform, b = a // 2; I = H(b) = ln 2, H(a) = ln 4
    a = np.array([0, 1, 2, 3] * 10)
    assert normalized_mutual_information(a, a // 2) == pytest.approx(
        np.log(2) / np.sqrt(np.log(4) * np.log(2))
    )

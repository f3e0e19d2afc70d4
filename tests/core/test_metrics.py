"""AUC / GAUC (Sec. 4.1) against scikit-learn, overall and on a cold-start mask."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hisam_core.metrics import auc, gauc, hit_rate_at_k, ndcg_at_k, ranking_metrics, target_hit_at_k


@pytest.fixture
def samples() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, size=600)
    labels = rng.integers(0, 2, size=600)
    scores = np.round(labels * 0.3 + rng.random(600), 1)  # rounding creates many ties
    cold = np.isin(users, np.arange(15))
    return labels, scores, users, cold


def reference_gauc(labels, scores, users) -> float:
    values, weights = [], []
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) == 2:
            values.append(roc_auc_score(labels[mine], scores[mine]))
            weights.append(mine.sum())
    return float(np.average(values, weights=weights))


def test_auc_equals_sklearn_with_ties(samples):
    labels, scores, _, cold = samples
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc(labels, scores, cold) == pytest.approx(roc_auc_score(labels[cold], scores[cold]), abs=1e-12)


def test_gauc_is_the_count_weighted_mean_of_per_user_auc(samples):
    labels, scores, users, cold = samples
    labels = labels.copy()
    labels[users == 3] = 1  # a single-class user is skipped
    assert gauc(labels, scores, users) == pytest.approx(reference_gauc(labels, scores, users), abs=1e-12)
    expected_cold = reference_gauc(labels[cold], scores[cold], users[cold])
    assert gauc(labels, scores, users, cold) == pytest.approx(expected_cold, abs=1e-12)


def test_ranking_metrics_bundle(samples):
    labels, scores, users, cold = samples
    metrics = ranking_metrics(labels, scores, users, cold)
    assert metrics == {
        "auc": auc(labels, scores),
        "gauc": gauc(labels, scores, users),
        "cold_auc": auc(labels, scores, cold),
        "cold_gauc": gauc(labels, scores, users, cold),
    }
    assert set(ranking_metrics(labels, scores, users)) == {"auc", "gauc"}


def test_a_cold_subset_that_cannot_define_a_metric_reports_nan(samples):
    """Which users are cold is a property of the data: a subset with one class (or, for GAUC, no
    user with both) leaves that metric undefined for every model, so it is NaN, never an error."""
    labels, scores, users, cold = samples
    labels = labels.copy()
    labels[cold] = 1
    one_class = ranking_metrics(labels, scores, users, cold)
    assert np.isnan(one_class["cold_auc"]) and np.isnan(one_class["cold_gauc"])
    assert one_class["auc"] == auc(labels, scores) and one_class["gauc"] == gauc(labels, scores, users)
    # each cold user single-class, but both classes across them: AUC defined, GAUC not
    labels[cold] = users[cold] % 2
    mixed = ranking_metrics(labels, scores, users, cold)
    assert mixed["cold_auc"] == auc(labels, scores, cold) and np.isnan(mixed["cold_gauc"])
    with pytest.raises(ValueError, match="boolean"):
        ranking_metrics(labels, scores, users, cold.astype(int))


def test_perfect_and_reversed_rankings():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(labels, -np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert auc(labels, np.zeros(4)) == 0.5


@pytest.mark.parametrize(
    ("labels", "scores", "mask", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], None, "both classes"),
        ([0, 1, 2], [0.1, 0.2, 0.3], None, "0 or 1"),
        ([0, 1], [0.1, np.nan], None, "finite"),
        ([0, 1], [0.1, 0.2, 0.3], None, "equal lengths"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [1, 0, 1], "boolean"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [False, True, True], "both classes"),
    ],
)
def test_bad_input_raises(labels, scores, mask, match):
    with pytest.raises(ValueError, match=match):
        auc(np.array(labels), np.array(scores), None if mask is None else np.array(mask))


def test_gauc_without_a_two_class_user_raises():
    with pytest.raises(ValueError, match="at least one user"):
        gauc(np.array([0, 1]), np.array([0.3, 0.4]), np.array([1, 2]))


def test_a_missing_user_id_raises_instead_of_dropping_its_samples():
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.9, 0.1, 0.2, 0.8])
    users = np.array([1.0, 1.0, np.nan, np.nan])
    for metric in (gauc, lambda *a: ndcg_at_k(*a, k=1), lambda *a: hit_rate_at_k(*a, k=1)):
        with pytest.raises(ValueError, match="must not be missing"):
            metric(labels, scores, users)
    assert gauc(labels, scores, np.array([1, 1, 2, 2])) == 0.5  # user 1 reversed, user 2 right


def test_ndcg_and_hr_at_k_on_hand_computed_cases():
    # user 0: scores rank its samples [pos, neg, pos, neg]; user 1: [neg, pos]; user 2: one class only
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.9, 0.2, 0.5, 0.4])
    users = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    ndcg_user0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    ndcg_user1 = (1 / np.log2(3)) / 1
    assert ndcg_at_k(labels, scores, users, k=10) == pytest.approx((ndcg_user0 + ndcg_user1) / 2)
    # k = 1: user 0 hits its only slot, user 1 misses
    assert hit_rate_at_k(labels, scores, users, k=1) == pytest.approx(0.5)
    assert ndcg_at_k(labels, scores, users, k=1) == pytest.approx(0.5)
    # k = 2: user 0 has 1 of min(2, 2) attainable hits, user 1 1 of min(2, 1)
    assert hit_rate_at_k(labels, scores, users, k=2) == pytest.approx((0.5 + 1.0) / 2)


def test_ndcg_and_hr_are_one_for_a_perfect_ranking_and_respect_the_mask(samples):
    labels, _, users, cold = samples
    perfect = labels + np.random.default_rng(1).random(len(labels)) * 0.5
    assert ndcg_at_k(labels, perfect, users, 10) == pytest.approx(1.0)
    assert hit_rate_at_k(labels, perfect, users, 10) == pytest.approx(1.0)
    worst = -perfect
    assert ndcg_at_k(labels, worst, users, 10) < 0.5
    keep = cold
    assert ndcg_at_k(labels, worst, users, 5, keep) == pytest.approx(
        ndcg_at_k(labels[keep], worst[keep], users[keep], 5)
    )
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(labels, worst, users, 0)


def test_ndcg_and_hr_count_ties_as_the_mean_over_every_order_of_the_tie():
    """A tie broken by sample order favoured whichever label came first (a popularity-style scorer
    ties often): tied scores count as the average over all their orders, so permuting the samples
    changes nothing, and the value is that of the brute-force average over orders."""
    from itertools import permutations

    labels = np.array([1, 0, 0, 1, 0, 1, 0, 0])
    scores = np.array([0.5, 0.5, 0.5, 0.9, 0.2, 0.2, 0.2, 0.1])  # one user; two ties
    users = np.zeros(8, dtype=int)
    for k in (1, 2, 3, 5, 10):
        tied = [np.flatnonzero(scores == s) for s in (0.5, 0.2)]
        orders = [(a, b) for a in permutations(tied[0]) for b in permutations(tied[1])]
        by_order = []
        for a, b in orders:  # the tie's members take its ranks in this order
            ranked = np.concatenate([[3], a, b, [7]])
            positives = labels[ranked[:k]]
            dcg = (positives / np.log2(np.arange(len(positives)) + 2)).sum()
            ideal = (1 / np.log2(np.arange(min(k, 3)) + 2)).sum()
            by_order.append((positives.sum() / min(k, 3), dcg / ideal))
        expected = np.mean(by_order, axis=0)
        assert hit_rate_at_k(labels, scores, users, k) == pytest.approx(expected[0])
        assert ndcg_at_k(labels, scores, users, k) == pytest.approx(expected[1])
        shuffled = np.random.default_rng(k).permutation(8)
        assert ndcg_at_k(labels[shuffled], scores[shuffled], users, k) == pytest.approx(expected[1])
    # all tied: each rank holds the one positive of four with probability 1/4
    flat = np.full(4, 0.3)
    assert hit_rate_at_k(np.array([0, 0, 0, 1]), flat, np.zeros(4), k=2) == pytest.approx(0.5)
    assert ndcg_at_k(np.array([1, 0, 0, 0]), flat, np.zeros(4), k=2) == pytest.approx(
        (1 + 1 / np.log2(3)) / 4
    )


def test_a_targets_hit_at_k_is_the_share_of_tie_orders_that_rank_it_in_the_top_k():
    """Next-item HR@k over a whole catalogue: the brute-force share of the orders of every tie in
    which the target is among the first ``k``; the strict count when nothing ties; never for an
    excluded (``-inf``) target."""
    from itertools import permutations

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(40, 6)).astype(float)  # three values over six items: many ties
    scores[rng.random(scores.shape) < 0.15] = -1e9  # excluded, as -inf (np.diff of two -inf is nan)
    targets = rng.integers(0, 6, size=40)
    for k in (1, 2, 4, 6):
        got = target_hit_at_k(np.where(scores == -1e9, -np.inf, scores), targets, k)
        for row, t in enumerate(targets):
            # the rankings by descending score: one per order of the ties
            orders = [p for p in permutations(range(6)) if all(np.diff(scores[row][list(p)]) <= 0)]
            expected = 0.0 if scores[row, t] == -1e9 else np.mean([t in p[:k] for p in orders])
            assert got[row] == pytest.approx(expected)
    with pytest.raises(ValueError, match="must not be NaN"):  # it ranked the target first
        target_hit_at_k(np.array([[np.nan, 0.5, 0.9]]), np.array([0]), 1)
    distinct = rng.permutation(6)[None, :].astype(float)
    for k in (1, 3):
        assert target_hit_at_k(distinct, np.array([2]), k)[0] == float(
            (distinct[0] > distinct[0, 2]).sum() < k
        )

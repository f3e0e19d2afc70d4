"""Offline ranking metrics of Sec. 4.1: AUC and GAUC, overall and on the cold-start subset.

* AUC: the Mann-Whitney statistic with average ranks for tied scores (equal to scikit-learn's
  ``roc_auc_score``).
* GAUC: per-user AUC averaged over the users that have both a positive and a negative sample,
  each user weighted by their number of samples; users with a single class are skipped.
* NDCG@k and HR@k: per user, then averaged over users with both classes; tied scores count in
  expectation over every order of the tie (McSherry and Najork, ECIR 2008), as AUC's average ranks do,
  so no metric depends on the order the samples come in.
* :func:`target_hit_at_k`: whether one target item ranks among the ``k`` best of a whole catalogue's
  scores (next-item HR@k), with ties counted the same way.

Every metric takes an optional boolean ``mask`` selecting the samples to score, e.g. the cold-start
subset (Sec. 4.1: users with fewer than 10 interactions). A selection without both classes (or,
for GAUC, without a single user having both) raises ``ValueError``; :func:`ranking_metrics` instead
reports such a cold-start subset as NaN, since which users are cold is a property of the data, not of
the model being scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class NonFiniteScoresError(ValueError):
    """A model gave NaN or infinite scores: no metric ranks them."""


def _prepare(
    labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, *extra: np.ndarray
) -> tuple[np.ndarray, ...]:
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    arrays = [labels, scores, *(np.asarray(a).reshape(-1) for a in extra)]
    if mask is not None:
        arrays.append(np.asarray(mask).reshape(-1))
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(
            f"labels, scores, groups and mask need equal lengths, got {[len(a) for a in arrays]}"
        )
    if mask is not None:
        if arrays[-1].dtype != bool:
            raise ValueError(f"mask must be boolean, got {arrays[-1].dtype}")
        keep = arrays.pop()
        arrays = [a[keep] for a in arrays]
    if not np.isin(arrays[0], (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(arrays[1]).all():
        raise NonFiniteScoresError("scores must be finite")
    if len(arrays) > 2 and pd.isna(arrays[2]).any():  # pandas would drop those samples from every group
        raise ValueError("groups (user ids) must not be missing")
    return (arrays[0].astype(np.int64), *arrays[1:])


def auc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Area under the ROC curve of the (masked) samples."""
    labels, scores = _prepare(labels, scores, mask)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUC needs both classes, got {positives} positives and {negatives} negatives")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sample-count-weighted mean of per-user AUC over users with both classes."""
    labels, scores, groups = _prepare(labels, scores, mask, groups)
    frame = pd.DataFrame({"group": groups, "label": labels, "score": scores})
    frame["rank"] = frame.groupby("group")["score"].rank(method="average")
    frame["positive_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("group").agg(
        count=("label", "size"), positives=("label", "sum"), rank_sum=("positive_rank", "sum")
    )
    per_user = per_user[(per_user["positives"] > 0) & (per_user["positives"] < per_user["count"])]
    if per_user.empty:
        raise ValueError("GAUC needs at least one user with both a positive and a negative sample")
    positives = per_user["positives"]
    negatives = per_user["count"] - positives
    user_auc = (per_user["rank_sum"] - positives * (positives + 1) / 2) / (positives * negatives)
    return float(np.average(user_auc, weights=per_user["count"]))


def ranking_metrics(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, cold_start: np.ndarray | None = None
) -> dict[str, float]:
    """``auc`` and ``gauc``, plus ``cold_auc`` and ``cold_gauc`` on the ``cold_start`` subset; each
    cold metric is NaN when the subset cannot define it (one class only; for GAUC, no user with both)."""
    metrics = {"auc": auc(labels, scores), "gauc": gauc(labels, scores, groups)}
    if cold_start is not None:
        cold_labels, _, cold_groups = _prepare(labels, scores, cold_start, groups)
        some_user_has_both = (pd.Series(cold_labels).groupby(cold_groups).nunique() == 2).any()
        metrics["cold_auc"] = auc(labels, scores, cold_start) if len(set(cold_labels)) == 2 else np.nan
        metrics["cold_gauc"] = gauc(labels, scores, groups, cold_start) if some_user_has_both else np.nan
    return metrics


def _top_k_per_user(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int, mask: np.ndarray | None
) -> pd.DataFrame:
    """Per user with both classes: ``hits`` (positives among the ``k`` best-scored samples) and their
    ``dcg``, in expectation over the orders of tied scores, ``positives`` and ``count``.

    A tie of ``n`` samples, ``p`` of them positive, fills ranks ``start .. start + n - 1``; in a
    uniformly random order each of those ranks holds a positive with probability ``p / n``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    labels, scores, groups = _prepare(labels, scores, mask, groups)
    frame = pd.DataFrame({"group": groups, "label": labels, "score": scores})
    ties = frame.groupby(["group", "score"]).agg(n=("label", "size"), p=("label", "sum")).reset_index()
    ties = ties.sort_values(["group", "score"], ascending=[True, False])
    start = ties.groupby("group")["n"].cumsum().to_numpy() - ties["n"].to_numpy()
    first, last = np.minimum(start, k), np.minimum(start + ties["n"].to_numpy(), k)  # ranks in the top k
    discounts = np.concatenate([[0.0], np.cumsum(1 / np.log2(np.arange(k) + 2))])  # sum of the first r
    share = ties["p"].to_numpy() / ties["n"].to_numpy()
    ties["hits"] = share * (last - first)
    ties["dcg"] = share * (discounts[last] - discounts[first])
    per_user = ties.groupby("group").agg(
        positives=("p", "sum"), count=("n", "sum"), hits=("hits", "sum"), dcg=("dcg", "sum")
    )
    per_user = per_user[(per_user["positives"] > 0) & (per_user["positives"] < per_user["count"])]
    if per_user.empty:
        raise ValueError("ranking metrics need at least one user with both a positive and a negative sample")
    return per_user


def ndcg_at_k(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int = 10, mask: np.ndarray | None = None
) -> float:
    """Mean over users with both classes of DCG@k / ideal DCG@k, binary relevance (log2 discount)."""
    per_user = _top_k_per_user(labels, scores, groups, k, mask)
    discounts = 1 / np.log2(np.arange(k) + 2)
    ideal = np.cumsum(discounts)[np.minimum(per_user["positives"].to_numpy(), k) - 1]
    return float(np.mean(per_user["dcg"].to_numpy() / ideal))


def hit_rate_at_k(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int = 10, mask: np.ndarray | None = None
) -> float:
    """Mean over users with both classes of (positives in the top ``k``) / min(k, positives): the
    share of the attainable hits (1 when the top ``k`` are as positive as they can be)."""
    per_user = _top_k_per_user(labels, scores, groups, k, mask)
    return float(np.mean(per_user["hits"] / np.minimum(per_user["positives"], k)))


def target_hit_at_k(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> np.ndarray:
    """Per row of ``scores`` (one query's scores of every item, ``-inf`` for an excluded one), the
    probability that item ``targets[row]`` ranks among the ``k`` best when tied scores are ordered at
    random: ``(k - better) / (tied + 1)`` clipped to [0, 1], ``better`` the items scored higher and
    ``tied`` the others scored the same. An excluded target never hits; a NaN score is an error (it
    would tie with nothing and rank the target first)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores = np.asarray(scores)
    if np.isnan(scores).any():
        raise ValueError("scores must not be NaN (-inf excludes an item)")
    target = scores[np.arange(len(scores)), np.asarray(targets)][:, None]
    better = (scores > target).sum(axis=1)
    tied = (scores == target).sum(axis=1) - 1
    hit = np.clip((k - better) / (tied + 1), 0.0, 1.0)
    return np.where(np.isneginf(target[:, 0]), 0.0, hit)

"""Codebook and catalogue metrics of semantic IDs: utilisation, perplexity, uniqueness, collisions.

Also the optional dedup suffix (a 7th code disambiguating items that share all six codes) and the
normalised mutual information used to check codes against planted factors.
"""

from __future__ import annotations

import numpy as np


def code_utilisation(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Fraction of the ``K`` codes used at each position, ``codes [N, P] -> [P]``."""
    return np.array([len(np.unique(column)) / codebook_size for column in np.asarray(codes).T])


def code_perplexity(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """``exp(entropy)`` of the code distribution at each position (``K`` when uniform), ``[P]``."""
    out = []
    for column in np.asarray(codes).T:
        p = np.bincount(column, minlength=codebook_size) / len(column)
        p = p[p > 0]
        out.append(float(np.exp(-(p * np.log(p)).sum())))
    return np.array(out)


def _require_items(codes: np.ndarray) -> None:
    if len(codes) == 0:
        raise ValueError("code metrics: no items (an empty code table), so no rate")


def _tuple_group_sizes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group index of each item's code tuple and the size of every group."""
    _, inverse, counts = np.unique(np.asarray(codes), axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def unique_id_rate(codes: np.ndarray) -> float:
    """Distinct code tuples divided by items (1.0 when every item has its own ID)."""
    _require_items(codes)
    _, counts = _tuple_group_sizes(codes)
    return len(counts) / len(codes)


def collision_rate(codes: np.ndarray) -> float:
    """Fraction of items whose code tuple is shared with at least one other item."""
    _require_items(codes)
    inverse, counts = _tuple_group_sizes(codes)
    return float((counts[inverse] > 1).mean())


def dedup_suffix(codes: np.ndarray) -> np.ndarray:
    """Extra code per item: its rank among items sharing its tuple (in row order), 0 when unique."""
    inverse, counts = _tuple_group_sizes(codes)
    order = np.argsort(inverse, kind="stable")
    group_start = np.cumsum(counts) - counts
    suffix = np.empty(len(inverse), dtype=np.int64)
    suffix[order] = np.arange(len(inverse)) - group_start[inverse[order]]
    return suffix


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """``I(a; b) / sqrt(H(a) H(b))`` of two integer labelings of the same items (0 if one is constant)."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa * np.log(pa)).sum())
    hb = float(-(pb * np.log(pb)).sum())
    return mi / np.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0

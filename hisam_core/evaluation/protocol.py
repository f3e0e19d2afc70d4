"""The offline protocol of Sec. 4.1 in a single process: labels, global chronological 90/10 split,
cold-start users, and the fixed history windows every model of the comparison is trained and scored on.

* **Labels.** ``label`` when the interactions carry one, else ``rating > positive_threshold`` (3).
* **Split.** All interactions ordered by timestamp; with ``N`` rows and ``k = floor(0.9 N)`` the cut is
  the timestamp of the row of 0-based rank ``k``. Train is ``timestamp < cut``, test ``timestamp >=
  cut`` (rows sharing the cut instant all go to test), the rule of ``spark_jobs.sequences``.
* **Cold start.** A user is cold when they have fewer than ``cold_start_threshold`` (10) *training*
  interactions; test users are the users with at least one test interaction.
* **Per-user order.** ``(timestamp, item_id)``; a test interaction's history is every earlier
  interaction of its user, train and earlier test ones (the ``all_earlier`` rule of the Spark job).
  Interactions of one instant are not each other's history: the item-id order among them is
  arbitrary, and an earlier one's label would be the answer (a MovieLens user often rates several
  films in one second). Every model scores a target from what happened before its instant: the ID
  rankers from their state before it, HMAT hiding from every item the others of its instant
  (their items and their actions); windows carry the timestamps.
* **Windows.** A model sees at most ``window`` items. A user's sequence is cut into windows of at most
  ``window`` items whose *targets* (the labelled positions) are consecutive chunks of at most
  ``stride`` items (the first chunk of a sequence may take a whole window); every target after the
  first window sees at least ``window - stride`` earlier items (fewer where they share the target's
  second). Training windows cover every training interaction of every user once as a
  target; test windows cover every test interaction once. All models of a comparison get the same
  windows, so the same inputs and the same labels, and none reads an interaction of the target's
  second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from hisam_core.config import Config

logger = logging.getLogger(__name__)

#: MovieLens-100K profile fields and their bucket counts (ages as in ``spark_jobs.content``).
MOVIELENS_AGE_BOUNDS = (18, 25, 35, 45, 50, 56)
MOVIELENS_OCCUPATIONS = [
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
]
MOVIELENS_PROFILE_FIELDS = {
    "age_bucket": len(MOVIELENS_AGE_BOUNDS) + 1,
    "gender": 2,
    "occupation": len(MOVIELENS_OCCUPATIONS),
}


class ProtocolConfig(Config):
    """Sec. 4.1: labels, the 90/10 chronological split and the cold-start threshold."""

    positive_threshold: float = Field(3.0, description="rating > threshold is positive")
    train_fraction: float = Field(0.9, gt=0, lt=1)
    cold_start_threshold: int = Field(10, ge=1, description="cold: fewer training interactions")


@dataclass(frozen=True)
class Dataset:
    """Interactions (``user_id``, ``item_id``, ``label``, ``timestamp``) and optional user profiles
    (``user_id -> {field: bucket}``, buckets in ``[0, profile_fields[field])``)."""

    name: str
    interactions: pd.DataFrame
    profiles: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    profile_fields: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Split:
    """The labelled interactions with ``split`` (train/test) and ``is_cold`` columns, and the cut."""

    interactions: pd.DataFrame
    cut: int  # timestamp of the first test row
    cold_users: frozenset[int]
    test_users: frozenset[int]

    @property
    def train(self) -> pd.DataFrame:
        return self.interactions[self.interactions["split"] == "train"]

    @property
    def test(self) -> pd.DataFrame:
        return self.interactions[self.interactions["split"] == "test"]

    def summary(self) -> dict[str, int]:
        test = self.test
        train_items = set(self.train["item_id"])
        return {
            "interactions": len(self.interactions),
            "train": len(self.train),
            "test": len(test),
            "cut": self.cut,
            "users": int(self.interactions["user_id"].nunique()),
            "items": int(self.interactions["item_id"].nunique()),
            "test_users": len(self.test_users),
            "cold_test_users": len(self.cold_users & self.test_users),
            "unseen_test_items": len(set(test["item_id"]) - train_items),
            "test_positive_rate": round(float(test["label"].mean()), 4),
        }


@dataclass(frozen=True)
class Window:
    """At most ``window`` consecutive interactions of one user (oldest first); ``targets`` marks the
    positions to predict and score. ``profile`` are the user's profile buckets."""

    user_id: int
    item_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], 0/1
    targets: np.ndarray  # bool [n]
    profile: Mapping[str, int]
    timestamps: np.ndarray | None = None  # int64 [n]; None: each interaction its own instant

    def __len__(self) -> int:
        return len(self.item_ids)


def label_interactions(frame: pd.DataFrame, config: ProtocolConfig) -> pd.DataFrame:
    """``user_id, item_id, label, timestamp`` from a frame with ``label`` or ``rating`` (Sec. 4.1)."""
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in frame.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}; have {list(frame.columns)}")
    if "label" in frame.columns:
        labels = frame["label"]
        if not labels.isin([0, 1]).all():
            raise ValueError("column 'label' must hold 0 or 1")
    elif "rating" in frame.columns:
        missing_ratings = int(frame["rating"].isna().sum())
        if missing_ratings:  # NaN > threshold is False: they would silently become negatives
            raise ValueError(f"column 'rating' has {missing_ratings} missing (NaN) values")
        labels = frame["rating"] > config.positive_threshold
    else:
        raise ValueError("interactions need a 'label' or a 'rating' column")
    if frame.empty:
        raise ValueError("no interactions")
    out = pd.DataFrame(
        {
            "user_id": integer_column(frame, "user_id"),
            "item_id": integer_column(frame, "item_id"),
            "label": labels.astype(np.int64),
            "timestamp": integer_column(frame, "timestamp"),  # unix seconds
        }
    )
    return out.reset_index(drop=True)


def integer_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]`` as int64; a ValueError naming the column when a value is missing, not a
    number, not whole or beyond int64 (a cast would fail obscurely, truncate ``1.7`` to ``1`` or wrap
    ``1e20`` to a negative id silently)."""
    values = pd.to_numeric(frame[name], errors="coerce")
    bound = float(np.iinfo(np.int64).max)  # 2**63: floats at or past it do not fit
    bad = values.isna() | (values != np.floor(values)) | ~values.astype(float).abs().lt(bound)
    if bad.any():
        first = frame[name][bad].iloc[0]
        shown = repr(first) if isinstance(first, str) else str(first)
        raise ValueError(
            f"column {name!r} must hold whole numbers: {int(bad.sum())} of {len(frame)} rows do not "
            f"(first: {shown})"
        )
    return values.astype(np.int64)


def cut_rank(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, the 0-based rank of the first row at or after the cut, of the
    fraction as written: the product is rounded to 6 decimals first, so float error cannot take a
    row off (``0.7 * 90`` is ``62.99999999999999``). The pipeline's split uses it too."""
    return math.floor(round(fraction * n, 6))


def chronological_split(frame: pd.DataFrame, config: ProtocolConfig) -> Split:
    """Global chronological split and cold-start flags (Sec. 4.1); see the module docstring."""
    timestamps = np.sort(frame["timestamp"].to_numpy())
    rank = cut_rank(config.train_fraction, len(timestamps))
    if rank >= len(timestamps):
        raise ValueError(
            f"train_fraction {config.train_fraction} of {len(timestamps)} interactions leaves none to test"
        )
    cut = int(timestamps[rank])
    out = frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    out["split"] = np.where(out["timestamp"] < cut, "train", "test")
    n_train = out["split"].eq("train").groupby(out["user_id"]).transform("sum")
    out["is_cold"] = n_train < config.cold_start_threshold
    cold = frozenset(out.loc[out["is_cold"], "user_id"].unique().tolist())
    test_users = frozenset(out.loc[out["split"] == "test", "user_id"].unique().tolist())
    split = Split(out, cut, cold, test_users)
    logger.info("split: %s", split.summary())
    return split


def _windows_of(
    user_id: int,
    item_ids: np.ndarray,
    labels: np.ndarray,
    timestamps: np.ndarray,
    is_target: np.ndarray,
    profile: Mapping[str, int],
    window: int,
    stride: int,
) -> list[Window]:
    """Windows covering every target position of one sequence exactly once (module docstring)."""
    positions = np.flatnonzero(is_target)
    out = []
    i = 0
    while i < len(positions):
        first = int(positions[i])
        end = min(max(first + stride, window), len(item_ids))
        start = max(0, end - window)
        chunk = positions[(positions >= first) & (positions < end)]
        targets = np.zeros(end - start, dtype=bool)
        targets[chunk - start] = True
        out.append(
            Window(user_id, item_ids[start:end], labels[start:end], targets, profile, timestamps[start:end])
        )
        i += len(chunk)
    return out


def build_windows(
    split: Split,
    window: int,
    stride: int,
    profiles: Mapping[int, Mapping[str, int]] | None = None,
) -> tuple[list[Window], list[Window]]:
    """(train windows over training interactions only, test windows over the full sequences with the
    test interactions as targets)."""
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    profiles = profiles or {}
    train_windows: list[Window] = []
    test_windows: list[Window] = []
    for user_id, rows in split.interactions.groupby("user_id", sort=True):
        items = rows["item_id"].to_numpy()
        labels = rows["label"].to_numpy()
        timestamps = rows["timestamp"].to_numpy(dtype=np.int64)
        is_test = rows["split"].to_numpy() == "test"
        profile = profiles.get(int(user_id), {})
        n_train = int((~is_test).sum())
        if n_train:
            train_windows += _windows_of(
                int(user_id),
                items[:n_train],
                labels[:n_train],
                timestamps[:n_train],
                np.ones(n_train, bool),
                profile,
                window,
                stride,
            )
        if is_test.any():
            test_windows += _windows_of(
                int(user_id), items, labels, timestamps, is_test, profile, window, stride
            )
    return train_windows, test_windows


def target_arrays(windows: Sequence[Window]) -> dict[str, np.ndarray]:
    """Labels, users and items of every target, in window order then chronological order (the order
    every model's scorer returns its scores in)."""
    if not windows:
        raise ValueError("no windows")
    return {
        "labels": np.concatenate([w.labels[w.targets] for w in windows]),
        "users": np.concatenate([np.full(int(w.targets.sum()), w.user_id) for w in windows]),
        "items": np.concatenate([w.item_ids[w.targets] for w in windows]),
    }


def read_interactions(path: str | Path) -> pd.DataFrame:
    """A generic interactions file (CSV, TSV or Parquet) with ``user_id, item_id, timestamp`` and
    ``rating`` or ``label``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"interactions file {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")


def load_movielens(data_dir: str | Path, config: ProtocolConfig) -> Dataset:
    """MovieLens-100K ratings (``raw/u.data``) and profiles (``raw/u.user``: age bucket, gender,
    occupation), labelled by Sec. 4.1."""
    raw = Path(data_dir) / "raw"
    if not (raw / "u.data").exists():
        raise ValueError(f"MovieLens-100K not found: {raw / 'u.data'} does not exist")
    ratings = pd.read_csv(
        raw / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"], dtype=np.int64
    )
    users = pd.read_csv(
        raw / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"], dtype=str
    )
    profiles = {
        int(row.user_id): {
            "age_bucket": int(np.searchsorted(MOVIELENS_AGE_BOUNDS, int(row.age), side="right")),
            "gender": int(row.gender == "F"),
            "occupation": MOVIELENS_OCCUPATIONS.index(row.occupation),
        }
        for row in users.itertuples()
    }
    return Dataset("movielens-100k", label_interactions(ratings, config), profiles, MOVIELENS_PROFILE_FIELDS)

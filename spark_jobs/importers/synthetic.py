"""Synthetic data with planted structure, written in the generic format (no Spark needed).

The generative story, deterministic under ``seed``:

* ``num_clusters`` latent taste clusters. Every user and every item belongs to one (round-robin,
  then shuffled, so each cluster is non-empty when there are enough users and items).
* Item text reflects its cluster: the title and description draw most words from the cluster's own
  vocabulary, the genre is the cluster's genre; the optional image is a small PNG whose base colour
  is the cluster's colour plus noise.
* User profiles lean on the cluster (age around a cluster mean, occupation mostly the cluster's).
* Interactions: users are drawn with a Zipf-like activity; with probability ``p_in_cluster`` the item
  comes from the user's cluster, else from the whole catalogue. The rating is
  ``clip(round(3 + rating_scale * affinity[user cluster, item cluster] + noise), 1, 5)``, with
  affinity 1 on the diagonal and uniform in ``[-1, 0.3]`` elsewhere. Timestamps increase through
  the file (sorted within each chunk, chunks cover consecutive time windows).

Outputs under ``out_dir``: ``interactions/part-NNNNN.parquet`` (chunks of ``chunk_rows``),
``items.parquet``, ``users.parquet``, ``images/<item_id>.png`` (when ``image_size`` > 0), the
ground truth in ``truth/item_clusters.parquet`` and ``truth/user_clusters.parquet`` (kept apart so
it cannot leak into item text), and ``manifest.json``. 10M events take seconds: everything is
vectorised numpy, written chunk by chunk.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from tqdm.auto import tqdm

from hisam_core.config import Config

logger = logging.getLogger(__name__)

#: Vocabulary per cluster (cluster c uses bank c % len); more clusters reuse banks with a suffix.
WORD_BANKS: tuple[tuple[str, ...], ...] = (
    ("galaxy", "rocket", "alien", "orbit", "starship", "nebula", "android", "laser"),
    ("romance", "wedding", "letters", "kiss", "heart", "summer", "promise", "waltz"),
    ("detective", "murder", "alibi", "clue", "suspect", "heist", "noir", "witness"),
    ("dragon", "wizard", "quest", "kingdom", "sword", "spell", "castle", "prophecy"),
    ("comedy", "prank", "roommate", "wedding-crash", "sitcom", "slapstick", "parody", "blunder"),
    ("ocean", "whale", "reef", "jungle", "glacier", "volcano", "savanna", "migration"),
    ("zombie", "haunted", "curse", "scream", "shadow", "cellar", "ritual", "nightmare"),
    ("football", "coach", "marathon", "rookie", "champion", "stadium", "boxing", "relay"),
)
GENRES: tuple[str, ...] = ("Sci-Fi", "Romance", "Crime", "Fantasy", "Comedy", "Nature", "Horror", "Sports")
COMMON_WORDS: tuple[str, ...] = (
    "story", "journey", "night", "city", "family", "secret", "life", "world", "return", "legend",
)  # fmt: skip
OCCUPATIONS: tuple[str, ...] = (
    "engineer",
    "artist",
    "student",
    "teacher",
    "doctor",
    "writer",
    "lawyer",
    "retired",
)
START_TS = 1_577_836_800  # 2020-01-01T00:00:00Z


class SyntheticConfig(Config):
    """Size and structure of the synthetic dataset."""

    num_users: int = Field(200, ge=1)
    num_items: int = Field(300, ge=1)
    num_events: int = Field(10_000, ge=0)
    num_clusters: int = Field(5, ge=1)
    seed: int = 0
    #: Probability that an event's item comes from the user's own cluster.
    p_in_cluster: float = Field(0.8, ge=0.0, le=1.0)
    rating_scale: float = 1.5
    rating_noise: float = Field(0.7, ge=0.0)
    #: Zipf-like exponent of user activity (0 = uniform).
    activity_exponent: float = Field(0.8, ge=0.0)
    #: Seconds covered by the whole interaction log.
    time_span_s: int = Field(180 * 86_400, ge=1)
    #: Side of the square PNG per item; 0 writes no images (image_path empty).
    image_size: int = Field(16, ge=0)
    description_words: int = Field(12, ge=1)
    chunk_rows: int = Field(1_000_000, ge=1)


@dataclass(frozen=True)
class SyntheticOutput:
    """Where the generator wrote what."""

    out_dir: Path
    interactions: Path
    items: Path
    users: Path
    num_events: int
    manifest: dict


def _vocabulary(cluster: int) -> tuple[str, ...]:
    bank = WORD_BANKS[cluster % len(WORD_BANKS)]
    return bank if cluster < len(WORD_BANKS) else tuple(f"{w}{cluster}" for w in bank)


def _genre(cluster: int) -> str:
    name = GENRES[cluster % len(GENRES)]
    return name if cluster < len(GENRES) else f"{name}-{cluster}"


def _assign_clusters(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def affinity_matrix(config: SyntheticConfig) -> np.ndarray:
    """[k, k] user-cluster x item-cluster affinity: 1 on the diagonal, U[-1, 0.3] elsewhere."""
    rng = np.random.default_rng([config.seed, 1])
    k = config.num_clusters
    a = rng.uniform(-1.0, 0.3, size=(k, k))
    np.fill_diagonal(a, 1.0)
    return a


def _items_table(config: SyntheticConfig, clusters: np.ndarray, image_dir: Path | None) -> pa.Table:
    rng = np.random.default_rng([config.seed, 2])
    n, w = config.num_items, config.description_words
    titles, descriptions, genres, paths = [], [], [], []
    for i in range(n):  # text assembly per item; num_items is small next to num_events
        vocab = _vocabulary(int(clusters[i]))
        own = rng.random(w) < 0.7
        words = np.where(own, rng.choice(vocab, w), rng.choice(COMMON_WORDS, w))
        titles.append(
            f"The {vocab[rng.integers(len(vocab))].title()} {COMMON_WORDS[rng.integers(len(COMMON_WORDS))]} {i}"
        )
        descriptions.append(" ".join(words.tolist()).capitalize() + ".")
        genres.append(_genre(int(clusters[i])))
        paths.append(f"images/{i}.png" if image_dir is not None else None)
    return pa.table(
        {
            "item_id": pa.array(np.arange(n, dtype=np.int64)),
            "title": titles,
            "genres": genres,
            "description": descriptions,
            "image_path": pa.array(paths, pa.string()),
        }
    )


def _users_table(config: SyntheticConfig, clusters: np.ndarray) -> pa.Table:
    rng = np.random.default_rng([config.seed, 3])
    n, k = config.num_users, config.num_clusters
    mean_age = 20 + 30 * (np.arange(k) / max(k - 1, 1))
    ages = np.clip(np.rint(rng.normal(mean_age[clusters], 5.0)), 13, 80).astype(np.int64)
    own = rng.random(n) < 0.7
    occupation = np.where(own, clusters % len(OCCUPATIONS), rng.integers(len(OCCUPATIONS), size=n))
    return pa.table(
        {
            "user_id": pa.array(np.arange(n, dtype=np.int64)),
            "age": pa.array(ages),
            "gender": np.where(rng.random(n) < 0.5, "F", "M").tolist(),
            "occupation": [OCCUPATIONS[o] for o in occupation],
        }
    )


def _write_images(config: SyntheticConfig, clusters: np.ndarray, image_dir: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng([config.seed, 4])
    palette = np.random.default_rng([config.seed, 5]).integers(0, 256, size=(config.num_clusters, 3))
    s = config.image_size
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(config.num_items), desc="images", unit="img", disable=config.num_items < 5000):
        noise = rng.normal(0, 20, size=(s, s, 3))
        pixels = np.clip(palette[clusters[i]] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(image_dir / f"{i}.png")


def _events_chunk(
    config: SyntheticConfig,
    chunk: int,
    rows: int,
    t0: float,
    t1: float,
    user_p: np.ndarray,
    user_clusters: np.ndarray,
    item_clusters: np.ndarray,
    by_cluster: np.ndarray,
    offsets: np.ndarray,
    counts: np.ndarray,
    affinity: np.ndarray,
) -> pa.Table:
    rng = np.random.default_rng([config.seed, 100, chunk])
    users = rng.choice(config.num_users, size=rows, p=user_p)
    uc = user_clusters[users]
    in_cluster = (rng.random(rows) < config.p_in_cluster) & (counts[uc] > 0)
    pick = offsets[uc] + np.floor(rng.random(rows) * np.maximum(counts[uc], 1)).astype(np.int64)
    anywhere = rng.integers(config.num_items, size=rows)
    items = np.where(in_cluster, by_cluster[np.minimum(pick, len(by_cluster) - 1)], anywhere)
    score = (
        3
        + config.rating_scale * affinity[uc, item_clusters[items]]
        + rng.normal(0, config.rating_noise, rows)
    )
    ratings = np.clip(np.rint(score), 1, 5).astype(np.float32)
    ts = np.sort(rng.uniform(t0, t1, rows)).astype(np.int64)
    return pa.table(
        {
            "user_id": pa.array(users.astype(np.int64)),
            "item_id": pa.array(items.astype(np.int64)),
            "timestamp": pa.array(ts),
            "rating": pa.array(ratings),
        }
    )


def generate(config: SyntheticConfig, out_dir: str | Path) -> SyntheticOutput:
    """Write the synthetic dataset under ``out_dir`` (replacing earlier interaction chunks)."""
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    inter_dir = out / "interactions"
    inter_dir.mkdir(exist_ok=True)
    for old in inter_dir.glob("part-*.parquet"):
        old.unlink()
    k = config.num_clusters
    root = np.random.default_rng([config.seed, 0])
    item_clusters = _assign_clusters(root, config.num_items, k)
    user_clusters = _assign_clusters(root, config.num_users, k)
    image_dir = out / "images" if config.image_size > 0 else None
    pq.write_table(_items_table(config, item_clusters, image_dir), out / "items.parquet")
    pq.write_table(_users_table(config, user_clusters), out / "users.parquet")
    pq.write_table(
        pa.table({"item_id": np.arange(config.num_items), "cluster": item_clusters}),
        out / "truth" / "item_clusters.parquet",
    )
    pq.write_table(
        pa.table({"user_id": np.arange(config.num_users), "cluster": user_clusters}),
        out / "truth" / "user_clusters.parquet",
    )
    if image_dir is not None:
        _write_images(config, item_clusters, image_dir)

    affinity = affinity_matrix(config)
    weights = 1.0 / np.arange(1, config.num_users + 1) ** config.activity_exponent
    user_p = root.permutation(weights / weights.sum())
    by_cluster = np.argsort(item_clusters, kind="stable")
    counts = np.bincount(item_clusters, minlength=k)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_chunks = max(1, math.ceil(config.num_events / config.chunk_rows))
    edges = np.linspace(START_TS, START_TS + config.time_span_s, n_chunks + 1)
    written = 0
    for c in tqdm(range(n_chunks), desc="events", unit="chunk", disable=n_chunks < 3):
        rows = min(config.chunk_rows, config.num_events - written)
        table = _events_chunk(
            config, c, rows, edges[c], edges[c + 1], user_p, user_clusters, item_clusters,
            by_cluster, offsets, counts, affinity,
        )  # fmt: skip
        pq.write_table(table, inter_dir / f"part-{c:05d}.parquet")
        written += rows
    manifest = {
        "generator": "spark_jobs.importers.synthetic",
        "config": config.model_dump(mode="json"),
        "num_events": written,
        "files": {"interactions": "interactions", "items": "items.parquet", "users": "users.parquet"},
        "affinity": affinity.round(6).tolist(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    logger.info(
        "synthetic data: %d users, %d items, %d events in %s",
        config.num_users,
        config.num_items,
        written,
        out,
    )
    return SyntheticOutput(out, inter_dir, out / "items.parquet", out / "users.parquet", written, manifest)

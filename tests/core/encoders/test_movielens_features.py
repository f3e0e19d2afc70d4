"""hisam_core.evaluation.features: item documents, the chronological cut-off and the .npz cache
(the full encoder build takes minutes, so it is exercised by benchmarks/movielens_features.py, not here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hisam_core.encoders import EncodersConfig
from hisam_core.evaluation.features import (
    MovieLensFeatures,
    _load_cache,
    _save_cache,
    cache_key,
    chronological_cutoff,
    item_document,
    read_items,
    read_ratings,
)
from hisam_core.features import ItemFeatures


def test_documents_cover_every_item_with_its_fields(movielens_dir):
    items = read_items(movielens_dir)
    assert len(items) == 1682 and items.index.is_unique
    docs = {int(i): item_document(row) for i, row in items.iterrows()}
    assert all(doc.startswith("Title: ") for doc in docs.values())
    toy = docs[1]
    for expected in ("Toy Story (1995)", "Animation", "Children's", "John Lasseter", "Tom Hanks", "Woody"):
        assert expected in toy
    assert toy.index("Actors:") < toy.index("Plot:")  # plot last: truncation only shortens the plot
    with_plot = sum("Plot:" in d for d in docs.values())
    assert with_plot == 1396  # item_extra.tsv's 1,397 plots less item 360's "N/A"
    assert "Plot:" not in docs[360]


def test_chronological_cutoff_matches_bundle_facts(movielens_dir):
    ts = read_ratings(movielens_dir)["timestamp"].to_numpy()
    cutoff = chronological_cutoff(ts, 0.9)
    share = (ts < cutoff).mean()
    assert 0.89 < share <= 0.9
    assert str(pd.to_datetime(cutoff, unit="s").date()) == "1998-03-31"  # SOURCES.md
    with pytest.raises(ValueError, match="cutoff_quantile"):
        chronological_cutoff(ts, 1.0)


@pytest.mark.parametrize(
    ("n", "fraction", "train"), [(90, 0.7, 63), (100, 0.9, 90), (10, 0.3, 3), (7, 0.5, 3)]
)
def test_the_behaviour_cutoff_is_the_protocols_split_cut(n, fraction, train):
    """The behaviour encoder trained before ``chronological_cutoff(q)`` sees exactly the training rows
    of the protocol's split at ``train_fraction = q``: one rank rule for both (``0.7 * 90`` is
    62.99999999999999 in floats, and a plain floor put the cutoff one row early)."""
    from hisam_core.evaluation.protocol import ProtocolConfig, chronological_split, label_interactions

    frame = pd.DataFrame(
        {
            "user_id": np.arange(n) % 5,
            "item_id": np.arange(n),
            "rating": np.full(n, 5),
            "timestamp": 1_000 + 10 * np.arange(n),  # distinct: the cut is exactly one row
        }
    )
    config = ProtocolConfig(train_fraction=fraction)
    split = chronological_split(label_interactions(frame, config), config)
    assert chronological_cutoff(frame["timestamp"].to_numpy(), fraction) == split.cut
    assert (frame["timestamp"] < split.cut).sum() == train  # floor(fraction * n) of the decimal fraction


def test_cache_roundtrip_and_key(tmp_path, movielens_dir):
    rng = np.random.default_rng(0)
    ids = np.arange(1, 6)
    present = {"behavior": np.array([1, 1, 0, 1, 1], bool), "text": np.ones(5, bool)}
    feats = ItemFeatures(ids, {"behavior": rng.normal(size=(5, 4)), "text": rng.normal(size=(5, 3))}, present)
    path = tmp_path / "c" / "f.npz"
    _save_cache(path, MovieLensFeatures(feats, 123, {"a": 1}))
    back = _load_cache(path)
    assert back.from_cache and back.cutoff == 123 and back.meta == {"a": 1}
    np.testing.assert_array_equal(back.features.item_ids, ids)
    for name in feats.names:
        np.testing.assert_array_equal(back.features.modalities[name], feats.modalities[name])
        np.testing.assert_array_equal(back.features.present[name], present[name])
    assert (tmp_path / "c" / ".gitignore").read_text().strip().endswith("*")
    cfg = EncodersConfig()
    assert cache_key(movielens_dir, 0.9, cfg) == cache_key(movielens_dir, 0.9, EncodersConfig())
    assert cache_key(movielens_dir, 0.9, cfg) != cache_key(movielens_dir, 0.8, cfg)
    cfg.behavior.epochs = 1
    assert cache_key(movielens_dir, 0.9, cfg) != cache_key(movielens_dir, 0.9, EncodersConfig())


def test_two_builds_of_one_cache_at_once_each_write_whole_files_of_their_own(tmp_path, monkeypatch):
    """A second build saves the same cache while the first is writing: neither touches the other's
    temporary file, the last rename wins with a whole cache, and no temporary file is left."""
    ids = np.arange(1, 4)

    def result(value: float) -> MovieLensFeatures:
        feats = ItemFeatures(ids, {"text": np.full((3, 2), value)}, {"text": np.ones(3, bool)})
        return MovieLensFeatures(feats, int(value), {})

    path = tmp_path / "f.npz"
    savez, nested = np.savez, []

    def interleaved(file, *args, **kwargs):
        savez(file, *args, **kwargs)
        if not nested:  # the first build has written its file but not renamed it yet
            nested.append(True)
            _save_cache(path, result(2.0))

    monkeypatch.setattr(np, "savez", interleaved)
    _save_cache(path, result(1.0))
    back = _load_cache(path)
    assert back.cutoff == 1 and (back.features.modalities["text"] == 1.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", "f.npz"]

    def failing(file, *args, **kwargs):
        file.write(b"half a cache")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(OSError, match="disk full"):
        _save_cache(path, result(3.0))
    assert _load_cache(path).cutoff == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", "f.npz"]


def test_the_cache_key_changes_with_the_text_models_weights(tmp_path, movielens_dir):
    """A model fine-tuned in place keeps its config.json: its weights must change the key all the
    same (and a README beside them must not)."""
    model = tmp_path / "minilm"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights v1")
    cfg = EncodersConfig()
    cfg.text.model_name_or_path = str(model)
    first = cache_key(movielens_dir, 0.9, cfg)
    (model / "README.md").write_text("notes")
    assert cache_key(movielens_dir, 0.9, cfg) == first
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert cache_key(movielens_dir, 0.9, cfg) != first

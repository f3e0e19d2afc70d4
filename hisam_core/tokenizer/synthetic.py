"""Planted multimodal item features for tests and demos of DST (Sec. 3.2).

Every item has one shared categorical factor, seen by all modalities, and one private categorical
factor per modality. Each factor value has a random latent vector; a modality's raw feature is a
fixed random linear map of ``[shared latent, private latent]`` plus Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hisam_core.features import ItemFeatures


@dataclass(frozen=True)
class PlantedFactors:
    """Ground truth of :func:`planted_features`: factor values per item."""

    shared: np.ndarray  # int64 [N], in [0, num_shared)
    private: dict[str, np.ndarray]  # modality -> int64 [N], in [0, num_private)


def planted_features(
    num_items: int = 2000,
    dims: dict[str, int] | None = None,
    num_shared: int = 8,
    num_private: int = 8,
    latent_dim: int = 8,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[ItemFeatures, PlantedFactors]:
    """Item features with one shared and one private factor per modality, plus the factors."""
    dims = dims or {"behavior": 32, "image": 48, "text": 64}
    rng = np.random.default_rng(seed)
    shared = rng.integers(num_shared, size=num_items)
    shared_latent = rng.standard_normal((num_shared, latent_dim))[shared]
    modalities, private = {}, {}
    for name, dim in dims.items():
        private[name] = rng.integers(num_private, size=num_items)
        private_latent = rng.standard_normal((num_private, latent_dim))
        mixing = rng.standard_normal((2 * latent_dim, dim)) / np.sqrt(2 * latent_dim)
        latent = np.concatenate([shared_latent, private_latent[private[name]]], axis=1)
        modalities[name] = (latent @ mixing + noise * rng.standard_normal((num_items, dim))).astype(
            np.float32
        )
    features = ItemFeatures(np.arange(num_items, dtype=np.int64), modalities)
    return features, PlantedFactors(shared, private)


def with_fallback_rows(features: ItemFeatures, modality: str, share: float, seed: int = 0) -> ItemFeatures:
    """``features`` with a random ``share`` of the items' ``modality`` replaced by a zero row marked not
    present, as an encoder without input writes it (e.g. a movie without a poster)."""
    absent = np.random.default_rng(seed).random(len(features)) < share
    values = features.modalities[modality].copy()
    values[absent] = 0.0
    present = {**features.present, modality: ~absent}
    return ItemFeatures(features.item_ids, {**features.modalities, modality: values}, present)

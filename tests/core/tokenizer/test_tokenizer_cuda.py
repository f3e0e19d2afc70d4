"""DST on a CUDA device: training there disentangles as on the CPU, is reproducible under its seed,
and its checkpoint encodes the same semantic IDs on the CPU. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.dst import DST
from hisam_core.tokenizer.metrics import normalized_mutual_information as nmi
from hisam_core.tokenizer.synthetic import with_fallback_rows
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def config(tiny) -> TokenizerTrainConfig:
    return TokenizerTrainConfig.model_validate({**tiny, "device": "cuda"})


def test_trained_on_cuda_it_disentangles_and_encodes_the_same_ids_on_cpu(planted, config, tmp_path):
    features, factors = planted
    model = train_tokenizer(features, config, checkpoint_path=tmp_path / "dst.pt")
    assert next(model.parameters()).is_cuda
    on_gpu = model.encode(features, "v").codes
    assert nmi(on_gpu[:, 0], factors.shared) > 0.7
    layers = model.config.shared_layers
    for offset, m in enumerate(model.modalities):
        own = nmi(on_gpu[:, layers + offset], factors.private[m])
        assert own > 2 * max(
            nmi(on_gpu[:, layers + offset], factors.private[o]) for o in factors.private if o != m
        )
    on_cpu = DST.load_checkpoint(tmp_path / "dst.pt").encode(features, "v").codes
    np.testing.assert_array_equal(on_cpu, on_gpu)
    loaded = DST.load_checkpoint(tmp_path / "dst.pt", device="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    np.testing.assert_array_equal(loaded.encode(features, "v").codes, on_gpu)


def test_training_on_cuda_is_deterministic(planted, config):
    features, _ = planted
    small = features.subset(np.arange(300))
    short = config.model_copy(update={"epochs": 3, "alignment_warmup_epochs": 1})
    first = train_tokenizer(small, short).encode(small, "a").codes
    second = train_tokenizer(small, short).encode(small, "a").codes
    np.testing.assert_array_equal(first, second)


def test_with_fallback_rows_on_cuda_training_is_deterministic_and_encodes_the_same_on_cpu(
    planted, config, tmp_path
):
    """The masked paths (per-group Eq. 1, masked k-means and restarts, items with no modality) on CUDA:
    reproducible under the seed, and the checkpoint gives the same IDs on the CPU, whatever the
    fallback rows hold."""
    features = planted[0].subset(np.arange(400))
    for seed, (modality, share) in enumerate({"image": 0.3, "behavior": 0.3, "text": 0.15}.items()):
        features = with_fallback_rows(features, modality, share, seed)
    some = np.any([features.present[m] for m in features.dims], axis=0)
    assert 0 < (~some).sum() < 20
    short = config.model_copy(update={"epochs": 4, "alignment_warmup_epochs": 1})
    model = train_tokenizer(features, short, checkpoint_path=tmp_path / "dst.pt")
    on_gpu = model.encode(features, "a").codes
    np.testing.assert_array_equal(train_tokenizer(features, short).encode(features, "a").codes, on_gpu)
    on_cpu = DST.load_checkpoint(tmp_path / "dst.pt")
    np.testing.assert_array_equal(on_cpu.encode(features, "a").codes, on_gpu)
    absent = ~features.present["image"] & some
    images = features.modalities["image"].copy()
    images[absent] = 7.0
    moved = ItemFeatures(features.item_ids, {**features.modalities, "image": images}, features.present)
    image = model.config.shared_layers + model.modalities.index("image")
    others = [p for p in range(on_gpu.shape[1]) if p != image]  # only the image code reads the row
    np.testing.assert_array_equal(on_cpu.encode(moved, "a").codes[:, others], on_gpu[:, others])


def test_kmeans_cluster_sums_on_cuda_are_reproducible_and_match_the_cpu():
    """Many rows into few clusters is where ``index_add_``'s racing float adds differ run to run."""
    from hisam_core.tokenizer.quantize import cluster_sums

    torch.manual_seed(0)
    x, assign = torch.randn(200_000, 32), torch.randint(0, 4, (200_000,))
    first = cluster_sums(x.cuda(), assign.cuda(), 4)
    assert all(torch.equal(first, cluster_sums(x.cuda(), assign.cuda(), 4)) for _ in range(3))
    torch.testing.assert_close(first.cpu(), cluster_sums(x.double(), assign, 4).float(), rtol=1e-5, atol=1e-3)

"""Plain RQ-VAE baseline: it learns to reconstruct and gives unique IDs with the same code budget."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.metrics import unique_id_rate
from hisam_core.tokenizer.rqvae import RQVAE, RQVAEConfig, RQVAETrainConfig, train_rqvae
from hisam_core.tokenizer.synthetic import with_fallback_rows


def test_rqvae_reconstructs_and_tokenizes(planted):
    features, _ = planted
    history = []
    config = RQVAETrainConfig.model_validate(
        {
            "model": {"dim": 32, "hidden_dim": 64, "num_layers": 6, "codebook_size": 16},
            "epochs": 15,
            "batch_size": 128,
            "lr": 3e-3,
            "dead_code_threshold": 30,
        }
    )
    model = train_rqvae(features, config, callback=lambda e, m: history.append(m))
    for m in features.names:  # unit-norm targets: predicting their mean would give ~1
        assert history[-1][f"recon_{m}"] < 0.5 * history[0][f"recon_{m}"] < 1.0
    model.train()
    ids = model.encode(features, "v")
    assert model.training  # encode leaves the mode it found, as DST's does
    model.eval()
    assert ids.num_positions == 6 and ids.position_names[0] == "rq_0"
    assert unique_id_rate(ids.codes) > 0.9
    np.testing.assert_array_equal(ids.codes, model.encode(features, "v").codes)


def test_all_true_masks_are_the_plain_batch_means(planted):
    features = planted[0].subset(np.arange(64))
    torch.manual_seed(0)
    model = RQVAE(
        RQVAEConfig(modality_dims=features.dims, dim=8, hidden_dim=16, num_layers=2, codebook_size=4)
    )
    model.train()
    raw, present = model.tensors(features)
    assert all(bool(mask.all()) for mask in present.values())
    out = model(raw)
    losses = model.losses(out)
    for m in model.modalities:
        expected = ((F.normalize(model.standardize[m](raw[m]), dim=-1) - out.reconstructed[m]) ** 2).sum(-1)
        torch.testing.assert_close(losses[f"recon_{m}"], expected.mean())


def test_a_fallback_row_teaches_the_baseline_nothing(planted):
    """Like DST, the RQ-VAE standardises on real rows, reconstructs only them and sees a missing block
    as zeros: whatever the fallback rows hold, training gives the same weights and the same codes."""
    features = with_fallback_rows(planted[0].subset(np.arange(300)), "image", share=0.3)
    absent = ~features.present["image"]
    moved = ItemFeatures(
        features.item_ids,
        {**features.modalities, "image": np.where(absent[:, None], 7.0, features.modalities["image"])},
        features.present,
    )
    config = RQVAETrainConfig.model_validate(
        {"model": {"dim": 16, "hidden_dim": 32, "num_layers": 3, "codebook_size": 8}, "epochs": 3}
    )
    first, second = train_rqvae(features, config), train_rqvae(moved, config)
    real = features.modalities["image"][~absent]
    np.testing.assert_allclose(first.standardize["image"].mean.numpy(), real.mean(0), atol=1e-5)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(first.encode(features, "v").codes, second.encode(moved, "v").codes)
    out = first(*first.tensors(features))
    assert torch.equal(out.targets["image"][torch.as_tensor(absent)], torch.zeros(int(absent.sum()), 48))

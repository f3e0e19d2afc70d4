"""Plain RQ-VAE baseline: it learns to reconstruct and gives unique IDs with the same code budget."""

from __future__ import annotations

import numpy as np

from hisam_core.tokenizer.metrics import unique_id_rate
from hisam_core.tokenizer.rqvae import RQVAETrainConfig, train_rqvae


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

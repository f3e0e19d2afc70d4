"""The packaged DST on a real MLflow SQLite registry: the served IDs are ``DST.encode``'s, with the
``present`` flags of a request or without them; the cold behaviour row it carries comes back as logged."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.synthetic import planted_features, with_fallback_rows
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from pipelines.settings import Settings
from pipelines.tokenizer_model import (
    PRESENT_PREFIX,
    HisamTokenizerModel,
    features_frame,
    load_tokenizer,
    log_tokenizer,
    request_features,
)
from pipelines.tracking import configure_mlflow

NAME = "hisam-tokenizer"
COLD = np.random.default_rng(0).normal(size=16).astype(np.float32)  # a behaviour space's cold row


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlflow_store, isolated_mlflow):
    """A tiny DST trained on planted items, 30% without an image, registered and loaded back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("hisam")
    features = with_fallback_rows(planted_features(num_items=300, seed=3)[0], "image", share=0.3)
    config = TokenizerTrainConfig.model_validate(
        {
            "model": {"dim": 16, "hidden_dim": 16, "codebook_size": 8, "vclub_hidden_dim": 16},
            "epochs": 3,
            "alignment_warmup_epochs": 1,
            "batch_size": 64,
        }
    )
    dst = train_tokenizer(features, config, checkpoint_path=home / "dst.pt")
    settings = Settings(home=home, mlflow_tracking_uri=mlflow_store(home), experiment="tokenizer")
    with isolated_mlflow():
        configure_mlflow(settings)
        with mlflow.start_run():
            version = log_tokenizer(home / "dst.pt", "dst-t", features, NAME, cold_behaviour=COLD)
            older = log_tokenizer(home / "dst.pt", "dst-t", features, NAME)  # as registered before it
        assert load_tokenizer(f"models:/{NAME}/{older.version}").cold_behaviour is None
        # MLflow unpickles the instance logged then, without __init__: an older one lacks the attribute
        old_state = HisamTokenizerModel.__new__(HisamTokenizerModel)
        old_state.__dict__.update(dst=None, version="dst-t")
        assert old_state.cold_behaviour is None
        yield dst, features, mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}")
    torch.set_num_threads(threads)


def test_served_ids_follow_the_present_flags_of_the_request(served) -> None:
    dst, features, model = served
    assert model.unwrap_python_model().cold_behaviour.tobytes() == COLD.tobytes()  # carried to the bit
    request = features_frame(features)
    served_ids = np.stack(model.predict(request)["semantic_ids"].to_numpy())
    assert np.array_equal(served_ids, dst.encode(features, "dst-t").codes)
    # without the flags every row counts as real: the paper's forward, and other shared codes
    plain = request.drop(columns=[c for c in request.columns if c.startswith(PRESENT_PREFIX)])
    plain_ids = np.stack(model.predict(plain)["semantic_ids"].to_numpy())
    all_real = ItemFeatures(features.item_ids, features.modalities)
    assert np.array_equal(plain_ids, dst.encode(all_real, "dst-t").codes)
    absent = ~features.present["image"]
    assert np.array_equal(plain_ids[~absent], served_ids[~absent])
    assert not np.array_equal(plain_ids[absent], served_ids[absent])
    flagged = request.copy()
    flagged[PRESENT_PREFIX + "image"] = None
    with pytest.raises(Exception, match="present_image"):  # MLflow's schema check or ours
        model.predict(flagged)
    with pytest.raises(ValueError, match="present_image has nulls"):
        request_features(flagged, dst.config.modality_dims)
    with pytest.raises(ValueError, match=r"\['present_images'\] flag no modality"):
        request_features(request.assign(present_images=True), dst.config.modality_dims)

"""The train-tokenizer step: validated input, artifacts written, reruns reproduce the IDs."""

from __future__ import annotations

import numpy as np
import pytest

from hisam_core.semantic_ids import SemanticIds
from hisam_core.tokenizer import TokenizerTrainConfig
from hisam_core.tokenizer.dst import DSTConfig
from pipelines.tokenizer import TrainTokenizerStepConfig, train_tokenizer_step

TINY = TokenizerTrainConfig(
    model=DSTConfig(dim=16, hidden_dim=32, codebook_size=16, vclub_hidden_dim=16),
    epochs=4,
    alignment_warmup_epochs=1,
    batch_size=64,
)


def _config(tmp_path, **overrides) -> TrainTokenizerStepConfig:
    return TrainTokenizerStepConfig(
        synthetic_items=200, train=TINY, output_dir=tmp_path / "out", track=False, **overrides
    )


def test_step_writes_artifacts_and_reruns_identically(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    first = train_tokenizer_step(_config(tmp_path, version="v1"))
    ids = SemanticIds.load(first["semantic_ids"])
    assert ids.version == "v1" and len(ids.item_ids) == 200 and ids.num_positions == 6
    assert first["unique_id_rate"] == pytest.approx(len({tuple(c) for c in ids.codes}) / 200)
    again = train_tokenizer_step(_config(tmp_path, version="v1"))
    assert np.array_equal(SemanticIds.load(again["semantic_ids"]).codes, ids.codes)


def test_bad_features_fail_before_anything_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "bad.npz"
    np.savez(path, item_ids=np.arange(3), text=np.ones((3, 4)), image=np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="'image'"):
        train_tokenizer_step(_config(tmp_path, features="npz", features_path=path))
    assert not (tmp_path / "out").exists()

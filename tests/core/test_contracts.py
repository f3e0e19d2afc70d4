"""The shared contracts: ItemFeatures validation, SemanticIds vocabulary, Config loading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hisam_core.config import Config
from hisam_core.features import ItemFeatures
from hisam_core.semantic_ids import SemanticIds


def _features(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "behavior": rng.normal(size=(n, 3)),
        "image": rng.normal(size=(n, 5)),
        "text": rng.normal(size=(n, 2)),
    }


def test_item_features_accepts_aligned_finite_input() -> None:
    raw = _features()
    feats = ItemFeatures(np.arange(10, 14), raw)
    assert feats.dims == {"behavior": 3, "image": 5, "text": 2}
    rows = np.array([2, 0])
    subset = feats.subset(rows)
    assert subset.item_ids.tolist() == [12, 10]  # ids and every modality's rows move together
    for name, values in raw.items():
        assert np.array_equal(subset.modalities[name], values[rows].astype(np.float32)), name


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(image=m["image"][:3]), "'image': 3 rows but 4 item_ids"),
        (lambda m: m["text"].__setitem__((1, 0), np.nan), "'text': 1 items have NaN or inf"),
        (lambda m: m["behavior"].__setitem__((2, 1), np.inf), "'behavior': 1 items have NaN or inf"),
        (lambda m: m.update(text=m["text"][:, 0]), "'text': expected a 2-D"),
    ],
)
def test_item_features_errors_name_the_modality(mutate, message: str) -> None:
    modalities = _features()
    mutate(modalities)
    with pytest.raises(ValueError, match=message):
        ItemFeatures(np.arange(4), modalities)


def test_item_features_present_masks_default_to_true_and_move_with_subset() -> None:
    feats = ItemFeatures(np.arange(4), _features(), {"image": np.array([True, False, True, False])})
    assert all(feats.present[m].all() for m in ("behavior", "text"))
    assert feats.subset(np.array([3, 0])).present["image"].tolist() == [False, True]


@pytest.mark.parametrize(
    ("present", "message"),
    [
        ({"audio": np.ones(4, bool)}, r"unknown modalities \['audio'\]"),
        ({"image": np.ones(3, bool)}, "'image': present must be a bool"),
        ({"image": np.ones(4)}, "'image': present must be a bool"),
    ],
)
def test_item_features_rejects_bad_present_masks(present, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ItemFeatures(np.arange(4), _features(), present)


def test_item_features_rejects_empty_and_duplicate_items() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ItemFeatures(np.arange(0), {"text": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="unique"):
        ItemFeatures(np.array([1, 1]), {"text": np.zeros((2, 2))})


def test_check_dims_names_the_mismatching_modality() -> None:
    feats = ItemFeatures(np.arange(4), _features())
    with pytest.raises(ValueError, match="'image': expected dimension 7, got 5"):
        feats.check_dims({"behavior": 3, "image": 7, "text": 2})
    with pytest.raises(ValueError, match=r"missing \['audio'\]"):
        feats.check_dims({"behavior": 3, "image": 5, "text": 2, "audio": 1})


def test_semantic_id_tokens_partition_one_vocabulary() -> None:
    codes = np.array([[0, 1, 2, 3, 4, 5], [7, 7, 7, 7, 7, 7]])
    ids = SemanticIds(np.array([10, 20]), codes, codebook_size=8, version="v1")
    tokens = ids.tokens()
    # position p owns exactly [p*K, (p+1)*K): decoding recovers (position, code)
    assert np.array_equal(tokens // 8, np.tile(np.arange(6), (2, 1)))
    assert np.array_equal(tokens % 8, codes)
    assert tokens.max() < ids.vocab_size == 48


def test_semantic_ids_round_trip_and_lookup(tmp_path) -> None:
    rng = np.random.default_rng(1)
    names = ("shared_0", "shared_1", "shared_2", "behavior", "image", "text")
    ids = SemanticIds(np.array([5, 3, 9]), rng.integers(0, 16, size=(3, 6)), 16, "dst-1", names)
    ids.save(tmp_path / "ids.parquet")
    back = SemanticIds.load(tmp_path / "ids.parquet")
    assert back.version == "dst-1" and back.codebook_size == 16 and back.position_names == names
    assert np.array_equal(back.item_ids, ids.item_ids) and np.array_equal(back.codes, ids.codes)
    assert np.array_equal(back.lookup(np.array([9, 5])), ids.codes[[2, 0]])
    with pytest.raises(KeyError, match=r"\[42\]"):
        ids.lookup(np.array([3, 42]))
    assert np.array_equal(ids.lookup(np.array([9.0])), ids.codes[[2]])  # a whole float is its id
    with pytest.raises(ValueError, match=r"item_ids must be integers, got \[3.7\]"):
        ids.lookup(np.array([3.7]))  # not item 3's codes
    with pytest.raises(ValueError, match=r"item_ids came as floats, which cannot hold ids from 2\*\*53 on"):
        ids.lookup(np.array([2.0**62]))  # a hashed id as a float may be another id already


def test_a_failed_semantic_ids_save_keeps_the_previous_table(tmp_path, monkeypatch) -> None:
    """Parallel evaluation workers share the table cache: a reader never sees half a file."""
    path = tmp_path / "ids.parquet"
    SemanticIds(np.array([1, 2]), np.array([[0, 1], [2, 3]]), 4, "v1").save(path)

    def disk_full(self, handle, **_kwargs) -> None:
        handle.write(b"PAR1 half a table")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        SemanticIds(np.array([1, 2]), np.array([[3, 3], [3, 3]]), 4, "v2").save(path)
    monkeypatch.undo()
    kept = SemanticIds.load(path)
    assert kept.version == "v1" and kept.codes.tolist() == [[0, 1], [2, 3]]
    assert [p.name for p in tmp_path.iterdir()] == ["ids.parquet"]


def test_semantic_ids_reject_codes_outside_the_codebook() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SemanticIds(np.array([1]), np.array([[0, 1, 2, 3, 4, 0]]), codebook_size=4, version="v")
    with pytest.raises(ValueError, match="codes must be integers, got float64"):
        SemanticIds(np.array([1]), np.array([[1.7, 2.2]]), codebook_size=4, version="v")  # not [[1, 2]]
    with pytest.raises(ValueError, match=r"positions > 0, got \(1, 0\)"):  # a table of no token
        SemanticIds(np.array([1]), np.zeros((1, 0), dtype=np.int64), codebook_size=4, version="v")


class _Cfg(Config):
    lr: float = 1e-3
    layers: int = 2


def test_config_yaml_round_trip_and_unknown_keys(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    _Cfg(lr=0.5).to_yaml(path)
    assert _Cfg.from_yaml(path) == _Cfg(lr=0.5, layers=2)
    path.write_text("lr: 0.1\nlayrs: 3\n")
    with pytest.raises(ValueError, match="layrs"):
        _Cfg.from_yaml(path)
    path.write_text("lr: [0.1\nlayers: 3\n")  # an unclosed list
    with pytest.raises(ValueError, match=r"c\.yaml:2:7: not valid YAML: expected ',' or ']', but got ':'$"):
        _Cfg.from_yaml(path)


def test_training_devices_are_checked_at_load_and_auto_means_cuda_when_present() -> None:
    """``auto`` (the production config's tokenizer and ranker device) is CUDA when the machine has
    it, else the CPU; a name torch does not know is refused with the config, not at the first tensor."""
    import torch
    from pydantic import ValidationError

    from hisam_core.device import resolve_device
    from hisam_core.ranker.train import TrainConfig
    from hisam_core.tokenizer.train import TokenizerTrainConfig

    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device(
        "cpu"
    )
    for config in (TokenizerTrainConfig, TrainConfig):
        assert config(device="auto").device == "auto"
        with pytest.raises(ValidationError, match="device"):
            config(device="gpu")

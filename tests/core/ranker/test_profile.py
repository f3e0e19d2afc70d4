"""The profile vocabulary of HMAT's profile tokens (Sec. 3.3)."""

from __future__ import annotations

import math

import numpy as np

from hisam_core.ranker.profile import UNKNOWN, ProfileVocabulary
from hisam_core.ranker.sequence import SequenceConfig


def test_known_values_take_buckets_one_to_n_in_sorted_order_and_the_rest_bucket_zero() -> None:
    vocab = ProfileVocabulary.fit(
        {"gender": ["m", "f", None, "f"], "age_bucket": ["25-34", "18-24", "", math.nan, "35-44"]}
    )
    assert vocab.values == {"gender": ("f", "m"), "age_bucket": ("18-24", "25-34", "35-44")}
    assert vocab.bucket_counts == {"gender": 3, "age_bucket": 4}
    assert vocab.encode({"gender": "m", "age_bucket": "18-24"}) == {"gender": 2, "age_bucket": 1}
    unseen = vocab.encode({"gender": "x", "age_bucket": None})
    assert unseen == {"gender": UNKNOWN, "age_bucket": UNKNOWN}
    assert vocab.encode({}) == {"gender": UNKNOWN, "age_bucket": UNKNOWN}  # a user without a profile


def test_every_encoding_fits_the_model_built_from_the_bucket_counts() -> None:
    vocab = ProfileVocabulary.fit({"occupation": ["writer", "artist"], "gender": ["f"]})
    config = SequenceConfig(codebook_size=16, profile_fields=vocab.bucket_counts, max_tokens=64)
    for profile in ({"occupation": "artist", "gender": "f"}, {"occupation": "nurse"}, {}):
        encoded = vocab.encode(profile)
        assert all(0 <= encoded[f] < config.profile_fields[f] for f in config.profile_fields)


def test_save_load_round_trip_keeps_field_order_and_buckets(tmp_path) -> None:
    vocab = ProfileVocabulary.fit({"z": ["b", "a"], "a": ["q"]})
    vocab.save(tmp_path / "profile.json")
    loaded = ProfileVocabulary.load(tmp_path / "profile.json")
    assert loaded == vocab and loaded.fields == ("z", "a")
    assert loaded.encode({"z": "b", "a": "q"}) == vocab.encode({"z": "b", "a": "q"}) == {"z": 2, "a": 1}


def test_numeric_columns_with_missing_values_encode_like_their_integers() -> None:
    import pandas as pd

    floats = pd.Series([18, None, 25])  # float64: 18.0, NaN, 25.0
    nullable = pd.Series([18, None, 25], dtype="Int64")  # 18, <NA>, 25
    for column in (floats, nullable):
        vocabulary = ProfileVocabulary.fit({"age": column})
        assert vocabulary.values == {"age": ("18", "25")}
        assert [vocabulary.encode({"age": v})["age"] for v in (18, 18.0, np.int64(25), None, pd.NA, 30)] == [
            1, 1, 2, 0, 0, 0
        ]  # fmt: skip
        served = ("18", "18.0", "25.00", "18.5", "30.0")  # strings, as a JSON request may carry them
        assert [vocabulary.encode({"age": v})["age"] for v in served] == [1, 1, 2, 0, 0]
    halves = ProfileVocabulary.fit({"score": [1.5, 2.0]})  # a fractional value, served as text too
    assert [halves.encode({"score": v})["score"] for v in (1.5, "1.5", "1.50", 2, "2.00", "2.5")] == [
        1,
        1,
        1,
        2,
        2,
        0,
    ]
    zips = ProfileVocabulary.fit({"zip_region": ["021", "21"]})  # text codes are never read as numbers
    assert [zips.encode({"zip_region": v})["zip_region"] for v in ("021", "21", "21.0")] == [1, 2, 2]
    codes = ProfileVocabulary.fit({"zip": ["01234"], "code": ["1e3", "2.50"]})  # nor fitted text codes
    assert [codes.encode({"zip": v})["zip"] for v in ("01234", "1234", 1234)] == [1, 0, 0]
    assert [codes.encode({"code": v})["code"] for v in ("1e3", 1000, "1000", "2.50", 2.5)] == [1, 0, 0, 2, 0]


def test_a_vocabulary_fitted_with_float_strings_still_encodes_integers() -> None:
    legacy = ProfileVocabulary({"age": ("18.0", "25.0")})  # saved before integral floats were normalised
    assert [legacy.encode({"age": v})["age"] for v in (18, 18.0, "18.0", 25, 30)] == [1, 1, 1, 2, 0]

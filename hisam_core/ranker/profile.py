"""Profile vocabulary: categorical user-profile values -> the bucket ids of HMAT's profile tokens (Sec. 3.3).

HMAT's stream opens with one token per profile field (``SequenceConfig.profile_fields``: field ->
number of buckets). The values each field took when the vocabulary was fitted, sorted, take buckets
``1 .. n``; bucket 0 is a missing or unseen value, so a profile that changes after training still
encodes, and ``bucket_counts`` (``n + 1`` per field) is the ``profile_fields`` a model is built with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

#: The bucket of a missing or unseen value.
UNKNOWN = 0


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        if value != value:  # NaN
            return False
    except TypeError:  # pandas' NA has no truth value
        return False
    return str(value).strip() != ""


def _key(value: Any) -> str:
    """The vocabulary's string of a value; an integral float is written as the integer (a numeric
    column with a missing value reads as float, ``18.0``, where serving passes ``18``)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _numeric(text: str) -> str:
    """A number written as text in the vocabulary's form (``"18.0"`` -> ``"18"``, ``"1.50"`` ->
    ``"1.5"``); any other text as it is."""
    try:
        number = float(text)
    except ValueError:
        return text
    return _key(number) if math.isfinite(number) else text


def _float_text(text: str) -> bool:
    """Whether ``text`` is how Python writes a float (``"18.0"``, not ``"018"``, ``"1e3"`` or
    ``"1.50"``, which are text codes)."""
    try:
        return "." in text and str(float(text)) == text
    except ValueError:
        return False


@dataclass(frozen=True)
class ProfileVocabulary:
    """``values[field]``: the known values of ``field``; value ``values[field][k]`` is bucket ``k + 1``."""

    values: Mapping[str, tuple[str, ...]]

    @classmethod
    def fit(cls, columns: Mapping[str, Iterable[Any]]) -> ProfileVocabulary:
        """The vocabulary of ``columns`` (field -> its values over users; missing values are skipped)."""
        return cls({f: tuple(sorted({_key(v) for v in col if _present(v)})) for f, col in columns.items()})

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def bucket_counts(self) -> dict[str, int]:
        """``SequenceConfig.profile_fields`` of a model using this vocabulary."""
        return {field: len(known) + 1 for field, known in self.values.items()}

    @cached_property
    def _buckets(self) -> dict[str, dict[str, int]]:
        out = {}
        for field, known in self.values.items():
            buckets = {v: k + 1 for k, v in enumerate(known)}
            for value, bucket in list(buckets.items()):
                if _float_text(value):  # "18.0", fitted before _key: also "18"
                    buckets.setdefault(_numeric(value), bucket)
            out[field] = buckets
        return out

    def encode(self, profile: Mapping[str, Any]) -> dict[str, int]:
        """Bucket ids of one user's profile; a missing field or unseen value is :data:`UNKNOWN`."""
        out = {}
        for field, buckets in self._buckets.items():
            value = profile.get(field)
            if not _present(value):
                out[field] = UNKNOWN
                continue
            key = _key(value)
            if key not in buckets and "." in key:  # a served "18.0" is the fitted 18, as the float 18.0 is
                key = _numeric(key)
            out[field] = buckets.get(key, UNKNOWN)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({f: list(v) for f, v in self.values.items()}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ProfileVocabulary:
        data = json.loads(Path(path).read_text())
        return cls({field: tuple(values) for field, values in data.items()})

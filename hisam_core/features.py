"""Per-item modality embeddings: the contract between the encoders and DST (Sec. 3.1).

``ItemFeatures`` holds one float matrix per modality, rows aligned on ``item_ids``, and per modality
a ``present`` mask: False where the encoder had no input (no poster, no interaction before the
behaviour cut-off) and the row is a fallback, not evidence about the item. Construction validates
everything DST relies on, so bad input fails here with a message naming the modality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The paper's modalities in the order of its Figure 3 (b1 behaviour, b2 image, b3 text).
MODALITIES: tuple[str, ...] = ("behavior", "image", "text")


#: From 2**53 on, a float64 no longer holds every integer (2**53 + 1 arrives as 2**53): a hashed id
#: (from 2**62 on) that came as a float is already another id.
FLOAT_EXACT = float(2**53)


def integral(values: Any, what: str) -> np.ndarray:
    """``values`` as int64, refusing a fractional value (a cast would truncate it into another id) and
    a float from :data:`FLOAT_EXACT` on (it may already be another id)."""
    array = np.asarray(values)
    whole = np.issubdtype(array.dtype, np.integer) or array.dtype == bool
    if np.issubdtype(array.dtype, np.floating):
        whole = bool((np.isfinite(array) & (array == np.round(array))).all())
        if whole and bool((np.abs(array) >= FLOAT_EXACT).any()):
            raise ValueError(
                f"{what} came as floats, which cannot hold ids from 2**53 on exactly "
                f"(got {array[np.abs(array) >= FLOAT_EXACT][:3].tolist()}): send them as integers"
            )
    if not whole:
        raise ValueError(f"{what} must be integers, got {array.ravel()[:5].tolist()} ({array.dtype})")
    return array.astype(np.int64)


def as_item_ids(values: np.ndarray) -> np.ndarray:
    """``values`` as unique int64 item ids; floats, or integers past int64, are a ValueError rather
    than ids that a cast would truncate or wrap onto each other."""
    item_ids = np.asarray(values)
    if item_ids.ndim != 1 or item_ids.shape[0] == 0:
        raise ValueError(f"item_ids must be a non-empty 1-D array, got shape {item_ids.shape}")
    if item_ids.dtype.kind not in "iu":
        raise ValueError(f"item_ids must be integers, got {item_ids.dtype} (e.g. {item_ids[:3].tolist()})")
    if item_ids.dtype.kind == "u" and int(item_ids.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"item_ids must fit int64, got {int(item_ids.max())}")
    item_ids = item_ids.astype(np.int64)
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item_ids must be unique")
    return item_ids


@dataclass(frozen=True)
class ItemFeatures:
    """Raw (pre-alignment) embeddings per modality for one catalogue of items."""

    item_ids: np.ndarray  # int64 [N], unique
    modalities: dict[str, np.ndarray]  # name -> float32 [N, d_m]
    present: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool [N]; absent: all True

    def __post_init__(self) -> None:
        item_ids = as_item_ids(self.item_ids)
        if not self.modalities:
            raise ValueError("at least one modality is required")
        arrays: dict[str, np.ndarray] = {}
        for name, values in self.modalities.items():
            values = np.asarray(values, dtype=np.float32)
            if values.ndim != 2 or values.shape[1] == 0:
                raise ValueError(
                    f"modality {name!r}: expected a 2-D [items, dim] array, got shape {values.shape}"
                )
            if values.shape[0] != item_ids.shape[0]:
                raise ValueError(
                    f"modality {name!r}: {values.shape[0]} rows but {item_ids.shape[0]} item_ids"
                )
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"modality {name!r}: {int(bad.sum())} items have NaN or inf values, "
                    f"e.g. item_ids {item_ids[bad][:5].tolist()}"
                )
            arrays[name] = values
        unknown = [m for m in self.present if m not in arrays]
        if unknown:
            raise ValueError(f"present masks for unknown modalities {unknown}")
        present = {}
        for name in arrays:
            mask = np.asarray(self.present.get(name, np.ones(len(item_ids), dtype=bool)))
            if mask.shape != item_ids.shape or mask.dtype != bool:
                raise ValueError(
                    f"modality {name!r}: present must be a bool [{len(item_ids)}] mask, "
                    f"got {mask.dtype} {mask.shape}"
                )
            present[name] = mask
        object.__setattr__(self, "item_ids", item_ids)
        object.__setattr__(self, "modalities", arrays)
        object.__setattr__(self, "present", present)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.modalities)

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(v.shape[1]) for name, v in self.modalities.items()}

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def check_dims(self, expected: dict[str, int]) -> None:
        """Raise a ValueError naming the modality when names or widths differ from ``expected``."""
        missing = [m for m in expected if m not in self.modalities]
        extra = [m for m in self.modalities if m not in expected]
        if missing or extra:
            raise ValueError(f"modalities differ from the model's: missing {missing}, unexpected {extra}")
        for name, dim in expected.items():
            if self.dims[name] != dim:
                raise ValueError(f"modality {name!r}: expected dimension {dim}, got {self.dims[name]}")

    def subset(self, index: np.ndarray) -> ItemFeatures:
        return ItemFeatures(
            self.item_ids[index],
            {k: v[index] for k, v in self.modalities.items()},
            {k: v[index] for k, v in self.present.items()},
        )

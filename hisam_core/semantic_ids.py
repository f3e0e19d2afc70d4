"""The item -> semantic-ID table: the contract between DST (producer) and HMAT (consumer).

Each item gets ``num_positions`` codes (paper default 6: 3 shared + 1 per modality, Sec. 3.2.2),
each in ``[0, codebook_size)``. ``tokens`` offsets position p by ``p * codebook_size`` so the six
positions share one vocabulary of ``num_positions * codebook_size`` ids without collisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hisam_core.checkpoint import write_atomically
from hisam_core.features import as_item_ids, integral


@dataclass(frozen=True)
class SemanticIds:
    """Semantic IDs of a catalogue, produced by one tokenizer version."""

    item_ids: np.ndarray  # int64 [N], unique
    codes: np.ndarray  # int64 [N, num_positions], each in [0, codebook_size)
    codebook_size: int
    version: str
    position_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        item_ids = as_item_ids(self.item_ids)
        codes = np.asarray(self.codes)
        if codes.size and codes.dtype.kind not in "iu":
            raise ValueError(f"codes must be integers, got {codes.dtype} (e.g. {codes.ravel()[:3].tolist()})")
        codes = codes.astype(np.int64)
        if codes.ndim != 2 or codes.shape[0] != item_ids.shape[0] or codes.shape[1] == 0:
            n = item_ids.shape[0]
            raise ValueError(f"codes must be [N, positions] with N={n} and positions > 0, got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        if self.position_names and len(self.position_names) != codes.shape[1]:
            raise ValueError("position_names must name every code position")
        object.__setattr__(self, "item_ids", item_ids)
        object.__setattr__(self, "codes", codes)

    @property
    def num_positions(self) -> int:
        return int(self.codes.shape[1])

    @property
    def vocab_size(self) -> int:
        return self.num_positions * self.codebook_size

    def tokens(self) -> np.ndarray:
        """Codes offset by position into one vocabulary: ``codes[:, p] + p * codebook_size``."""
        return self.codes + np.arange(self.num_positions, dtype=np.int64) * self.codebook_size

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """Codes of the given items, in order; unknown items raise a KeyError naming them."""
        index = pd.Index(self.item_ids)
        pos = index.get_indexer(integral(item_ids, "item_ids"))
        if (pos < 0).any():
            missing = np.asarray(item_ids)[pos < 0][:10].tolist()
            raise KeyError(f"items without semantic IDs in version {self.version!r}: {missing}")
        return self.codes[pos]

    def to_frame(self) -> pd.DataFrame:
        """One row per item: ``item_id``, ``semantic_ids`` (list of codes), ``tokenizer_version``."""
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "semantic_ids": list(self.codes),
                "tokenizer_version": self.version,
            }
        )

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, codebook_size: int, position_names: tuple[str, ...] = ()
    ) -> SemanticIds:
        versions = frame["tokenizer_version"].unique()
        if len(versions) != 1:
            raise ValueError(f"expected one tokenizer_version, got {list(versions)}")
        codes = np.stack([np.asarray(c, dtype=np.int64) for c in frame["semantic_ids"]])
        return cls(frame["item_id"].to_numpy(), codes, codebook_size, str(versions[0]), position_names)

    def save(self, path: str | Path) -> None:
        """Parquet, the position names in its metadata (pandas ``attrs``), written atomically: a
        reader of a shared cache (parallel evaluation workers) never sees half a table."""
        frame = self.to_frame().assign(codebook_size=self.codebook_size)
        frame.attrs = {"position_names": list(self.position_names)}
        write_atomically(path, lambda handle: frame.to_parquet(handle, index=False))

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        frame = pd.read_parquet(path)
        names = tuple(frame.attrs.get("position_names", ()))
        return cls.from_frame(frame, int(frame["codebook_size"].iloc[0]), names)

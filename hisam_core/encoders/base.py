"""Shared pieces of the modality encoders (Sec. 3.2.1, App. B.2): the encoded-batch record with its
``present`` mask, L2 normalisation and model-path checks (devices: :mod:`hisam_core.device`).

Every encoder returns float32 numpy rows that go straight into :class:`hisam_core.features.ItemFeatures`.
Items the encoder has no information for (a missing poster, an item never seen before the behaviour
cut-off) still get a finite, fixed row so the matrix stays aligned, and ``present`` marks them False so
the pipeline can count or quarantine them; ``reasons`` says why, one entry per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def looks_like_path(name: str) -> bool:
    """True when ``name`` is meant as a filesystem path rather than a Hugging Face hub id."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def require_local_dir(path: str | Path, what: str) -> Path:
    """Resolve ``path`` to an existing directory or raise a ValueError naming ``what`` it was for."""
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise ValueError(f"{what}: model path {str(path)!r} does not exist or is not a directory")
    if not (resolved / "config.json").is_file():
        raise ValueError(
            f"{what}: {str(resolved)!r} has no config.json, so it is not a saved transformers model"
        )
    return resolved


@dataclass(frozen=True)
class EncodedBatch:
    """Embeddings for a list of inputs, aligned row by row.

    ``embeddings``: float32 [N, d], finite. ``present``: bool [N], False where the encoder had no
    information for the row and filled in its documented fallback vector. ``reasons``: one string per
    row, empty when present, else why not (e.g. ``"missing file"``).
    """

    embeddings: np.ndarray
    present: np.ndarray
    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        emb = np.asarray(self.embeddings, dtype=np.float32)
        present = np.asarray(self.present, dtype=bool)
        if emb.ndim != 2 or present.shape != (emb.shape[0],) or len(self.reasons) != emb.shape[0]:
            raise ValueError(
                f"inconsistent batch: embeddings {emb.shape}, present {present.shape}, {len(self.reasons)} reasons"
            )
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or inf")
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "reasons", tuple(self.reasons))

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_missing(self) -> int:
        return int((~self.present).sum())

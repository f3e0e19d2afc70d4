"""Figure 3 (Sec. 4.4): similarity between each code position and each modality.

Measure: for code position ``p`` and modality ``m``, the mean over items of the cosine between the
item's codeword at ``p`` (its contribution to the reconstruction ``h_hat + q_m``, Eq. 2) and its aligned
feature ``a_m``, both centred by their catalogue means first:

    S[p, m] = mean_i cos(c_{p,i} - mean_j c_{p,j}, a_{m,i} - mean_j a_{m,j}).

Centring removes constant offsets (the modality gap, the mean codeword) that would otherwise dominate
every cosine, so ``S`` reflects how a position's code varies with a modality across items: shared
positions score alike for all modalities, a disentangled specific position scores highest on its own.
Column ``m`` averages over the items whose modality ``m`` is present (not a fallback row).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _centred_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def position_modality_similarity(
    codewords: np.ndarray, aligned: dict[str, np.ndarray], present: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """``S [positions, modalities]`` from ``codewords [N, P, d]`` and ``aligned[m] [N, d]``, column
    ``m`` over the rows where ``present[m]`` (default: all; NaN when there are none)."""
    codewords = np.asarray(codewords)
    rows = {
        m: np.ones(len(a), bool) if present is None else np.asarray(present[m], bool)
        for m, a in aligned.items()
    }
    return np.array(
        [
            [
                (_centred_unit(codewords[rows[m], p]) * _centred_unit(a[rows[m]])).sum(-1).mean()
                if rows[m].any()
                else np.nan  # no item has the modality
                for m, a in aligned.items()
            ]
            for p in range(codewords.shape[1])
        ]
    )


def save_similarity_figure(
    matrix: np.ndarray,
    position_names: list[str] | tuple[str, ...],
    modality_names: list[str] | tuple[str, ...],
    path: str | Path,
    title: str = "DST code position x modality (centred cosine)",
) -> None:
    """Heatmap of :func:`position_modality_similarity` as a PNG (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(modality_names) + 2.5, 0.5 * len(position_names) + 1.5))
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", aspect="auto", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(modality_names)), labels=list(modality_names))
    ax.set_yticks(range(len(position_names)), labels=list(position_names))
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    logger.info("saved figure %s", path)

"""The sequences benchmark's Polars checksums (benchmarks/sequences.py): what its "identical" verdict
against the Spark build rests on, held against a direct computation over each sample's history."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.sequences import polars_build


def _inputs(tmp_path, codes: np.ndarray):
    rng = np.random.default_rng(0)
    n = 40
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 3, n),
            "item_id": rng.integers(0, len(codes), n),
            "timestamp": rng.integers(0, 12, n),  # repeated instants: a history holds earlier ones only
            "rating": rng.integers(1, 6, n).astype(float),
        }
    )
    (tmp_path / "interactions").mkdir(exist_ok=True)
    events.to_parquet(tmp_path / "interactions" / "part-0.parquet")
    table = pa.table(
        {
            "item_id": np.arange(len(codes), dtype=np.int64),
            "semantic_ids": pa.FixedSizeListArray.from_arrays(codes.ravel(), 6).cast(pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, tmp_path / "semantic_ids.parquet")
    return events


def _flat_weighted(events: pd.DataFrame, codes: np.ndarray, max_hist: int) -> list[int]:
    """Per sample, in (user, order): sum (f + 1) * c_f over its history's flat codes, computed directly."""
    ordered = events.assign(label=(events["rating"] > 3).astype(int)).sort_values(
        ["user_id", "timestamp", "item_id", "label"], kind="stable"
    )
    out = []
    for _, rows in ordered.groupby("user_id", sort=True):
        items, times = rows["item_id"].to_numpy(), rows["timestamp"].to_numpy()
        for t in times:
            flat = codes[items[times < t][-max_hist:]].ravel().astype(np.int64)
            out.append(int((np.arange(1, len(flat) + 1) * flat).sum()))
    return out


def test_semantic_id_checksums_weight_every_code_by_its_flat_position(tmp_path):
    """``sem_wsum`` is sum (f + 1) * c_f over the flat codes of a sample's history (the last L items
    of earlier instants), so codes reordered within one item change it, which an item-weighted sum
    of code sums did not."""
    codes = np.random.default_rng(1).integers(0, 256, size=(8, 6), dtype=np.int32)
    swapped = codes.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # each item's first two codes exchanged
    sums = []
    for name, table in (("a", codes), ("b", swapped)):
        events = _inputs(tmp_path, table)
        built = polars_build(
            tmp_path / "interactions", tmp_path / "semantic_ids.parquet", 0.9, 3, 4, tmp_path / name
        )
        got = built["bounds"].to_pandas().sort_values(["user_id", "seq_pos"])["sem_wsum"].tolist()
        assert got == _flat_weighted(events, table, 4) and any(got)
        sums.append(got)
    assert sums[0] != sums[1]

"""Embedding job: bounded batches through mapInPandas, absent inputs, resumability, real encoders."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from PIL import Image

from hisam_core.encoders.base import EncodedBatch
from hisam_core.encoders.text import TextEncoder, TextEncoderConfig
from spark_jobs.embeddings import (
    EmbeddingJobConfig,
    EncoderSpec,
    HashingTextEncoder,
    build_encoder,
    embed_items,
    encode_batch,
)
from spark_jobs.lake import Lake
from spark_jobs.tables import get_table

DOCS = {
    1: "Title: Galaxy Rocket\nDescription: rocket galaxy alien orbit",
    2: "Title: Starship Nebula\nDescription: galaxy starship alien laser",
    3: "Title: Garden Letters\nDescription: romance letters summer kiss",
    4: "",
}


def documents(spark, docs: dict[int, str], images: dict[int, str | None]):
    import hashlib

    rows = [
        ("ds", i, d, hashlib.sha256(d.encode()).hexdigest(), images.get(i), None, int(bool(d)))
        for i, d in docs.items()
    ]
    return spark.createDataFrame(rows, get_table("gold.item_documents").schema)


def embeddings(lake: Lake, modality: str) -> dict[int, tuple]:
    rows = lake.read("gold.item_embeddings", partitions={"dataset": "ds", "modality": modality}).collect()
    return {
        r.item_id: (np.asarray(r.embedding), r.present, r.encoder, r.encoder_version, r.dim) for r in rows
    }


def test_hashing_encoder_and_encode_batch():
    enc = HashingTextEncoder(dim=32)
    a = enc.encode(["rocket galaxy alien", "rocket galaxy alien", "romance letters kiss"])
    assert np.allclose(np.linalg.norm(a, axis=1), 1) and np.array_equal(a[0], a[1])
    assert a[0] @ a[0] > a[0] @ a[2]
    emb, present = encode_batch(enc, ["rocket", None, "  ", "kiss"])
    assert present.tolist() == [True, False, False, True]
    assert not emb[1].any() and not emb[2].any() and np.allclose(emb[0], enc.encode(["rocket"])[0])

    class Partial:  # an encoder that reports its own missing rows (EncodedBatch)
        dim = 2

        def encode(self, inputs):
            return EncodedBatch(np.ones((len(inputs), 2)), np.array([True, False]), ("", "missing file"))

    emb, present = encode_batch(Partial(), ["a", "b"])
    assert present.tolist() == [True, False] and emb.tolist() == [[1.0, 1.0], [0.0, 0.0]]

    class Wrong:
        dim = 3

        def encode(self, inputs):
            return np.ones((len(inputs), 2))

    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \(1, 3\)"):
        encode_batch(Wrong(), ["a"])


def test_embed_items_is_resumable(spark, tmp_path):
    lake = Lake(spark, tmp_path / "lake")
    lake.write(documents(spark, DOCS, {}), "gold.item_documents", mode="merge")
    spec = EncoderSpec(modality="text", kind="hashing", config={"dim": 16})
    job = EmbeddingJobConfig(batch_size=2, commit_every=2, num_partitions=2)
    first = embed_items(lake, "ds", spec, job)
    assert (first.items, first.skipped, first.embedded, first.absent) == (4, 0, 4, 1)
    # 4 items in hash slices of about 2: one commit per non-empty slice, each a new table version
    history = DeltaTable(str(tmp_path / "lake" / "gold" / "item_embeddings")).history()
    commits = sorted(h["version"] for h in history if h["operation"] != "CREATE TABLE")
    assert first.versions == commits[-len(first.versions) :] and len(set(first.versions)) == len(
        first.versions
    )
    got = embeddings(lake, "text")
    expected = HashingTextEncoder(16).encode([DOCS[1]])[0]
    assert np.allclose(got[1][0], expected) and got[1][1:] == (True, "hashing-16", "1", 16)
    assert got[4][1] is False and not got[4][0].any()  # empty document: zero row, absent
    assert got[1][0] @ got[2][0] > got[1][0] @ got[3][0]  # shared words, closer

    again = embed_items(lake, "ds", spec, job)
    assert (again.skipped, again.embedded, again.versions) == (4, 0, [])
    # one changed document: only that item is redone
    lake.write(documents(spark, {3: "Title: Rocket Letters"}, {}), "gold.item_documents", mode="merge")
    changed = embed_items(lake, "ds", spec, job)
    assert (changed.skipped, changed.embedded) == (3, 1)
    assert np.allclose(
        embeddings(lake, "text")[3][0], HashingTextEncoder(16).encode(["Title: Rocket Letters"])[0]
    )
    # a new encoder version embeds everything again, next to the old rows
    bumped = embed_items(lake, "ds", spec.model_copy(update={"version": "2"}), job)
    assert bumped.embedded == 4
    assert lake.read("gold.item_embeddings").count() == 8
    # one item per slice: items 3 and 4 hash to one slice and one slice is empty, so three commits
    single = embed_items(
        lake, "ds", spec.model_copy(update={"version": "3"}), job.model_copy(update={"commit_every": 1})
    )
    assert single.embedded == 4 and len(set(single.versions)) == len(single.versions) == 3


def test_image_modality_with_descriptor_fallback(spark, tmp_path):
    lake = Lake(spark, tmp_path / "lake")
    paths = {}
    for i, colour in ((1, (250, 10, 10)), (2, (240, 20, 15)), (3, (10, 10, 250))):
        paths[i] = str(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), colour).save(paths[i])
    paths[4] = str(tmp_path / "missing.png")
    lake.write(documents(spark, DOCS, paths), "gold.item_documents", mode="merge")
    report = embed_items(lake, "ds", EncoderSpec(modality="image"), EmbeddingJobConfig(num_partitions=1))
    assert (report.embedded, report.absent, report.encoder) == (4, 1, "descriptor")
    got = embeddings(lake, "image")
    assert [got[i][1] for i in (1, 2, 3, 4)] == [True, True, True, False]
    assert got[1][0] @ got[2][0] > got[1][0] @ got[3][0]  # red is closer to red than to blue
    # the missing file is tried again, and once it is there, embedded; a blank path is never retried
    lake.write(documents(spark, {5: "x"}, {5: " "}), "gold.item_documents", mode="merge")
    spec, job = EncoderSpec(modality="image"), EmbeddingJobConfig(num_partitions=1)
    assert (embed_items(lake, "ds", spec, job).embedded, embeddings(lake, "image")[5][1]) == (2, False)
    Image.new("RGB", (8, 8), (250, 10, 10)).save(paths[4])
    again = embed_items(lake, "ds", spec, job)
    assert (again.skipped, again.embedded, again.absent) == (4, 1, 0)
    got = embeddings(lake, "image")
    assert len(got) == 5 and got[4][1] is True and np.allclose(got[4][0], got[1][0])
    assert embed_items(lake, "ds", spec, job).embedded == 0
    # a file written again with the same bytes is not embedded again; a poster replaced in place is
    Image.new("RGB", (8, 8), (10, 10, 250)).save(paths[3])
    later = os.stat(paths[3]).st_mtime_ns + 10**9
    os.utime(paths[3], ns=(later, later))
    assert embed_items(lake, "ds", spec, job).embedded == 0
    Image.new("RGB", (8, 8), (250, 10, 10)).save(paths[3])
    assert embed_items(lake, "ds", spec, job).embedded == 1
    assert np.allclose(embeddings(lake, "image")[3][0], got[1][0])  # blue became red
    # other settings under the same name and version: every item again, never a mix of two spaces
    smaller = spec.model_copy(update={"config": {"descriptor": {"thumb_size": 8}}})
    assert (smaller.encoder_name(), smaller.version) == (spec.encoder_name(), spec.version)
    assert embed_items(lake, "ds", smaller, job).embedded == 5
    assert len({v[4] for v in embeddings(lake, "image").values()}) == 1  # one dim: one space


def test_a_remote_image_uri_is_absent_once_not_tried_on_every_run(spark, tmp_path):
    """Images are read from local files (and file:// URIs of this host): an http(s) URI can never be
    read here, so it is absent once, as a blank path is, not embedded again on every run."""
    lake = Lake(spark, tmp_path / "lake")
    poster = {1: "https://example.invalid/poster.jpg"}
    lake.write(documents(spark, {1: "x"}, poster), "gold.item_documents", mode="merge")
    spec, job = EncoderSpec(modality="image"), EmbeddingJobConfig(num_partitions=1)
    first = embed_items(lake, "ds", spec, job)
    assert (first.embedded, first.absent, embeddings(lake, "image")[1][1]) == (1, 1, False)
    assert embed_items(lake, "ds", spec, job).embedded == 0


def test_a_share_that_vanishes_is_refused_before_any_vector_turns_absent(spark, tmp_path):
    """Files vanishing under present vectors turn them absent only up to ``max_vanished_fraction``
    of the present vectors (one file always may); above it (an unmounted share: every file gone)
    the run writes nothing."""
    lake = Lake(spark, tmp_path / "lake")
    share = tmp_path / "share"
    share.mkdir()
    paths = {}
    for i in range(1, 7):
        paths[i] = str(share / f"{i}.png")
        Image.new("RGB", (8, 8), (40 * i, 10, 10)).save(paths[i])
    lake.write(documents(spark, {i: f"film {i}" for i in paths}, paths), "gold.item_documents", mode="merge")
    spec, job = EncoderSpec(modality="image"), EmbeddingJobConfig(num_partitions=1)
    assert embed_items(lake, "ds", spec, job).absent == 0
    version = DeltaTable(lake.path("gold.item_embeddings")).version

    def present() -> list[int]:
        return sorted(i for i, (_, there, *_) in embeddings(lake, "image").items() if there)

    os.remove(paths[1])  # one file: an ordinary deletion
    assert (embed_items(lake, "ds", spec, job).absent, present()) == (1, [2, 3, 4, 5, 6])
    os.remove(paths[2])
    os.remove(paths[3])  # two of five at once: 0.4 of the present vectors
    written = version()
    with pytest.raises(
        ValueError, match=r"files of 2 of the 5 items .*'.*2\.png'.*max_vanished_fraction 0\.05"
    ):
        embed_items(lake, "ds", spec, job)
    assert version() == written and present() == [2, 3, 4, 5, 6]
    allowed = job.model_copy(update={"max_vanished_fraction": 0.4})
    assert embed_items(lake, "ds", spec, allowed).absent == 3  # item 1's missing file is tried again
    share.rename(tmp_path / "unmounted")
    written = version()
    with pytest.raises(ValueError, match=r"files of 3 of the 3 items .*is the share they are on mounted\?"):
        embed_items(lake, "ds", spec, allowed)
    assert version() == written and present() == [4, 5, 6]
    everything = embed_items(lake, "ds", spec, job.model_copy(update={"max_vanished_fraction": 1}))
    assert (everything.embedded, everything.absent, present()) == (6, 6, [])


def test_each_row_records_its_settings_and_rows_from_before_the_column_get_theirs(
    spark, tmp_path, monkeypatch
):
    """A re-embed under new settings and the same name and version overwrites the rows one slice at
    a time: the ``fingerprint`` tells the two spaces apart while it is in progress or after it
    crashed. A table written before the column gets it on its next embed, on exactly the rows whose
    input hash proves the settings, in one commit before anything else; their vectors are unchanged."""
    from deltalake import write_deltalake

    def fingerprints(lake: Lake) -> dict[int, str | None]:
        rows = lake.read("gold.item_embeddings").select("item_id", "fingerprint").collect()
        return {r.item_id: r.fingerprint for r in rows}

    lake = Lake(spark, tmp_path / "lake")
    lake.write(documents(spark, DOCS, {}), "gold.item_documents", mode="merge")
    words = EncoderSpec(modality="text", kind="hashing", name="words", config={"dim": 16})
    job = EmbeddingJobConfig(batch_size=2, commit_every=1, num_partitions=1)
    first = embed_items(lake, "ds", words, job)
    assert (first.embedded, first.fingerprinted) == (4, 0)
    assert set(fingerprints(lake).values()) == {words.fingerprint()}
    before = embeddings(lake, "text")

    # the same table as an older release wrote it, without the column; then document 3 changes
    stored = DeltaTable(str(tmp_path / "lake" / "gold" / "item_embeddings")).to_pyarrow_table()
    legacy = Lake(spark, tmp_path / "legacy")
    write_deltalake(
        legacy.path("gold.item_embeddings"),
        stored.drop(["fingerprint"]),
        partition_by=["dataset", "modality"],
    )
    docs = {**DOCS, 3: "Title: Rocket Letters"}
    legacy.write(documents(spark, docs, {}), "gold.item_documents", mode="merge")
    assert set(fingerprints(legacy).values()) == {None}
    upgraded = embed_items(legacy, "ds", words, job)
    assert (upgraded.fingerprinted, upgraded.skipped, upgraded.embedded) == (3, 3, 1)
    history = DeltaTable(legacy.path("gold.item_embeddings")).history()
    recorded = next(h for h in history if h["version"] == upgraded.versions[0])
    assert recorded["operation"] == "MERGE" and recorded["operationMetrics"]["num_target_rows_updated"] == 3
    assert set(fingerprints(legacy).values()) == {words.fingerprint()}
    after = embeddings(legacy, "text")
    assert all(np.array_equal(after[i][0], before[i][0]) for i in (1, 2, 4))
    assert not np.array_equal(after[3][0], before[3][0])
    assert embed_items(legacy, "ds", words, job).versions == []  # recorded once: nothing to commit
    # a row of an item no longer in the catalogue never gets one, and never costs the inputs again
    from pyspark.sql import functions as F

    from spark_jobs.embeddings import record_fingerprints

    retracted = (
        legacy.read("gold.item_embeddings")
        .filter("item_id = 1")
        .withColumns({"item_id": F.lit(99).cast("long"), "fingerprint": F.lit(None).cast("string")})
    )
    legacy.write(retracted, "gold.item_embeddings", mode="merge")
    unreadable = spark.createDataFrame([(1, "h")], "item_id long, input_hash string").withColumn(
        "input_hash", F.raise_error(F.lit("the inputs were computed"))
    )
    recorded = record_fingerprints(legacy, "ds", "text", ("words", "1"), words.fingerprint(), unreadable)
    assert recorded == (0, None) and fingerprints(legacy)[99] is None
    DeltaTable(legacy.path("gold.item_embeddings")).delete("item_id = 99")

    # new settings, same name and version: the re-embed crashes after its first slice
    wider = words.model_copy(update={"config": {"dim": 32}})
    assert wider.fingerprint() != words.fingerprint()
    write = Lake.write
    merges = []

    def crash_after_one_slice(self, df, table, **kwargs):
        merges.append(table)
        if len(merges) > 1:
            raise RuntimeError("worker lost")
        return write(self, df, table, **kwargs)

    monkeypatch.setattr(Lake, "write", crash_after_one_slice)
    with pytest.raises(RuntimeError, match="worker lost"):
        embed_items(legacy, "ds", wider, job)
    monkeypatch.setattr(Lake, "write", write)
    half = fingerprints(legacy)
    new = {i for i, f in half.items() if f == wider.fingerprint()}
    assert len(half) == 4 and 0 < len(new) < 4  # one key per item: two spaces in one name and version
    assert {i for i, f in half.items() if f == words.fingerprint()} == set(half) - new
    assert all(embeddings(legacy, "text")[i][4] == 32 for i in new)
    resumed = embed_items(legacy, "ds", wider, job)
    assert (resumed.skipped, resumed.embedded) == (len(new), 4 - len(new))
    assert set(fingerprints(legacy).values()) == {wider.fingerprint()}


@pytest.mark.slow
def test_default_text_encoder_is_wired():
    """The real hisam_core TextEncoder (bundled all-MiniLM-L6-v2) behind the job's spec."""
    spec = EncoderSpec(modality="text")
    encoder = build_encoder(spec, device="cpu")  # the job's default, whatever the worker has
    assert str(encoder.device) == "cpu"
    emb, present = encode_batch(encoder, [DOCS[1], DOCS[2], DOCS[3], ""])
    assert spec.encoder_name() == "all-MiniLM-L6-v2" and emb.shape == (4, encoder.dim)
    assert present.tolist() == [True, True, True, False]
    assert np.allclose(np.linalg.norm(emb[:3], axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    direct = TextEncoder(TextEncoderConfig(), device="cpu").encode([DOCS[1], DOCS[2], DOCS[3]])
    np.testing.assert_allclose(emb[:3], direct, atol=1e-6)  # the job's encoder is the library's default


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 'default', 'hashing' or 'module:factory'"):
        build_encoder(EncoderSpec(modality="text", kind="nonsense"))


def test_the_jobs_device_reaches_the_workers_encoder(monkeypatch):
    """What ``_encode_partitions`` ships to the Spark workers builds the encoder on the job's device
    (``auto`` is None: CUDA when the worker has one), once per worker, spec and device."""
    from pydantic import ValidationError

    from spark_jobs import embeddings

    built: list[str | None] = []

    def fake(spec, device=None):
        built.append(device)
        return HashingTextEncoder(8)

    monkeypatch.setattr(embeddings, "build_encoder", fake)
    monkeypatch.setattr(embeddings, "_ENCODERS", {})
    spec_json = EncoderSpec(modality="text", kind="hashing").model_dump_json()
    frame = pd.DataFrame({"dataset": ["ds"], "item_id": [1], "input": ["a film"], "input_hash": ["h"]})
    for device in ("cpu", "auto", "cpu"):
        job = EmbeddingJobConfig(device=device, torch_threads=None)
        out = list(embeddings._encode_partitions(spec_json, job)(iter([frame])))
        assert len(out) == 1 and out[0]["present"].tolist() == [True]
    assert built == ["cpu", None]  # the second cpu job reused the worker's encoder
    with pytest.raises(ValidationError, match="device"):
        EmbeddingJobConfig(device="gpu")

"""Embedding job: gold item documents -> ``gold.item_embeddings`` per modality (Sec. 3.2.1).

The hisam_core encoders run inside ``mapInPandas`` (one encoder per Python worker, reused across
tasks), on bounded batches of ``batch_size`` inputs:

* ``text``: the item document -> :class:`hisam_core.encoders.TextEncoder` (all-MiniLM-L6-v2 by
  default), or ``kind="hashing"`` (:class:`HashingTextEncoder`, model-free, for tests and smoke runs).
* ``image``: the item's ``image_path`` -> :func:`hisam_core.encoders.build_image_encoder` (a local
  transformers vision model when ``config.model_path`` is set, else the hand-crafted
  ``DescriptorImageEncoder``). Remote ``image_url`` values are not downloaded.
* any ``kind="package.module:factory"`` returning an object with ``dim`` and ``encode(list[str])``
  (a float array ``[n, dim]`` or an :class:`hisam_core.encoders.EncodedBatch`).

Items without input (no text, no image file) get a zero row with ``present = False``, as the
encoders do for missing files, so every modality covers the same items.

Resumable: an item is skipped when a row for the same (dataset, modality, encoder name, encoder
version) exists with the same ``input_hash``: a hash of what the encoder reads (the document, or the
image path and the file's bytes, so a poster replaced in place is embedded again; each local image
is read once per run for it, twice on the run that records fingerprints) and of the encoder's settings (:meth:`EncoderSpec.fingerprint`, so
changed settings embed every item again). The work is committed in slices of ``commit_every`` items
(one MERGE each), so a crash loses at most one slice and a rerun continues where it stopped. Each row
records its settings' ``fingerprint`` too: while a re-embed under new settings is in progress (or
after it crashed midway), the table holds rows of two spaces under one name and version, and readers
take only the configured settings' rows (:func:`record_fingerprints` fills the column in on rows
written before it). Bump ``version`` when the model's weights change under the same path: the
files are not hashed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from hisam_core.config import DEVICE_PATTERN, Config
from spark_jobs.lake import Lake
from spark_jobs.tables import GOLD_ITEM_DOCUMENTS, GOLD_ITEM_EMBEDDINGS

logger = logging.getLogger(__name__)

Modality = Literal["text", "image"]


class Encoder(Protocol):
    """What the job needs from an encoder."""

    dim: int

    def encode(self, inputs: list[str]) -> Any:  # np.ndarray [n, dim] or EncodedBatch
        ...


#: Encoder settings that do not change a vector (how many inputs per call, where files are found).
EXECUTION_SETTINGS = frozenset({"batch_size", "local_files_only"})
#: Settings added after fingerprints were first recorded, with the behaviour before them: digested
#: only when set otherwise, so the rows and tokenizers of earlier configs keep their fingerprint.
ADDED_SETTINGS: dict[str, dict[str, Any]] = {"text": {"pooling": "mean"}}


class EncoderSpec(Config):
    """Which encoder to run for which modality; ``name``/``version`` identify its rows."""

    modality: Modality
    #: ``default`` (the hisam_core encoder of the modality), ``hashing``, or ``module:factory``.
    kind: str = "default"
    #: Recorded in the table; default: the model (path) name, ``hashing-<dim>`` or the factory.
    name: str | None = None
    version: str = "1"
    #: Settings passed to the encoder (``TextEncoderConfig`` / ``ImageEncoderConfig`` fields, or the
    #: factory's keyword arguments).
    config: dict[str, Any] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """A digest of the settings that shape the vectors (defaults filled in; batch sizes, where
        model files are looked up and the settings of the image encoder not in use, the descriptor's
        or the model's, left at their defaults): what its rows' ``input_hash`` covers besides the
        input, and what a tokenizer trained on its vectors records."""
        if self.kind == "default":
            if self.modality == "text":
                from hisam_core.encoders.text import TextEncoderConfig as Settings
            else:
                from hisam_core.encoders.image import ImageEncoderConfig as Settings  # type: ignore[assignment]
            settings = Settings(**self.config)
            if self.modality == "image":  # the settings of the other image encoder shape nothing
                default = Settings()
                unused = ("pooling",) if settings.model_path is None else ("descriptor",)  # type: ignore[attr-defined]
                settings = settings.model_copy(update={k: getattr(default, k) for k in unused})
            config = settings.model_dump(mode="json")
            for key, before in ADDED_SETTINGS.get(self.modality, {}).items():
                if config.get(key) == before:
                    del config[key]
        elif self.kind == "hashing":
            config = {"dim": self.config.get("dim", HashingTextEncoder.DEFAULT_DIM)}
        else:  # a factory's keyword arguments: what each one does is the factory's
            config = dict(self.config)
        shaping = {k: v for k, v in config.items() if k not in EXECUTION_SETTINGS}
        settings = json.dumps({"kind": self.kind, "config": shaping}, sort_keys=True, default=str)
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    def encoder_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == "hashing":
            return f"hashing-{self.config.get('dim', HashingTextEncoder.DEFAULT_DIM)}"
        if self.kind != "default":
            return self.kind
        if self.modality == "text":
            return str(self.config.get("model_name_or_path") or "all-MiniLM-L6-v2")
        return str(self.config.get("model_path") or "descriptor")


class EmbeddingJobConfig(Config):
    """Batching and parallelism of the job."""

    #: Inputs per ``encode`` call (bounds memory per task).
    batch_size: int = Field(64, ge=1)
    #: Items per commit (MERGE); progress is durable per slice.
    commit_every: int = Field(50_000, ge=1)
    #: Spark partitions per slice; None = the session's default parallelism.
    num_partitions: int | None = Field(None, ge=1)
    #: torch threads per Python worker (avoid oversubscribing cores); None leaves torch's default.
    torch_threads: int | None = Field(1, ge=1)
    #: Where each Python worker runs a transformers encoder: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or ``auto``
    #: (None), CUDA when the worker has one, but every worker (one per core) then loads its own copy
    #: of the model onto it. Not part of an encoder's fingerprint: it changes where rows are
    #: computed, not what they mean.
    device: str | None = Field("cpu", pattern=DEVICE_PATTERN)
    #: The largest share of the items with a present image vector whose file may vanish in one run
    #: (their vectors become absent rows; one file always may). Above it the run is refused before
    #: anything is written: an unmounted poster share looks like every file deleted. 1 turns the
    #: check off (a mass removal).
    max_vanished_fraction: float = Field(0.05, ge=0, le=1)

    @field_validator("device")
    @classmethod
    def _auto(cls, value: str | None) -> str | None:
        return None if value == "auto" else value


class HashingTextEncoder:
    """Model-free text encoder: signed feature hashing of lowercase word tokens, L2-normalised.

    Deterministic across processes (MD5, not Python's salted ``hash``); texts sharing words get
    similar vectors. For tests and smoke runs, not a substitute for a sentence encoder.
    """

    DEFAULT_DIM = 64
    _TOKEN = re.compile(r"[a-z0-9]+")

    def __init__(self, dim: int = DEFAULT_DIM) -> None:
        if dim < 2:
            raise ValueError(f"hashing encoder: dim must be >= 2, got {dim}")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in self._TOKEN.findall(text.lower()):
                h = int.from_bytes(hashlib.md5(token.encode()).digest()[:8], "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def build_encoder(spec: EncoderSpec, device: str | None = None) -> Encoder:
    """Instantiate the encoder described by ``spec`` (heavy imports happen here, on the worker); a
    transformers encoder on ``device`` (None: CUDA when available)."""
    if spec.kind == "hashing":
        return HashingTextEncoder(**spec.config)
    if spec.kind != "default":
        module, _, attr = spec.kind.partition(":")
        if not attr:
            raise ValueError(f"encoder kind {spec.kind!r}: expected 'default', 'hashing' or 'module:factory'")
        factory: Callable[..., Encoder] = getattr(importlib.import_module(module), attr)
        return factory(**spec.config)
    if spec.modality == "text":
        from hisam_core.encoders.text import TextEncoder, TextEncoderConfig

        return TextEncoder(TextEncoderConfig(**spec.config), device=device)
    from hisam_core.encoders.image import ImageEncoderConfig, build_image_encoder

    return build_image_encoder(ImageEncoderConfig(**spec.config), device=device)


_ENCODERS: dict[tuple[str, str | None], Encoder] = {}


def _worker_encoder(spec_json: str, job: EmbeddingJobConfig) -> Encoder:
    """One encoder per Python worker process, spec and device (workers are reused across tasks)."""
    key = (spec_json, job.device)
    if key not in _ENCODERS:
        if job.torch_threads is not None:
            import torch

            torch.set_num_threads(job.torch_threads)
        _ENCODERS[key] = build_encoder(EncoderSpec.model_validate_json(spec_json), job.device)
    return _ENCODERS[key]


def encode_batch(encoder: Encoder, inputs: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[n, dim]`` and ``present`` for ``inputs``; blank inputs, and rows the encoder
    reports missing (an unreadable image), -> zero row, absent."""
    n = len(inputs)
    valid = np.array([isinstance(x, str) and x.strip() != "" for x in inputs], dtype=bool)
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    if valid.any():
        result = encoder.encode([x for x, ok in zip(inputs, valid, strict=True) if ok])
        emb = np.asarray(getattr(result, "embeddings", result), dtype=np.float32)
        got = np.asarray(getattr(result, "present", np.ones(len(emb), dtype=bool)), dtype=bool)
        if emb.shape != (int(valid.sum()), encoder.dim):
            raise ValueError(
                f"encoder returned shape {emb.shape}, expected ({int(valid.sum())}, {encoder.dim})"
            )
        if not np.isfinite(emb).all():
            raise ValueError("encoder returned NaN or inf values")
        out[valid] = np.where(got[:, None], emb, 0.0)
        present[valid] = got
    return out, present


def _encode_partitions(
    spec_json: str, job: EmbeddingJobConfig
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    spec = EncoderSpec.model_validate_json(spec_json)
    name, version, fingerprint = spec.encoder_name(), spec.version, spec.fingerprint()

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        encoder = _worker_encoder(spec_json, job)
        for frame in frames:
            for start in range(0, len(frame), job.batch_size):
                part = frame.iloc[start : start + job.batch_size]
                emb, present = encode_batch(encoder, part["input"].tolist())
                yield pd.DataFrame(
                    {
                        "dataset": part["dataset"].to_numpy(),
                        "modality": spec.modality,
                        "encoder": name,
                        "encoder_version": version,
                        "item_id": part["item_id"].to_numpy(dtype=np.int64),
                        "dim": np.int32(encoder.dim),
                        "embedding": list(emb),
                        "present": present,
                        "input_hash": part["input_hash"].to_numpy(),
                        "fingerprint": fingerprint,
                    }
                )

    return run


def file_digest(path: str | None) -> str:
    """SHA-256 of a local file's bytes, ``missing`` when there is none (``NOT_A_FILE``: as the image
    encoders decide, so the item's row is an absent one), and ``""`` for no path or a
    remote URI (not read: its path alone identifies it). The bytes, not the modification time: a
    source that writes the same file again must not make every image be embedded again. Any other
    read failure (permissions, an I/O error of a share) is raised: as ``missing`` it would change the
    item's input and replace its vector with an absent one."""
    if path is None or not path.strip() or ("://" in path and not path.startswith("file://")):
        return ""
    from hisam_core.encoders.image import NOT_A_FILE, local_path

    local = local_path(path)
    try:  # a folder, a device (/dev/zero never ends), a FIFO (opening it waits for a writer) or a
        if not stat.S_ISREG(os.stat(local).st_mode):  # socket is no file, as the encoders' is_file()
            return "missing"  # decides; non-blocking and checked again: one may be swapped in since
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK)
        try:  # closed here: open() of a folder's descriptor raises and leaves it open
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "missing"
            with open(fd, "rb", closefd=False) as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in NOT_A_FILE:
            return "missing"
        raise OSError(f"cannot read image {path!r} ({err}); nothing is embedded until it can be") from err


def embedding_inputs(documents: DataFrame, modality: Modality) -> DataFrame:
    """``dataset, item_id, input, input_hash, input_missing`` of gold.item_documents rows for
    ``modality``: the hash of what the encoder reads (the document, or the image path and the file's
    bytes), and whether the input names a local file that is not there."""
    if modality == "text":
        return documents.select(
            "dataset",
            "item_id",
            F.col("document").alias("input"),
            F.col("document_hash").alias("input_hash"),
            F.lit(False).alias("input_missing"),
        )
    path = F.when(F.trim("image_path") != "", F.col("image_path"))
    digest = F.pandas_udf(lambda paths: paths.map(file_digest), "string")(path)  # where the encoder reads
    return documents.select("dataset", "item_id", path.alias("input"), digest.alias("digest")).select(
        "dataset",
        "item_id",
        "input",
        F.sha2(F.concat_ws("\0", F.coalesce("input", F.lit("")), "digest"), 256).alias("input_hash"),
        (F.col("digest") == "missing").alias("input_missing"),
    )


def embed(inputs: DataFrame, spec: EncoderSpec, config: EmbeddingJobConfig) -> DataFrame:
    """``dataset, item_id, input, input_hash`` rows -> gold.item_embeddings rows (lazy)."""
    spec_json = spec.model_dump_json()
    schema = GOLD_ITEM_EMBEDDINGS.schema
    return inputs.mapInPandas(_encode_partitions(spec_json, config), schema)


@dataclass
class EmbeddingReport:
    dataset: str
    modality: str
    encoder: str
    encoder_version: str
    items: int = 0
    skipped: int = 0
    embedded: int = 0
    absent: int = 0
    fingerprinted: int = 0
    versions: list[int] = field(default_factory=list)


def record_fingerprints(
    lake: Lake,
    dataset: str,
    modality: str,
    encoder: tuple[str, str],
    fingerprint: str,
    current: DataFrame,
) -> tuple[int, int | None]:
    """Record ``fingerprint`` on the rows of ``encoder`` (name, version) written before
    ``gold.item_embeddings`` had the column, where ``current`` (``item_id, input_hash``: the hashes
    the configured settings give today) proves it: a row's ``input_hash`` covers its settings. One
    MERGE; returns the rows recorded and the version committed (None when no row needed it). Rows of
    catalogue items it leaves without one were computed with other settings or another input (the
    embed redoes them); rows of items retracted from the catalogue are never read, and left as
    they are."""
    name, version = encoder
    part = {"dataset": dataset, "modality": modality}
    listed = lake.read(GOLD_ITEM_DOCUMENTS, partitions={"dataset": dataset}).select("item_id")
    unrecorded = (
        lake.read(GOLD_ITEM_EMBEDDINGS, partitions=part)
        .filter(
            (F.col("encoder") == name) & (F.col("encoder_version") == version) & F.col("fingerprint").isNull()
        )
        .join(listed, "item_id", "left_semi")
    )
    if unrecorded.isEmpty():  # every day once recorded: ``current`` (image digests) is not computed
        return 0, None
    legacy = (
        unrecorded.join(current.select("item_id", "input_hash"), ["item_id", "input_hash"], "left_semi")
        .withColumn("fingerprint", F.lit(fingerprint))
        .cache()
    )
    try:
        n = legacy.count()
        if not n:
            return 0, None
        written = lake.write(legacy, GOLD_ITEM_EMBEDDINGS, mode="merge", partition_values=part)
    finally:
        legacy.unpersist()
    logger.info(
        "%s/%s: recorded the settings fingerprint of %d rows of %s v%s", dataset, modality, n, name, version
    )
    return n, written


def refuse_vanished_inputs(todo: DataFrame, done: DataFrame, max_fraction: float, label: str) -> None:
    """Refuse a run that would turn more than ``max_fraction`` of the present vectors of ``done``
    (the encoder's rows: ``item_id, present``) into absent ones because the files ``todo`` (the
    inputs to embed, with ``input_missing``) names are no longer there: one unmounted share makes
    every poster look deleted, and the next monthly DST would learn from no image at all. One file
    may always vanish (a catalogue of a few posters is not stopped by one deletion)."""
    present = done.filter("present").select("item_id")
    vanished = todo.filter("input_missing").join(present, "item_id", "left_semi").select("input")
    n = vanished.count()
    if not n:
        return
    had = present.count()
    if n > 1 and n > max_fraction * had:
        examples = ", ".join(repr(r.input) for r in vanished.limit(3).collect())
        raise ValueError(
            f"{label}: the files of {n} of the {had} items with a present vector are no longer there "
            f"(e.g. {examples}), above max_vanished_fraction {max_fraction}: is the share they are on "
            f"mounted? Nothing of {label} was written. If they were removed on purpose, run with a larger "
            "embeddings.job.max_vanished_fraction (1 turns the check off)."
        )
    logger.warning(
        "%s: the files of %d of %d items with a present vector are gone: absent rows", label, n, had
    )


def embed_items(
    lake: Lake, dataset: str, spec: EncoderSpec, config: EmbeddingJobConfig | None = None
) -> EmbeddingReport:
    """Embed every item of ``dataset`` not yet embedded by this encoder name/version with this input,
    and again those whose input was given but unreadable (``present`` False, e.g. a missing image)."""
    config = config or EmbeddingJobConfig()
    name = spec.encoder_name()
    report = EmbeddingReport(dataset, spec.modality, name, spec.version)
    docs = lake.read(GOLD_ITEM_DOCUMENTS, partitions={"dataset": dataset})
    inputs = embedding_inputs(docs, spec.modality).withColumn(  # and of the encoder's settings
        "input_hash", F.sha2(F.concat_ws(":", "input_hash", F.lit(spec.fingerprint())), 256)
    )
    part = {"dataset": dataset, "modality": spec.modality}
    done = (
        lake.read(GOLD_ITEM_EMBEDDINGS, partitions=part)
        .filter((F.col("encoder") == name) & (F.col("encoder_version") == spec.version))
        .select("item_id", "input_hash", "present")
    )
    # an input that was given but could not be read (an image file not there yet) is tried again;
    # not a remote URI: images are read from local files (file:// of this host), so it never will be
    given = F.trim(F.coalesce(F.col("input"), F.lit(""))) != ""
    if spec.modality == "image":
        remote = F.col("input").rlike("^[A-Za-z][A-Za-z0-9+.-]*://") & ~F.col("input").startswith("file://")
        given = given & ~remote
    todo = (
        inputs.join(done, ["item_id", "input_hash"], "left")
        .filter(F.col("present").isNull() | (~F.col("present") & given))
        .drop("present")
        .cache()
    )
    try:
        report.items = docs.count()
        pending = todo.count()
        report.skipped = report.items - pending
        if pending:  # before anything is written
            refuse_vanished_inputs(todo, done, config.max_vanished_fraction, f"{dataset}/{spec.modality}")
        report.fingerprinted, recorded = record_fingerprints(  # no hash changes: todo stands
            lake, dataset, spec.modality, (name, spec.version), spec.fingerprint(), inputs
        )
        report.versions += [] if recorded is None else [recorded]
        slices = max(1, math.ceil(pending / config.commit_every))
        partitions = config.num_partitions or lake.spark.sparkContext.defaultParallelism
        logger.info(
            "embed %s/%s with %s v%s: %d items, %d already done, %d slices",
            dataset, spec.modality, name, spec.version, report.items, report.skipped, slices,
        )  # fmt: skip
        for k in range(slices if pending else 0):
            chunk = todo.filter(F.pmod(F.xxhash64("item_id"), F.lit(slices)) == k) if slices > 1 else todo
            rows = embed(chunk.repartition(partitions), spec, config).cache()
            try:
                stats = rows.agg(
                    F.count(F.lit(1)).alias("n"), F.sum((~F.col("present")).cast("int")).alias("absent")
                ).first()
                if stats["n"]:  # a hash slice can be empty: merging it would commit nothing
                    report.versions.append(
                        lake.write(rows, GOLD_ITEM_EMBEDDINGS, mode="merge", partition_values=part)
                    )
            finally:
                rows.unpersist()
            report.embedded += int(stats["n"])
            report.absent += int(stats["absent"] or 0)
            logger.info(
                "embed %s/%s: slice %d/%d %s",
                dataset,
                spec.modality,
                k + 1,
                slices,
                f"committed ({stats['n']} items)" if stats["n"] else "empty, nothing to commit",
            )
    finally:
        todo.unpersist()
    if report.absent:
        logger.warning(
            "%s/%s: %d items had no input (zero rows, present=False)", dataset, spec.modality, report.absent
        )
    return report

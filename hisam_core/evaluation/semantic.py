"""Semantic-ID tables of the comparison (Sec. 4.3, Tables 3-4, Figure 2), trained once and cached.

A :class:`TokenizerVariant` names how an item catalogue becomes codes:

* ``dst``: DST (Sec. 3.2) on the chosen modalities (at least two): CGA, shared RQ, PSGR codebooks.
  ``alignment: false`` is the *w/o CGA* ablation (``DSTConfig.fusion = "concat"``): no GRAM loss
  (Eq. 1) and no alignment warm-up; the modalities' projections are concatenated and mapped linearly
  to ``d`` for the shared codes, and PSGR recovers each modality from what those codes miss.
* ``rqvae``: plain RQ-VAE over the concatenated modalities (QARM/TIGER-like), as many codebooks as
  DST would use (3 shared + one per modality); with one modality this is the *behaviour only* table.
* ``dst_rq``: the *w/o DMRQ* ablation: the CGA-aligned features ``a_m`` of the ``dst`` model on the
  same modalities, concatenated and quantised by a plain residual quantizer (RQ-VAE), same budget.

Tables are cached as ``<cache_dir>/sids_<key>.parquet``, DST checkpoints as ``dst_<key>.pt``; the key
hashes the variant, the training configs, the feature arrays and their ``present`` masks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from hisam_core.config import Config
from hisam_core.features import MODALITIES, ItemFeatures
from hisam_core.semantic_ids import SemanticIds
from hisam_core.tokenizer.dst import DST
from hisam_core.tokenizer.rqvae import RQVAEConfig, RQVAETrainConfig, train_rqvae
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer

logger = logging.getLogger(__name__)

#: Part of the cache keys, per trainer: bump one when a change to it (DST or the RQ-VAE, or their
#: training) changes what its cached models or tables hold, so no cache from before it is read; a
#: table keys on the versions of every trainer it needs (``dst_rq``: both). RQ-VAE 3: fallback rows.
CACHE_VERSIONS = {"dst": 2, "rqvae": 3}
TRAINERS = {"dst": ("dst",), "rqvae": ("rqvae",), "dst_rq": ("dst", "rqvae")}


class TokenizerVariant(Config):
    """One semantic-ID table: tokenizer kind, modalities and the CGA switch (module docstring)."""

    kind: Literal["dst", "rqvae", "dst_rq"] = "dst"
    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES), min_length=1)
    alignment: bool = Field(True, description="false: w/o CGA (concatenation, no GRAM loss); dst only")

    @model_validator(mode="after")
    def _check(self) -> TokenizerVariant:
        if self.kind in ("dst", "dst_rq") and len(self.modalities) < 2:
            raise ValueError(f"{self.kind} needs at least two modalities, got {self.modalities}")
        if not self.alignment and self.kind != "dst":
            raise ValueError("alignment: false (w/o CGA) applies to kind 'dst' only")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities repeat: {self.modalities}")
        return self


def features_fingerprint(features: ItemFeatures) -> str:
    """SHA-1 of the ids, arrays and masks: what the caches key on and a result records."""
    digest = hashlib.sha1(features.item_ids.tobytes())
    for name in sorted(features.modalities):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(features.modalities[name]).tobytes())
        digest.update(np.ascontiguousarray(features.present[name]).tobytes())
    return digest.hexdigest()


def _key(trainers: tuple[str, ...], *parts: object) -> str:
    versions = [CACHE_VERSIONS[t] for t in trainers]
    text = json.dumps(
        [*versions, *(p.model_dump(mode="json") if isinstance(p, Config) else p for p in parts)],
        sort_keys=True,
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _select(features: ItemFeatures, modalities: list[str]) -> ItemFeatures:
    missing = [m for m in modalities if m not in features.modalities]
    if missing:
        raise ValueError(f"modalities {missing} are not in the features ({list(features.modalities)})")
    return ItemFeatures(
        features.item_ids,
        {m: features.modalities[m] for m in modalities},
        {m: features.present[m] for m in modalities},
    )


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock``: parallel workers that miss the same cache entry
    train it once, the others wait and read it."""
    with open(path.with_name(f"{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _dst(
    variant: TokenizerVariant, features: ItemFeatures, config: TokenizerTrainConfig, cache_dir: Path
) -> DST:
    """The (cached) DST model of ``variant`` (kind ignored: ``dst_rq`` reuses the ``dst`` model)."""
    model = config.model.model_copy(
        update={"anchor_modality": "text" if "text" in variant.modalities else variant.modalities[-1]}
    )
    update: dict[str, object] = {"model": model}
    if not variant.alignment:
        update |= {
            "model": model.model_copy(update={"alignment_weight": 0.0, "fusion": "concat"}),
            "alignment_warmup_epochs": 0,
        }
    config = TokenizerTrainConfig.model_validate({**config.model_dump(), **update})
    path = cache_dir / f"dst_{_key(('dst',), variant.modalities, config, features_fingerprint(features))}.pt"
    with _exclusive(path):
        if path.exists():
            return DST.load_checkpoint(path)
        logger.info("training DST on %s (alignment=%s)", variant.modalities, variant.alignment)
        return train_tokenizer(features, config, checkpoint_path=path).eval()


def semantic_ids(
    variant: TokenizerVariant,
    features: ItemFeatures,
    tokenizer: TokenizerTrainConfig,
    rqvae: RQVAETrainConfig,
    cache_dir: str | Path,
) -> SemanticIds:
    """The semantic-ID table of ``variant`` over the catalogue (trained once, then read from cache)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = _select(features, variant.modalities)
    key = _key(TRAINERS[variant.kind], variant, tokenizer, rqvae, features_fingerprint(features))
    path = cache_dir / f"sids_{key}.parquet"
    with _exclusive(path):
        if path.exists():
            return SemanticIds.load(path)
        return _train_ids(variant, features, tokenizer, rqvae, cache_dir, path)


def _train_ids(
    variant: TokenizerVariant,
    features: ItemFeatures,
    tokenizer: TokenizerTrainConfig,
    rqvae: RQVAETrainConfig,
    cache_dir: Path,
    path: Path,
) -> SemanticIds:
    version = f"{variant.kind}-{'-'.join(variant.modalities)}{'' if variant.alignment else '-nocga'}"
    layers = tokenizer.model.shared_layers + len(variant.modalities)
    rq = rqvae.model_copy(
        update={
            "model": RQVAEConfig.from_dict(
                {
                    **rqvae.model.model_dump(),
                    "num_layers": layers,
                    "codebook_size": tokenizer.model.codebook_size,
                }
            )
        }
    )
    if variant.kind == "rqvae":
        ids = train_rqvae(features, rq).encode(features, version)
    else:
        dst = _dst(variant, features, tokenizer, cache_dir)
        if variant.kind == "dst":
            ids = dst.encode(features, version)
        else:
            with torch.no_grad():
                aligned = dst.cga(dst.tensors(features)[0])
            aligned_features = ItemFeatures(
                features.item_ids, {m: aligned[m].cpu().numpy() for m in dst.modalities}, features.present
            )
            ids = train_rqvae(aligned_features, rq).encode(aligned_features, version)
    ids.save(path)
    logger.info(
        "semantic IDs %s: %d items x %d codes -> %s", version, len(ids.item_ids), ids.num_positions, path
    )
    return ids


def npz_cutoff(path: str | Path) -> int | None:
    """The behaviour cut-off (unix seconds) a features file records in ``cutoff``, if it does."""
    with np.load(path) as z:
        return int(z["cutoff"]) if "cutoff" in z.files else None


def load_features_npz(path: str | Path) -> ItemFeatures:
    """Item features from an ``.npz`` with ``item_ids``, one ``emb_<modality>`` array per modality and,
    optionally, its ``present_<modality>`` mask (all True when absent): the format of the
    ``benchmarks/movielens_features.py`` cache."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"features file {path} does not exist")
    with np.load(path) as z:
        modalities = {
            k.removeprefix("emb_"): z[k].astype(np.float32) for k in z.files if k.startswith("emb_")
        }
        if "item_ids" not in z.files or not modalities:
            raise ValueError(f"{path}: expected 'item_ids' and 'emb_<modality>' arrays, got {z.files}")
        item_ids = z["item_ids"]
        present = {k.removeprefix("present_"): z[k] for k in z.files if k.startswith("present_")}
    orphans = sorted(set(present) - set(modalities))
    if orphans:
        raise ValueError(f"{path}: present_<modality> masks without an emb_<modality> array: {orphans}")
    for m, mask in present.items():
        if mask.dtype != np.bool_:
            raise ValueError(f"{path}: present_{m} must be a bool array, got {mask.dtype}")
    ordered = [m for m in MODALITIES if m in modalities] + [m for m in modalities if m not in MODALITIES]
    return ItemFeatures(item_ids, {m: modalities[m] for m in ordered}, present)

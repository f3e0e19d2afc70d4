"""Disentangled Semantic Tokenizer (DST, Sec. 3.2): CGA alignment, then DMRQ quantisation.

Forward: CGA aligns each modality onto the hypersphere (Sec. 3.2.1); their mean, the consensus (not
renormalised, so ``a_m - mean`` is exactly modality m's deviation), is quantised by a shared residual
quantizer (``L`` layers); PSGR recovers each modality's nuance from what the shared codes left and
quantises it in the modality's codebook (Sec. 3.2.2). Each aligned feature is reconstructed
additively, ``a_m ~ h_hat + q_m`` (Eq. 2, first term). An item's semantic ID is ``L`` shared codes
followed by one code per modality, in the order of ``DSTConfig.modality_dims``.

Missing modalities (beyond the paper, whose items all have every modality): a fallback row
(``ItemFeatures.present`` False) is left out of the consensus, of its modality's reconstruction,
commitment and MI terms and of its codebook's k-means start and restarts, and Eq. 1 aligns an item
only on the modalities it has; no gradient comes from the row, so a catalogue's posterless items are
neither pulled onto one shared image vector nor used as each other's negatives. Such an item still
gets all ``L + M`` codes. An item with no modality present is quantised from all its rows but
teaches the shared codebooks nothing either, and ``fusion: concat`` (the w/o CGA ablation)
concatenates every row as is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from hisam_core.checkpoint import save_atomically
from hisam_core.config import Config
from hisam_core.features import ItemFeatures
from hisam_core.semantic_ids import SemanticIds
from hisam_core.tokenizer.cga import CGA
from hisam_core.tokenizer.metrics import dedup_suffix
from hisam_core.tokenizer.psgr import PSGR, Recovered
from hisam_core.tokenizer.quantize import ResidualQuantized, ResidualQuantizer, masked_mean
from hisam_core.tokenizer.vclub import VCLUB

logger = logging.getLogger(__name__)


class DSTConfig(Config):
    """DST architecture and loss weights; defaults follow App. B.2 (d=256, 3+3 codebooks of 256)."""

    modality_dims: dict[str, int] = Field(default_factory=dict)  # empty: taken from the training features
    dim: int = Field(256, gt=0)
    hidden_dim: int = Field(512, gt=0)
    shared_layers: int = Field(3, gt=0)
    codebook_size: int = Field(256, gt=1)
    psgr_heads: int = Field(4, gt=0)
    # What PSGR unfolds for modality m. "consensus": the shared residual r = mean_m a_m - h_hat, the
    # literal reading of Sec. 3.2.2; it carries a modality's nuance only scaled by 1/M and mixed with the
    # others'. "modality": r + (a_m - mean_m a_m) = a_m - sg[h_hat], the part of a_m the shared codes
    # miss, so the nuance the first term of Eq. 2 asks q_m to reconstruct is actually available.
    psgr_residual: Literal["modality", "consensus"] = "modality"
    # How the shared branch's input is formed. "mean": the consensus of the aligned features (Sec.
    # 3.2.2). "concat": the *w/o CGA* ablation (Sec. 4.3): the projected features are concatenated and
    # mapped linearly to d, with no GRAM loss (alignment_weight must be 0).
    fusion: Literal["mean", "concat"] = "mean"
    # Beyond the paper: > 0 adds a decoder per modality that maps h_hat + q_m back to the modality's
    # standardised, L2-normalised input (the plain RQ-VAE's target), weighted by this in Eq. 2, so the
    # codes must keep what the aligned space alone would drop. 0 is the paper (a_m targets only).
    input_reconstruction_weight: float = Field(0.0, ge=0)
    beta: float = Field(0.25, ge=0)
    alignment_weight: float = Field(1.0, ge=0)
    quantization_weight: float = Field(1.0, ge=0)
    mi_weight: float = Field(0.1, ge=0)
    anchor_modality: str = "text"
    temperature_init: float = Field(0.07, gt=0)
    temperature_min: float = Field(0.01, gt=0)
    temperature_max: float = Field(1.0, gt=0)
    rotation_trick: bool = False
    vclub_hidden_dim: int = Field(256, gt=0)
    dedup_suffix: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.modality_dims:
            if len(self.modality_dims) < 2:
                raise ValueError(f"DST needs at least two modalities, got {list(self.modality_dims)}")
            if self.anchor_modality not in self.modality_dims:
                raise ValueError(
                    f"anchor modality {self.anchor_modality!r} is not one of {list(self.modality_dims)}"
                )
            bad = {m: d for m, d in self.modality_dims.items() if d <= 0}
            if bad:
                raise ValueError(f"modality dimensions must be positive, got {bad}")
        if self.fusion == "concat" and self.alignment_weight:
            raise ValueError("fusion 'concat' is the w/o CGA ablation: set alignment_weight to 0")
        if not self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ValueError("temperature_init must lie in [temperature_min, temperature_max]")
        return self

    @property
    def position_names(self) -> tuple[str, ...]:
        shared = tuple(f"shared_{layer}" for layer in range(self.shared_layers))
        suffix = ("dedup",) if self.dedup_suffix else ()
        return shared + tuple(self.modality_dims) + suffix


@dataclass
class DSTOutput:
    """Everything one forward pass computes; :meth:`DST.losses` turns it into Eq. 2."""

    aligned: dict[str, torch.Tensor]  # a_m [B, d] on the unit sphere
    shared: ResidualQuantized  # shared branch on the mean of the a_m
    specific: dict[str, Recovered]  # PSGR branch per modality
    reconstructed: dict[str, torch.Tensor]  # h_hat + q_m [B, d]
    codes: torch.Tensor  # int64 [B, L + M]
    inputs: dict[str, torch.Tensor]  # standardised, L2-normalised raw input x_m [B, D_m]
    decoded: dict[str, torch.Tensor]  # decoder_m(h_hat + q_m) [B, D_m]; empty without decoders
    present: dict[str, torch.Tensor]  # bool [B]: False where x_m is a fallback row


def validate_features(features: ItemFeatures, modality_dims: dict[str, int]) -> ItemFeatures:
    """``features`` checked again (its arrays are mutable: row counts, NaN/inf, empty) and fitted to
    a model of these dims, as the float32 copy the checks ran on; a ValueError names the modality."""
    checked = ItemFeatures(features.item_ids, features.modalities, features.present)
    checked.check_dims(modality_dims)
    return checked


class DST(nn.Module):
    """CGA + shared RQ + PSGR + vCLUB (Sec. 3.2, Eq. 2)."""

    def __init__(self, config: DSTConfig) -> None:
        super().__init__()
        if not config.modality_dims:
            raise ValueError("DSTConfig.modality_dims must be set before building the model")
        self.config = config
        modalities = list(config.modality_dims)
        self.cga = CGA(
            config.modality_dims,
            config.dim,
            config.hidden_dim,
            config.anchor_modality,
            config.temperature_init,
            (config.temperature_min, config.temperature_max),
        )
        dim = config.dim
        self.fuse = nn.Linear(len(modalities) * dim, dim) if config.fusion == "concat" else None
        self.shared = ResidualQuantizer(
            config.shared_layers, config.codebook_size, config.dim, config.beta, config.rotation_trick
        )
        self.psgr = PSGR(
            modalities,
            config.dim,
            config.psgr_heads,
            config.codebook_size,
            config.beta,
            config.rotation_trick,
        )
        self.vclub = nn.ModuleDict(
            {m: VCLUB(config.dim, config.dim, config.vclub_hidden_dim) for m in modalities}
        )
        self.decoders = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, d)
                )
                for m, d in config.modality_dims.items()
            }
            if config.input_reconstruction_weight > 0
            else {}
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modality_dims)

    def consensus(self, aligned: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the present ``a_m`` of each item (of all of them when none is present)."""
        stacked = torch.stack([aligned[m] for m in self.modalities])  # [M, B, d]
        weights = torch.stack([present[m] for m in self.modalities]).to(stacked.dtype)  # [M, B]
        weights = torch.where(weights.sum(0) > 0, weights, torch.ones_like(weights))
        return (weights[..., None] * stacked).sum(0) / weights.sum(0)[:, None]

    def forward(
        self, raw: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
    ) -> DSTOutput:
        """One pass over a batch; ``present`` (bool ``[B]`` per modality) defaults to all True."""
        aligned = self.cga(raw)
        anchor = aligned[self.cga.anchor]
        everywhere = torch.ones(anchor.shape[0], dtype=torch.bool, device=anchor.device)
        present = {m: (present or {}).get(m, everywhere) for m in self.modalities}
        if self.fuse is None:
            consensus = self.consensus(aligned, present)
        else:
            consensus = self.fuse(torch.cat([aligned[m] for m in self.modalities], dim=-1))
        shared = self.shared(consensus, torch.stack(list(present.values())).any(0))
        residual = shared.residuals[-1]
        if self.config.psgr_residual == "modality":
            residuals = {m: residual + aligned[m] - consensus for m in self.modalities}
        else:
            residuals = dict.fromkeys(self.modalities, residual)
        specific = self.psgr(residuals, aligned, present)
        reconstructed = {m: shared.quantized + specific[m].quantized for m in self.modalities}
        codes = torch.cat([shared.codes] + [specific[m].codes[:, None] for m in self.modalities], dim=1)
        inputs = {m: F.normalize(self.cga.heads[m].standardize(raw[m]), dim=-1) for m in self.decoders}
        decoded = {m: decoder(reconstructed[m]) for m, decoder in self.decoders.items()}
        return DSTOutput(aligned, shared, specific, reconstructed, codes, inputs, decoded, present)

    def losses(self, out: DSTOutput) -> dict[str, torch.Tensor]:
        """Eq. 2: reconstruction + alignment (Eq. 1) + quantisation (Eq. 14-16) + lambda * vCLUB MI,
        plus the optional input-space reconstruction (``input_reconstruction_weight``).

        The shared side of the MI term is detached: the constraint steers PSGR, not the consensus.
        Rows whose modality is not present count in none of that modality's terms; Eq. 1 aligns each
        item on the modalities it has (:meth:`alignment_loss`).
        """
        cfg = self.config
        present = out.present
        losses = {}
        for m in self.modalities:
            error = ((out.aligned[m] - out.reconstructed[m]) ** 2).sum(-1)
            losses[f"recon_{m}"] = masked_mean(error, present[m])
        for m in out.decoded:
            losses[f"input_recon_{m}"] = masked_mean(
                ((out.inputs[m] - out.decoded[m]) ** 2).sum(-1), present[m]
            )
        losses["alignment"] = self.alignment_loss(out.aligned, present)
        losses["quantization"] = out.shared.loss + sum(out.specific[m].loss for m in self.modalities)
        losses["commitment_shared"] = out.shared.commitment  # reported, not optimised twice: each
        for m in self.modalities:  # is in "quantization" already, (1 + beta) times
            losses[f"commitment_{m}"] = out.specific[m].commitment
        shared = out.shared.quantized.detach()
        for m in self.modalities:
            rows = present[m]
            losses[f"mi_{m}"] = self.vclub[m].mi_upper_bound(shared[rows], out.specific[m].recovered[rows])
        losses["total"] = (
            sum(losses[f"recon_{m}"] for m in self.modalities)
            + cfg.alignment_weight * losses["alignment"]
            + cfg.quantization_weight * losses["quantization"]
            + cfg.mi_weight * sum(losses[f"mi_{m}"] for m in self.modalities)
            + cfg.input_reconstruction_weight * sum(losses[f"input_recon_{m}"] for m in out.decoded)
        )
        return losses

    def alignment_loss(
        self, aligned: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Eq. 1 within each group of items that have the same modalities, over those modalities,
        averaged by group size: an item without a poster is aligned on text and behaviour against the
        other posterless items. Groups without the anchor, with one modality or one item add nothing."""
        patterns = torch.stack([present[m] for m in self.modalities], dim=1)  # [B, M]
        unique, group = patterns.unique(dim=0, return_inverse=True)
        total, counted = aligned[self.cga.anchor].sum() * 0.0, 0  # 0 still in the graph
        for index, pattern in enumerate(unique.tolist()):
            kept = [m for m, has in zip(self.modalities, pattern, strict=True) if has]
            rows = group == index
            size = int(rows.sum())
            if self.cga.anchor in kept and len(kept) >= 2 and size >= 2:
                total = total + size * self.cga.alignment_loss({m: aligned[m][rows] for m in kept})
                counted += size
        return total / max(counted, 1)

    def vclub_log_likelihood(self, out: DSTOutput) -> torch.Tensor:
        """Sum over modalities of ``log q(z_m | h_hat)`` on detached inputs, rows where the modality is
        present: the vCLUB nets' objective."""
        shared = out.shared.quantized.detach()
        return sum(
            self.vclub[m].log_likelihood(
                shared[out.present[m]], out.specific[m].recovered.detach()[out.present[m]]
            )
            for m in self.modalities
        )

    def codewords(self, codes: torch.Tensor) -> torch.Tensor:
        """Codeword vectors ``[B, L + M, d]`` of codes ``[B, L + M]`` (shared layers, then modalities)."""
        books = [layer.codebook for layer in self.shared.layers]
        books += [self.psgr.codebooks[m].codebook for m in self.modalities]
        return torch.stack([book[codes[:, p]] for p, book in enumerate(books)], dim=1)

    def restart_dead_codes(self, threshold: int) -> int:
        return self.shared.restart_dead_codes(threshold) + sum(
            vq.restart_dead_codes(threshold) for vq in self.psgr.codebooks.values()
        )

    def tensors(self, features: ItemFeatures) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Validated raw features as float tensors on the model's device, and their ``present`` masks."""
        features = validate_features(features, self.config.modality_dims)
        device = next(self.parameters()).device
        raw = {m: torch.as_tensor(features.modalities[m], device=device) for m in self.modalities}
        present = {m: torch.as_tensor(features.present[m], device=device) for m in self.modalities}
        return raw, present

    @torch.no_grad()
    def outputs(self, features: ItemFeatures, batch_size: int = 4096) -> Iterator[DSTOutput]:
        """The eval-mode forward of a catalogue, ``batch_size`` items at a time (PSGR holds
        ``N x N_h x d`` floats per pass); the model's mode is restored after the last batch. Aligned
        features that are not finite (inputs too large for float32, or broken weights) are a
        ValueError naming the modality and items: they would be code 0 at every position."""
        raw, present = self.tensors(features)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(features), batch_size):
                part = slice(start, start + batch_size)
                out = self({m: v[part] for m, v in raw.items()}, {m: v[part] for m, v in present.items()})
                for m, aligned in out.aligned.items():  # a NaN would be code 0 of every codebook
                    bad = (~torch.isfinite(aligned).all(-1)).cpu().numpy()
                    if bad.any():
                        raise ValueError(
                            f"{m!r}: items {features.item_ids[part][bad][:5].tolist()} have aligned features "
                            "that are not finite (raw values too large for float32, or broken weights)"
                        )
                yield out
        finally:
            self.train(was_training)

    @torch.no_grad()
    def codewords_and_aligned(
        self, features: ItemFeatures, batch_size: int = 4096
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per item, the codewords of its codes ``[N, L + M, d]`` and its aligned features ``a_m``
        (Figure 3's inputs), ``batch_size`` items at a time."""
        codewords, aligned = [], {m: [] for m in self.modalities}
        for out in self.outputs(features, batch_size):
            codewords.append(self.codewords(out.codes).cpu().numpy())
            for m in self.modalities:
                aligned[m].append(out.aligned[m].cpu().numpy())
        return np.concatenate(codewords), {m: np.concatenate(parts) for m, parts in aligned.items()}

    @torch.no_grad()
    def encode(
        self,
        features: ItemFeatures,
        version: str,
        batch_size: int = 4096,
        known_codes: np.ndarray | None = None,
    ) -> SemanticIds:
        """Semantic IDs of a catalogue (plus the dedup suffix when ``config.dedup_suffix``).

        ``known_codes`` ``[K, L + M]`` are the codes (without suffix) of items that already hold IDs
        of this version: new items' suffixes continue after theirs, so no existing ID changes.
        """
        codes = torch.cat([out.codes for out in self.outputs(features, batch_size)]).cpu().numpy()
        if self.config.dedup_suffix:
            known = np.empty((0, codes.shape[1]), np.int64) if known_codes is None else known_codes
            suffix = dedup_suffix(np.concatenate([known, codes]))[len(known) :]
            if len(suffix) and suffix.max() >= self.config.codebook_size:
                raise ValueError(f"{suffix.max() + 1} items share one ID: more than the suffix can separate")
            codes = np.concatenate([codes, suffix[:, None]], axis=1)
        return SemanticIds(
            features.item_ids, codes, self.config.codebook_size, version, self.config.position_names
        )

    def save_checkpoint(self, path: str | Path) -> None:
        """Write ``{"config", "state_dict"}`` atomically (:func:`~hisam_core.checkpoint.save_atomically`)."""
        payload = {"config": self.config.model_dump(mode="json"), "state_dict": self.state_dict()}
        save_atomically(payload, path)
        logger.info("saved DST checkpoint to %s", path)

    @classmethod
    def load_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> DST:
        """The model of a checkpoint, on ``device`` (read on the CPU first)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]):  # the random init is replaced: leave the RNG as it was
            model = cls(DSTConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model.to(device).eval()

"""Plain RQ-VAE baseline (Rajput et al., 2023): one residual quantizer over concatenated modalities.

The "w/o CGA, w/o DMRQ" reference for DST with the same code budget (App. B.2: as many codebooks of
the same size). Each modality is standardised and L2-normalised, the blocks are concatenated, encoded
to ``d`` dimensions, quantised by ``num_layers`` residual codebooks and decoded back; the loss is the
per-modality squared error on those normalised blocks plus the codebook/commitment loss (Eq. 15).

Missing modalities are treated as DST treats them: a fallback row (``ItemFeatures.present`` False)
enters the encoder as a zero block (the standardised mean: no information) and counts in neither the
standardisation statistics nor its block's reconstruction; an item with no modality present teaches
the codebooks nothing. So the baseline, like DST, spends no capacity on rows no measure counts.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from hisam_core.config import DEVICE_PATTERN, Config
from hisam_core.device import resolve_device
from hisam_core.features import ItemFeatures
from hisam_core.semantic_ids import SemanticIds
from hisam_core.tokenizer.cga import Standardize
from hisam_core.tokenizer.dst import validate_features
from hisam_core.tokenizer.quantize import ResidualQuantizer, masked_mean
from hisam_core.tokenizer.train import Callback, code_metrics, minibatches, seed_everything

logger = logging.getLogger(__name__)


class RQVAEConfig(Config):
    modality_dims: dict[str, int] = Field(default_factory=dict)  # empty: taken from the training features
    dim: int = Field(256, gt=0)
    hidden_dim: int = Field(512, gt=0)
    num_layers: int = Field(6, gt=0)
    codebook_size: int = Field(256, gt=1)
    beta: float = Field(0.25, ge=0)
    rotation_trick: bool = False


class RQVAETrainConfig(Config):
    model: RQVAEConfig = Field(default_factory=RQVAEConfig)
    epochs: int = Field(60, gt=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(1e-3, gt=0)
    dead_code_threshold: int = Field(20, gt=0)
    init_sample_size: int = Field(8192, gt=0)
    seed: int = 0
    device: str = Field("cpu", pattern=DEVICE_PATTERN)  # auto: CUDA when present


@dataclass
class RQVAEOutput:
    targets: dict[str, torch.Tensor]  # standardised, L2-normalised input block per modality (0: absent)
    reconstructed: dict[str, torch.Tensor]  # decoder output block per modality
    codes: torch.Tensor  # int64 [B, L]
    quantization_loss: torch.Tensor
    present: dict[str, torch.Tensor]  # bool [B] per modality: False where the row is a fallback


class RQVAE(nn.Module):
    """Encoder MLP -> residual quantizer -> decoder MLP over the concatenated modalities."""

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        if not config.modality_dims:
            raise ValueError("RQVAEConfig.modality_dims must be set before building the model")
        self.config = config
        total = sum(config.modality_dims.values())
        self.standardize = nn.ModuleDict({m: Standardize(d) for m, d in config.modality_dims.items()})
        self.encoder = nn.Sequential(
            nn.Linear(total, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, config.dim)
        )
        self.quantizer = ResidualQuantizer(
            config.num_layers, config.codebook_size, config.dim, config.beta, config.rotation_trick
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, total)
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modality_dims)

    def forward(
        self, raw: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
    ) -> RQVAEOutput:
        """One pass over a batch; ``present`` (bool ``[B]`` per modality) defaults to all True."""
        first = raw[self.modalities[0]]
        everywhere = torch.ones(first.shape[0], dtype=torch.bool, device=first.device)
        present = {m: (present or {}).get(m, everywhere) for m in self.modalities}
        targets = {
            m: F.normalize(self.standardize[m](raw[m]), dim=-1) * present[m][:, None] for m in self.modalities
        }
        encoded = self.encoder(torch.cat([targets[m] for m in self.modalities], dim=-1))
        quantized = self.quantizer(encoded, torch.stack(list(present.values())).any(0))
        blocks = self.decoder(quantized.quantized).split(list(self.config.modality_dims.values()), dim=-1)
        return RQVAEOutput(
            targets, dict(zip(self.modalities, blocks, strict=True)), quantized.codes, quantized.loss, present
        )

    def losses(self, out: RQVAEOutput) -> dict[str, torch.Tensor]:
        """Per-modality reconstruction over the rows that have the modality, plus Eq. 15."""
        losses = {
            f"recon_{m}": masked_mean(((out.targets[m] - out.reconstructed[m]) ** 2).sum(-1), out.present[m])
            for m in self.modalities
        }
        losses["quantization"] = out.quantization_loss
        losses["total"] = sum(losses.values())
        return losses

    def tensors(self, features: ItemFeatures) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Validated raw features as float tensors on the model's device, and their ``present`` masks."""
        features = validate_features(features, self.config.modality_dims)
        device = next(self.parameters()).device
        raw = {m: torch.as_tensor(features.modalities[m], device=device) for m in self.modalities}
        present = {m: torch.as_tensor(features.present[m], device=device) for m in self.modalities}
        return raw, present

    @torch.no_grad()
    def encode(self, features: ItemFeatures, version: str, batch_size: int = 4096) -> SemanticIds:
        raw, present = self.tensors(features)
        was_training = self.training
        self.eval()
        try:
            codes = torch.cat(
                [
                    self(
                        {m: v[start : start + batch_size] for m, v in raw.items()},
                        {m: v[start : start + batch_size] for m, v in present.items()},
                    ).codes
                    for start in range(0, len(features), batch_size)
                ]
            )
        finally:
            self.train(was_training)
        names = tuple(f"rq_{layer}" for layer in range(self.config.num_layers))
        return SemanticIds(features.item_ids, codes.cpu().numpy(), self.config.codebook_size, version, names)


def train_rqvae(features: ItemFeatures, config: RQVAETrainConfig, callback: Callback | None = None) -> RQVAE:
    """Train the baseline; codebooks are k-means initialised on encoder outputs of a sample first."""
    model_config = config.model
    if not model_config.modality_dims:
        model_config = RQVAEConfig.from_dict({**model_config.model_dump(), "modality_dims": features.dims})
    validate_features(features, model_config.modality_dims)
    generator = seed_everything(config.seed)
    model = RQVAE(model_config).to(resolve_device(config.device))
    raw, present = model.tensors(features)
    for m, standardize in model.standardize.items():  # statistics of real rows, not of fallback ones
        standardize.fit(raw[m], present[m])
    init_index = torch.randperm(len(features), generator=generator)[: config.init_sample_size]
    model.train()
    with torch.no_grad():
        model({m: v[init_index] for m, v in raw.items()}, {m: v[init_index] for m, v in present.items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    names = tuple(f"rq_{layer}" for layer in range(model_config.num_layers))
    for epoch in tqdm(range(config.epochs), desc="RQ-VAE", unit="epoch"):
        model.train()
        sums: dict[str, float] = defaultdict(float)
        epoch_codes = []
        batches = 0
        for index in minibatches(len(features), config.batch_size, generator):
            out = model({m: v[index] for m, v in raw.items()}, {m: v[index] for m, v in present.items()})
            losses = model.losses(out)
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
            sums["dead_codes_restarted"] += model.quantizer.restart_dead_codes(config.dead_code_threshold)
            for key, value in losses.items():
                sums[key] += value.item()
            epoch_codes.append(out.codes.cpu().numpy())
            batches += 1
        metrics = {k: v if k == "dead_codes_restarted" else v / batches for k, v in sums.items()}
        metrics.update(code_metrics(np.concatenate(epoch_codes), model_config.codebook_size, names))
        logger.debug("epoch %d: %s", epoch, metrics)
        if callback is not None:
            callback(epoch, metrics)
    return model.eval()

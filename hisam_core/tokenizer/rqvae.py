"""Plain RQ-VAE baseline (Rajput et al., 2023): one residual quantizer over concatenated modalities.

The "w/o CGA, w/o DMRQ" reference for DST with the same code budget (App. B.2: as many codebooks of
the same size). Each modality is standardised and L2-normalised, the blocks are concatenated, encoded
to ``d`` dimensions, quantised by ``num_layers`` residual codebooks and decoded back; the loss is the
per-modality squared error on those normalised blocks plus the codebook/commitment loss (Eq. 15).
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
from hisam_core.tokenizer.quantize import ResidualQuantizer
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
    targets: dict[str, torch.Tensor]  # standardised, L2-normalised input block per modality
    reconstructed: dict[str, torch.Tensor]  # decoder output block per modality
    codes: torch.Tensor  # int64 [B, L]
    quantization_loss: torch.Tensor


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

    def forward(self, raw: dict[str, torch.Tensor]) -> RQVAEOutput:
        targets = {m: F.normalize(self.standardize[m](raw[m]), dim=-1) for m in self.modalities}
        quantized = self.quantizer(self.encoder(torch.cat([targets[m] for m in self.modalities], dim=-1)))
        blocks = self.decoder(quantized.quantized).split(list(self.config.modality_dims.values()), dim=-1)
        return RQVAEOutput(
            targets, dict(zip(self.modalities, blocks, strict=True)), quantized.codes, quantized.loss
        )

    def losses(self, out: RQVAEOutput) -> dict[str, torch.Tensor]:
        losses = {
            f"recon_{m}": ((out.targets[m] - out.reconstructed[m]) ** 2).sum(-1).mean()
            for m in self.modalities
        }
        losses["quantization"] = out.quantization_loss
        losses["total"] = sum(losses.values())
        return losses

    def tensors(self, features: ItemFeatures) -> dict[str, torch.Tensor]:
        features = validate_features(features, self.config.modality_dims)
        device = next(self.parameters()).device
        return {m: torch.as_tensor(features.modalities[m], device=device) for m in self.modalities}

    @torch.no_grad()
    def encode(self, features: ItemFeatures, version: str, batch_size: int = 4096) -> SemanticIds:
        raw = self.tensors(features)
        was_training = self.training
        self.eval()
        try:
            codes = torch.cat(
                [
                    self({m: v[start : start + batch_size] for m, v in raw.items()}).codes
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
    raw = model.tensors(features)
    for m, standardize in model.standardize.items():
        standardize.fit(raw[m])
    init_index = torch.randperm(len(features), generator=generator)[: config.init_sample_size]
    model.train()
    with torch.no_grad():
        model({m: v[init_index] for m, v in raw.items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    names = tuple(f"rq_{layer}" for layer in range(model_config.num_layers))
    for epoch in tqdm(range(config.epochs), desc="RQ-VAE", unit="epoch"):
        model.train()
        sums: dict[str, float] = defaultdict(float)
        epoch_codes = []
        batches = 0
        for index in minibatches(len(features), config.batch_size, generator):
            out = model({m: v[index] for m, v in raw.items()})
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

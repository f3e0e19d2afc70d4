"""Training loop of DST (Sec. 3.2, Eq. 2) with vCLUB fitted alternately (App. A.1).

Epochs ``[0, alignment_warmup_epochs)`` train CGA alone (Eq. 1) so the codebooks are k-means
initialised on aligned features; then the full objective runs with, per batch, ``vclub_steps``
likelihood steps on the variational nets followed by one step on everything else, and dead codes are
re-seeded after each step.

With a ``state_path``, the training state (weights, both optimisers, the shuffling and global RNG
states, the quantisers' latest inputs, the epoch) is saved there after every epoch, and a training
that finds one resumes after its epoch and ends as the uninterrupted run would, to the bit.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from hisam_core.checkpoint import load_training_state, rng_state, save_atomically, set_rng_state
from hisam_core.config import DEVICE_PATTERN, Config, differences
from hisam_core.device import resolve_device
from hisam_core.features import MODALITIES, ItemFeatures
from hisam_core.tokenizer.dst import DST, DSTConfig, validate_features
from hisam_core.tokenizer.metrics import code_perplexity, code_utilisation
from hisam_core.tokenizer.quantize import VectorQuantizer

logger = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]


class TokenizerTrainConfig(Config):
    """Optimisation settings of :func:`train_tokenizer`; ``model`` holds the architecture."""

    model: DSTConfig = Field(default_factory=DSTConfig)
    epochs: int = Field(60, gt=0)
    alignment_warmup_epochs: int = Field(10, ge=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    vclub_lr: float = Field(3e-3, gt=0)
    vclub_steps: int = Field(3, ge=1)
    dead_code_threshold: int = Field(20, gt=0)  # optimiser steps without a hit before a restart
    init_sample_size: int = Field(8192, gt=0)  # items for the k-means codebook initialisation
    seed: int = 0
    device: str = Field("cpu", pattern=DEVICE_PATTERN)  # auto: CUDA when present

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.alignment_warmup_epochs >= self.epochs:
            raise ValueError("alignment_warmup_epochs must be smaller than epochs")
        if self.model.fusion == "concat" and self.alignment_warmup_epochs:
            raise ValueError(
                "fusion 'concat' (w/o CGA) has no alignment to warm up: set alignment_warmup_epochs to 0"
            )
        return self


def resolve_modality_dims(features: ItemFeatures, config: DSTConfig) -> DSTConfig:
    """``config`` with ``modality_dims`` taken from ``features`` (paper order first) when unset."""
    if config.modality_dims:
        return config
    names = [m for m in MODALITIES if m in features.modalities]
    names += [m for m in features.names if m not in names]
    return DSTConfig.from_dict({**config.model_dump(), "modality_dims": {m: features.dims[m] for m in names}})


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a dedicated one for shuffling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def minibatches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering every item once."""
    order = torch.randperm(num_items, generator=generator)
    yield from order.split(batch_size)


def code_metrics(codes: np.ndarray, codebook_size: int, names: tuple[str, ...]) -> dict[str, float]:
    """Utilisation and perplexity per code position, keyed by position name."""
    metrics = {}
    for name, util, ppl in zip(
        names, code_utilisation(codes, codebook_size), code_perplexity(codes, codebook_size), strict=False
    ):
        metrics[f"utilisation_{name}"] = float(util)
        metrics[f"perplexity_{name}"] = float(ppl)
    return metrics


#: Settings a resumed training may change: they alter neither the saved state nor what comes next.
RESUMABLE_CHANGES = frozenset({"device"})


def features_digest(features: ItemFeatures) -> str:
    """SHA-256 of the item ids and of each modality's rows and ``present`` mask, in name order."""
    digest = hashlib.sha256(np.ascontiguousarray(features.item_ids).tobytes())
    for name in sorted(features.names):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(features.modalities[name]).tobytes())
        digest.update(np.ascontiguousarray(features.present[name]).tobytes())
    return digest.hexdigest()


def state_conflicts(
    state_path: str | Path, features: ItemFeatures, config: TokenizerTrainConfig
) -> list[str]:
    """Why the training state at ``state_path`` cannot resume a training of ``config`` on ``features``:
    the dotted settings it differs in (other than :data:`RESUMABLE_CHANGES`), ``"features"`` when it
    began on another catalogue, and ``"modality order"`` when its modules follow another order of the
    modalities. Empty when it can resume."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    modalities = list(resolve_modality_dims(features, config.model).modality_dims)
    return _conflicts(state, features_digest(features), config, modalities)


def _conflicts(state: dict, digest: str, config: TokenizerTrainConfig, modalities: list[str]) -> list[str]:
    changed = differences(TokenizerTrainConfig.from_dict(state["config"]), config) - RESUMABLE_CHANGES
    if state["features"] != digest:
        changed.add("features")
    # the modules (and so the optimiser's moments, matched by position) follow the modality order,
    # which names outside the paper's take from the features (a state before the order was kept: unknown)
    if state.get("modalities", modalities) != modalities:
        changed.add("modality order")
    return sorted(changed)


def _quantizers(model: DST) -> dict[str, VectorQuantizer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, VectorQuantizer)}


def _check_finite(loss: torch.Tensor, what: str, epoch: int) -> None:
    """Stop a diverging run before its weights (and the checkpoint) turn NaN."""
    if not torch.isfinite(loss):
        raise ValueError(
            f"DST training diverged in epoch {epoch}: non-finite {what} loss; lower lr or check the features"
        )


def train_tokenizer(
    features: ItemFeatures,
    config: TokenizerTrainConfig,
    callback: Callback | None = None,
    checkpoint_path: str | Path | None = None,
    state_path: str | Path | None = None,
) -> DST:
    """Train DST on a catalogue; per-epoch metrics go to ``callback(epoch, metrics)``.

    Input is validated before anything is built or written; the checkpoint, when asked for, is
    written atomically at the end. ``state_path``: resume from the training state there, and save it
    after every epoch (module docstring); a state of other settings or another catalogue
    (:func:`state_conflicts`) is a ValueError.
    """
    model_config = resolve_modality_dims(features, config.model)
    validate_features(features, model_config.modality_dims)
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    model = DST(model_config).to(device)
    raw, present = model.tensors(features)
    for m, rows in features.present.items():
        if not rows.any():
            logger.warning(
                "%s: no item has a real row, so its code carries nothing about the items%s",
                m,
                ", and Eq. 1 (anchored on it) aligns nothing" if m == model_config.anchor_modality else "",
            )
        elif not rows.all():
            logger.info(
                "%s: %d of %d items have only a fallback row; DST does not learn from it",
                m,
                (~rows).sum(),
                len(rows),
            )
    for m, head in model.cga.heads.items():  # statistics of real rows, not of the fallback ones
        head.standardize.fit(raw[m], present[m])
    vclub_params = list(model.vclub.parameters())
    vclub_ids = {id(p) for p in vclub_params}
    main_params = [p for p in model.parameters() if id(p) not in vclub_ids]
    optimizer = torch.optim.Adam(main_params, lr=config.lr, weight_decay=config.weight_decay)
    vclub_optimizer = torch.optim.Adam(vclub_params, lr=config.vclub_lr)
    num_items = len(features)
    start, digest = 0, features_digest(features) if state_path is not None else ""
    modalities = list(model_config.modality_dims)  # the modules' order, which a state must share
    if state_path is not None and Path(state_path).exists():
        state = load_training_state(
            state_path, lambda s: _conflicts(s, digest, config, modalities), "state_path"
        )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        vclub_optimizer.load_state_dict(state["vclub_optimizer"])
        for name, quantizer in _quantizers(model).items():
            recent = state["recent_inputs"][name]
            quantizer.recent_inputs = None if recent is None else recent.to(device)
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        start = int(state["epoch"])
        logger.info("resuming DST from %s after epoch %d of %d", state_path, start, config.epochs)

    progress = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="DST", unit="epoch")
    for epoch in progress:
        model.train()
        sums: dict[str, float] = defaultdict(float)
        batches = 0
        warmup = epoch < config.alignment_warmup_epochs
        if epoch == config.alignment_warmup_epochs:
            init_index = torch.randperm(num_items, generator=generator)[: config.init_sample_size]
            with torch.no_grad():
                model(  # k-means init, layer by layer
                    {m: v[init_index] for m, v in raw.items()}, {m: v[init_index] for m, v in present.items()}
                )
        epoch_codes = []
        for index in minibatches(num_items, config.batch_size, generator):
            batch = {m: v[index] for m, v in raw.items()}
            batch_present = {m: v[index] for m, v in present.items()}
            if warmup:
                loss = model.alignment_loss(model.cga(batch), batch_present)
                _check_finite(loss, "alignment", epoch)
                optimizer.zero_grad()
                (model_config.alignment_weight * loss).backward()
                optimizer.step()
                model.cga.clamp_temperature_()
                sums["alignment"] += loss.item()
            else:
                out = model(batch, batch_present)
                for _ in range(config.vclub_steps):
                    vclub_optimizer.zero_grad()
                    log_likelihood = model.vclub_log_likelihood(out)
                    (-log_likelihood).backward()
                    vclub_optimizer.step()
                losses = model.losses(out)
                _check_finite(losses["total"], "total", epoch)
                optimizer.zero_grad()
                losses["total"].backward()
                optimizer.step()
                model.cga.clamp_temperature_()
                sums["dead_codes_restarted"] += model.restart_dead_codes(config.dead_code_threshold)
                sums["vclub_log_likelihood"] += log_likelihood.item()
                for key, value in losses.items():
                    sums[key] += value.item()
                epoch_codes.append(out.codes.cpu().numpy())
            batches += 1
        metrics = {k: v if k == "dead_codes_restarted" else v / batches for k, v in sums.items()}
        metrics["temperature"] = model.cga.temperature.item()
        if epoch_codes:
            codes = np.concatenate(epoch_codes)
            metrics.update(code_metrics(codes, model_config.codebook_size, model_config.position_names))
        progress.set_postfix(loss=metrics.get("total", metrics["alignment"]))
        logger.debug("epoch %d: %s", epoch, metrics)
        if callback is not None:
            callback(epoch, metrics)
        if state_path is not None:
            state = {
                "config": config.model_dump(mode="json"),
                "features": digest,
                "modalities": modalities,
                "epoch": epoch + 1,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "vclub_optimizer": vclub_optimizer.state_dict(),
                "recent_inputs": {name: q.recent_inputs for name, q in _quantizers(model).items()},
                "generator": generator.get_state(),
                "rng": rng_state(),
            }
            save_atomically(state, state_path)
    model.eval()
    if checkpoint_path is not None:
        model.save_checkpoint(checkpoint_path)
    return model

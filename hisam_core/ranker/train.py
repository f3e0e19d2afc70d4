"""Training loop of HMAT for both stages (Sec. 3.4.1, B.2): PT (next-token, causal) and SFT (action
NLL, MA mask, optionally initialised from a PT checkpoint). AdamW with linear warm-up and cosine
decay, gradient clipping, bf16 autocast where supported, deterministic seeding, and checkpoints
(model, optimizer, scheduler, RNG states, step) that resume only into the same run: exactly on the
CPU, within float tolerance on CUDA (its attention backward is not deterministic).

Our choices where B.2 says otherwise or nothing: AdamW (weight decay 0.01, betas 0.9/0.95) for the
paper's Adam, bf16 autocast for its FP16 (no loss scaling needed), warm-up, cosine decay, clipping.

Batches are a pure function of ``(seed, step)``: step ``s`` takes samples ``[s * B, (s + 1) * B)``
of the concatenation of per-epoch permutations, so a resumed run sees the same batches.
Checkpoints are ``{"config": dict, "state_dict": ..., "mask_rule": int}`` (training adds the
optimizer, scheduler, RNG and step) and load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from hisam_core.checkpoint import load_training_state, rng_state, save_atomically, set_rng_state
from hisam_core.config import DEVICE_PATTERN, Config, differences
from hisam_core.device import resolve_device
from hisam_core.metrics import ranking_metrics
from hisam_core.ranker.attention import MASK_RULE
from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.objectives import action_logits, positive_probability, pretrain_loss, sft_loss
from hisam_core.ranker.sequence import IGNORE_LABEL, SequenceBuilder, SequenceConfig, UserHistory

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_NAME = "checkpoint.pt"


class TrainConfig(Config):
    """Optimisation settings of one stage (B.2: batch 128; AdamW here, see the module docstring)."""

    objective: Literal["pt", "sft"] = "sft"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(10000, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a fraction of learning_rate")
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast on CUDA devices that support it, off elsewhere"
    )
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(50, ge=1)
    init_from: str | None = Field(None, description="PT checkpoint to initialise SFT from")
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # auto: CUDA when present


class RankerConfig(Config):
    """Everything a ranker run needs; ``configs/ranker.yaml`` holds the Hi-SAM-Small defaults."""

    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    model: HMATConfig = Field(default_factory=HMATConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> RankerConfig:
        if self.model.position_encoding == "absolute" and self.model.max_positions < self.sequence.max_tokens:
            raise ValueError(
                f"model.max_positions={self.model.max_positions} < sequence.max_tokens={self.sequence.max_tokens}"
            )
        return self


def build_model(config: RankerConfig) -> HMAT:
    return HMAT(config.model, SequenceBuilder(config.sequence).vocab.size)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RankerConfig, HMAT]:
    """Config and model of a checkpoint written by :func:`train` (read on the CPU: the optimizer's
    moments, twice the weights, never reach ``device``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = RankerConfig.from_dict(checkpoint["config"])
    with torch.random.fork_rng(devices=[]):  # the random init is replaced: leave the RNG as it was
        model = build_model(config).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return config, model


def checkpoint_mask_rule(path: str | Path) -> int | None:
    """The :data:`~hisam_core.ranker.attention.MASK_RULE` a ranker checkpoint was trained under, None
    for one written before rules were recorded (memory-mapped: its tensors are not read)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("mask_rule")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, batch_size: int, num_samples: int, seed: int) -> np.ndarray:
    """Sample indices of ``step``: a slice of the concatenated per-epoch permutations."""
    indices: list[int] = []
    start = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(start, num_samples)
        permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
        taken = permutation[offset : offset + batch_size - len(indices)]
        indices.extend(taken.tolist())
        start += len(taken)
    return np.asarray(indices)


def _autocast_enabled(mode: str, device: torch.device) -> bool:
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "bf16" and not supported:
        raise ValueError(f"bf16 autocast needs a CUDA device with bf16 support, got {device}")
    return mode == "bf16" or (mode == "auto" and supported)


def _optimizer(model: HMAT, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)


def train(
    config: RankerConfig,
    histories: Sequence[UserHistory],
    output_dir: str | Path,
    callback: MetricsCallback | None = None,
) -> HMAT:
    """Run ``config.train`` over ``histories``, resuming from ``output_dir/checkpoint.pt`` when present.
    ``callback(step, metrics)`` gets ``loss``, ``lr``, ``grad_norm`` and ``tokens`` every ``log_every``
    steps (``step`` = optimizer steps done)."""
    tc = config.train
    if not histories:
        raise ValueError("no training histories")
    device = resolve_device(tc.device)
    if config.model.attention_backend == "flex" and device.type == "cpu":
        raise ValueError(
            "attention_backend='flex' cannot train on the CPU: torch has no FlexAttention backward "
            "pass there. Train with 'auto' or 'sdpa' (the weights are the same; flex still serves on CPU)."
        )
    checkpoint_path = Path(output_dir) / CHECKPOINT_NAME
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    seed_everything(tc.seed)
    builder = SequenceBuilder(config.sequence)
    model = build_model(config).to(device)
    optimizer = _optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    )
    start = 0
    if checkpoint_path.exists():
        state = load_training_state(
            checkpoint_path,
            lambda s: resume_conflicts(s["config"], config) + mask_rule_conflict(s),
            "output_dir",
        )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        # the saved rate is the old schedule's: a new max_steps takes effect from this step on
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * warmup_cosine(start, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        logger.info("resuming from %s at step %d", checkpoint_path, start)
    elif tc.init_from:
        pretrained = torch.load(tc.init_from, map_location="cpu", weights_only=True)
        changed = init_conflicts(RankerConfig.from_dict(pretrained["config"]), config)
        if changed:
            raise ValueError(
                f"PT checkpoint {tc.init_from} was trained with other settings ({changed}): its weights "
                "would load but mean something else; pre-train again with this config"
            )
        model.load_state_dict(pretrained["state_dict"])  # equal settings: equal shapes
        logger.info("initialised from %s", tc.init_from)
        rule = pretrained.get("mask_rule")
        if rule != MASK_RULE:  # fine-tuning adapts the weights: a weekly PT is not held up for it
            logger.warning(
                "PT checkpoint %s was pre-trained under %s, this code's is %d (hisam_core.ranker.attention."
                "MASK_RULE): fine-tuning from it, but pre-train again for weights that learned this rule",
                tc.init_from,
                f"mask rule {rule}"
                if rule is not None
                else "an unrecorded mask rule (before rules were recorded)",
                MASK_RULE,
            )
    use_bf16 = _autocast_enabled(tc.mixed_precision, device)
    model.train()
    for step in tqdm(
        range(start, tc.max_steps), initial=start, total=tc.max_steps, desc=tc.objective, disable=None
    ):
        batch = builder.batch(
            [histories[i] for i in batch_indices(step, tc.batch_size, len(histories), tc.seed)]
        )
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = (
                pretrain_loss(model, batch) if tc.objective == "pt" else sft_loss(model, batch, builder.vocab)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        done = step + 1
        logs = done % tc.log_every == 0 or done == tc.max_steps
        saves = done % tc.checkpoint_every == 0 or done == tc.max_steps
        # checked where the loop reads the device anyway (a check every step would sync every step):
        # a divergence stops before it is logged as a number or saved
        if (logs or saves) and not torch.isfinite(grad_norm):
            raise ValueError(
                f"training diverged by step {done}: non-finite loss or gradient (loss {loss.item():.4g}); "
                f"{checkpoint_path} still holds the last finite state: lower train.learning_rate or check the data"
            )
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler's is the next)
        optimizer.step()
        scheduler.step()
        if callback is not None and logs:
            metrics = {
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": float(batch.num_tokens),
            }
            callback(done, metrics)
        if saves:
            _save(checkpoint_path, config, model, optimizer, scheduler, done)
    return model


#: Train settings a resumed run may change: they do not alter the state a checkpoint holds. A new
#: ``max_steps`` stretches the cosine schedule over the new length, so the learning rate of an extended
#: run jumps back up from where the shorter run had decayed it.
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "checkpoint_every", "device", "init_from"})


def mask_rule_conflict(state: dict[str, Any]) -> list[str]:
    """``["mask_rule"]`` when a training state records another :data:`MASK_RULE` than this code's
    (resuming would train the rest of the run under another visibility or geometry), else empty; a
    state from before rules were recorded is not judged."""
    rule = state.get("mask_rule")
    return ["mask_rule"] if rule is not None and rule != MASK_RULE else []


def resume_conflicts(stored: dict[str, Any], config: RankerConfig) -> list[str]:
    """Dotted names of the settings in which a checkpoint's config differs from ``config``, other
    than :data:`RESUMABLE_CHANGES` (``init_from`` only matters before the first checkpoint)."""
    changed = differences(RankerConfig.from_dict(stored), config)
    return sorted(k for k in changed if not (k.startswith("train.") and k[6:] in RESUMABLE_CHANGES))


#: Settings a fine-tune may choose apart from the PT it starts from: the SFT mask and attention kernel
#: (PT trains under the causal mask whatever they say), the initialiser the loaded weights replace,
#: and the token budget (rotary positions have no table).
FINETUNE_CHANGES = frozenset(
    {
        "model.attention_mask",
        "model.history_memory",
        "model.attention_backend",
        "model.init_std",
        "sequence.max_tokens",
    }
)


def init_conflicts(pretrained: RankerConfig, config: RankerConfig) -> list[str]:
    """Dotted names of the ``sequence`` and ``model`` settings in which a PT checkpoint's config
    differs from the fine-tune's, other than :data:`FINETUNE_CHANGES`: with any of them the weights
    would load (the shapes can agree) yet mean something else (token ids, rotary frequencies)."""
    changed = differences(pretrained, config)
    return sorted(k for k in changed if k.startswith(("sequence.", "model.")) and k not in FINETUNE_CHANGES)


def _save(
    path: Path,
    config: RankerConfig,
    model: HMAT,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> None:
    state = {
        "config": config.model_dump(mode="json"),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "step": step,
        "mask_rule": MASK_RULE,
    }
    save_atomically(state, path)


@torch.no_grad()
def evaluate(
    model: HMAT,
    sequence_config: SequenceConfig,
    histories: Sequence[UserHistory],
    batch_size: int = 256,
    cold_start_items: int = 10,
    cold_users: Collection[int] | None = None,
) -> dict[str, float]:
    """AUC/GAUC of ``P(positive)`` on every labelled action within the token budget (a longer history
    keeps its most recent items, :meth:`SequenceBuilder.truncate`: cut it into windows first, as the
    pipeline does, to score every label); the cold-start subset is ``cold_users`` when given (e.g.
    the users with fewer than 10 *training* interactions, Sec. 4.1), else the histories with fewer
    than ``cold_start_items`` interactions."""
    builder = SequenceBuilder(sequence_config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, labels, users, cold = [], [], [], []
    for start in range(0, len(histories), batch_size):
        chunk = histories[start : start + batch_size]
        batch = builder.batch(chunk).to(device)
        labelled = batch.labels != IGNORE_LABEL
        if not bool(labelled.any()):  # the budget dropped every labelled item of the chunk
            continue
        logits, targets = action_logits(model, batch, builder.vocab)
        row_users = batch.user_ids.unsqueeze(1).expand_as(batch.labels)[labelled]
        is_cold = torch.tensor(
            [h.user_id in cold_users if cold_users is not None else len(h) < cold_start_items for h in chunk],
            device=device,
        )
        scores.append(positive_probability(logits, builder.vocab).cpu())
        labels.append((targets == builder.vocab.positive_index).long().cpu())
        users.append(row_users.cpu())
        cold.append(is_cold.unsqueeze(1).expand_as(batch.labels)[labelled].cpu())
    model.train(was_training)
    if not scores:
        raise ValueError("no labelled action within the token budget: nothing to evaluate")
    return ranking_metrics(  # the cold metrics are NaN when no cold user has both classes (or none is cold)
        torch.cat(labels).numpy(),
        torch.cat(scores).numpy(),
        torch.cat(users).numpy(),
        torch.cat(cold).numpy(),
    )

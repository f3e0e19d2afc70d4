"""The tiny pipeline config the DAG tests run (seconds per step on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

TINY = {
    "dataset": "tiny",
    "source": {"kind": "synthetic", "synthetic": {"num_users": 80, "num_items": 120, "num_events": 3000,
                                                  "num_clusters": 4, "seed": 1, "image_size": 8}},
    "quality": {"result_format": "BOOLEAN_ONLY", "build_data_docs": False},
    "embeddings": {"text": {"modality": "text", "kind": "hashing", "config": {"dim": 32}},
                   "behavior": {"dim": 16, "epochs": 2, "max_len": 20}},
    "tokenizer": {
        "train": {"model": {"dim": 16, "hidden_dim": 32, "codebook_size": 16, "vclub_hidden_dim": 16},
                  "epochs": 6, "alignment_warmup_epochs": 2, "batch_size": 64},
        "health": {"min_utilisation": 0.2, "min_unique_id_rate": 0.5},
    },
    "sequences": {"token_budget": 120, "profile_tokens": 3},
    "ranker": {
        "sequence": {"codebook_size": 16, "max_tokens": 120},
        "profile_fields": ["age_bucket", "gender", "occupation"],
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "ffn_size": 64},
        "pretrain": {"objective": "pt", "learning_rate": 3.0e-3, "warmup_steps": 5, "max_steps": 60,
                     "batch_size": 16, "log_every": 5, "checkpoint_every": 10},
        "finetune": {"objective": "sft", "learning_rate": 1.0e-3, "warmup_steps": 5, "max_steps": 500,
                     "batch_size": 16, "log_every": 25, "checkpoint_every": 100},
    },
    "gate": {"floors": {"auc": 0.55}, "max_regression": {"auc": 0.01, "gauc": 0.02}},
    "notify": {"sinks": ["log", "file"]},
}  # fmt: skip


def _write(path: Path, **section_updates: dict) -> Path:
    config = json.loads(json.dumps(TINY))
    for section, update in section_updates.items():
        config["ranker"][section].update(update)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def write_config():
    """``write(path, pretrain={...}, finetune={...}) -> path``: the tiny config with ranker overrides."""
    return _write

"""``hisam demo``: the main job on the embedded default.

Until the scheduled lifecycle lands, the demo trains the tokenizer (DST, Sec. 3.2) on the bundled
synthetic catalogue with planted structure, tokenizes it into semantic IDs, and tracks the run in the
local MLflow store; everything goes under ``$HISAM_HOME`` (default ``.hisam``).
"""

from __future__ import annotations

import logging
from typing import Any

from hisam_core.tokenizer import TokenizerTrainConfig
from pipelines.settings import Settings
from pipelines.tokenizer import TrainTokenizerStepConfig, train_tokenizer_step

log = logging.getLogger(__name__)


def run_demo(seed: int = 0) -> dict[str, Any]:
    """Train DST on the synthetic catalogue and report where everything went."""
    settings = Settings.from_env()
    train = TokenizerTrainConfig.from_dict(
        {"epochs": 40, "alignment_warmup_epochs": 5, "batch_size": 256, "seed": seed}
    )
    config = TrainTokenizerStepConfig(features="synthetic", synthetic_items=2000, train=train, version="demo")
    summary = train_tokenizer_step(config)
    summary["next"] = {
        "mlflow_ui": f"mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}",
        "figure": summary["figure"],
    }
    log.info("demo done: open the MLflow UI with `%s`", summary["next"]["mlflow_ui"])
    return summary

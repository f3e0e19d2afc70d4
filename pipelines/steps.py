"""The registry of pipeline steps: name -> (typed config, function).

A step is a plain function ``fn(config) -> dict`` (a JSON-able summary of what it wrote). The CLI
(``hisam run <step> --config file.yaml``) and the Airflow DAGs call the same functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hisam_core.config import Config


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # imported lazily so `hisam --help` and DAG parsing stay fast
    function: str
    config: str
    help: str

    def resolve(self) -> tuple[type[Config], Callable[[Any], dict[str, Any]]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.function)


STEPS: dict[str, Step] = {
    s.name: s
    for s in [
        Step(
            "train-tokenizer",
            "pipelines.tokenizer",
            "train_tokenizer_step",
            "TrainTokenizerStepConfig",
            "train DST on item features and write the checkpoint and semantic-ID table",
        ),
    ]
}

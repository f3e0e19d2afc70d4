"""Typed configuration: pydantic models loaded from and saved to YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

#: The device names a config accepts (validated at load, not at the first tensor): ``auto`` is CUDA
#: when the machine has it, else the CPU (:func:`hisam_core.device.resolve_device`).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class Config(BaseModel):
    """Base for every config in the project: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Load from a YAML file; an empty file gives the defaults. Malformed YAML is a one-line
        ValueError ``path:line:column: not valid YAML: problem``; an invalid value one naming the file
        and each key (:func:`describe`)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
            raise ValueError(f"{where}: not valid YAML: {problem}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"{path}: {describe(err)}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        return cls.model_validate(data or {})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def describe(err: ValidationError) -> str:
    """Pydantic's errors as one ``dotted.key: message`` per problem, ``; ``-joined (its own text is a
    multi-line dump with a documentation link per error)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
    )


def differences(old: Config, new: Config) -> set[str]:
    """Dotted names of the settings in which two configs of one class differ; a mapping counts as a
    setting of its own as well (its key order, which token ids can follow), and so do its entries."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[f"{prefix}{key}"] = list(value)
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, after = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}

"""Modality encoders producing the raw per-item embeddings that DST consumes (Sec. 3.2.1, App. B.2).

- :mod:`.text`: frozen transformers sentence encoder (default all-MiniLM-L6-v2, offline).
- :mod:`.image`: frozen transformers vision encoder from a local path, or the hand-crafted
  :class:`DescriptorImageEncoder` fallback when no weights exist.
- :mod:`.behavior`: SASRec trained only on interactions before a cut-off.

Importing this package loads torch and PIL but not transformers (deferred to encoder construction).
"""

from __future__ import annotations

from pydantic import Field

from hisam_core.config import Config
from hisam_core.encoders.base import EncodedBatch
from hisam_core.encoders.behavior import BehaviorEncoder, BehaviorEncoderConfig
from hisam_core.encoders.image import (
    DescriptorImageEncoder,
    DescriptorImageEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    build_image_encoder,
)
from hisam_core.encoders.text import TextEncoder, TextEncoderConfig


class EncodersConfig(Config):
    """All three encoders' settings, one section per modality (``configs/encoders.yaml``)."""

    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    behavior: BehaviorEncoderConfig = Field(default_factory=BehaviorEncoderConfig)


__all__ = [
    "BehaviorEncoder",
    "BehaviorEncoderConfig",
    "DescriptorImageEncoder",
    "DescriptorImageEncoderConfig",
    "EncodedBatch",
    "EncodersConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "build_image_encoder",
]

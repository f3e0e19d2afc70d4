"""Disentangled Semantic Tokenizer (Sec. 3.2): multimodal item features -> semantic IDs."""

from hisam_core.tokenizer.dst import DST, DSTConfig, DSTOutput, validate_features
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer

__all__ = ["DST", "DSTConfig", "DSTOutput", "TokenizerTrainConfig", "train_tokenizer", "validate_features"]

"""HMAT: the Hierarchical Memory-Anchor Transformer ranker (Sec. 3.3-3.4)."""

from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, UserHistory, Vocabulary
from hisam_core.ranker.serving import AnchorKVCache, HMATRanker, rank_reference
from hisam_core.ranker.train import RankerConfig, TrainConfig, evaluate, load_model, train

__all__ = [
    "HMAT",
    "AnchorKVCache",
    "HMATConfig",
    "HMATRanker",
    "RankerConfig",
    "SequenceBuilder",
    "SequenceConfig",
    "TrainConfig",
    "UserHistory",
    "Vocabulary",
    "evaluate",
    "load_model",
    "rank_reference",
    "train",
]

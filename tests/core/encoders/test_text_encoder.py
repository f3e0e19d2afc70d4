"""TextEncoder (Sec. 3.2.1): unit-norm mean-pooled MiniLM embeddings, equal to a hand-written reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hisam_core.encoders.text import TextEncoder, TextEncoderConfig, default_text_model_path

TEXTS = [
    "A cat is sitting on the mat.",
    "A kitten rests on a rug.",
    "The central bank raised interest rates to fight inflation.",
    "Toy Story (1995). Genres: Animation, Children's, Comedy. A cowboy doll is threatened by a new spaceman toy.",
    "Short.",
]


def reference_embeddings(texts: list[str], max_length: int = 256) -> np.ndarray:
    """Mean pooling written out independently of the encoder: sum(h * m) / sum(m), then / ||.||."""
    from transformers import AutoModel, AutoTokenizer

    path = default_text_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            m = enc["attention_mask"][0].float()[:, None]
            v = (h * m).sum(0) / m.sum()
            rows.append((v / v.norm()).numpy())
    return np.stack(rows)


def test_unit_norm_and_matches_manual_mean_pooling(text_encoder):
    emb = text_encoder.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, reference_embeddings(TEXTS), atol=2e-5)


def test_cls_pooling_is_the_first_tokens_state_normalised() -> None:
    """For BGE-style models; whatever the padding of its batch."""
    from transformers import AutoModel, AutoTokenizer

    encoder = TextEncoder(TextEncoderConfig(pooling="cls"))
    path = default_text_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        first = [model(**tok(t, return_tensors="pt")).last_hidden_state[0, 0] for t in TEXTS]
    reference = np.stack([(v / v.norm()).numpy() for v in first])
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=2), reference, atol=2e-5)
    assert np.abs(encoder.encode(TEXTS) - reference_embeddings(TEXTS)).max() > 0.1  # not the mean


def test_batch_size_and_order_invariant_and_deterministic(text_encoder):
    full = text_encoder.encode(TEXTS, batch_size=len(TEXTS))
    single = text_encoder.encode(TEXTS, batch_size=1)
    np.testing.assert_allclose(full, single, atol=2e-5)
    reversed_ = text_encoder.encode(TEXTS[::-1], batch_size=2)
    np.testing.assert_allclose(reversed_[::-1], full, atol=2e-5)
    np.testing.assert_array_equal(text_encoder.encode(TEXTS), text_encoder.encode(TEXTS))


def test_similar_sentences_closer_than_unrelated(text_encoder):
    cat, kitten, bank = text_encoder.encode(TEXTS[:3])
    assert cat @ kitten > cat @ bank + 0.3
    assert cat @ kitten > kitten @ bank + 0.3


def test_truncation_to_max_length():
    enc = TextEncoder(TextEncoderConfig(max_length=8), device="cpu")
    a, b = enc.encode(["one two three four five six seven eight", "one two three four five six nine ten"])
    same_prefix = "one two three four five six"  # [CLS] + 6 words + [SEP] = 8 tokens
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, enc.encode([same_prefix])[0], atol=1e-6)


def test_bad_input(text_encoder, tmp_path):
    with pytest.raises(ValueError, match="empty input"):
        text_encoder.encode([])
    with pytest.raises(ValueError, match="expected a sequence of texts, got one str"):
        text_encoder.encode("hello")  # one text, not five one-letter texts
    with pytest.raises(ValueError, match="input 1 is an empty"):
        text_encoder.encode(["fine", "   "])
    with pytest.raises(ValueError, match="does not exist"):
        TextEncoder(TextEncoderConfig(model_name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match=r"no config\.json"):
        TextEncoder(TextEncoderConfig(model_name_or_path=str(tmp_path)))
    copy.deepcopy(text_encoder.model).half().save_pretrained(tmp_path / "fp16")  # saved in fp16
    text_encoder.tokenizer.save_pretrained(tmp_path / "fp16")
    half = TextEncoder(TextEncoderConfig(model_name_or_path=str(tmp_path / "fp16")), device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}  # not the checkpoint's fp16
    np.testing.assert_allclose(half.encode(["a film"]), text_encoder.encode(["a film"]), atol=5e-3)

"""HMAT on a CUDA device: the compiled FlexAttention path equals the dense-mask SDPA reference
(forward and backward) and compiles once per padded length, serving equals its references there, and
a model trained in bf16 on the GPU serves the same scores on the CPU. Skipped without CUDA (CI has
none; `make gpu-check` runs them on a GPU machine)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask

from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.objectives import action_logits, sft_loss
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, UserHistory
from hisam_core.ranker.serving import HMATRanker, rank_reference
from hisam_core.ranker.synthetic import random_semantic_ids, synthetic_histories
from hisam_core.ranker.train import RankerConfig, TrainConfig, evaluate, load_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Long enough (300 tokens) that FlexAttention's 128-token blocks tile the stream in three rows.
SEQUENCE = SequenceConfig(codebook_size=16, profile_fields={"age": 4, "gender": 3}, max_tokens=300)
ITEMS = random_semantic_ids(500, SEQUENCE, seed=0)
CUDA = torch.device("cuda")


def model_config(**overrides) -> HMATConfig:
    return HMATConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=256, **overrides)


def twin_models(**overrides) -> tuple[HMAT, HMAT]:
    """The same weights on CUDA, once with the dense SDPA reference and once with FlexAttention."""
    torch.manual_seed(0)
    vocab_size = SequenceBuilder(SEQUENCE).vocab.size
    sdpa = HMAT(model_config(attention_backend="auto", **overrides), vocab_size).to(CUDA)
    flex = HMAT(model_config(attention_backend="flex", **overrides), vocab_size).to(CUDA)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def ragged_histories() -> list[UserHistory]:
    """Users of 1 .. 36 interactions (up to the budget), so the batch is padded across blocks; every
    other user's items come in instants of three, which the compiled mask must hide from each other."""
    histories = synthetic_histories(ITEMS, SEQUENCE, 12, min_items=36, max_items=36, seed=1)
    tails = [h.tail(1 + (index * 7) % 36) for index, h in enumerate(histories)]
    return [replace(h, instants=np.arange(len(h)) // 3) if i % 2 else h for i, h in enumerate(tails)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"history_memory": "anchor_action"}, {"attention_mask": "causal"}],
    ids=["memory_anchor", "anchor_action", "causal"],
)
def test_compiled_flex_attention_equals_dense_sdpa_forward_and_backward(overrides):
    builder = SequenceBuilder(SEQUENCE)
    batch = builder.batch(ragged_histories()).to(CUDA)
    assert batch.tokens.shape[1] > 2 * 128 and not bool(batch.valid.all())
    sdpa, flex = twin_models(**overrides)
    mode = sdpa.config.attention_mask
    flex_mask, dense = flex.mask(batch, mode), sdpa.mask(batch, mode)
    assert isinstance(flex_mask, BlockMask) and flex_mask.shape[-1] == 384  # padded to 128-token blocks
    assert isinstance(dense, torch.Tensor)  # "auto" is the dense reference, on CUDA too
    expected = sdpa(batch, dense).hidden[batch.valid]
    actual = flex(batch, flex_mask).hidden[batch.valid]
    assert relative_error(actual, expected) < 1e-5
    for model in (sdpa, flex):
        model.zero_grad()
        sft_loss(model, batch, builder.vocab).backward()
    for (name, reference), (_, parameter) in zip(
        sdpa.named_parameters(), flex.named_parameters(), strict=True
    ):
        assert reference.grad is not None and reference.grad.norm() > 0, name
        assert relative_error(parameter.grad, reference.grad) < 1e-4, name


def test_flex_compiles_once_per_padded_length_and_shape_and_then_never_again():
    """New lengths within a 128-token bucket reuse the compiled kernels: without the padding every
    batch length recompiled until torch's recompile limit, then ran unfused with only a warning."""
    builder = SequenceBuilder(SEQUENCE)
    _, flex = twin_models()
    ranker = HMATRanker(flex.eval(), SEQUENCE)

    def exercise(longest: list[int], batch_size: int = 8) -> None:
        """A bf16 training step, a no-grad pass and a served history, per batch."""
        for n in longest:
            users = synthetic_histories(ITEMS, SEQUENCE, batch_size, n, n, seed=n)
            batch = builder.batch([h.tail(max(1, n - 3 * i)) for i, h in enumerate(users)]).to(CUDA)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sft_loss(flex, batch, builder.vocab).backward()
            with torch.no_grad():
                flex(batch, flex.mask(batch, "memory_anchor"))
            ranker.encode(users[0])

    torch._dynamo.reset()
    counters.clear()
    exercise([1, 16, 36])  # 10, 138 and 298 tokens: one batch per bucket (128, 256, 384)
    exercise([2, 30], batch_size=3)  # a second batch size
    # the fused kernel was compiled at all (eager flex would pass the stance below without compiling)
    assert counters["stats"]["unique_graphs"] > 0
    with torch.compiler.set_stance("fail_on_recompile"):
        exercise([3, 5, 12, 15, 17, 20, 25, 31, 33, 35])
        exercise([4, 22, 34], batch_size=5)


@pytest.mark.parametrize("backend", ["auto", "flex"])  # flex: the compiled FlexAttention history encode
def test_one_pass_ranking_and_anchor_cache_on_cuda_equal_their_references(backend):
    torch.manual_seed(0)
    model = HMAT(model_config(), SequenceBuilder(SEQUENCE).vocab.size).eval()
    cpu_ranker, cuda_ranker = (
        HMATRanker(model, SEQUENCE),
        HMATRanker(HMAT(model_config(attention_backend=backend), model.vocab_size).eval().to(CUDA), SEQUENCE),
    )
    cuda_ranker.model.load_state_dict(model.state_dict())
    # 40 items, more than the 36 the budget keeps beside a candidate, in instants of two
    history = synthetic_histories(ITEMS, SEQUENCE, 1, min_items=40, max_items=40, seed=2)[0]
    history = replace(history, instants=np.arange(40) // 2)
    candidates = ITEMS.codes[np.random.default_rng(3).choice(500, size=64, replace=False)]
    scores = cuda_ranker.rank(history, candidates)
    assert scores.is_cuda
    reference = rank_reference(cuda_ranker.model, SEQUENCE, history, candidates)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.cpu(), cpu_ranker.rank(history, candidates), atol=1e-5, rtol=0)
    assert reference.std() > 1e-4, "a constant score would make these checks vacuous"
    # appending to the anchor cache on the GPU equals re-encoding the longer history, for an item of
    # the last instant and for a later one: attending to the cache (30 items: room for one more) and
    # past the budget (40: the cache is rebuilt)
    room = cuda_ranker.builder.max_items(with_candidate=True)
    for past in (history.tail(30), history):
        for new_item, action, instant in ((ITEMS.codes[7], 1, 19), (ITEMS.codes[8], 0, None)):
            assert (len(past) < room) == (len(past) == 30)  # which path append takes
            grown = cuda_ranker.append(cuda_ranker.encode(past), new_item, action, instant)
            longer = past.append(new_item, action, instant)
            torch.testing.assert_close(
                cuda_ranker.rank(grown, candidates),
                rank_reference(cuda_ranker.model, SEQUENCE, longer, candidates),
                atol=1e-5,
                rtol=0,
            )


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_bf16_training_on_cuda_learns_and_its_checkpoint_serves_the_same_scores_on_cpu(backend, tmp_path):
    sequence = SequenceConfig(codebook_size=16, profile_fields={"age": 4}, max_tokens=64)
    items = random_semantic_ids(200, sequence, seed=0)
    train_users = synthetic_histories(items, sequence, 300, signal_position=2, seed=1)
    test_users = synthetic_histories(items, sequence, 80, signal_position=2, seed=2)
    config = RankerConfig(
        sequence=sequence,
        model=HMATConfig(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128, attention_backend=backend
        ),
        train=TrainConfig(
            objective="sft",
            max_steps=30,
            learning_rate=3e-3,
            warmup_steps=5,
            batch_size=32,
            device="cuda",
            mixed_precision="auto",
        ),
    )
    assert torch.cuda.is_bf16_supported(), "auto would fall back to fp32 and test nothing"
    model = train(config, train_users, tmp_path)
    on_gpu = evaluate(model, sequence, test_users)
    assert on_gpu["auc"] > 0.9
    _, served = load_model(tmp_path / "checkpoint.pt", "cpu")
    on_cpu = evaluate(served, sequence, test_users)
    assert on_cpu["auc"] == pytest.approx(on_gpu["auc"], abs=1e-3)
    builder = SequenceBuilder(sequence)
    batch = builder.batch(test_users)
    with torch.no_grad():
        gpu_logits, _ = action_logits(model.eval(), batch.to(CUDA), builder.vocab)
        cpu_logits, _ = action_logits(served, batch, builder.vocab)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)


class Interrupted(Exception):
    pass


def test_training_on_cuda_resumes_from_its_checkpoint(tmp_path):
    """A retried GPU task resumes: the checkpoint's RNG states are loaded as CPU tensors."""
    sequence = SequenceConfig(codebook_size=16, profile_fields={"age": 4}, max_tokens=64)
    users = synthetic_histories(random_semantic_ids(200, sequence, seed=0), sequence, 100, seed=1)

    def config(checkpoint_every: int) -> RankerConfig:
        return RankerConfig(
            sequence=sequence,
            model=HMATConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128),
            train=TrainConfig(
                objective="sft", max_steps=8, batch_size=16, log_every=1, checkpoint_every=checkpoint_every
            ),
        )

    straight: list[float] = []
    train(config(8), users, tmp_path / "straight", callback=lambda step, m: straight.append(m["loss"]))

    def crash_after_five(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config(4), users, tmp_path / "resumed", callback=crash_after_five)
    resumed: list[float] = []
    train(config(4), users, tmp_path / "resumed", callback=lambda step, m: resumed.append(m["loss"]))
    assert len(resumed) == 4  # steps 5 to 8, from the step-4 checkpoint
    np.testing.assert_allclose(resumed, straight[4:], rtol=1e-3)

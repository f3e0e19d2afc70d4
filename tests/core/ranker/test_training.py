"""Sec. 3.4.1: PT and SFT learn a task whose label depends on one semantic token; exact resume."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hisam_core.ranker.attention import MASK_RULE
from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.objectives import pretrain_loss, sft_loss
from hisam_core.ranker.sequence import IGNORE_LABEL, SequenceBuilder, SequenceConfig, TokenType, UserHistory
from hisam_core.ranker.synthetic import random_semantic_ids, synthetic_histories
from hisam_core.ranker.train import (
    RankerConfig,
    TrainConfig,
    batch_indices,
    checkpoint_mask_rule,
    evaluate,
    init_conflicts,
    load_model,
    train,
    warmup_cosine,
)

SEQUENCE = SequenceConfig(codebook_size=16, profile_fields={"age": 4}, max_tokens=64)
MODEL = HMATConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
ITEMS = random_semantic_ids(200, SEQUENCE, seed=0)
TRAIN_USERS = synthetic_histories(ITEMS, SEQUENCE, 300, signal_position=2, seed=1)
TEST_USERS = synthetic_histories(ITEMS, SEQUENCE, 80, signal_position=2, seed=2)


def config(objective: str, steps: int, **train) -> RankerConfig:
    # the CPU everywhere, for exact comparisons; test_ranker_cuda.py covers training on CUDA
    options = {"learning_rate": 3e-3, "warmup_steps": 5, "batch_size": 32, "log_every": 1, "device": "cpu"}
    options |= {"checkpoint_every": steps} | train
    return RankerConfig(
        sequence=SEQUENCE, model=MODEL, train=TrainConfig(objective=objective, max_steps=steps, **options)
    )


def run(cfg: RankerConfig, directory: Path) -> list[float]:
    losses: list[float] = []
    train(cfg, TRAIN_USERS, directory, callback=lambda step, metrics: losses.append(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, list[float]]:
    """One PT run shared by the module (single-threaded like every ranker test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("pt")
    losses = run(config("pt", 40, batch_size=16), directory)
    torch.set_num_threads(threads)
    return directory / "checkpoint.pt", losses


def test_pretraining_loss_falls(pretrained):
    _, losses = pretrained
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_sft_from_pretrained_learns_the_task(pretrained, tmp_path):
    checkpoint, _ = pretrained
    cfg = config("sft", 30, init_from=str(checkpoint))
    losses: list[float] = []
    model = train(cfg, TRAIN_USERS, tmp_path, callback=lambda step, metrics: losses.append(metrics["loss"]))
    # the first logged loss is the PT model's SFT loss on the first batch: SFT started from PT weights
    _, pt_model = load_model(checkpoint)
    builder = SequenceBuilder(SEQUENCE)
    first = builder.batch([TRAIN_USERS[i] for i in batch_indices(0, 32, len(TRAIN_USERS), 0)])
    with torch.no_grad():
        assert losses[0] == pytest.approx(float(sft_loss(pt_model, first, builder.vocab)), abs=1e-5)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    metrics = evaluate(model, SEQUENCE, TEST_USERS)
    assert metrics["auc"] > 0.9 and metrics["gauc"] > 0.9
    assert {"cold_auc", "cold_gauc"} <= set(metrics)
    warm = evaluate(model, SEQUENCE, TEST_USERS, cold_users=set())  # none cold: unmeasured, not absent
    assert np.isnan(warm["cold_auc"]) and np.isnan(warm["cold_gauc"]) and warm["auc"] == metrics["auc"]
    short = {h.user_id for h in TEST_USERS if len(h) < 12}  # the default rule: fewer than k items
    assert 0 < len(short) < len(TEST_USERS)
    by_length = evaluate(model, SEQUENCE, TEST_USERS, cold_start_items=12)
    assert by_length == evaluate(model, SEQUENCE, TEST_USERS, cold_users=short)


def test_evaluate_scores_each_labelled_action_as_the_reference_scores_its_prefix():
    """``evaluate`` = ``ranking_metrics`` of the reference scores: item k of a user scored as a
    candidate after the user's first k items (a separate full forward pass, dense mask), on every
    labelled item once, whatever the batch size (a chunk whose labels the token budget all dropped
    scores nothing); the cold subset is ``cold_users``."""
    from hisam_core.metrics import ranking_metrics
    from hisam_core.ranker.serving import rank_reference

    torch.manual_seed(0)
    model = HMAT(MODEL, SequenceBuilder(SEQUENCE).vocab.size).eval()
    users = [
        UserHistory(
            u.user_id, u.items[:5], u.actions[:5], u.profile, np.array([False, True, True, False, True])
        )
        for u in [u for u in TEST_USERS if len(u) >= 5][:12]
    ]  # 5 items fit the 64-token budget whole: no window cuts a prefix
    scores, labels, groups = [], [], []
    for user in users:
        for k in np.flatnonzero(user.targets):
            prefix = UserHistory(user.user_id, user.items[:k], user.actions[:k], user.profile)
            scores.append(float(rank_reference(model, SEQUENCE, prefix, user.items[k : k + 1])[0]))
            labels.append(int(user.actions[k] == SequenceBuilder(SEQUENCE).vocab.positive_index))
            groups.append(user.user_id)
    cold = {u.user_id for u in users[:5]}
    expected = ranking_metrics(
        np.array(labels), np.array(scores), np.array(groups), np.isin(groups, list(cold))
    )
    assert len(scores) == 36 and 0 < sum(labels) < 36 and np.std(scores) > 1e-3
    long = next(u for u in TEST_USERS if len(u) == 12)  # labelled on items the budget drops only
    cut = UserHistory(long.user_id, long.items, long.actions, long.profile, np.arange(12) < 2)
    assert not (SequenceBuilder(SEQUENCE).batch([cut]).labels != IGNORE_LABEL).any()
    users.append(cut)  # scores nothing, and a batch of it alone is no error
    for batch_size in (256, 5, 1):
        got = evaluate(model, SEQUENCE, users, batch_size=batch_size, cold_users=cold)
        assert got == pytest.approx(expected, abs=1e-6), batch_size


def test_sft_from_scratch_learns_the_task(tmp_path):
    model = train(config("sft", 30), TRAIN_USERS, tmp_path)
    assert evaluate(model, SEQUENCE, TEST_USERS)["auc"] > 0.9


def test_training_on_several_threads_is_bitwise_reproducible(tmp_path):
    """``hisam --threads N`` promises the same weights on a rerun: PT then SFT on 4 threads, twice,
    with a model wide enough that the CPU splits its kernels across the threads."""
    wide = MODEL.model_copy(update={"hidden_size": 128, "ffn_size": 256})
    torch.set_num_threads(4)  # the autouse single_thread fixture restores the count
    runs = []
    for attempt in ("a", "b"):
        pt = config("pt", 4, batch_size=64).model_copy(update={"model": wide})
        train(pt, TRAIN_USERS, tmp_path / attempt / "pt")
        sft = config("sft", 4, batch_size=64, init_from=str(tmp_path / attempt / "pt" / "checkpoint.pt"))
        runs.append(
            train(sft.model_copy(update={"model": wide}), TRAIN_USERS, tmp_path / attempt).state_dict()
        )
    first, second = runs
    assert all(torch.equal(first[k], second[k]) for k in first)


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_loss_curve_exactly(tmp_path):
    cfg = config("sft", 8)
    straight = run(cfg, tmp_path / "straight")
    interrupted = config("sft", 8, checkpoint_every=4)
    seen: list[float] = []

    def crash_after_five(step: int, metrics: dict[str, float]) -> None:
        seen.append(metrics["loss"])
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(interrupted, TRAIN_USERS, tmp_path / "resumed", callback=crash_after_five)
    resumed = run(interrupted, tmp_path / "resumed")  # restarts from the step-4 checkpoint
    assert seen[:4] == straight[:4]
    assert resumed == straight[4:]


def test_resume_refuses_another_runs_checkpoint_but_accepts_more_steps(tmp_path):
    train(config("pt", 6), TRAIN_USERS, tmp_path)  # past the warm-up: its last steps at the floor
    with pytest.raises(ValueError, match=r"train\.objective"):  # SFT must not continue a PT run
        train(config("sft", 8), TRAIN_USERS, tmp_path)
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        train(config("pt", 8, learning_rate=1e-2), TRAIN_USERS, tmp_path)
    logged: list[tuple[int, float]] = []
    longer = config("pt", 40)  # only the step budget changed: it continues, on the new schedule
    train(longer, TRAIN_USERS, tmp_path, callback=lambda step, metrics: logged.append((step, metrics["lr"])))
    tc = longer.train
    assert [step for step, _ in logged] == list(range(7, 41))
    expected = [
        tc.learning_rate * warmup_cosine(s - 1, tc.warmup_steps, 40, tc.min_lr_ratio) for s in range(7, 41)
    ]
    assert [lr for _, lr in logged] == pytest.approx(expected)  # step 7 too: not the old schedule's floor


def test_a_diverging_run_stops_before_a_non_finite_checkpoint(tmp_path):
    cfg = config("sft", 30, learning_rate=1e35, warmup_steps=0, checkpoint_every=1, grad_clip=1e30)
    with pytest.raises(ValueError, match="diverged by step") as err:
        run(cfg, tmp_path)
    failed = int(str(err.value).split("step ")[1].split(":")[0])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == failed - 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_pretrain_loss_scores_each_target_items_token_against_the_one_before_and_skips_the_rest():
    """Next-token cross-entropy under the causal mask, over the tokens of target items only: not the
    profile, not a window's context items (targets False), not padding, and not an item's first token
    after another item of its instant (their order is arbitrary)."""
    torch.manual_seed(0)
    builder = SequenceBuilder(SEQUENCE)
    model = HMAT(MODEL, builder.vocab.size).eval()
    user = TRAIN_USERS[1]
    targets, instants = [False, False, True, True], np.array([10, 11, 12, 12])  # the two targets: one instant
    context_first = UserHistory(7, user.items[:4], user.actions[:4], user.profile, targets, instants)
    batch = builder.batch([TRAIN_USERS[0], context_first])  # the second row is padded
    assert not bool(batch.valid.all())
    target_item = batch.token_type != TokenType.PROFILE
    target_item[1] &= batch.item_index[1] > 2
    with torch.no_grad():
        hidden = model(batch, model.mask(batch, "causal")).hidden
        terms = [
            -torch.log_softmax(model.logits(hidden[b, t]), -1)[batch.tokens[b, t + 1]]
            for b in range(batch.tokens.shape[0])
            for t in range(batch.tokens.shape[1] - 1)
            if batch.valid[b, t] and batch.valid[b, t + 1] and target_item[b, t + 1]
            and not (batch.item_index[b, t + 1] == 4 and batch.item_index[b, t] == 3 and b == 1)
        ]  # fmt: skip
        assert len(terms) == len(TRAIN_USERS[0]) * SEQUENCE.item_length + 2 * SEQUENCE.item_length - 1
        assert float(pretrain_loss(model, batch)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_sft_loss_is_eq11_written_out_and_padding_changes_nothing():
    """Eq. 11: the mean over labelled items of ``-log softmax(h_anchor . E[actions])[action]``, where
    ``h_anchor`` is the output at the item's Anchor under the MA mask and the Action token that follows
    it is the one predicted. A padded row scores as it does alone."""
    torch.manual_seed(0)
    builder = SequenceBuilder(SEQUENCE)
    vocab = builder.vocab
    model = HMAT(MODEL, vocab.size).eval()
    first = TRAIN_USERS[0]
    short = UserHistory(7, TRAIN_USERS[1].items[:3], TRAIN_USERS[1].actions[:3], TRAIN_USERS[1].profile)
    short = UserHistory(7, short.items, short.actions, short.profile, np.array([True, False, True]))
    batch = builder.batch([first, short])  # the second row is padded and labels 2 of its 3 items
    assert not bool(batch.valid.all())
    with torch.no_grad():
        hidden = model(batch, model.mask(batch, "memory_anchor")).hidden
        table = model.embed.weight[vocab.action_ids]
        terms, per_row = [], [0, 0]
        for b, t in zip(*np.nonzero((batch.labels != IGNORE_LABEL).numpy()), strict=True):
            label = int(batch.labels[b, t])
            assert batch.token_type[b, t] == TokenType.ANCHOR
            assert batch.tokens[b, t + 1] == vocab.action_ids[label]  # the Action it predicts comes next
            terms.append(-torch.log_softmax(hidden[b, t] @ table.T, -1)[label])
            per_row[b] += 1
        assert per_row == [int((batch.token_type[0] == TokenType.ACTION).sum()), 2]
        loss = float(sft_loss(model, batch, vocab))
        assert loss == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
        alone = [float(sft_loss(model, builder.batch([user]), vocab)) for user in (first, short)]
        assert loss == pytest.approx(np.average(alone, weights=per_row), rel=1e-5)


def test_checkpoint_is_a_weights_only_config_and_state_dict(tmp_path):
    train(config("pt", 2), TRAIN_USERS, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert RankerConfig.from_dict(state["config"]) == config("pt", 2)
    assert (
        state["step"] == 2
        and state["mask_rule"] == checkpoint_mask_rule(tmp_path / "checkpoint.pt") == MASK_RULE
    )
    rng = torch.random.get_rng_state()
    _, model = load_model(tmp_path / "checkpoint.pt")
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading draws nothing from the global RNG
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["state_dict"].items())


@pytest.mark.parametrize(
    ("section", "change", "named"),
    [
        ("sequence", {"codebook_size": 32}, "sequence.codebook_size"),  # other shapes
        ("model", {"position_encoding": "rope1d"}, "model.position_encoding"),  # same shapes
        ("sequence", {"action_names": ["positive", "negative"]}, "sequence.action_names"),  # ids swapped
    ],
)
def test_init_from_a_checkpoint_of_other_settings_fails(pretrained, tmp_path, section, change, named):
    checkpoint, _ = pretrained
    base = config("sft", 2, init_from=str(checkpoint))
    other = base.model_copy(update={section: getattr(base, section).model_copy(update=change)})
    histories = synthetic_histories(random_semantic_ids(50, other.sequence), other.sequence, 8)
    with pytest.raises(ValueError, match=re.escape(named)):
        train(other, histories, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_checkpoint_of_another_mask_rule_is_not_resumed_and_seeds_a_fine_tune_with_a_warning(
    pretrained, tmp_path, caplog
):
    """A run resumed under another rule would train its rest with another visibility: refused. A PT
    trained under another (or an unrecorded) rule still seeds the daily fine-tune, with a warning."""
    checkpoint, _ = pretrained
    state = torch.load(checkpoint, weights_only=True)
    older = tmp_path / "pt" / "checkpoint.pt"
    older.parent.mkdir()
    torch.save({**state, "mask_rule": MASK_RULE - 1}, older)
    with pytest.raises(ValueError, match=r"differs in \['mask_rule'\]"):
        train(config("pt", 41, batch_size=16), TRAIN_USERS, older.parent)
    unrecorded = tmp_path / "unrecorded.pt"
    torch.save({k: v for k, v in state.items() if k != "mask_rule"}, unrecorded)
    for seed, rule in ((older, f"mask rule {MASK_RULE - 1}"), (unrecorded, "an unrecorded mask rule")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hisam_core.ranker.train"):
            train(config("sft", 1, init_from=str(seed)), TRAIN_USERS, tmp_path / seed.stem)
        assert f"pre-trained under {rule}" in caplog.text and f"this code's is {MASK_RULE}" in caplog.text
        assert (
            checkpoint_mask_rule(tmp_path / seed.stem / "checkpoint.pt") == MASK_RULE
        )  # what it trained under
    caplog.clear()
    with caplog.at_level("WARNING", logger="hisam_core.ranker.train"):
        train(config("sft", 1, init_from=str(checkpoint)), TRAIN_USERS, tmp_path / "same")
    assert "mask rule" not in caplog.text


def test_flex_refuses_to_train_on_the_cpu_before_writing_anything(tmp_path):
    """torch has no FlexAttention backward on the CPU: a clear error up front, not one at step 1."""
    flex = config("sft", 1).model_copy(
        update={"model": MODEL.model_copy(update={"attention_backend": "flex"})}
    )
    with pytest.raises(ValueError, match="cannot train on the CPU"):
        train(flex, TRAIN_USERS, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sft_may_choose_its_mask_and_budget_apart_from_pt():
    pt = config("pt", 2)
    sft = config("sft", 2, init_from="pt.pt")
    sft = sft.model_copy(
        update={
            "model": MODEL.model_copy(update={"attention_mask": "causal", "history_memory": "anchor_action"}),
            "sequence": SEQUENCE.model_copy(update={"max_tokens": 128}),
        }
    )
    assert init_conflicts(pt, sft) == []
    assert init_conflicts(
        pt, sft.model_copy(update={"model": MODEL.model_copy(update={"inter_base": 500.0})})
    ) == ["model.inter_base"]
    fields = {"age": 3, "gender": 2}
    with_profile = pt.model_copy(update={"sequence": SEQUENCE.model_copy(update={"profile_fields": fields})})
    reordered = dict(reversed(fields.items()))  # same shapes, but every profile token id means another field
    assert init_conflicts(
        with_profile,
        sft.model_copy(update={"sequence": SEQUENCE.model_copy(update={"profile_fields": reordered})}),
    ) == ["sequence.profile_fields"]


def test_one_step_is_clipped_and_decays_only_the_matrices(tmp_path):
    """One AdamW step from the same start on the same batch. Adam's first step is
    ``lr * g / (|g| + eps)`` per weight, so a gradient clipped to norm 1e-12 (far under eps = 1e-8)
    barely moves a weight, and an unclipped one moves most by about ``lr``. Decoupled weight decay then
    subtracts exactly ``lr * wd * w`` from the matrices, and nothing from norms and biases."""

    def weights(name: str, **train) -> dict[str, torch.Tensor]:
        run(config("pt", 1, warmup_steps=0, batch_size=16, **train), tmp_path / name)
        return load_model(tmp_path / name / "checkpoint.pt")[1].state_dict()

    lr, wd = 1e-2, 0.5
    start = weights("start", learning_rate=1e-12, weight_decay=0.0)
    clipped = weights("clipped", learning_rate=lr, grad_clip=1e-12, weight_decay=0.0)
    free = weights("free", learning_rate=lr, grad_clip=1e3, weight_decay=0.0)
    decayed = weights("decayed", learning_rate=lr, grad_clip=1e-12, weight_decay=wd)
    assert max((clipped[k] - start[k]).abs().max().item() for k in start) < lr * 2e-4
    assert max((free[k] - start[k]).abs().max().item() for k in start) > lr / 2
    matrices = [k for k in start if start[k].ndim >= 2]
    assert matrices and len(matrices) < len(start)
    for k in start:
        expected = clipped[k] - lr * wd * start[k] if k in matrices else clipped[k]
        torch.testing.assert_close(decayed[k], expected, atol=1e-7, rtol=0)


def test_schedule_warms_up_then_decays_to_the_floor():
    values = [warmup_cosine(step, 10, 100, 0.1) for step in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    assert values[100] == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """Step ``s`` (1-based) trains with ``warmup_cosine(s - 1)``; the scheduler already holds the
    next step's rate when the metrics are sent, so it is not the one to log."""
    logged: list[tuple[int, float]] = []
    cfg = config("sft", 4, warmup_steps=3, batch_size=8)
    train(cfg, TRAIN_USERS, tmp_path, callback=lambda step, metrics: logged.append((step, metrics["lr"])))
    tc = cfg.train
    expected = [tc.learning_rate * warmup_cosine(s - 1, 3, 4, tc.min_lr_ratio) for s in range(1, 5)]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [lr for _, lr in logged] == pytest.approx(expected)


def test_every_epoch_visits_each_sample_once():
    steps = [batch_indices(step, 7, 20, seed=3) for step in range(20)]  # 140 samples = 7 epochs
    flat = np.concatenate(steps)
    for epoch in range(7):
        assert sorted(flat[epoch * 20 : (epoch + 1) * 20].tolist()) == list(range(20))
    assert (batch_indices(4, 7, 20, seed=3) == steps[4]).all()


def test_shipped_config_is_hi_sam_small():
    shipped = RankerConfig.from_yaml(Path(__file__).resolve().parents[3] / "configs" / "ranker.yaml")
    assert shipped == RankerConfig()
    model = shipped.model
    assert (model.hidden_size, model.ffn_size, model.num_layers) == (512, 2560, 4)
    assert (model.num_heads, model.num_kv_heads, model.inter_base, model.intra_base) == (8, 2, 10000, 100)
    assert shipped.sequence.max_tokens == 300 and shipped.sequence.num_positions == 6


def test_absolute_position_table_must_cover_the_budget():
    with pytest.raises(ValueError, match="max_positions"):
        RankerConfig(model=HMATConfig(position_encoding="absolute", max_positions=128))

"""BehaviorEncoder (App. B.2): SASRec trained strictly before the cut-off; no leakage, seeded,
learns a planted transition, documented cold-item fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hisam_core.encoders.behavior import (
    COLD_REASON,
    BehaviorEncoder,
    BehaviorEncoderConfig,
    left_pad,
    windows,
)

CATALOGUE = np.arange(100, 112)  # 12 items; 111 never interacted with before the cut-off
A, B = 103, 107  # planted: A is always followed by B
CUTOFF = 10_000
SMALL = {"dim": 16, "num_layers": 1, "num_heads": 2, "max_len": 8, "dropout": 0.0, "batch_size": 16}


def planted_interactions(num_users: int = 40, length: int = 12, seed: int = 0) -> pd.DataFrame:
    """Random sequences over items 100..110 in which every A is immediately followed by B."""
    rng = np.random.default_rng(seed)
    rows = []
    others = [i for i in CATALOGUE[:-1] if i not in (A, B)]
    for user in range(num_users):
        seq: list[int] = []
        while len(seq) < length:
            seq.extend([A, B] if rng.random() < 0.3 else [int(rng.choice(others))])
        times = np.sort(rng.choice(np.arange(0, CUTOFF), size=len(seq), replace=False))
        rows += [(user, item, int(t)) for item, t in zip(seq, times, strict=True)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def fit(df: pd.DataFrame, device: str = "cpu", **overrides) -> BehaviorEncoder:
    cfg = BehaviorEncoderConfig(**{**SMALL, "epochs": 3, **overrides})
    return BehaviorEncoder(cfg, device=device).fit(df, CUTOFF, CATALOGUE, progress=False)


@pytest.fixture(scope="module")
def train_df() -> pd.DataFrame:
    return planted_interactions()


def test_events_at_or_after_cutoff_do_not_change_anything(train_df):
    rng = np.random.default_rng(5)
    future = pd.DataFrame(
        {
            "user_id": rng.integers(0, 60, 300),  # old and new users
            "item_id": rng.choice(CATALOGUE, 300),  # including the cold item 111
            "timestamp": CUTOFF + rng.integers(0, 5000, 300),
        }
    )
    future.loc[:10, "timestamp"] = CUTOFF  # exactly at the cut-off is already "after"
    with_future = pd.concat([train_df, future]).sample(frac=1.0, random_state=1)  # also reorder rows
    base, leaked = fit(train_df).encode(), fit(with_future).encode()
    np.testing.assert_array_equal(base.embeddings, leaked.embeddings)
    np.testing.assert_array_equal(base.present, leaked.present)
    # not vacuous: one more event *before* the cut-off does change the embeddings
    extra = pd.DataFrame({"user_id": [0], "item_id": [A], "timestamp": [CUTOFF - 1]})
    changed = fit(pd.concat([train_df, extra])).encode()
    assert not np.array_equal(base.embeddings, changed.embeddings)


def test_events_of_one_second_are_ordered_by_item_id_whatever_the_row_order():
    """Ties in time are broken by item id, so the training sequence never depends on row order."""
    encoder = BehaviorEncoder(BehaviorEncoderConfig(**SMALL))
    encoder.item_ids = np.asarray(CATALOGUE)
    index = {item: k + 1 for k, item in enumerate(CATALOGUE)}
    rows = pd.DataFrame({"user_id": [0, 0, 0], "item_id": [105, 102, 103], "timestamp": [5, 5, 1]})
    for frame in (rows, rows.iloc[::-1]):
        (sequence,) = encoder.training_sequences(frame, CUTOFF)
        assert sequence.tolist() == [index[103], index[102], index[105]]


def test_deterministic_under_seed(train_df):
    a, b = fit(train_df, seed=3), fit(train_df, seed=3)
    np.testing.assert_array_equal(a.encode().embeddings, b.encode().embeddings)
    assert a.history == b.history
    assert not np.array_equal(a.encode().embeddings, fit(train_df, seed=4).encode().embeddings)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_several_threads_are_bitwise_reproducible(train_df, loss):
    """The same seed and thread count give the same embeddings on 4 threads (the tests run on one)."""
    torch.set_num_threads(4)  # the autouse single_torch_thread fixture restores the count
    a, b = (fit(train_df, dim=128, batch_size=64, loss=loss).encode().embeddings for _ in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_learns_planted_transition(train_df, loss):
    enc = fit(train_df, epochs=20, lr=5e-3, loss=loss, num_negatives=4)
    assert enc.history[-1] < enc.history[0]
    rng = np.random.default_rng(2)
    histories = [[A]] + [[*rng.choice(CATALOGUE[:-1], size=k).tolist(), A] for k in (1, 3, 6, 10)]
    scores = enc.next_item_scores(histories)
    assert (CATALOGUE[scores.argmax(axis=1)] == B).all()


def test_cold_items_get_mean_of_warm_rows_and_mask(train_df):
    enc = fit(train_df)
    out = enc.encode()
    cold = CATALOGUE == 111
    assert out.present.tolist() == (~cold).tolist()
    assert out.reasons[-1] == COLD_REASON and set(out.reasons[:-1]) == {""}
    table = enc.model.item_emb.weight.detach().numpy()[1:]
    np.testing.assert_allclose(out.embeddings[cold][0], table[~cold].mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(out.embeddings[~cold], table[~cold])
    # encode(ids) is the catalogue rows in the asked order
    sub = enc.encode([111, 100])
    np.testing.assert_array_equal(sub.embeddings, out.embeddings[[-1, 0]])


def test_scores_do_not_depend_on_batch_or_padding(train_df):
    enc = fit(train_df)
    short, long_ = [A], [100, 101, 102, 104, 105, 106, 108, 109, 110, A]
    together = enc.next_item_scores([short, long_])
    np.testing.assert_allclose(together[0], enc.next_item_scores([short])[0], atol=1e-5)
    np.testing.assert_allclose(together[1], enc.next_item_scores([long_])[0], atol=1e-5)


def test_save_load_roundtrip(train_df, tmp_path):
    enc = fit(train_df)
    enc.save(tmp_path / "sasrec.pt")
    rng = torch.random.get_rng_state()
    back = BehaviorEncoder.load(tmp_path / "sasrec.pt", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading draws nothing from the global RNG
    np.testing.assert_array_equal(back.encode().embeddings, enc.encode().embeddings)
    np.testing.assert_array_equal(back.next_item_scores([[A]]), enc.next_item_scores([[A]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trained_on_cuda_it_learns_is_seeded_and_serves_the_same_embeddings_on_cpu(train_df, tmp_path):
    enc = fit(train_df, device="cuda", epochs=20, lr=5e-3, num_negatives=4)
    assert enc.history[-1] < enc.history[0]
    assert CATALOGUE[enc.next_item_scores([[A]]).argmax()] == B
    again = fit(train_df, device="cuda", epochs=20, lr=5e-3, num_negatives=4)
    np.testing.assert_array_equal(again.encode().embeddings, enc.encode().embeddings)
    enc.save(tmp_path / "sasrec.pt")
    back = BehaviorEncoder.load(tmp_path / "sasrec.pt", device="cpu")
    np.testing.assert_allclose(back.encode().embeddings, enc.encode().embeddings, atol=1e-5)


def test_windows_cover_every_transition_once():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 5, 9, 10, 17, 40]:
        seq = rng.integers(1, 1000, n)
        got = sorted((int(w[i]), int(w[i + 1]), len(w)) for w in windows(seq, 8) for i in range(len(w) - 1))
        assert [(a, b) for a, b, _ in got] == sorted(zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True))
        assert all(length <= 9 for _, _, length in got)
    padded = left_pad([np.array([5, 6, 7])], 5)
    assert padded.tolist() == [[0, 0, 5, 6, 7]]


def test_a_diverging_fit_raises_and_leaves_the_encoder_unfitted(train_df, tmp_path):
    enc = fit(train_df)  # fitted before: the failed refit must not leave its NaN weights behind
    enc.config = enc.config.model_copy(update={"lr": 1e30})
    with pytest.raises(ValueError, match="behavior encoder training diverged in epoch 0"):
        enc.fit(train_df, CUTOFF, CATALOGUE, progress=False)
    for use in (enc.encode, lambda: enc.save(tmp_path / "nan.pt")):
        with pytest.raises(ValueError, match="not fitted"):
            use()
    assert not (tmp_path / "nan.pt").exists()


def test_bad_input(train_df):
    with pytest.raises(ValueError, match="timestamp"):
        fit(train_df.drop(columns="timestamp"))
    with pytest.raises(ValueError, match="no interactions before the cut-off"):
        fit(train_df.assign(timestamp=CUTOFF))
    with pytest.raises(ValueError, match="outside the catalogue"):
        fit(pd.concat([train_df, pd.DataFrame({"user_id": [0], "item_id": [999], "timestamp": [1]})]))
    # text times compare letter by letter ("10000" < "500"): refused, not silently leaked
    with pytest.raises(ValueError, match="timestamp and cut-off must be numbers or datetimes, got object"):
        fit(train_df.assign(timestamp=train_df["timestamp"].astype(str)))
    with pytest.raises(ValueError, match="got int64 and str"):
        BehaviorEncoder(BehaviorEncoderConfig(**SMALL)).fit(train_df, str(CUTOFF), CATALOGUE, progress=False)
    with pytest.raises(ValueError, match="not fitted"):
        BehaviorEncoder().encode()
    enc = fit(train_df)
    with pytest.raises(ValueError, match=r"not in the catalogue: \[999\]"):
        enc.encode([100, 999])
    with pytest.raises(ValueError, match="empty input"):
        enc.encode([])
    with pytest.raises(ValueError, match="empty input"):
        enc.next_item_scores([])
    # a fractional id is no id (a cast would give another item's row)
    with pytest.raises(ValueError, match=r"item_ids must be integers, got \[100.5\]"):
        enc.encode([100.5])
    with pytest.raises(ValueError, match="history item_ids must be integers"):
        enc.next_item_scores([[100, 100.5]])
    with pytest.raises(ValueError, match="behavior encoder: item_ids must be integers"):
        BehaviorEncoder(BehaviorEncoderConfig(**SMALL)).fit(train_df, CUTOFF, CATALOGUE + 0.5, progress=False)
    assert np.array_equal(
        enc.encode(CATALOGUE[:3].astype(float)).embeddings, enc.encode(CATALOGUE[:3]).embeddings
    )


def test_behaviour_sanity_counts_tied_popularity_as_the_mean_over_tie_orders(train_df):
    """Every catalogue item is as popular before the cut as any other: popularity ranks a target
    among ``n`` unseen items in the top ``k`` with probability ``min(1, k / n)``, not always (a
    strict "better than" count ranked every tie in the target's favour)."""
    from hisam_core.evaluation.features import behaviour_sanity

    before = [(50, int(item), t) for t, item in enumerate(CATALOGUE[1:], start=1)]
    user = [(51, 100, 5), (51, 101, CUTOFF), (51, 102, CUTOFF + 1), (51, 103, CUTOFF + 2)]
    ratings = pd.DataFrame(before + user, columns=["user_id", "item_id", "timestamp"])
    encoder = fit(train_df)
    for k in (2, 10):
        result = behaviour_sanity(encoder, ratings, CUTOFF, k)
        unseen = np.array([11, 10, 9])  # the catalogue less the history before each target
        assert result["targets"] == 3
        assert result[f"hr@{k}_popularity"] == round(float(np.minimum(1, k / unseen).mean()), 4)
        assert 0 <= result[f"hr@{k}_sasrec"] <= 1
    # two items of one second after the cut: neither is the other's history (the protocol's rule),
    # so each is ranked among the 11 items the one before them leaves (not 10 for the second)
    same_second = [(52, 100, 5), (52, 101, CUTOFF + 5), (52, 102, CUTOFF + 5)]
    ratings = pd.DataFrame(before + same_second, columns=["user_id", "item_id", "timestamp"])
    result = behaviour_sanity(encoder, ratings, CUTOFF, 2)
    assert result["targets"] == 2 and result["hr@2_popularity"] == round(2 / 11, 4)

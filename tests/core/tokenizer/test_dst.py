"""DST end to end on planted data (Sec. 3.2): disentanglement, checkpoints, encoding, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.cga import Standardize
from hisam_core.tokenizer.dst import DST, DSTConfig
from hisam_core.tokenizer.figure import position_modality_similarity, save_similarity_figure
from hisam_core.tokenizer.metrics import normalized_mutual_information as nmi
from hisam_core.tokenizer.train import (
    TokenizerTrainConfig,
    features_digest,
    resolve_modality_dims,
    state_conflicts,
    train_tokenizer,
)


def test_shared_positions_track_the_shared_factor(trained):
    """Every shared position, coarse to fine, agrees with the shared factor several times more than
    with any modality's private one (all factors have 64 values, so chance agreement is alike)."""
    model, features, factors, _ = trained
    codes = model.encode(features, "t").codes
    assert nmi(codes[:, 0], factors.shared) > 0.7
    for layer in range(model.config.shared_layers):
        shared = nmi(codes[:, layer], factors.shared)
        private = max(nmi(codes[:, layer], p) for p in factors.private.values())
        assert shared > 3 * private, (layer, shared, private)


def test_specific_positions_track_their_own_private_factor(trained):
    model, features, factors, _ = trained
    codes = model.encode(features, "t").codes
    layers = model.config.shared_layers
    for offset, m in enumerate(model.modalities):
        own = nmi(codes[:, layers + offset], factors.private[m])
        others = [nmi(codes[:, layers + offset], factors.private[o]) for o in model.modalities if o != m]
        assert own > 2 * max(others), (m, own, others)


def test_figure3_similarity_is_diagonal_on_specific_positions(trained, tmp_path):
    model, features, _, _ = trained
    with torch.no_grad():
        out = model(*model.tensors(features))
        codewords = model.codewords(out.codes).numpy()
    matrix = position_modality_similarity(codewords, {m: out.aligned[m].numpy() for m in model.modalities})
    specific = matrix[model.config.shared_layers :]
    assert (specific.argmax(1) == np.arange(len(model.modalities))).all(), matrix
    from PIL import Image

    def drawn(values: np.ndarray, name: str) -> np.ndarray:
        path = tmp_path / name
        save_similarity_figure(values, model.config.position_names, model.modalities, path)
        return np.asarray(Image.open(path))

    pixels = drawn(matrix, "figure3.png")
    rows, cols = len(model.config.position_names), len(model.modalities)  # one cell each, 120 dpi
    assert pixels.shape[:2] == (round((0.5 * rows + 1.5) * 120), round((1.2 * cols + 2.5) * 120))
    assert np.array_equal(drawn(matrix, "again.png"), pixels)  # the matrix decides every pixel
    assert not np.array_equal(drawn(-matrix, "negated.png"), pixels)


def test_training_reports_metrics_and_uses_codebooks(trained, tiny):
    model, _, _, history = trained
    assert len(history) == tiny["epochs"]
    last = history[-1]
    for key in ("recon_behavior", "alignment", "quantization", "mi_text", "utilisation_shared_0"):
        assert np.isfinite(last[key]), key
    for epoch in history[tiny["alignment_warmup_epochs"] :]:  # Eq. 16's two terms have the same value
        branches = epoch["commitment_shared"] + sum(epoch[f"commitment_{m}"] for m in model.modalities)
        assert epoch["quantization"] == pytest.approx((1 + model.config.beta) * branches, rel=1e-5)
    assert last["utilisation_shared_0"] >= 0.9
    # quantised reconstruction improved after the codebooks were initialised
    first_full = history[tiny["alignment_warmup_epochs"]]
    assert last["recon_text"] < first_full["recon_text"]


def test_save_load_encode_give_identical_ids(trained, tmp_path):
    model, features, _, _ = trained
    path = tmp_path / "dst.pt"
    model.save_checkpoint(path)
    rng = torch.random.get_rng_state()
    loaded = DST.load_checkpoint(path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading draws nothing from the global RNG
    before, after = model.encode(features, "v1"), loaded.encode(features, "v1")
    np.testing.assert_array_equal(before.codes, after.codes)
    np.testing.assert_array_equal(before.tokens(), after.tokens())
    assert after.position_names == ("shared_0", "shared_1", "shared_2", "behavior", "image", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.pt"]  # no temp file left behind


def test_the_catalogue_is_read_in_batches_as_in_one_pass(trained):
    """``encode`` and Figure 3's inputs run the catalogue a batch at a time (PSGR's memory grows with
    it): the same codes, codewords and aligned features as one pass, and the model's mode restored."""
    model, features, _, _ = trained
    model.train()
    with torch.no_grad():
        model.eval()
        whole = model(*model.tensors(features))
        model.train()
    codewords, aligned = model.codewords_and_aligned(features, batch_size=7)
    assert model.training
    np.testing.assert_array_equal(model.encode(features, "v", batch_size=7).codes, whole.codes.numpy())
    np.testing.assert_allclose(codewords, model.codewords(whole.codes).detach().numpy(), atol=1e-6)
    for m in model.modalities:
        np.testing.assert_allclose(aligned[m], whole.aligned[m].numpy(), atol=1e-5)
    model.eval()


def test_encode_order_of_modalities_does_not_matter(trained):
    model, features, _, _ = trained
    reordered = ItemFeatures(features.item_ids, dict(reversed(features.modalities.items())))
    np.testing.assert_array_equal(model.encode(features, "v").codes, model.encode(reordered, "v").codes)


def test_dedup_suffix_makes_every_id_unique(trained):
    model, features, _, _ = trained
    config = model.config.model_copy(update={"dedup_suffix": True})
    with_suffix = DST(config)
    with_suffix.load_state_dict(model.state_dict())
    ids = with_suffix.encode(features, "v")
    assert ids.num_positions == 7 and len(np.unique(ids.codes, axis=0)) == len(features)


def test_new_items_continue_the_suffixes_of_known_ones(trained):
    """Incremental tokenization: known items first, new items later with ``known_codes``, gives the
    IDs of one pass over both, so every ID stays unique and no known ID changes."""
    model, features, _, _ = trained
    with_suffix = DST(model.config.model_copy(update={"dedup_suffix": True}))
    with_suffix.load_state_dict(model.state_dict())
    rows = np.arange(len(features))
    known, new = rows[::2], rows[1::2]
    first = with_suffix.encode(features.subset(known), "v")
    later = with_suffix.encode(features.subset(new), "v", known_codes=first.codes[:, :-1])
    assert (later.codes[:, -1] > 0).any()  # some new items collide with known ones
    one_pass = with_suffix.encode(features.subset(np.concatenate([known, new])), "v")
    np.testing.assert_array_equal(np.concatenate([first.codes, later.codes]), one_pass.codes)
    assert len(np.unique(one_pass.codes, axis=0)) == len(features)


def test_more_items_on_one_id_than_the_suffix_can_separate_is_an_error(trained):
    """The suffix is one more code of the same vocabulary: K items may share an ID, the K+1-th not."""
    model, features, _, _ = trained
    with_suffix = DST(model.config.model_copy(update={"dedup_suffix": True}))
    with_suffix.load_state_dict(model.state_dict())
    one, k = features.subset(np.array([0])), model.config.codebook_size
    codes = model.encode(one, "v").codes
    last = with_suffix.encode(one, "v", known_codes=np.repeat(codes, k - 1, axis=0))
    assert last.codes[0, -1] == k - 1
    with pytest.raises(ValueError, match=f"^{k + 1} items share one ID: more than the suffix can separate$"):
        with_suffix.encode(one, "v", known_codes=np.repeat(codes, k, axis=0))


def test_failed_save_leaves_no_partial_checkpoint(trained, tmp_path, monkeypatch):
    model, _, _, _ = trained

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        model.save_checkpoint(tmp_path / "dst.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_run_raises_and_writes_no_checkpoint(planted, tiny, tmp_path):
    features, _ = planted
    config = TokenizerTrainConfig.model_validate(
        {**tiny, "epochs": 3, "alignment_warmup_epochs": 1, "lr": 1e20}
    )
    with pytest.raises(ValueError, match="DST training diverged in epoch 0: non-finite alignment loss"):
        train_tokenizer(features.subset(np.arange(300)), config, checkpoint_path=tmp_path / "dst.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_dimension_constant_in_training_is_centred_not_scaled():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=generator)
    x[:, 1] = 300.0 + 1e-5 * torch.randn(50, generator=generator)  # above 1e-6, but 3e-8 of its mean
    standardize = Standardize(3)
    standardize.fit(x)
    assert standardize.std[1] == 1.0
    shifted = standardize(x + torch.tensor([0.0, 0.01, 0.0]))[:, 1]
    torch.testing.assert_close(shifted, torch.full((50,), 0.01), atol=1e-4, rtol=0)
    z = standardize(x)[:, [0, 2]]
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2))


def test_a_change_in_a_dimension_constant_in_training_keeps_the_ids(planted, tiny):
    """An image histogram bin no training poster uses: a new image that uses it a little is still
    its item's image (incremental encoding of new items)."""
    features = planted[0].subset(np.arange(300))

    def with_bin(value: float) -> ItemFeatures:
        image = features.modalities["image"].copy()
        image[:, 0] = value
        return ItemFeatures(features.item_ids, {**features.modalities, "image": image})

    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 4, "alignment_warmup_epochs": 1})
    model = train_tokenizer(with_bin(0.0), config)
    assert np.array_equal(model.encode(with_bin(1e-4), "t").codes, model.encode(with_bin(0.0), "t").codes)


def test_training_is_deterministic(planted, tiny):
    features, _ = planted
    small = features.subset(np.arange(300))
    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 3, "alignment_warmup_epochs": 1})
    first = train_tokenizer(small, config).encode(small, "a").codes
    second = train_tokenizer(small, config).encode(small, "a").codes
    np.testing.assert_array_equal(first, second)


def test_training_is_bitwise_reproducible_on_several_threads(planted, tiny):
    """The pipeline may train on every core (``hisam --threads``). Wide enough rows that the CPU
    parallelises the codebook gradient: with ``codebook[codes]`` two runs differed."""
    features, _ = planted
    model = {**tiny["model"], "dim": 128, "hidden_dim": 128}
    config = TokenizerTrainConfig.model_validate({**tiny, "model": model, "epochs": 5, "batch_size": 1000})
    torch.set_num_threads(4)  # the autouse single_thread fixture restores the count
    first, second = (train_tokenizer(features, config).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


class _Killed(Exception):
    """Stands for a worker killed mid-training."""


def _stop_at(epoch: int, seen: list):
    def callback(e: int, metrics: dict[str, float]) -> None:
        if e == epoch:
            raise _Killed
        seen.append((e, metrics))

    return callback


@pytest.mark.parametrize("killed_in", [1, 4])  # during the alignment warm-up; after the k-means start
def test_a_killed_training_resumes_from_its_state_and_ends_as_the_uninterrupted_one(
    planted, tiny, tmp_path, killed_in
):
    """Every epoch saves the state; a rerun starts after the last saved epoch, reports each later
    epoch's metrics as the uninterrupted run did (dead-code restarts, which draw from the global RNG
    and the quantisers' latest inputs, included) and ends with the same weights, to the bit."""
    features, _ = planted
    present = {m: np.ones(len(features), dtype=bool) for m in features.names}
    present["image"][1:] = False  # one real image: its quantiser's latest inputs then stay that item
    # as it was at its first step after the warm-up (one row never replaces them): only the state has it
    small = ItemFeatures(features.item_ids, features.modalities, present).subset(np.arange(300))
    config = TokenizerTrainConfig.model_validate(
        {**tiny, "epochs": 6, "alignment_warmup_epochs": 2, "dead_code_threshold": 2}
    )
    whole: list = []
    reference = train_tokenizer(small, config, callback=lambda e, m: whole.append((e, m)))
    state, before, after = tmp_path / "state.pt", [], []
    with pytest.raises(_Killed):
        train_tokenizer(small, config, callback=_stop_at(killed_in, before), state_path=state)
    torch.manual_seed(1234)  # another process: its global RNG is anything
    resumed = train_tokenizer(small, config, callback=lambda e, m: after.append((e, m)), state_path=state)
    assert before + after == whole
    assert sum(m.get("dead_codes_restarted", 0) for _, m in after) > 0
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(reference_state[k], resumed_state[k]) for k in reference_state)
    np.testing.assert_array_equal(resumed.encode(small, "a").codes, reference.encode(small, "a").codes)
    done: list = []  # a rerun after the last epoch trains nothing and returns the same model
    again = train_tokenizer(small, config, callback=lambda e, m: done.append(e), state_path=state)
    assert done == [] and all(torch.equal(again.state_dict()[k], resumed_state[k]) for k in resumed_state)


def test_a_state_of_other_settings_or_another_catalogue_does_not_resume(planted, tiny, tmp_path):
    """The device may change between attempts (a retry on another worker); the optimisation and the
    catalogue may not: they would continue another training under this one's name."""
    features, _ = planted
    small = features.subset(np.arange(200))
    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 2, "alignment_warmup_epochs": 1})
    state = tmp_path / "state.pt"
    train_tokenizer(small, config, state_path=state)
    assert state_conflicts(state, small, config.model_copy(update={"device": "auto"})) == []
    other = config.model_copy(update={"lr": 1e-4, "model": config.model.model_copy(update={"dim": 16})})
    assert state_conflicts(state, small, other) == ["lr", "model.dim"]
    moved = ItemFeatures(small.item_ids, {**small.modalities, "text": small.modalities["text"] + 1e-3})
    assert state_conflicts(state, moved, config) == ["features"]
    with pytest.raises(ValueError, match=r"belongs to another training \(it differs in \['features'\]\)"):
        train_tokenizer(moved, config, state_path=state)
    # modalities outside the paper's names are ordered as the features give them: the same catalogue
    # in another order would load the optimiser's moments onto other parameters
    named = ItemFeatures(small.item_ids, {"text": small.modalities["text"], "x": small.modalities["image"],
                                          "y": small.modalities["behavior"]})  # fmt: skip
    reordered = ItemFeatures(small.item_ids, {m: named.modalities[m] for m in ("text", "y", "x")})
    assert features_digest(named) == features_digest(reordered)  # the catalogue is the same
    train_tokenizer(named, config, state_path=tmp_path / "named.pt")
    assert state_conflicts(tmp_path / "named.pt", named, config) == []
    assert state_conflicts(tmp_path / "named.pt", reordered, config) == ["modality order"]


def test_only_the_vclub_optimiser_moves_the_variational_network(planted, tiny):
    """Sec. 3.2.2: the variational network is fitted alone, on detached inputs; the main step lowers
    the bound through the encoders only. Were its parameters in the main optimiser, that step would
    move them to shrink the estimate; at a vCLUB learning rate of 1e-12 they stay where they began."""
    features, _ = planted
    small = features.subset(np.arange(300))
    config = TokenizerTrainConfig.model_validate(
        {**tiny, "epochs": 3, "alignment_warmup_epochs": 1, "vclub_lr": 1e-12}
    )
    torch.manual_seed(config.seed)  # as train_tokenizer builds its model
    initial = DST(resolve_modality_dims(small, config.model))
    trained = train_tokenizer(small, config)
    moved = {
        name: float((p - dict(initial.named_parameters())[name]).detach().abs().max())
        for name, p in trained.named_parameters()
    }
    vclub = {name: change for name, change in moved.items() if name.startswith("vclub.")}
    assert vclub and max(vclub.values()) < 1e-9, vclub
    assert max(change for name, change in moved.items() if name not in vclub) > 1e-3  # the rest trained


def test_the_mi_bound_trains_only_what_makes_its_modalitys_recovered_feature(planted):
    """Eq. 2's vCLUB term of modality m (Sec. 3.2.2) reaches the encoders: m's projection head (a_m),
    PSGR's unfolding and m's probe, which make the recovered feature it bounds. Its shared side is
    detached (:meth:`DST.losses`), so no other head, probe or codebook, nor the temperature, gets any
    of its gradient; the variational network's own fit is the other half (the test above)."""
    features, _ = planted
    config = DSTConfig(modality_dims=features.dims, dim=16, hidden_dim=16, codebook_size=8)
    torch.manual_seed(0)
    model = DST(config).train()
    losses = model.losses(model(*model.tensors(features.subset(np.arange(64)))))
    for m in model.modalities:
        model.zero_grad()
        losses[f"mi_{m}"].backward(retain_graph=True)
        moved = {
            name
            for name, p in model.named_parameters()
            if not name.startswith("vclub.") and p.grad is not None and p.grad.abs().sum() > 0
        }
        assert moved == {
            *(f"cga.heads.{m}.{name}" for name, _ in model.cga.heads[m].named_parameters()),
            "psgr.unfold.weight",
            f"psgr.probes.{m}.weight",
            f"psgr.probes.{m}.bias",
        }


def test_training_keeps_the_temperature_in_its_range(planted, tiny):
    """A range of one value: every optimiser step moves log tau, the projection puts it back."""
    features, _ = planted
    fixed = {"temperature_init": 0.07, "temperature_min": 0.07, "temperature_max": 0.07}
    config = TokenizerTrainConfig.model_validate(
        {**tiny, "model": {**tiny["model"], **fixed}, "epochs": 2, "alignment_warmup_epochs": 1}
    )
    model = train_tokenizer(features.subset(np.arange(300)), config)
    assert model.cga.log_temperature.item() == pytest.approx(math.log(0.07), abs=1e-6)


def _mutated(features: ItemFeatures, name: str, values: np.ndarray) -> ItemFeatures:
    """Features whose arrays were changed after validation (numpy arrays are mutable)."""
    bad = ItemFeatures(features.item_ids, dict(features.modalities))
    bad.modalities[name] = values
    return bad


def _bad_inputs(features: ItemFeatures) -> dict[str, tuple[ItemFeatures, str]]:
    text = features.modalities["text"]
    nan, inf = text.copy(), features.modalities["image"].copy()
    nan[3, 1] = np.nan
    inf[5, 0] = np.inf
    return {
        "item counts differ": (
            _mutated(features, "behavior", features.modalities["behavior"][:-1]),
            "behavior",
        ),
        "nan": (_mutated(features, "text", nan), "text"),
        "inf": (_mutated(features, "image", inf), "image"),
        "wrong dimension": (_mutated(features, "text", text[:, :-1]), "text"),
        "empty modality": (_mutated(features, "image", features.modalities["image"][:, :0]), "image"),
        "missing modality": (
            ItemFeatures(features.item_ids, {m: v for m, v in features.modalities.items() if m != "image"}),
            "image",
        ),
        "extra modality": (
            ItemFeatures(features.item_ids, {**features.modalities, "audio": text}),
            "audio",
        ),
    }


def test_bad_input_raises_naming_the_modality_and_writes_nothing(planted, tiny, tmp_path):
    features, _ = planted
    config = TokenizerTrainConfig.model_validate(
        {**tiny, "model": {**tiny["model"], "modality_dims": features.dims}}
    )
    for case, (bad, modality) in _bad_inputs(features).items():
        path = tmp_path / case / "dst.pt"
        with pytest.raises(ValueError, match=repr(modality)):
            train_tokenizer(bad, config, checkpoint_path=path)
        assert not Path(tmp_path / case).exists() or list((tmp_path / case).iterdir()) == [], case


def test_bad_input_is_rejected_at_encode_time(trained):
    model, features, _, _ = trained
    for bad, modality in _bad_inputs(features).values():
        with pytest.raises(ValueError, match=repr(modality)):
            model.encode(bad, "v")


def test_features_that_overflow_the_projection_are_refused_not_coded_as_zeros(trained):
    """A finite value too large for float32 arithmetic became a NaN aligned feature, whose distance
    to every codeword is NaN: ``argmin`` gave code 0 at every position, without a word."""
    model, features, _, _ = trained
    small = features.subset(np.arange(10))
    text = small.modalities["text"].copy()
    text[3] = 3e38
    huge = ItemFeatures(small.item_ids, {**small.modalities, "text": text})
    item = int(small.item_ids[3])
    with pytest.raises(
        ValueError, match=rf"'text': items \[{item}\] have aligned features that are not finite"
    ):
        model.encode(huge, "v")


def test_bad_input_is_rejected_when_features_are_built():
    ids = np.arange(4)
    with pytest.raises(ValueError, match="'text'"):
        ItemFeatures(ids, {"text": np.full((4, 3), np.nan, dtype=np.float32)})
    with pytest.raises(ValueError, match="'image'"):
        ItemFeatures(ids, {"image": np.zeros((3, 2), dtype=np.float32)})
    with pytest.raises(ValueError, match="non-empty"):
        ItemFeatures(np.arange(0), {"text": np.zeros((0, 3), dtype=np.float32)})
    text = {"text": np.zeros((2, 3), dtype=np.float32)}
    with pytest.raises(ValueError, match="must be integers, got float64"):  # 1.2 and 1.7 would both be 1
        ItemFeatures(np.array([1.2, 1.7]), text)
    with pytest.raises(ValueError, match="must fit int64"):  # 2**63 would wrap to -2**63
        ItemFeatures(np.array([2**63, 0], dtype=np.uint64), text)


def test_features_swapped_for_float64_after_validation_encode_as_float32(trained):
    model, features, _, _ = trained
    wider = _mutated(features, "text", features.modalities["text"].astype(np.float64))
    assert np.array_equal(model.encode(wider, "v").codes, model.encode(features, "v").codes)


def test_config_file_holds_the_paper_defaults():
    config = TokenizerTrainConfig.from_yaml(
        Path(__file__).resolve().parents[3] / "configs" / "tokenizer.yaml"
    )
    assert config == TokenizerTrainConfig()
    m = config.model
    assert (m.dim, m.shared_layers, m.codebook_size, m.psgr_heads, m.beta) == (256, 3, 256, 4, 0.25)


@pytest.mark.parametrize("psgr_residual", ["modality", "consensus"])
def test_forward_decomposes_additively(planted, psgr_residual):
    features, _ = planted
    config = DSTConfig(
        modality_dims=features.dims, dim=16, hidden_dim=16, codebook_size=8, psgr_residual=psgr_residual
    )
    torch.manual_seed(0)
    model = DST(config).train()
    out = model(*model.tensors(features.subset(np.arange(64))))  # first call: k-means initialisation
    consensus = torch.stack([out.aligned[m] for m in model.modalities]).mean(0)
    assert torch.allclose(out.shared.quantized + out.shared.residuals[-1], consensus, atol=1e-5)
    for m in model.modalities:
        assert torch.allclose(out.aligned[m].norm(dim=-1), torch.ones(64), atol=1e-5)  # on the sphere
        assert torch.allclose(out.reconstructed[m], out.shared.quantized + out.specific[m].quantized)
        assert torch.allclose(out.specific[m].attention.sum(-1), torch.ones(64), atol=1e-5)
    shared_codewords = model.codewords(out.codes)[:, : config.shared_layers].sum(1)
    assert torch.allclose(shared_codewords, out.shared.quantized, atol=1e-5)


def test_concat_fusion_quantises_the_linear_map_of_the_concatenation_without_gram_loss(planted):
    """*w/o CGA* (Sec. 4.3): shared codes quantise fuse([a_1; ...; a_M]) and Eq. 2 drops Eq. 1."""
    features, _ = planted
    config = DSTConfig(
        modality_dims=features.dims,
        dim=16,
        hidden_dim=16,
        codebook_size=8,
        fusion="concat",
        alignment_weight=0,
    )
    torch.manual_seed(0)
    model = DST(config).train()
    out = model(*model.tensors(features.subset(np.arange(64))))
    fused = model.fuse(torch.cat([out.aligned[m] for m in model.modalities], dim=-1))
    assert torch.allclose(out.shared.quantized + out.shared.residuals[-1], fused, atol=1e-5)
    losses = model.losses(out)
    expected = (
        sum(losses[f"recon_{m}"] for m in model.modalities)
        + losses["quantization"]
        + config.mi_weight * sum(losses[f"mi_{m}"] for m in model.modalities)
    )
    assert losses["alignment"] > 0 and torch.allclose(losses["total"], expected)


def test_concat_fusion_refuses_an_alignment_term():
    with pytest.raises(ValueError, match="alignment_weight"):
        DSTConfig(fusion="concat")
    with pytest.raises(ValueError, match="alignment_warmup_epochs"):
        TokenizerTrainConfig(model=DSTConfig(fusion="concat", alignment_weight=0), alignment_warmup_epochs=2)


def test_input_reconstruction_decodes_each_modality_and_joins_eq2_only_when_weighted(planted):
    features, _ = planted
    base = {"modality_dims": features.dims, "dim": 16, "hidden_dim": 16, "codebook_size": 8}
    paper = DST(DSTConfig(**base))
    assert not any(k.startswith("decoders.") for k in paper.state_dict())  # paper checkpoints unchanged
    torch.manual_seed(0)
    model = DST(DSTConfig(**base, input_reconstruction_weight=0.5)).train()
    raw, present = model.tensors(features.subset(np.arange(64)))
    out = model(raw, present)
    for m in model.modalities:
        head = model.cga.heads[m]
        expected = torch.nn.functional.normalize(
            (raw[m] - head.standardize.mean) / head.standardize.std, dim=-1
        )
        assert torch.allclose(out.inputs[m], expected, atol=1e-6)
        assert out.decoded[m].shape == raw[m].shape
    losses = model.losses(out)
    paper_total = (
        sum(losses[f"recon_{m}"] for m in model.modalities)
        + losses["alignment"]
        + losses["quantization"]
        + 0.1 * sum(losses[f"mi_{m}"] for m in model.modalities)
    )
    extra = 0.5 * sum(losses[f"input_recon_{m}"] for m in model.modalities)
    assert torch.allclose(losses["total"], paper_total + extra)
    weighted = DST(DSTConfig(**base, input_reconstruction_weight=0.5, quantization_weight=3.0, mi_weight=0.2))
    weighted.load_state_dict(model.state_dict())
    again = weighted.losses(weighted(raw, present))  # the same weights: the same terms, reweighted
    mi = sum(losses[f"mi_{m}"] for m in model.modalities)
    assert torch.allclose(
        again["total"], losses["total"] + 2.0 * losses["quantization"] + 0.1 * mi, atol=1e-5
    )
    for m in model.modalities:  # each term is what it names, not just a part of the total
        rows = present[m]
        squared = ((out.inputs[m] - out.decoded[m]) ** 2).sum(-1)[rows]
        assert torch.allclose(losses[f"input_recon_{m}"], squared.mean())
        squared = ((out.aligned[m] - out.reconstructed[m]) ** 2).sum(-1)[rows]
        assert torch.allclose(losses[f"recon_{m}"], squared.mean())


def test_device_auto_trains_where_resolve_device_says_cpu_or_cuda(planted, tiny):
    """``device: auto`` (configs/production.yaml) is a device, not a name torch is handed: training
    runs on CUDA when the machine has it, else on the CPU, and encodes as a run naming that device
    does (``-k cuda`` selects it for the GPU check)."""
    from hisam_core.device import resolve_device

    small = planted[0].subset(np.arange(200))
    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 2, "alignment_warmup_epochs": 1})
    auto = train_tokenizer(small, config.model_copy(update={"device": "auto"}))
    where = resolve_device("auto").type
    assert next(auto.parameters()).device.type == where
    named = train_tokenizer(small, config.model_copy(update={"device": where}))
    np.testing.assert_array_equal(auto.encode(small, "a").codes, named.encode(small, "a").codes)

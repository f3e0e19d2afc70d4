"""DST on items that lack a modality (``ItemFeatures.present``): fallback rows are not evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hisam_core.features import ItemFeatures
from hisam_core.tokenizer.cga import CGA
from hisam_core.tokenizer.dst import DST, DSTConfig
from hisam_core.tokenizer.figure import position_modality_similarity
from hisam_core.tokenizer.synthetic import with_fallback_rows
from hisam_core.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from hisam_core.tokenizer.vclub import VCLUB


@pytest.fixture
def initialised(planted):
    """An untrained DST whose codebooks were k-means initialised on 128 planted items, in eval mode."""
    features = with_fallback_rows(planted[0].subset(np.arange(128)), "image", share=0.3)
    torch.manual_seed(0)
    model = DST(DSTConfig(modality_dims=features.dims, dim=16, hidden_dim=16, codebook_size=8)).train()
    with torch.no_grad():
        model(*model.tensors(features))
    return model.eval(), features


def test_all_true_masks_are_the_paper_forward(initialised):
    """Every item has every modality: Eq. 2's terms are the paper's plain batch means."""
    model, features = initialised
    raw, _ = model.tensors(features)
    everything = {m: torch.ones(len(features), dtype=torch.bool) for m in raw}
    with torch.no_grad():
        out = model(raw, everything)
        losses = model.losses(out)
    consensus = torch.stack([out.aligned[m] for m in model.modalities]).mean(0)
    torch.testing.assert_close(out.shared.quantized + out.shared.residuals[-1], consensus)
    shared = out.shared.quantized
    for m in model.modalities:
        error = ((out.aligned[m] - out.reconstructed[m]) ** 2).sum(-1).mean()
        torch.testing.assert_close(losses[f"recon_{m}"], error)
        torch.testing.assert_close(
            losses[f"mi_{m}"], model.vclub[m].mi_upper_bound(shared, out.specific[m].recovered)
        )
        book = model.psgr.codebooks[m]
        words = book.codebook[out.specific[m].codes]
        commitment = (1 + book.beta) * ((out.specific[m].recovered - words) ** 2).sum(-1).mean()
        torch.testing.assert_close(out.specific[m].loss, commitment)
    torch.testing.assert_close(losses["alignment"], model.cga.alignment_loss(out.aligned))


def test_consensus_is_the_mean_of_the_present_modalities(initialised):
    model, features = initialised
    with torch.no_grad():
        out = model(*model.tensors(features))
    absent = ~out.present["image"]
    assert absent.sum() > 10
    expected = (out.aligned["behavior"][absent] + out.aligned["text"][absent]) / 2
    consensus = out.shared.quantized + out.shared.residuals[-1]
    assert torch.allclose(consensus[absent], expected, atol=1e-6)
    full = torch.stack([out.aligned[m][~absent] for m in model.modalities]).mean(0)
    assert torch.allclose(consensus[~absent], full, atol=1e-6)
    nothing = {m: torch.zeros(2, dtype=torch.bool) for m in model.modalities}  # no modality: all count
    aligned = {m: a[:2] for m, a in out.aligned.items()}
    assert torch.allclose(model.consensus(aligned, nothing), torch.stack(list(aligned.values())).mean(0))


def test_a_fallback_row_reaches_no_term_and_no_other_code(initialised):
    """Replacing the fallback image rows by anything leaves every other code and every loss of Eq. 2
    unchanged: they are neither aligned, reconstructed, committed, nor in the MI."""
    model, features = initialised
    raw, present = model.tensors(features)
    absent = ~present["image"]
    noisy = dict(raw, image=raw["image"].clone())
    noisy["image"][absent] = torch.randn(int(absent.sum()), raw["image"].shape[1]) * 5
    with torch.no_grad():
        before, after = model(raw, present), model(noisy, present)
        losses_before, losses_after = model.losses(before), model.losses(after)
    image = model.config.shared_layers + model.modalities.index("image")
    others = [p for p in range(before.codes.shape[1]) if p != image]
    assert torch.equal(before.codes[:, others], after.codes[:, others])
    assert torch.equal(before.codes[~absent], after.codes[~absent])
    assert not torch.equal(before.aligned["image"][absent], after.aligned["image"][absent])
    for key, value in losses_before.items():
        torch.testing.assert_close(value, losses_after[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eq1_aligns_each_item_on_the_modalities_it_has(initialised):
    model, features = initialised
    raw, present = model.tensors(features)
    with torch.no_grad():
        aligned = model.cga(raw)
        posters = present["image"]  # behaviour and text are present everywhere here
        complete = model.cga.alignment_loss({m: a[posters] for m, a in aligned.items()})
        posterless = model.cga.alignment_loss({m: aligned[m][~posters] for m in ("behavior", "text")})
        expected = (posters.sum() * complete + (~posters).sum() * posterless) / len(posters)
        torch.testing.assert_close(model.alignment_loss(aligned, present), expected)
        no_posters = dict(present, image=torch.zeros_like(posters))
        pair = model.cga.alignment_loss({m: aligned[m] for m in ("behavior", "text")})
        torch.testing.assert_close(model.alignment_loss(aligned, no_posters), pair)
        no_text = dict(present, text=torch.zeros_like(present["text"]))  # the anchor: nothing to contrast
        assert model.alignment_loss(aligned, no_text).item() == 0.0


def test_no_gradient_comes_from_a_fallback_row(initialised):
    """Whatever a fallback row holds, every parameter (vCLUB nets included) gets the same gradient."""
    model, features = initialised
    model.train()
    raw, present = model.tensors(features)
    absent = ~present["image"]
    noisy = dict(raw, image=raw["image"].clone())
    noisy["image"][absent] = torch.randn(int(absent.sum()), raw["image"].shape[1]) * 5
    gradients = []
    for batch in (raw, noisy):
        model.zero_grad()
        model.losses(model(batch, present))["total"].backward()
        model.vclub_log_likelihood(model(batch, present)).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    assert "psgr.unfold.weight" in gradients[0] and "cga.heads.image.mlp.0.weight" in gradients[0]
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_item_with_no_modality_present_teaches_nothing(planted):
    """Its rows may hold anything: a fresh DST starts the same codebooks and every parameter gets the
    same gradient, the shared codebooks' included."""
    features = planted[0].subset(np.arange(128))
    for seed, m in enumerate(features.dims):
        features = with_fallback_rows(features, m, share=0.5, seed=seed)
    nothing = torch.as_tensor(~np.any([features.present[m] for m in features.dims], axis=0))
    assert nothing.sum() >= 5
    config = DSTConfig(modality_dims=features.dims, dim=16, hidden_dim=16, codebook_size=8)
    books, gradients = [], []
    for scale in (0.0, 5.0):
        torch.manual_seed(0)
        model = DST(config).train()
        raw, present = model.tensors(features)
        noisy = {m: v.clone() for m, v in raw.items()}
        for v in noisy.values():
            v[nothing] = torch.randn(int(nothing.sum()), v.shape[1]) * scale
        model.losses(model(noisy, present))["total"].backward()
        books.append([layer.codebook.detach().clone() for layer in model.shared.layers])
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for first, second in zip(*books, strict=True):
        assert torch.equal(first, second)
    assert "shared.layers.0.codebook" in gradients[0]
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_too_few_rows_contribute_zero_but_stay_in_the_graph():
    club = VCLUB(4, 4, hidden_dim=8)
    for rows in (0, 1):
        s, z = torch.randn(rows, 4), torch.randn(rows, 4)
        assert club.mi_upper_bound(s, z).item() == 0.0
        likelihood = club.log_likelihood(s, z)
        assert likelihood.item() == 0.0
        likelihood.backward()  # the vCLUB step of a batch without the modality must not crash
    cga = CGA({"image": 3, "text": 3}, 4, 8, "text", 0.07, (0.01, 1.0))
    for rows in (0, 1):
        loss = cga.alignment_loss(cga({"image": torch.randn(rows, 3), "text": torch.randn(rows, 3)}))
        assert loss.item() == 0.0
        loss.backward()


def test_training_standardises_on_present_rows_only(planted, tiny):
    features = with_fallback_rows(planted[0], "image", share=0.4)
    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 2, "alignment_warmup_epochs": 1})
    history = []
    model = train_tokenizer(features, config, callback=lambda e, m: history.append(m))
    present = features.present["image"]
    head = model.cga.heads["image"].standardize
    real = features.modalities["image"][present]
    np.testing.assert_allclose(head.mean.numpy(), real.mean(0), atol=1e-5)
    np.testing.assert_allclose(head.std.numpy(), real.std(0), rtol=1e-4)
    assert all(np.isfinite(v) for epoch in history for v in epoch.values())
    # an item whose image is missing gets all six codes; only its image code depends on the fallback row
    ids = model.encode(features, "t").codes
    assert ids.shape == (len(features.item_ids), 6)
    moved = ItemFeatures(
        features.item_ids,
        {**features.modalities, "image": np.where(present[:, None], features.modalities["image"], 7.0)},
        features.present,
    )
    image = model.config.shared_layers + model.modalities.index("image")
    others = [p for p in range(ids.shape[1]) if p != image]
    assert np.array_equal(model.encode(moved, "t").codes[:, others], ids[:, others])
    assert np.array_equal(model.encode(moved, "t").codes[present], ids[present])


def test_figure3_columns_average_over_the_items_that_have_the_modality() -> None:
    rng = np.random.default_rng(0)
    codewords = rng.normal(size=(40, 4, 8))
    aligned = {"image": rng.normal(size=(40, 8)), "text": rng.normal(size=(40, 8))}
    present = {"image": rng.random(40) < 0.6, "text": np.ones(40, dtype=bool)}
    matrix = position_modality_similarity(codewords, aligned, present)
    keep = present["image"]
    alone = position_modality_similarity(codewords[keep], {"image": aligned["image"][keep]})
    np.testing.assert_allclose(matrix[:, :1], alone)
    np.testing.assert_allclose(
        matrix[:, 1:], position_modality_similarity(codewords, {"text": aligned["text"]})
    )
    none = position_modality_similarity(codewords, aligned, {**present, "image": np.zeros(40, dtype=bool)})
    assert np.isnan(none[:, 0]).all() and np.array_equal(none[:, 1], matrix[:, 1])


def test_a_codebook_starts_counts_use_and_restarts_from_masked_rows_only():
    from hisam_core.tokenizer.quantize import VectorQuantizer

    real = torch.randn(64, 4)
    mask = torch.arange(96) < 64
    books = []
    for fallback in (torch.zeros(32, 4), torch.full((32, 4), 9.0)):
        torch.manual_seed(0)
        vq = VectorQuantizer(8, 4, beta=0.25, rotation_trick=False).train()
        out = vq(torch.cat([real, fallback]), mask)
        books.append(vq.codebook.detach().clone())
        assert torch.equal(vq.recent_inputs, real)
        used = set(out.codes[:64].tolist())
        assert all((vq.steps_since_used[c] == 0) == (c in used) for c in range(8))
    assert torch.equal(books[0], books[1])  # k-means on the real rows alone


def test_a_modality_no_item_has_trains_with_a_warning(planted, tiny, caplog):
    """A catalogue without any text: Eq. 1, anchored on text, has no term (exactly 0 every epoch),
    and the log says so rather than only counting fallback rows."""
    features = with_fallback_rows(planted[0].subset(np.arange(200)), "text", share=1.0)
    config = TokenizerTrainConfig.model_validate({**tiny, "epochs": 2, "alignment_warmup_epochs": 1})
    history = []
    with caplog.at_level("WARNING", logger="hisam_core.tokenizer.train"):
        train_tokenizer(features, config, callback=lambda e, m: history.append(m))
    assert [epoch["alignment"] for epoch in history] == [0.0, 0.0]
    assert "text: no item has a real row" in caplog.text and "aligns nothing" in caplog.text

"""Image encoders (Sec. 3.2.1): the hand-crafted descriptor fallback and the transformers path, the
latter against tiny random-init ViT / CLIP models saved to disk and called directly as reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hisam_core.encoders.image import (
    DescriptorImageEncoder,
    ImageEncoder,
    ImageEncoderConfig,
    build_image_encoder,
)


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 48, dtype=np.float64)
    grad_h = np.broadcast_to(x[None, :, None], (40, 48, 3)).astype(np.uint8)
    grad_v = np.broadcast_to(np.linspace(0, 255, 40)[:, None, None], (40, 48, 3)).astype(np.uint8)
    checker = ((np.indices((40, 48)).sum(0) // 8) % 2 * 255).astype(np.uint8)
    red_square = np.zeros((40, 48, 3), np.uint8)
    red_square[10:30, 12:36] = (220, 30, 30)
    return {
        "red": Image.new("RGB", (48, 40), (220, 30, 30)),
        "blue": Image.new("RGB", (48, 40), (30, 30, 220)),
        "grad_h": Image.fromarray(grad_h),
        "grad_v": Image.fromarray(grad_v),
        "checker": Image.fromarray(np.stack([checker] * 3, -1)),
        "red_square": Image.fromarray(red_square),
        "noise": Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, img in _images().items():
        img.save(root / f"{name}.png")
        paths.append(root / f"{name}.png")
    return paths


# ------------------------------------------------------------------------------------- descriptor
def test_descriptor_deterministic_unit_norm_and_distinguishes(image_paths):
    enc = DescriptorImageEncoder()
    out = enc.encode(image_paths)
    assert out.present.all() and out.embeddings.shape[1] == enc.dim
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out.embeddings, DescriptorImageEncoder().encode(image_paths).embeddings)
    sims = out.embeddings @ out.embeddings.T
    off_diagonal = sims[~np.eye(len(image_paths), dtype=bool)]
    assert off_diagonal.max() < 0.95, sims.round(2)
    # a PIL image and the same picture read back from disk (lossless) give the same descriptor
    pil = list(_images().values())
    np.testing.assert_allclose(enc.encode(pil).embeddings, out.embeddings, atol=1e-7)


def test_descriptor_small_perturbation_stays_nearest(image_paths):
    enc = DescriptorImageEncoder()
    base = enc.encode(image_paths).embeddings
    rng = np.random.default_rng(1)
    for i, path in enumerate(image_paths):
        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        noisy = np.clip(arr + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
        v = enc.encode([Image.fromarray(noisy)]).embeddings[0]
        assert int(np.argmax(base @ v)) == i


def test_missing_and_unreadable_images_are_flagged(image_paths, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    enc = DescriptorImageEncoder()
    too_long = tmp_path / ("x" * 5000)  # is_file() raises ENAMETOOLONG: no such file either
    out = enc.encode([image_paths[0], tmp_path / "absent.jpg", broken, too_long])
    assert out.present.tolist() == [True, False, False, False]
    assert out.reasons[0] == "" and out.reasons[1] == out.reasons[3] == "missing file"
    assert out.reasons[2].startswith("unreadable") and out.num_missing == 3
    np.testing.assert_array_equal(out.embeddings[1:], 0.0)
    np.testing.assert_array_equal(out.embeddings[0], enc.encode([image_paths[0]]).embeddings[0])
    with pytest.raises(ValueError, match=r"absent\.jpg.*missing file"):
        enc.encode([tmp_path / "absent.jpg"], strict=True)
    with pytest.raises(ValueError, match="empty input"):
        enc.encode([])
    # an image without pixels (an empty crop in memory) is one unreadable image, not a failed batch
    empty = enc.encode([image_paths[0], Image.new("RGB", (0, 4))])
    assert empty.present.tolist() == [True, False] and empty.reasons[1] == "unreadable: no pixels (0x4)"
    for one in (str(image_paths[0]), image_paths[0]):  # one path, not ten one-letter "paths"
        with pytest.raises(ValueError, match="expected a sequence of images, got one"):
            enc.encode(one)


def test_an_image_is_read_as_shown(tmp_path, monkeypatch):
    """What a viewer sees, whatever the file's mode: the colour under transparent pixels does not
    count, 16-bit grey is not clipped to white, EXIF orientation is applied, and a decompression bomb
    is one unreadable file, not a failed batch."""
    from hisam_core.encoders.image import load_rgb

    logo = np.zeros((40, 48, 4), np.uint8)
    logo[10:30, 12:36] = (220, 30, 30, 255)  # a red square on transparent pixels
    hidden = [logo.copy(), logo.copy()]
    hidden[0][logo[..., 3] == 0, :3], hidden[1][logo[..., 3] == 0, :3] = (0, 0, 0), (0, 255, 0)
    for i, pixels in enumerate(hidden):
        Image.fromarray(pixels, "RGBA").save(tmp_path / f"logo{i}.png")
    a, b = (np.asarray(load_rgb(tmp_path / f"logo{i}.png")[0]) for i in range(2))
    np.testing.assert_array_equal(a, b)
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[20, 20]) == (220, 30, 30)
    keyed = Image.fromarray(hidden[0][..., :3], "RGB")  # the same logo, black as its transparent colour key
    keyed.save(tmp_path / "keyed.png", transparency=(0, 0, 0))
    keyed.convert("L").save(tmp_path / "keyed_grey.png", transparency=0)
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "keyed.png")[0]), a)
    assert tuple(np.asarray(load_rgb(tmp_path / "keyed_grey.png")[0])[0, 0]) == (255, 255, 255)

    ramp = np.tile(np.linspace(0, 65535, 48), (40, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = np.asarray(load_rgb(tmp_path / "deep.png")[0])[..., 0].astype(int)
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and abs(grey.mean() - 127.5) < 2  # not clipped white
    for level in (65535, 30000, 0):  # a flat image keeps its level: not stretched to the range
        Image.fromarray(np.full((8, 8), level, np.uint16)).save(tmp_path / "flat.png")
        assert abs(int(np.asarray(load_rgb(tmp_path / "flat.png")[0])[0, 0, 0]) - level / 257) < 1

    upright = np.zeros((40, 48, 3), np.uint8)
    upright[:10] = 255  # a white band on top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a 90-degree turn clockwise
    Image.fromarray(upright).rotate(90, expand=True).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(load_rgb(tmp_path / "phone.jpg")[0])
    assert shown.shape[:2] == (40, 48) and shown[:10].mean() > 200 and shown[-10:].mean() < 50

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 48 pixels is now a bomb (x2 raises)
    image, reason = load_rgb(tmp_path / "phone.jpg")
    assert image is None and reason.startswith("unreadable: DecompressionBombError")


# ----------------------------------------------------------------------------------- transformers
def _save_vit(path, pooling_layer: bool) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(cfg, add_pooling_layer=pooling_layer).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def _save_clip(path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=24,
    )
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )


def _direct(path, kind: str, images) -> np.ndarray:
    """Reference: processor + model called by hand, the documented pooling, then / ||.||."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        if kind == "clip":  # CLIP image features = visual_projection(post-LN CLS)
            feats = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        elif kind == "vit_pooler":
            feats = model(pixel_values=pixels).pooler_output
        else:
            feats = model(pixel_values=pixels).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


@pytest.mark.parametrize(
    ("kind", "expected_pooling"),
    [("vit_pooler", "pooler"), ("vit_cls", "cls"), ("clip", "image_features")],
)
def test_transformers_encoder_matches_direct_model_call(tmp_path, image_paths, kind, expected_pooling):
    if kind == "clip":
        _save_clip(tmp_path)
    else:
        _save_vit(tmp_path, pooling_layer=kind == "vit_pooler")
    enc = ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path), batch_size=3), device="cpu")
    assert enc.pooling == expected_pooling
    out = enc.encode(image_paths)
    assert out.present.all()
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.embeddings, _direct(tmp_path, kind, image_paths), atol=1e-5)
    # batch-size invariant, deterministic across fresh loads, distinguishes images
    np.testing.assert_allclose(enc.encode(image_paths, batch_size=1).embeddings, out.embeddings, atol=1e-5)
    again = ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path)), device="cpu").encode(image_paths)
    np.testing.assert_array_equal(again.embeddings, enc.encode(image_paths, batch_size=16).embeddings)
    assert np.linalg.matrix_rank(out.embeddings, tol=1e-4) > 1
    # a missing poster keeps the row aligned: zero, present False, the others unchanged
    mixed = enc.encode([image_paths[0], tmp_path / "absent.jpg", image_paths[1]])
    assert mixed.present.tolist() == [True, False, True]
    np.testing.assert_array_equal(mixed.embeddings[1], 0.0)
    np.testing.assert_allclose(mixed.embeddings[[0, 2]], out.embeddings[:2], atol=1e-5)


def test_a_half_precision_checkpoint_runs_in_float32(tmp_path, image_paths):
    """transformers 5 keeps a checkpoint's saved dtype: an fp16 one would run in fp16 on the CPU."""
    from transformers import AutoImageProcessor, AutoModel

    _save_vit(tmp_path / "full", pooling_layer=True)
    AutoModel.from_pretrained(tmp_path / "full").half().save_pretrained(tmp_path / "half")
    AutoImageProcessor.from_pretrained(tmp_path / "full").save_pretrained(tmp_path / "half")
    half = ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path / "half")), device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    full = ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path / "full")), device="cpu")
    np.testing.assert_allclose(
        half.encode(image_paths).embeddings, full.encode(image_paths).embeddings, atol=5e-3
    )


def test_transformers_encoder_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"no config\.json"):
        ImageEncoder(ImageEncoderConfig(model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="DescriptorImageEncoder"):
        ImageEncoder(ImageEncoderConfig())
    assert isinstance(build_image_encoder(ImageEncoderConfig()), DescriptorImageEncoder)


def test_a_file_uri_is_the_file_it_names(tmp_path):
    """The generic importer keeps ``file://`` image paths as given: reading and hashing them must
    reach the file, not report it missing (every such item would lose its image modality)."""
    from hisam_core.encoders.image import load_rgb
    from spark_jobs.embeddings import file_digest

    path = tmp_path / "a poster.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    uri = path.resolve().as_uri()  # file:///.../a%20poster.png
    image, why = load_rgb(uri)
    assert why == "" and np.asarray(image)[0, 0, 0] == 90
    assert file_digest(uri) == file_digest(str(path)) not in ("", "missing")
    assert load_rgb(uri + ".gone") == (None, "missing file") and file_digest(uri + ".gone") == "missing"
    odd = tmp_path / "poster#1?.png"  # a # or ? is part of the file name, as in a plain path
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(odd)
    assert np.asarray(load_rgb(f"file://{odd}")[0])[0, 0, 0] == 30
    assert np.asarray(load_rgb(f"file://localhost{path.resolve()}")[0])[0, 0, 0] == 90
    assert load_rgb(f"file://elsewhere{path.resolve()}") == (None, "missing file")  # not this host


def test_an_image_that_cannot_be_read_now_is_an_error_not_a_missing_one(tmp_path, monkeypatch):
    """Only a file that is not there is ``missing`` (its item is then embedded as absent); a read
    failure of a file that is there (an I/O error of a share) stops the embed, so the item keeps
    its vector."""
    import errno
    import hashlib
    import os

    from hisam_core.encoders.image import load_rgb
    from spark_jobs.embeddings import file_digest

    path = tmp_path / "poster.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    os.mkfifo(tmp_path / "fifo")
    wrong = (
        str(tmp_path),
        str(path / "x"),
        str(tmp_path / ("x" * 300)),
        str(tmp_path / "fifo"),
        "/dev/zero",
    )  # a folder, a file's child, too long, a FIFO (opening it waited for a writer), a device (endless)
    open_before = len(os.listdir("/proc/self/fd"))
    assert {file_digest(p) for p in wrong * 3} == {"missing"}
    assert len(os.listdir("/proc/self/fd")) == open_before  # no descriptor left open
    assert {load_rgb(p) for p in wrong} == {(None, "missing file")}  # the encoder agrees: absent rows

    swapped = tmp_path / "swapped"  # a file when checked, a folder when opened
    swapped.mkdir()
    real_stat = os.stat
    with monkeypatch.context() as race:
        race.setattr(os, "stat", lambda p, *a, **k: real_stat(path if str(p) == str(swapped) else p, *a, **k))
        assert file_digest(str(swapped)) == "missing"
    assert len(os.listdir("/proc/self/fd")) == open_before  # its descriptor closed too

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(hashlib, "file_digest", failing)
    with pytest.raises(OSError, match=r"cannot read image .*poster.png.*Input/output error"):
        file_digest(str(path))

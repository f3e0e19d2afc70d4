"""Image modality encoders (Sec. 3.2.1, App. B.2).

The paper encodes item images with BLIP-2. :class:`ImageEncoder` runs any local transformers vision
model (CLIP / SigLIP / BLIP-2-style models through ``get_image_features``; ViT / DINO-style backbones
through their pooled output, or the CLS token when the checkpoint has no trained pooler) and
L2-normalises the result.

:class:`DescriptorImageEncoder` is the pretrained-free fallback for when no vision weights are
available. It is NOT a learned encoder: it concatenates a joint HSV colour histogram with a small
greyscale thumbnail. It captures palette and coarse layout only, no semantics; use it to keep the
pipeline running, not as a stand-in for BLIP-2 in results.

Missing or unreadable images: both encoders return a zero row with ``present=False`` and the reason
(``"missing file"`` / ``"unreadable: ..."``) in :class:`EncodedBatch`, so rows stay aligned and the
caller can count or quarantine them. Pass ``strict=True`` to ``encode`` to raise a ValueError naming
the file instead.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field
from tqdm.auto import tqdm

from hisam_core.config import Config
from hisam_core.device import resolve_device
from hisam_core.encoders.base import EncodedBatch, l2_normalize, require_local_dir

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image


class ImageEncoderProtocol(Protocol):
    dim: int

    def encode(
        self,
        images: Sequence[ImageInput],
        progress: bool = False,
        strict: bool = False,
        batch_size: int | None = None,
    ) -> EncodedBatch: ...


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as it is shown, in 8-bit RGB: turned upright by its EXIF orientation, transparency (an
    alpha channel, or a palette entry or colour key) composited on white (``convert`` would show
    whatever colour hides under it), and 16-bit grey scaled to 8 bits (``convert`` clips it to
    white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16 bits per value (what PIL reads 16-bit PNGs as)
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):  # a palette entry or colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def local_path(image: str | Path) -> Path:
    """The file of a plain path or a ``file://`` URI of this host (``file:///x``, ``file://localhost/x``;
    percent-decoded), as importers may write it. A ``#`` or ``?`` is part of the name, as in a path."""
    text = str(image)
    if not text.startswith("file://"):
        return Path(text)
    rest = text.removeprefix("file://")
    rest = rest.removeprefix("localhost") if rest.startswith("localhost/") else rest
    if not rest.startswith("/"):  # file://otherhost/x: not a file here (reported missing)
        return Path(text)
    return Path(url2pathname(rest))


#: The errors of a path that names no file (the item has no image), as opposed to a file that is
#: there but cannot be read: a name too long for the filesystem or a symlink loop is no file either.
NOT_A_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


def load_rgb(image: ImageInput) -> tuple[Image.Image | None, str]:
    """Open ``image`` as RGB (:func:`to_rgb`). Returns (image, "") or (None, reason) when missing
    (:data:`NOT_A_FILE`) or unreadable, whatever PIL or the filesystem raised: one bad file must not
    fail a whole batch."""
    if isinstance(image, Image.Image):
        return _with_pixels(to_rgb(image))
    path = local_path(image)
    try:
        found = path.is_file()
    except OSError as err:  # is_file() raises for a name too long, not only for a failing share
        if err.errno not in NOT_A_FILE:
            return None, f"unreadable: {type(err).__name__}: {err}"
        found = False
    if not found:
        return None, "missing file"
    try:
        with Image.open(path) as img:
            return _with_pixels(to_rgb(img))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        return None, f"unreadable: {type(err).__name__}: {err}"


def _with_pixels(image: Image.Image) -> tuple[Image.Image | None, str]:
    """``image``, or the reason it is unreadable when it has no pixel (an empty crop, say)."""
    width, height = image.size
    return (image, "") if width and height else (None, f"unreadable: no pixels ({width}x{height})")


def encode_images(
    images: Sequence[ImageInput],
    embed: Callable[[list[Image.Image]], np.ndarray],
    dim: int,
    batch_size: int,
    what: str,
    strict: bool = False,
    progress: bool = False,
) -> EncodedBatch:
    """Stream ``images`` through ``embed`` in batches (only one batch of pixels in memory at a time).

    Missing/unreadable images get a zero row, ``present=False`` and the reason, or a ValueError naming
    the file when ``strict``.
    """
    if isinstance(images, str | bytes | os.PathLike | Image.Image):  # one path is not a list of them
        raise ValueError(f"{what}: expected a sequence of images, got one {type(images).__name__}")
    if len(images) == 0:
        raise ValueError(f"{what}: empty input, expected at least one image")
    n = len(images)
    out = np.zeros((n, dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    reasons = [""] * n
    for start in tqdm(range(0, n, batch_size), desc=what, unit="batch", disable=not progress):
        batch, rows = [], []
        for i in range(start, min(start + batch_size, n)):
            img, reason = load_rgb(images[i])
            if img is None:
                if strict:
                    raise ValueError(f"{what}: image {str(images[i])!r}: {reason}")
                reasons[i] = reason
            else:
                batch.append(img)
                rows.append(i)
        if batch:
            out[rows] = embed(batch)
            present[rows] = True
    if not present.all():
        logger.warning(
            "%s: %d of %d images missing or unreadable (zero rows, present=False)", what, n - present.sum(), n
        )
    return EncodedBatch(out, present, tuple(reasons))


class DescriptorImageEncoderConfig(Config):
    """Settings of :class:`DescriptorImageEncoder` (dim = prod(hsv_bins) + thumb_size**2)."""

    hsv_bins: tuple[int, int, int] = (8, 4, 4)
    thumb_size: int = Field(16, ge=2)


class DescriptorImageEncoder:
    """Hand-crafted image descriptor, NOT a learned encoder; the fallback when no weights exist.

    Descriptor = [sqrt(joint HSV histogram) / ||.||, centred 16x16 greyscale thumbnail / ||.||] / sqrt(2),
    i.e. colour palette (Hellinger-mapped, so cosine is the Bhattacharyya coefficient) and coarse layout
    with equal weight, L2 norm 1. A flat grey image has no layout part and is renormalised to norm 1.
    Deterministic (pure numpy/PIL); it does not know what is in the picture.
    """

    def __init__(self, config: DescriptorImageEncoderConfig | None = None):
        self.config = config or DescriptorImageEncoderConfig()
        self.dim = int(np.prod(self.config.hsv_bins)) + self.config.thumb_size**2

    def describe(self, image: Image.Image) -> np.ndarray:
        """Descriptor of one RGB image, float32 [dim], unit norm."""
        bins = np.asarray(self.config.hsv_bins)
        hsv = np.asarray(image.convert("HSV"), dtype=np.int64).reshape(-1, 3)
        cells = (hsv * bins) // 256  # each channel 0..255 -> 0..bins-1
        flat = (cells[:, 0] * bins[1] + cells[:, 1]) * bins[2] + cells[:, 2]
        hist = np.bincount(flat, minlength=int(bins.prod())).astype(np.float64)
        colour = np.sqrt(hist / hist.sum())
        colour /= np.linalg.norm(colour)
        size = self.config.thumb_size
        thumb = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
        layout = (thumb - thumb.mean()).ravel()
        norm = np.linalg.norm(layout)
        layout = layout / norm if norm > 1e-6 else np.zeros_like(layout)
        out = np.concatenate([colour, layout])
        return (out / np.linalg.norm(out)).astype(np.float32)

    def encode(
        self,
        images: Sequence[ImageInput],
        progress: bool = False,
        strict: bool = False,
        batch_size: int | None = None,
    ) -> EncodedBatch:
        """Descriptors for ``images`` (paths or PIL images); missing ones -> zero row, present False."""
        return encode_images(
            images,
            lambda batch: np.stack([self.describe(img) for img in batch]),
            self.dim,
            batch_size=batch_size or 64,
            what="descriptor image encoder",
            strict=strict,
            progress=progress,
        )


class ImageEncoderConfig(Config):
    """Settings of :class:`ImageEncoder`; ``model_path`` must be a local directory (no hub access)."""

    #: Local directory with a saved transformers vision model and its image processor config;
    #: None means no weights: :func:`build_image_encoder` returns the DescriptorImageEncoder.
    model_path: str | None = None
    batch_size: int = Field(16, ge=1)
    #: auto: get_image_features if the model has it, else a trained pooler output, else the CLS token.
    pooling: Literal["auto", "image_features", "pooler", "cls", "mean"] = "auto"
    descriptor: DescriptorImageEncoderConfig = Field(default_factory=DescriptorImageEncoderConfig)


class ImageEncoder:
    """Frozen transformers vision encoder loaded from a local directory (Sec. 3.2.1, App. B.2)."""

    def __init__(self, config: ImageEncoderConfig, device: str | torch.device | None = None):
        from transformers import AutoImageProcessor, AutoModel  # heavy import, deferred to use

        if config.model_path is None:
            raise ValueError(
                "image encoder: model_path is None; use DescriptorImageEncoder when no weights exist"
            )
        self.config = config
        self.device = resolve_device(device)
        path = require_local_dir(config.model_path, "image encoder")
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model, info = AutoModel.from_pretrained(  # float32 whatever the checkpoint's dtype
                path, local_files_only=True, output_loading_info=True, dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"image encoder: cannot load model or image processor from {str(path)!r}: {err}"
            ) from err
        self.model.eval().to(self.device)
        missing = sorted(info.get("missing_keys", ()))
        self.pooling = self._choose_pooling(missing)
        untrained = [k for k in missing if not (self.pooling != "pooler" and k.startswith("pooler"))]
        if untrained:
            logger.warning(
                "image encoder: %d weights not in the checkpoint (random init): %s",
                len(untrained),
                untrained[:5],
            )
        self.dim = int(self.embed_pixels(self._dummy_pixels()).shape[1])
        logger.info("image encoder %s (%s pooling, %d-d) on %s", path, self.pooling, self.dim, self.device)

    @torch.inference_mode()
    def _choose_pooling(self, missing_keys: list[str]) -> str:
        """``auto``: projected features if the model has ``get_image_features`` (CLIP, SigLIP); else
        its ``pooler_output`` when the checkpoint trained it (ViT pooler, CLIP-vision / DINOv2
        post-norm CLS); else the CLS token of the last hidden state."""
        if self.config.pooling != "auto":
            return self.config.pooling
        if hasattr(self.model, "get_image_features"):
            return "image_features"
        if any(k.startswith("pooler") for k in missing_keys):
            return "cls"
        out = self.model(pixel_values=self._dummy_pixels().to(self.device, dtype=self.model.dtype))
        return "pooler" if getattr(out, "pooler_output", None) is not None else "cls"

    def _dummy_pixels(self) -> torch.Tensor:
        return self.preprocess([Image.new("RGB", (32, 32))])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised features [B, dim] (float32, CPU) for preprocessed pixels."""
        pixel_values = pixel_values.to(self.device, dtype=self.model.dtype)
        if self.pooling == "image_features":
            out: Any = self.model.get_image_features(pixel_values=pixel_values)
            # transformers >= 5 returns a ModelOutput whose pooler_output is the projected feature
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = self.model(pixel_values=pixel_values)
            if self.pooling == "pooler":
                feats = out.pooler_output
                if feats is None:
                    raise ValueError("image encoder: pooling 'pooler' but the model returns no pooler_output")
            elif self.pooling == "cls":
                feats = out.last_hidden_state[:, 0]
            else:
                feats = out.last_hidden_state.mean(dim=1)
        if feats.ndim != 2:
            raise ValueError(
                f"image encoder: pooling {self.pooling!r} gave shape {tuple(feats.shape)}, expected [B, d]"
            )
        return l2_normalize(feats.float()).cpu()

    def encode(
        self,
        images: Sequence[ImageInput],
        progress: bool = False,
        strict: bool = False,
        batch_size: int | None = None,
    ) -> EncodedBatch:
        """Unit-norm embeddings for ``images`` (paths or PIL); missing ones -> zero row, present False.
        ``batch_size`` overrides ``config.batch_size`` for this call."""
        return encode_images(
            images,
            lambda batch: self.embed_pixels(self.preprocess(batch)).numpy(),
            self.dim,
            batch_size=batch_size or self.config.batch_size,
            what="image encoder",
            strict=strict,
            progress=progress,
        )


def build_image_encoder(
    config: ImageEncoderConfig | None = None, device: str | torch.device | None = None
) -> ImageEncoder | DescriptorImageEncoder:
    """The transformers encoder when ``config.model_path`` is set, else the (non-learned) descriptor."""
    config = config or ImageEncoderConfig()
    if config.model_path is None:
        logger.warning(
            "image encoder: no model_path, using DescriptorImageEncoder (hand-crafted, not learned)"
        )
        return DescriptorImageEncoder(config.descriptor)
    return ImageEncoder(config, device=device)

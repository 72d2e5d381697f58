"""Qwen2-VL image preprocessing in numpy/PIL (parity target: transformers' PIL ``Qwen2VLImageProcessorPil``).

1. ``smart_resize``: both sides become multiples of ``factor = patch * merge`` (28) by Python rounding
   (half-to-even), then the image is scaled down (floor) or up (ceil) to fit ``[min_pixels, max_pixels]``, keeping
   the aspect ratio; an aspect ratio above 200 is an error;
2. PIL bicubic resize of the RGB uint8 image (transparency composited onto white);
3. ``/255``, then ``(x - mean) / std`` per channel (OpenAI CLIP statistics);
4. patchify to rows of ``C * T * P * P`` (1176): patches listed in 2x2 merge-block order, each row laid out as
   (channel, time, py, px), the still image repeated ``T`` times; ``grid_thw = [1, h / P, w / P]``.

Qwen3-VL (``family`` "qwen3_vl" / "qwen3_vl_moe") prepares images with the same transformers class and steps, only
with ``P = 16`` (factor 32, rows of 1536) and mean = std = 0.5 per channel: ``image_settings(family)`` gives the
statistics to pass, ``processor_config(..., family=...)`` the matching ``preprocessor_config.json``.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Qwen3-VL hub checkpoints (e.g. Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json): mean = std = 0.5 (transformers'
# IMAGENET_STANDARD_MEAN / _STD), patch 16, and pixel bounds size.shortest_edge / longest_edge = 256**2 / 4096**2.
QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)
QWEN3_VL_PATCH_SIZE = 16
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216
# family (models.qwen_vl.config.FAMILIES) -> (mean, std, default patch size, transformers processor class)
_FAMILIES = {
    "qwen2_5_vl": (CLIP_MEAN, CLIP_STD, 14, "Qwen2_5_VLProcessor"),
    "qwen3_vl": (QWEN3_VL_MEAN, QWEN3_VL_STD, QWEN3_VL_PATCH_SIZE, "Qwen3VLProcessor"),
    "qwen3_vl_moe": (QWEN3_VL_MEAN, QWEN3_VL_STD, QWEN3_VL_PATCH_SIZE, "Qwen3VLProcessor"),
}


def _family(family: str) -> tuple:
    if family not in _FAMILIES:
        raise ValueError(f"family {family!r} is not one of {tuple(_FAMILIES)}")
    return _FAMILIES[family]


def image_settings(family: str = "qwen2_5_vl") -> dict:
    """The normalisation of ``family``'s checkpoints, as keyword arguments of ``preprocess_image(s)``:
    ``{"image_mean": ..., "image_std": ...}`` (the patch and merge sizes come from the model's vision config)."""
    mean, std, _, _ = _family(family)
    return {"image_mean": mean, "image_std": std}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, "
                         f"got {ratio:.1f} ({height}x{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> np.ndarray:
    """``[C, H, W]`` float image -> rows ``[H/P * W/P, C*T*P*P]`` in merge-block order."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def processor_config(min_pixels: int, max_pixels: int, patch_size: int | None = None, merge_size: int = 2,
                     temporal_patch_size: int = 2, family: str = "qwen2_5_vl") -> dict:
    """``preprocessor_config.json`` for these settings: transformers' ``Qwen2VLImageProcessor`` (and vLLM through it)
    then prepares images as ``preprocess_image`` with ``**image_settings(family)`` does. ``family`` picks the
    processor class (``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``), mean/std and the default ``patch_size``
    (14 / 16)."""
    mean, std, default_patch, processor_class = _family(family)
    patch_size = default_patch if patch_size is None else patch_size
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
        "do_convert_rgb": True, "do_resize": True, "resample": 3,  # PIL bicubic
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std),
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
    }


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is the short name counted in data-preparation reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image; ``BadImage`` (empty, undecodable, truncated, too large) else."""
    if not data:
        raise BadImage("empty_image", "zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("image_too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage("undecodable_image", str(e)) from None
    try:
        image.load()  # decodes every pixel: a truncated file fails here, not half-way through training
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage("truncated_image" if "truncated" in str(e) else "undecodable_image", str(e)) from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' ``convert_to_rgb``).

    Images of more than 8 bits a sample (16-bit PNG, 32-bit integer or float: common for radiographs) are first
    rescaled linearly from their own [min, max] to [0, 255]; PIL's plain conversion would clip them to white.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: tuple[float, ...] = CLIP_MEAN,
    image_std: tuple[float, ...] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """One PIL image -> (pixel rows ``[N, C*T*P*P]`` float32, ``grid_thw`` ``[1, h/P, w/P]`` int64); ``image_mean``
    / ``image_std``: per-channel statistics (``image_settings(family)``; default Qwen2.5-VL's, OpenAI CLIP)."""
    image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC), np.float32)
    normed = (resized / 255.0 - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    rows = patchify(normed.transpose(2, 0, 1), patch_size, merge_size, temporal_patch_size)
    return rows.astype(np.float32), np.array([1, height // patch_size, width // patch_size], np.int64)


def preprocess_images(images, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> concatenated rows and ``image_grid_thw`` ``[n, 3]`` (the processor's batch layout)."""
    rows, grids = zip(*(preprocess_image(im, **kwargs) for im in images), strict=True)
    return np.concatenate(rows), np.stack(grids)

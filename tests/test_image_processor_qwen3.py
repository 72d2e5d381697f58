"""Qwen3-VL image preprocessing parity with transformers (<= 1e-5, identical grid_thw).

transformers has no Qwen3-VL image processor of its own: ``AutoImageProcessor`` maps model_type ``qwen3_vl`` to
``Qwen2VLImageProcessor`` (torchvision) / ``Qwen2VLImageProcessorPil``, which the hub checkpoints configure with
patch 16 and mean = std = 0.5. torchvision is not installed here, so the reference is the PIL backend, built from
the hub settings (the statistics cross-checked against transformers' own Qwen3-VL defaults), not from our constants.
"""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from medix_jax.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    QWEN3_VL_MAX_PIXELS,
    QWEN3_VL_MIN_PIXELS,
    image_settings,
    preprocess_image,
    preprocess_images,
    processor_config,
)

# The hub's Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json, literally (not our constants).
HUB_MEAN = HUB_STD = [0.5, 0.5, 0.5]
HUB_PATCH, HUB_MIN, HUB_MAX = 16, 65536, 16777216
MIN_PIXELS, MAX_PIXELS = HUB_MIN, 256 * 32 * 32  # the hub's minimum; a small maximum keeps the test fast
OURS = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=16, **image_settings("qwen3_vl"))
CASES = [
    (37, 53, "RGB"),  # tiny: scaled up to min_pixels
    (1001, 333, "RGB"),  # large: scaled down to max_pixels
    (250, 301, "RGB"),  # inside the range: rounding to multiples of 32 only
    (420, 420, "RGBA"),  # transparency composited onto white
    (97, 611, "L"),  # grey, elongated, scaled up
]


def random_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.fixture(scope="module")
def reference():
    return Qwen2VLImageProcessorPil(patch_size=HUB_PATCH, merge_size=2, temporal_patch_size=2, image_mean=HUB_MEAN,
                                    image_std=HUB_STD, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """transformers' load of the preprocessor_config.json we write for qwen3_vl."""
    out = tmp_path_factory.mktemp("qwen3_vl_processor")
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config(MIN_PIXELS, MAX_PIXELS,
                                                                              family="qwen3_vl")))
    return AutoImageProcessor.from_pretrained(out)


def check(rows, grids, ref):
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    assert rows.shape == ref["pixel_values"].shape
    assert np.abs(rows - ref["pixel_values"]).max() <= 1e-5


def test_hub_settings_are_transformers_qwen3_defaults():
    assert list(Qwen3VLVideoProcessor.image_mean) == HUB_MEAN and list(Qwen3VLVideoProcessor.image_std) == HUB_STD
    vision = Qwen3VLVisionConfig()
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (HUB_PATCH, 2, 2)
    assert (QWEN3_VL_MIN_PIXELS, QWEN3_VL_MAX_PIXELS) == (HUB_MIN, HUB_MAX)


@pytest.mark.parametrize("height,width,mode", CASES)
def test_matches_transformers(reference, rng, height, width, mode):
    image = random_image(rng, height, width, mode)
    rows, grid = preprocess_image(image, **OURS)
    assert rows.shape[1] == 3 * 2 * 16 * 16
    assert grid[1] % 2 == 0 and grid[2] % 2 == 0 and MIN_PIXELS <= grid[1] * grid[2] * 256 <= MAX_PIXELS
    check(rows, grid[None], reference(images=[image], return_tensors="np"))


def test_written_config_loads_as_the_same_processor(written, reference, rng):
    assert type(written).__name__.startswith("Qwen2VLImageProcessor")
    assert written.patch_size == 16 and written.merge_size == 2 and written.temporal_patch_size == 2
    assert list(written.image_mean) == HUB_MEAN and list(written.image_std) == HUB_STD
    assert (written.size["shortest_edge"], written.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    images = [random_image(rng, h, w, mode) for h, w, mode in CASES]
    rows, grids = preprocess_images(images, **OURS)
    check(rows, grids, written(images=images, return_tensors="np"))
    check(rows, grids, reference(images=images, return_tensors="np"))


def test_processor_config_families():
    qwen3 = processor_config(MIN_PIXELS, MAX_PIXELS, family="qwen3_vl")
    assert qwen3["processor_class"] == "Qwen3VLProcessor" and qwen3["patch_size"] == 16
    assert qwen3["image_mean"] == HUB_MEAN and qwen3["image_std"] == HUB_STD
    assert processor_config(MIN_PIXELS, MAX_PIXELS, family="qwen3_vl_moe") == qwen3
    assert image_settings("qwen3_vl_moe") == image_settings("qwen3_vl")
    default = processor_config(3136, 1003520)  # every existing caller: Qwen2.5-VL, unchanged
    assert default["processor_class"] == "Qwen2_5_VLProcessor" and default["patch_size"] == 14
    assert default["image_mean"] == list(CLIP_MEAN) and default["image_std"] == list(CLIP_STD)
    assert image_settings("qwen2_5_vl") == {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    assert processor_config(3136, 1003520, patch_size=16, family="qwen3_vl")["patch_size"] == 16
    with pytest.raises(ValueError, match="family"):
        image_settings("qwen2_vl")


def test_pipeline_normalises_with_the_model_family(monkeypatch, reference, rng):
    from medix_jax.data import pipeline
    from medix_jax.models.qwen_vl.config import ModelConfig
    from medix_jax.models.qwen_vl.families import preset

    tiny = preset("tiny")
    model_cfg = ModelConfig(family="qwen3_vl", text=dataclasses.replace(tiny.text, qkv_bias=False, qk_norm=True),
                            vision=dataclasses.replace(tiny.vision, patch_size=16, num_position_embeddings=64),
                            tokens=tiny.tokens)
    monkeypatch.setattr(pipeline, "prompt_ids", lambda *args: [1, 2, 3])  # no tokenizer needed
    image = random_image(rng, 250, 301)
    data = io.BytesIO()
    image.save(data, "PNG")
    cfg = pipeline.DataConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    record = {"id": b"a", "solution": b"A", "problem": b"q", "images": [data.getvalue()]}
    example = pipeline.Preprocess(cfg, model_cfg, None, 10**6, 10**6)(record)
    check(example["pixel_values"], example["image_grid_thw"], reference(images=[image], return_tensors="np"))

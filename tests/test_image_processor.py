"""Image preprocessing parity with transformers' PIL Qwen2-VL image processor (<= 1e-5, identical grid_thw)."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from medix_jax.data.image import preprocess_image, preprocess_images, smart_resize

MIN_PIXELS, MAX_PIXELS = 64 * 28 * 28, 256 * 28 * 28


def random_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.fixture(scope="module")
def reference():
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "height,width,mode",
    [
        (37, 53, "RGB"),  # tiny: scaled up to min_pixels
        (1001, 333, "RGB"),  # large: scaled down to max_pixels
        (250, 301, "RGB"),  # odd sizes inside the range: rounding only
        (420, 420, "RGBA"),  # transparency composited onto white
        (97, 611, "L"),  # grey, elongated
    ],
)
def test_matches_transformers(reference, rng, height, width, mode):
    image = random_image(rng, height, width, mode)
    ref = reference(images=[image], return_tensors="np")
    rows, grid = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(grid[None], ref["image_grid_thw"])
    assert rows.shape == ref["pixel_values"].shape
    assert np.abs(rows - ref["pixel_values"]).max() <= 1e-5


def test_several_images_concatenate_like_the_processor(reference, rng):
    images = [random_image(rng, 300, 200), random_image(rng, 90, 150)]
    ref = reference(images=images, return_tensors="np")
    rows, grids = preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    assert np.abs(rows - ref["pixel_values"]).max() <= 1e-5


def test_smart_resize_rules():
    h, w = smart_resize(1000, 700, 28, MIN_PIXELS, MAX_PIXELS)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= MAX_PIXELS
    h, w = smart_resize(30, 30, 28, MIN_PIXELS, MAX_PIXELS)
    assert h * w >= MIN_PIXELS
    assert smart_resize(42, 70, 28, 1, 10**9) == (56, 56)  # round half to even: 1.5 -> 2, 2.5 -> 2


def test_extreme_aspect_ratio_is_an_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)

"""Logit parity with transformers' Qwen2.5-VL on the same random weights (fp32, CPU): max|delta| <= 1e-4."""

import numpy as np
import pytest
import torch

from medix_jax.models.qwen2_5_vl.vision import vision_inputs
from medix_jax.models.qwen_vl import forward
from medix_jax.models.qwen_vl.hf_io import load_hf
from tests.support.helpers import hf_logits, left_pad, tokens_for

TOL = 1e-4


@pytest.fixture(scope="module", params=[{}, {"scan_layers": True, "remat": True}, {"attention": "blockwise"}],
                ids=["unrolled", "scan+remat", "blockwise"])
def pair(tiny_checkpoint, request):
    hf, path = tiny_checkpoint
    return hf, load_hf(path, **request.param)


def test_two_images_in_one_row(pair, rng):
    hf, ours = pair
    grids = np.array([[1, 12, 20], [1, 8, 8]])  # neither is a multiple of the 4x4-merged-token window
    ids = np.array([tokens_for([5, "img", 3, "img", 4], grids, rng)])
    mask = np.ones_like(ids)
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    ref = hf_logits(hf, ids, mask, pixels, grids)
    got = np.asarray(forward(ours, ids, mask, pixels, grids))
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    assert np.abs(got - ref).max() <= TOL


def test_left_padded_batch_with_text_only_row(pair, rng):
    hf, ours = pair
    grids = np.array([[1, 8, 8], [1, 12, 20]])
    rows = [tokens_for([3, "img", 6], grids[:1], rng), tokens_for([9], [], rng),
            tokens_for([2, "img", 2], grids[1:], rng)]
    ids, mask = left_pad(rows, extra=2)
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    ref = hf_logits(hf, ids, mask, pixels, grids)
    got = np.asarray(forward(ours, ids, mask, pixels, grids))
    valid = mask.astype(bool)
    assert np.abs(got - ref)[valid].max() <= TOL


def test_text_only_batch(pair, rng):
    hf, ours = pair
    ids, mask = left_pad([tokens_for([7], [], rng), tokens_for([12], [], rng)])
    ref = hf_logits(hf, ids, mask)
    got = np.asarray(forward(ours, ids, mask))
    assert np.abs(got - ref)[mask.astype(bool)].max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [{}, {"num_images": 5, "rows_per_image": 512}], ids=["exact", "bucketed"])
def test_vision_tower_alone(pair, rng, buckets):
    hf, ours = pair
    grids = np.array([[1, 12, 20], [1, 8, 8], [1, 4, 6]])
    n = int(np.prod(grids, 1).sum())
    pixels = rng.normal(size=(n, 1176)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    inputs = vision_inputs(ours.config.vision, pixels, grids, [3], **buckets)  # one prompt holding all three
    got = np.asarray(ours.visual(inputs))
    assert got.shape[:2] == (1, inputs.valid.size // 4)
    assert np.abs(got[0, : len(ref)] - ref).max() <= TOL


@pytest.mark.slow
def test_vision_features_stay_with_their_prompt(pair, rng):
    """Batched per-prompt layout: each prompt's features equal the tower run on that prompt alone."""
    _, ours = pair
    grids = np.array([[1, 12, 20], [1, 8, 8], [1, 4, 6]])
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    batched = np.asarray(ours.visual(vision_inputs(ours.config.vision, pixels, grids, [1, 0, 2])))
    first = np.asarray(ours.visual(vision_inputs(ours.config.vision, pixels[:240], grids[:1], [1])))
    last = np.asarray(ours.visual(vision_inputs(ours.config.vision, pixels[240:], grids[1:], [2])))
    assert np.abs(batched[0, :60] - first[0, :60]).max() <= 1e-5
    assert np.abs(batched[2, :22] - last[0, :22]).max() <= 1e-5


def test_bfloat16_compute_returns_float32_logits_close_to_fp32(tiny_checkpoint, rng):
    hf, path = tiny_checkpoint
    ids, mask = left_pad([tokens_for([10], [], rng)])
    bf16 = load_hf(path, dtype="bfloat16", param_dtype="float32")
    got = forward(bf16, ids, mask)
    assert got.dtype == np.float32
    ref = hf_logits(hf, ids, mask)
    err = np.abs(np.asarray(got) - ref).max()
    assert 0 < err < 0.1 * np.abs(ref).max()  # bf16 matmuls: close, not exact

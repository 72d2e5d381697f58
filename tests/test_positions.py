"""3-D M-RoPE positions against transformers' get_rope_index, and clear errors on bad placeholders."""

import numpy as np
import pytest
import torch

from medix_jax.models.qwen_vl.rope import mrope_positions
from tests.support.helpers import IMAGE, left_pad, tokens_for


def test_positions_match_transformers(tiny_checkpoint, rng):
    hf, _ = tiny_checkpoint
    grids = np.array([[1, 4, 6], [1, 8, 8], [1, 12, 20], [1, 2, 2], [1, 6, 4]])
    rows = [tokens_for([2, "img", 1, "img", 3], grids[0:2], rng), tokens_for([5], [], rng),
            tokens_for(["img", 4], grids[2:3], rng), tokens_for([1, "img", "img"], grids[3:5], rng)]
    ids, mask = left_pad(rows, extra=3)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    pos, delta = mrope_positions(ids, mask, grids, IMAGE, 2)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_placeholder_mismatch_is_an_error(rng):
    grids = np.array([[1, 8, 8]])
    ids = np.array([tokens_for([2, "img", 2], grids, rng)])
    with pytest.raises(ValueError, match="more image placeholder tokens"):
        mrope_positions(ids, np.ones_like(ids), grids[:0], IMAGE, 2)
    with pytest.raises(ValueError, match="2 images in image_grid_thw"):
        mrope_positions(ids, np.ones_like(ids), np.concatenate([grids, grids]), IMAGE, 2)
    short = ids[:, :-5]  # cut into the image
    with pytest.raises(ValueError, match="placeholder tokens"):
        mrope_positions(short, np.ones_like(short), np.array([[1, 8, 10]]), IMAGE, 2)

"""Test helpers: a tiny random transformers Qwen2.5-VL and prompt builders (no hub access)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tests.support.weights import spread_torch_weights

# Special ids of the tiny models: inside the tiny vocabulary, far from the real ones, so that a hard-coded id breaks.
IMAGE, VIDEO, VISION_START, VISION_END, BOS, EOS, PAD = 590, 591, 592, 593, 594, 595, 596
VOCAB = 600


def tiny_hf_config(tied: bool) -> Qwen2_5_VLConfig:
    """5 vision blocks with full attention at 1 and 3, GQA 4/2 heads, mrope sections summing to head_dim/2 = 8."""
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=5, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
            fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-6, tie_word_embeddings=tied,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=tied,
    )


def make_tiny_hf_model(tied: bool, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Random weights large enough that logits are O(1) and every bias and norm weight matters."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_hf_config(tied), attn_implementation="eager")
    return spread_torch_weights(model)


def tokens_for(parts, grids, rng) -> list[int]:
    """Build one prompt: ints are runs of random text tokens, 'img' inserts the next image of ``grids``."""
    ids, it = [], iter(grids)
    for part in parts:
        if part == "img":
            t, h, w = next(it)
            ids += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]
        else:
            ids += rng.integers(0, 500, part).tolist()
    return ids


def left_pad(rows: list[list[int]], extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows)) + extra
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def hf_logits(model, ids, mask, pixel_values=None, grids=None) -> np.ndarray:
    """transformers logits; 5.x builds 3-D positions only when ``mm_token_type_ids`` is passed."""
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if grids is not None:
        kwargs.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=torch.tensor((np.asarray(ids) == IMAGE).astype(np.int64)))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()

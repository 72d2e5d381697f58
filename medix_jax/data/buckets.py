"""Static shapes for prompts: batches padded up to the smallest bucket that fits (prompt length, images per prompt,
vision layout rows per image), so a new batch reuses the compiled programs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from medix_jax.models.qwen_vl.model import ModelInputs, images_per_prompt, prepare_inputs
from medix_jax.models.qwen_vl.vision import rows_per_frame


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes: each batch is padded up to the smallest bucket that fits (no bucket fits -> error).
    ``images`` counts images (frames) per prompt; ``rows_per_image`` is the vision layout rows of one image."""

    prompt_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4352)
    images: tuple[int, ...] = (1, 2, 4)
    rows_per_image: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 21504)


def pick_bucket(n: int, buckets: tuple[int, ...], what: str) -> int:
    fitting = [b for b in sorted(buckets) if b >= n]
    if not fitting:
        raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")
    return fitting[0]


def prepare_prompts(model_cfg, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                    buckets: Buckets = Buckets(), at_least: Sequence[int] = (0, 0, 0)) -> ModelInputs:
    """Left-pad processor outputs to the prompt bucket and the vision buckets (host, numpy). Buckets are picked
    for the batch's ``prompt_sizes``, raised to ``at_least``: the processes of one job agree on shapes this way."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(1)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    per_prompt = np.split(grids, np.cumsum(images_per_prompt(
        ((ids == model_cfg.tokens.image_token_id) & mask).sum(1), grids, model_cfg.vision.merge_unit))[:-1])
    need = np.max([at_least, *(prompt_sizes(model_cfg.vision, ids.shape[1], g) for g in per_prompt)], axis=0)
    width = pick_bucket(int(need[0]), buckets.prompt_lengths, "prompt length")
    left_ids = np.full((len(ids), width), model_cfg.tokens.pad_token_id, np.int32)
    left_mask = np.zeros((len(ids), width), bool)
    for row, n in enumerate(lengths):
        left_ids[row, width - n:] = ids[row][mask[row]]
        left_mask[row, width - n:] = True
    vision = {}
    if len(grids):
        vision = dict(num_images=pick_bucket(int(need[1]), buckets.images, "images per prompt"),
                      rows_per_image=pick_bucket(int(need[2]), buckets.rows_per_image, "rows per image"))
    return prepare_inputs(model_cfg, left_ids, left_mask, pixel_values, image_grid_thw, **vision)


def prompt_sizes(vision_cfg, length: int, image_grid_thw) -> tuple[int, int, int]:
    """What one prompt needs of the buckets: (tokens, images (frames), most layout rows of one image)."""
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    rows = max((rows_per_frame(vision_cfg, h, w) for _, h, w in grids), default=0)
    return length, int(grids[:, 0].sum()), rows

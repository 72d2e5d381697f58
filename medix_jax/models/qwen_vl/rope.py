"""Rotary position embeddings of Qwen2.5-VL.

* Decoder: M-RoPE. Each token has a (t, h, w) position; the ``head_dim/2`` rotary frequencies are split into
  ``mrope_section`` = (t, h, w) groups and each group rotates by its own axis (Qwen2-VL paper, §2.1); Qwen3-VL
  interleaves the groups over the frequencies instead of laying them out in blocks (``mrope_axes``).
* Vision tower: 2-D rotary. A patch at (row, col) rotates the first half of the frequencies by row and the second
  half by col; positions are listed in spatial-merge-block order.
* ``mrope_positions`` builds the decoder's 3-D positions on the host (data preparation, numpy), as
  transformers' ``get_rope_index``: text tokens advance all three axes together; an image of merged grid (h', w')
  placed at text position ``p`` gets ``(p, p + i, p + j)``; the next text token continues at ``p + max(h', w')``.
  ``rope_delta = max_position + 1 - num_tokens``; decode step k (0-based) of a row uses position
  ``num_tokens + rope_delta + k`` on all three axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
    """``1 / theta^(2i/dim)`` for i in [0, dim/2), float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_axes(section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) rotates each of the ``sum(section)`` frequencies.

    Blocks (Qwen2-VL, Qwen2.5-VL): ``section[0]`` t, then ``section[1]`` h, then ``section[2]`` w. Interleaved
    (Qwen3-VL, transformers ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``): frequency f is h if
    ``f % 3 == 1 and f < 3 * section[1]``, w if ``f % 3 == 2 and f < 3 * section[2]``, t otherwise."""
    if not interleaved:
        return np.repeat(np.arange(3), section)
    f = np.arange(sum(section))
    return np.where((f % 3 == 1) & (f < 3 * section[1]), 1, np.where((f % 3 == 2) & (f < 3 * section[2]), 2, 0))


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, section: tuple[int, int, int],
                  interleaved: bool = False):
    """cos/sin ``[B, S, head_dim]`` (float32) for 3-D positions ``[3, B, S]``."""
    inv = inverse_frequencies(head_dim, theta)  # [head_dim/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, S, head_dim/2]
    axis_of_freq = mrope_axes(section, interleaved)  # frequency f rotates by axis axis_of_freq[f]
    freqs = jnp.take_along_axis(freqs, jnp.asarray(axis_of_freq)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rowcol: jax.Array | np.ndarray, head_dim: int, theta: float):
    """cos/sin ``[N, head_dim]`` (float32) for patch positions ``[N, 2]`` (row, col)."""
    inv = inverse_frequencies(head_dim // 2, theta)  # [head_dim/4]
    freqs = rowcol.astype(jnp.float32)[..., None] * inv  # [N, 2, head_dim/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # rows then cols
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D positions ``[3, B, S]`` (int32; 0 at padding) and ``rope_delta`` ``[B]`` for a (left- or right-) padded
    batch.

    Images are consumed from ``image_grid_thw`` in row-major order of their placeholder runs; a run of consecutive
    image tokens may hold several images back to back. Raises ``ValueError`` when the placeholders do not match
    the grids.
    """
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    b, s = input_ids.shape
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    if (grids[:, 0] != 1).any():
        raise ValueError(f"only still images (grid t == 1) are supported, got grids {grids.tolist()}")
    merged_h, merged_w = grids[:, 1] // spatial_merge_size, grids[:, 2] // spatial_merge_size
    tokens_per_image = merged_h * merged_w

    positions = np.zeros((3, b, s), np.int32)
    deltas = np.zeros((b,), np.int32)
    next_image = 0
    for row in range(b):
        valid = np.flatnonzero(mask[row])
        ids = input_ids[row, valid]
        is_image = ids == image_token_id
        # Per token: how far its position runs ahead (text) or which image it belongs to (image tokens).
        image_of_token = np.full(len(ids), -1)
        image_start = np.zeros(len(ids), np.int64)  # index (among valid tokens) of the image's first token
        k = 0
        while k < len(ids):
            if not is_image[k]:
                k += 1
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {row}: more image placeholder tokens than images in image_grid_thw")
            n = int(tokens_per_image[next_image])
            if k + n > len(ids) or not is_image[k : k + n].all():
                raise ValueError(
                    f"row {row}: image {next_image} needs {n} placeholder tokens at token {k}, found fewer"
                )
            image_of_token[k : k + n] = next_image
            image_start[k : k + n] = k
            next_image += 1
            k += n
        # shift[k] = sum over images that end before token k of (max(h', w') - h' * w')
        images_in_row = np.unique(image_of_token[image_of_token >= 0])
        per_image_shift = np.maximum(merged_h, merged_w) - tokens_per_image
        shift = np.zeros(len(ids) + 1, np.int64)
        for img in images_in_row:
            end = np.flatnonzero(image_of_token == img)[-1] + 1
            shift[end:] += per_image_shift[img]
        base = np.arange(len(ids)) + shift[: len(ids)]  # text position of each token
        pos = np.repeat(base[None], 3, axis=0)
        img_tok = np.flatnonzero(image_of_token >= 0)
        if len(img_tok):
            img = image_of_token[img_tok]
            j = img_tok - image_start[img_tok]  # index inside the image, row-major over (h', w')
            start = base[image_start[img_tok]]
            pos[0, img_tok] = start
            pos[1, img_tok] = start + j // merged_w[img]
            pos[2, img_tok] = start + j % merged_w[img]
        positions[:, row, valid] = pos
        deltas[row] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    if next_image != len(grids):
        raise ValueError(f"{len(grids)} images in image_grid_thw but placeholders for {next_image}")
    return positions, deltas

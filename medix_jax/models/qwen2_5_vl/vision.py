"""Qwen2.5-VL vision tower (ViT with 2-D rotary, windowed attention and a 2x2 patch merger).

Reference behaviour (transformers ``Qwen2_5_VisionTransformerPretrainedModel``):

1. patch embed: a Conv3d with kernel = stride = (T, P, P) on rows of ``C*T*P*P`` = one matmul;
2. tokens are permuted into windows of ``window_size/patch_size/merge`` x same merged tokens (4x4 for the
   released models); each window is its own attention segment, except in ``fullatt_block_indexes`` where each
   image is one segment;
3. blocks: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (RMSNorm, SwiGLU with biases);
4. merger: RMSNorm, then each 2x2 group of patches (consecutive rows) -> Linear -> GELU(erf) -> Linear;
5. merged tokens are put back in raster order.

All index bookkeeping (the window permutation, segment ids, rotary positions) is data preparation done on the host
by ``vision_layout``; the compiled tower sees fixed-shape arrays and uses block-diagonal masks from segment ids
instead of a Python loop over windows. Pixel rows may be padded to a bucket (a multiple of the merge unit): padding
rows form their own segment and their merged outputs come last.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax.models.qwen2_5_vl.config import VisionConfig
from medix_jax.models.qwen2_5_vl.layers import (
    Dense,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    attention,
    run_layers,
    stack_layers,
)
from medix_jax.models.qwen2_5_vl.rope import vision_cos_sin


class VisionInputs(NamedTuple):
    """Pixel rows as the HF processor gives them, plus the host-computed layout (all int32 index arrays)."""

    pixel_values: jax.Array  # [N, C*T*P*P] in processor (raster, merge-block) order
    patch_order: jax.Array  # [N] window order -> processor row
    rowcol: jax.Array  # [N, 2] (row, col) of each patch, in window order
    window_segment: jax.Array  # [N] window id, -1 for padding
    image_segment: jax.Array  # [N] image (frame) id, -1 for padding
    merge_restore: jax.Array  # [N / merge_unit] merged token in window order -> raster order


def vision_layout(cfg: VisionConfig, image_grid_thw: np.ndarray, num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Window permutation, segments and rotary positions for images of ``image_grid_thw`` (rows ``[t, h, w]``).

    ``num_rows`` pads to a bucket of pixel rows (default: no padding). Returns numpy arrays keyed as
    ``VisionInputs`` fields (without ``pixel_values``).
    """
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    win = cfg.window_size // m // cfg.patch_size  # merged tokens per window side
    orders, rowcols, windows, images = [], [], [], []
    unit_offset, window_offset, frame_offset = 0, 0, 0
    for image_id, (t, h, w) in enumerate(grids):
        if h % m or w % m:
            raise ValueError(f"image {image_id}: grid {h}x{w} is not a multiple of spatial_merge_size {m}")
        mh, mw = h // m, w // m
        # Window permutation of merged tokens (transformers get_vision_window_index), per frame.
        nh, nw = -(-mh // win), -(-mw // win)
        grid = np.full((t, nh * win, nw * win), -1, np.int64)
        grid[:, :mh, :mw] = np.arange(t * mh * mw).reshape(t, mh, mw)
        by_window = grid.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(-1, win * win)
        window_of_unit = np.broadcast_to(np.arange(len(by_window))[:, None], by_window.shape)
        keep = by_window >= 0
        units, unit_window = by_window[keep], window_of_unit[keep]
        _, unit_window = np.unique(unit_window, return_inverse=True)  # renumber non-empty windows
        # Patch level: each merged token is `unit` consecutive processor rows.
        orders.append(((units + unit_offset)[:, None] * unit + np.arange(unit)).reshape(-1))
        windows.append(np.repeat(unit_window + window_offset, unit))
        images.append(np.repeat(frame_offset + units // (mh * mw), unit))  # full attention: one segment a frame
        # (row, col) of every processor row (merge-block order), then permuted like the rows.
        block_r, block_c = np.divmod(np.arange(mh * mw), mw)
        in_r, in_c = np.divmod(np.arange(unit), m)
        rows = (block_r[:, None] * m + in_r).reshape(-1)
        cols = (block_c[:, None] * m + in_c).reshape(-1)
        rowcol = np.tile(np.stack([rows, cols], -1), (t, 1))
        rowcols.append(rowcol[orders[-1] - unit_offset * unit])
        unit_offset += t * mh * mw
        window_offset += unit_window.max() + 1
        frame_offset += t
    n = unit_offset * unit
    num_rows = n if num_rows is None else num_rows
    if num_rows < n or num_rows % unit:
        raise ValueError(f"pixel row bucket {num_rows} must be >= {n} rows and a multiple of {unit}")
    pad = num_rows - n
    cat = lambda parts, dtype=np.int32: np.concatenate(parts).astype(dtype) if parts else np.zeros((0,), dtype)
    patch_order = np.concatenate([cat(orders), np.arange(n, num_rows)]).astype(np.int32)
    merged_order = patch_order[::unit] // unit
    return dict(
        patch_order=patch_order,
        rowcol=np.concatenate([cat(rowcols).reshape(-1, 2), np.zeros((pad, 2))]).astype(np.int32),
        window_segment=np.concatenate([cat(windows), np.full(pad, -1)]).astype(np.int32),
        image_segment=np.concatenate([cat(images), np.full(pad, -1)]).astype(np.int32),
        merge_restore=np.argsort(merged_order).astype(np.int32),
    )


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.qkv = Dense(d, (3, d), ("vision_embed", None, "vision_heads"), bias=True, **kw)
        self.proj = Dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)

    def __call__(self, x, cos, sin, mask):
        n = x.shape[0]
        qkv = self.qkv(x).reshape(1, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, mask[None])
        return self.proj(out.reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, **kw)

    def __call__(self, x, full_attention, cos, sin, image_mask, window_mask):
        mask = jnp.where(full_attention, image_mask, window_mask)
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, group ``merge_unit`` consecutive patches, Linear -> GELU(erf) -> Linear (HF ``merger.mlp.{0,2}``)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, **kw)
        self.fc1 = Dense(wide, wide, ("vision_merge", "vision_mlp"), bias=True, **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, ("vision_mlp", "embed"), bias=True, **kw)

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.fc1.kernel.shape[0])
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Dense(cfg.patch_dim, cfg.hidden_size, ("vision_patch", "vision_embed"), bias=False,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_rows):
        return self.proj(pixel_rows)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool, scan: bool, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.remat, self.scan = remat, scan
        self.patch_embed = PatchEmbed(cfg, **kw, rngs=rngs)
        make = lambda r: VisionBlock(cfg, **kw, rngs=r)  # noqa: E731
        self.blocks = (stack_layers(make, cfg.depth, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.depth)]))
        self.merger = PatchMerger(cfg, **kw, rngs=rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Merged image features ``[N / merge_unit, out_hidden_size]`` in raster order (padding rows last)."""
        x = self.patch_embed(jnp.take(inputs.pixel_values, inputs.patch_order, axis=0))
        cos, sin = vision_cos_sin(inputs.rowcol, self.cfg.head_dim, self.cfg.rope_theta)
        window_mask = inputs.window_segment[:, None] == inputs.window_segment[None, :]
        image_mask = inputs.image_segment[:, None] == inputs.image_segment[None, :]
        full_attention = jnp.asarray([i in self.cfg.fullatt_block_indexes for i in range(self.cfg.depth)])
        x = run_layers(self.blocks, x, (full_attention,), (cos, sin, image_mask, window_mask),
                       scan=self.scan, remat=self.remat)
        return jnp.take(self.merger(x), inputs.merge_restore, axis=0)

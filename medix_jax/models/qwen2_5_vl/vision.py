"""Qwen2.5-VL vision tower (ViT with 2-D rotary, windowed attention and a 2x2 patch merger).

Reference behaviour (transformers ``Qwen2_5_VisionTransformerPretrainedModel``):

1. patch embed: a Conv3d with kernel = stride = (T, P, P) on rows of ``C*T*P*P`` = one matmul;
2. tokens are permuted into windows of ``window_size/patch_size/merge`` x same merged tokens (4x4 for the
   released models); each window is its own attention segment, except in ``fullatt_block_indexes`` where each
   image is one segment;
3. blocks: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (RMSNorm, SwiGLU with biases);
4. merger: RMSNorm, then each 2x2 group of patches (consecutive rows) -> Linear -> GELU(erf) -> Linear;
5. merged tokens are put back in raster order.

All index bookkeeping is data preparation done on the host (``vision_layout``, ``vision_inputs``); the compiled
tower sees fixed-shape arrays and no Python loop over windows. Layout: every frame (a still image is one frame) is
laid out in window order with each window padded to ``chunk = (window/patch)^2`` patch rows (64 for the released
models), and every frame is padded to ``rows_per_image`` rows (a multiple of ``chunk``). Window attention is then
batched attention over ``[windows, chunk]`` and full attention over ``[images, rows_per_image]``; padding rows only
see padding rows, and their merged outputs are dropped by the final gather.

The layout is **per prompt**: every array has a leading batch dimension (prompt b's images in its own
``num_images`` slots), so vision inputs are split over the mesh's batch axes like the token ids. A host holds only
its own prompts' pixels, and the tower runs data-parallel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax.models.qwen_vl.config import VisionConfig
from medix_jax.models.qwen_vl.layers import Dense, RMSNorm, SwiGLU, run_layers, stack_layers
from medix_jax.models.qwen_vl.rope import vision_cos_sin
from medix_jax.models.qwen_vl.vision import ROWS, VisionAttention, VisionInputs, rows_per_frame, window_rows
from medix_jax.parallel import constrain


def vision_layout(cfg: VisionConfig, image_grid_thw: np.ndarray, num_images: int | None = None,
                  rows_per_image: int | None = None) -> dict[str, np.ndarray]:
    """Window layout for one prompt's images ``image_grid_thw`` (rows ``[t, h, w]``; each of the t frames is laid
    out alone): ``patch_order`` (slot -> the prompt's processor row; 0 for padding), ``valid``, ``rowcol``,
    ``merge_restore``.

    ``num_images`` and ``rows_per_image`` pad to buckets (default: the exact count and the largest frame).
    Window order within a frame follows transformers ``get_vision_window_index``: windows of ``win x win``
    merged tokens in raster order, merged tokens in raster order inside each window.
    """
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    win = cfg.window_size // m // cfg.patch_size  # merged tokens per window side
    chunk = window_rows(cfg)
    frames = []  # per frame: processor row of each slot (-1 = padding) and (row, col)
    unit_offset = 0
    for image_id, (t, h, w) in enumerate(grids):
        if h % m or w % m:
            raise ValueError(f"image {image_id}: grid {h}x{w} is not a multiple of spatial_merge_size {m}")
        mh, mw = h // m, w // m
        nh, nw = -(-mh // win), -(-mw // win)
        grid = np.full((nh * win, nw * win), -1, np.int64)
        grid[:mh, :mw] = np.arange(mh * mw).reshape(mh, mw)
        by_window = grid.reshape(nh, win, nw, win).transpose(0, 2, 1, 3).reshape(-1)  # frame-local unit ids
        real = by_window >= 0
        block_r, block_c = np.divmod(np.where(real, by_window, 0), mw)
        in_r, in_c = np.divmod(np.arange(unit), m)
        rowcol = np.stack([(block_r[:, None] * m + in_r), (block_c[:, None] * m + in_c)], -1).reshape(-1, 2)
        for frame in range(t):
            units = unit_offset + frame * mh * mw + by_window
            rows = np.where(real[:, None], units[:, None] * unit + np.arange(unit), -1).reshape(-1)
            frames.append((rows, rowcol))
        unit_offset += t * mh * mw
    longest = max((rows_per_frame(cfg, h, w) for _, h, w in grids), default=chunk)
    rows_per_image = longest if rows_per_image is None else rows_per_image
    num_images = len(frames) if num_images is None else num_images
    if rows_per_image < longest or rows_per_image % chunk:
        raise ValueError(f"rows_per_image bucket {rows_per_image} must be >= {longest} and a multiple of {chunk}")
    if num_images < len(frames):
        raise ValueError(f"num_images bucket {num_images} is smaller than the {len(frames)} images (frames) given")
    rows = np.full((num_images, rows_per_image), -1, np.int64)
    rowcols = np.zeros((num_images, rows_per_image, 2), np.int64)
    for i, (r, rc) in enumerate(frames):
        rows[i, : len(r)], rowcols[i, : len(r)] = r, rc
    valid = rows >= 0
    first_of_merged = rows.reshape(-1, unit)[:, 0]
    order_key = np.where(first_of_merged >= 0, first_of_merged, np.iinfo(np.int64).max)
    return dict(
        patch_order=np.where(valid, rows, 0).astype(np.int32),
        valid=valid,
        rowcol=rowcols.reshape(-1, 2).astype(np.int32),
        merge_restore=np.argsort(order_key, kind="stable").astype(np.int32),
    )


def vision_inputs(cfg: VisionConfig, pixel_values: np.ndarray, image_grid_thw: np.ndarray,
                  images_per_prompt: Sequence[int], num_images: int | None = None,
                  rows_per_image: int | None = None) -> VisionInputs:
    """Batched vision inputs (host, numpy): prompt b gets the next ``images_per_prompt[b]`` images of
    ``image_grid_thw`` (processor order) and their ``pixel_values`` rows, laid out by ``vision_layout`` in its own
    ``num_images`` slots of ``rows_per_image`` rows (buckets; default: the most frames of any prompt and the
    largest frame). Pixels are gathered into layout order here, so the device never indexes across prompts."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values, np.float32)
    ends = np.cumsum(images_per_prompt)
    if len(ends) == 0 or ends[-1] != len(grids):
        raise ValueError(f"{len(grids)} images for prompts holding {list(images_per_prompt)} images")
    per_prompt = np.split(grids, ends[:-1])
    row_ends = np.cumsum([int(np.prod(g, axis=1).sum()) for g in per_prompt])
    if row_ends[-1] != len(pixel_values):
        raise ValueError(f"pixel_values has {len(pixel_values)} rows; image_grid_thw needs {row_ends[-1]}")
    pixels = np.split(pixel_values, row_ends[:-1])
    frames = max(int(g[:, 0].sum()) for g in per_prompt)
    num_images = max(frames, 1) if num_images is None else num_images
    if rows_per_image is None:
        rows_per_image = max((rows_per_frame(cfg, h, w) for _, h, w in grids), default=window_rows(cfg))
    layouts = [vision_layout(cfg, g, num_images, rows_per_image) for g in per_prompt]
    patches = np.zeros((len(layouts), num_images * rows_per_image, cfg.patch_dim), np.float32)
    for b, (layout, rows) in enumerate(zip(layouts, pixels, strict=True)):
        real = layout["valid"].reshape(-1)
        patches[b, real] = rows[layout["patch_order"].reshape(-1)[real]]
    stack = lambda key: np.stack([layout[key] for layout in layouts])  # noqa: E731
    return VisionInputs(patches, stack("valid"), stack("rowcol"), stack("merge_restore"))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, implementation: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = VisionAttention(cfg, implementation=implementation, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), ("batch", "act_mlp"),
                          bias=True, **kw)

    def __call__(self, x, full_attention, cos, sin, image_segments, window_segments):
        """Attention within each image (``image_segments`` ``[I, R]``) where ``full_attention``, else within each
        window (``window_segments`` ``[W, chunk]``); ``full_attention`` may be traced (scanned layers), so
        ``lax.cond`` picks."""
        x = constrain(x, ROWS)
        h = self.norm1(x)
        x = x + jax.lax.cond(full_attention, lambda: self.attn(h, cos, sin, image_segments),
                             lambda: self.attn(h, cos, sin, window_segments))
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
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool, scan: bool, attention: str,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.remat, self.scan = remat, scan
        self.patch_embed = PatchEmbed(cfg, **kw, rngs=rngs)
        make = lambda r: VisionBlock(cfg, **kw, implementation=attention, rngs=r)  # noqa: E731
        self.blocks = (stack_layers(make, cfg.depth, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.depth)]))
        self.merger = PatchMerger(cfg, **kw, rngs=rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Merged image features ``[B, N / U, out_hidden_size]``: each prompt's real tokens in raster order, then
        padding. The prompts' slots are flattened into one sequence of attention groups (images, windows)."""
        b, n, _ = inputs.patches.shape
        x = constrain(self.patch_embed(inputs.patches.reshape(b * n, -1)), ROWS)
        cos, sin = vision_cos_sin(inputs.rowcol.reshape(b * n, 2), self.cfg.head_dim, self.cfg.rope_theta)
        # Segment 1 = real slot, 0 = padding: attention groups are the images [B * I, R] or the windows [W, chunk].
        image_segments = inputs.valid.reshape(-1, inputs.valid.shape[-1]).astype(jnp.int32)
        window_segments = image_segments.reshape(-1, window_rows(self.cfg))
        full_attention = jnp.asarray([i in self.cfg.fullatt_block_indexes for i in range(self.cfg.depth)])
        x = run_layers(self.blocks, x, (full_attention,), (cos, sin, image_segments, window_segments),
                       scan=self.scan, remat=self.remat)
        merged = self.merger(x).reshape(b, n // self.cfg.merge_unit, -1)
        return jnp.take_along_axis(merged, inputs.merge_restore[..., None], axis=1)

"""Qwen3-VL vision tower (transformers ``Qwen3VLVisionModel``).

1. patch embed: Conv3d with kernel = stride = (T, P, P) and a bias (P = 16) on rows of ``C*T*P*P`` = one matmul;
2. plus learned position embeddings: a ``side x side`` table (``side = sqrt(num_position_embeddings)``, 48 for the
   released models) bilinearly interpolated (align_corners) to each image's ``h x w`` patch grid
   (``interpolation_taps``: 4 taps and weights per patch, as ``F.interpolate`` / transformers'
   ``get_vision_interpolation_indices_and_weights``);
3. blocks: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm, 2-D rotary as Qwen2.5-VL, full attention
   within each image (no windows) and an MLP ``fc2(gelu_tanh(fc1(x)))``;
4. merger: LayerNorm per patch, each 2x2 group of patches -> Linear -> GELU(erf) -> Linear;
5. DeepStack (Meng et al. 2024): the outputs of blocks ``deepstack_visual_indexes`` each go through their own merger
   (LayerNorm over the merged group instead of per patch) and are added to the decoder's first layers.

Layout (host, numpy): each image (frame) in its own slot of ``rows_per_image`` rows, its patches in the processor's
order (2x2 merge blocks in raster order) and padding after; padding slots attend only to padding, and the final
gather drops their merged outputs. Arrays have a leading prompt dimension, as for Qwen2.5-VL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax.models.qwen_vl.config import VisionConfig
from medix_jax.models.qwen_vl.layers import Dense, LayerNorm, param, run_layers, stack_layers
from medix_jax.models.qwen_vl.rope import vision_cos_sin
from medix_jax.models.qwen_vl.vision import ROWS, VisionAttention, VisionInputs
from medix_jax.parallel import constrain


def block_rowcol(h: int, w: int, merge: int) -> np.ndarray:
    """(row, col) ``[h * w, 2]`` of the patches in processor order: merge blocks in raster order, then the
    ``merge x merge`` patches of each block in raster order (transformers ``get_vision_position_ids``)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return np.stack([r.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
                     c.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)], -1)


def interpolation_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps ``[n, 2]`` into a ``side``-long axis and their float32 weights for target
    positions ``index`` on an axis of ``size`` (torch ``F.interpolate``; float32 arithmetic as transformers)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def position_taps(cfg: VisionConfig, rowcol: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The 4 taps into the flattened ``side x side`` position table ``[n, 4]`` and their weights for patches at
    ``rowcol`` of an ``h x w`` grid: the outer product of the row and column taps."""
    side = math.isqrt(cfg.num_position_embeddings)
    rt, rw = interpolation_taps(rowcol[:, 0], h, side)
    ct, cw = interpolation_taps(rowcol[:, 1], w, side)
    return ((rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4),
            (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4))


def vision_inputs(cfg: VisionConfig, pixel_values: np.ndarray, image_grid_thw: np.ndarray,
                  images_per_prompt: Sequence[int], num_images: int | None = None,
                  rows_per_image: int | None = None) -> VisionInputs:
    """Batched vision inputs (host, numpy): prompt b gets the next ``images_per_prompt[b]`` images of
    ``image_grid_thw`` (processor order) in its own ``num_images`` slots of ``rows_per_image`` rows (buckets;
    default: the most frames of any prompt and the largest frame)."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values, np.float32)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    ends = np.cumsum(images_per_prompt)
    if len(ends) == 0 or ends[-1] != len(grids):
        raise ValueError(f"{len(grids)} images for prompts holding {list(images_per_prompt)} images")
    if int(np.prod(grids, axis=1).sum()) != len(pixel_values):
        raise ValueError(f"pixel_values has {len(pixel_values)} rows; image_grid_thw needs "
                         f"{int(np.prod(grids, axis=1).sum())}")
    for i, (_, h, w) in enumerate(grids):
        if h % m or w % m:
            raise ValueError(f"image {i}: grid {h}x{w} is not a multiple of spatial_merge_size {m}")
    longest = max((int(h * w) for _, h, w in grids), default=unit)
    rows_per_image = longest if rows_per_image is None else rows_per_image
    if rows_per_image < longest or rows_per_image % unit:
        raise ValueError(f"rows_per_image bucket {rows_per_image} must be >= {longest} and a multiple of {unit}")
    per_prompt = np.split(np.arange(len(grids)), ends[:-1])
    frames = max(int(grids[g, 0].sum()) for g in per_prompt)
    num_images = max(frames, 1) if num_images is None else num_images
    if num_images < frames:
        raise ValueError(f"num_images bucket {num_images} is smaller than the {frames} images (frames) given")
    b, n = len(per_prompt), num_images * rows_per_image
    patches = np.zeros((b, n, cfg.patch_dim), np.float32)
    valid = np.zeros((b, num_images, rows_per_image), bool)
    rowcol = np.zeros((b, n, 2), np.int32)
    pos_index = np.zeros((b, n, 4), np.int32)
    pos_weight = np.zeros((b, n, 4), np.float32)
    merge_restore = np.zeros((b, n // unit), np.int32)
    starts = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    for row, images in enumerate(per_prompt):
        slot = 0
        order: list[int] = []
        for i in images:
            t, h, w = (int(x) for x in grids[i])
            rc = block_rowcol(h, w, m)
            index, weight = position_taps(cfg, rc, h, w)
            for frame in range(t):
                at, rows = slot * rows_per_image, starts[i] + frame * h * w
                patches[row, at: at + h * w] = pixel_values[rows: rows + h * w]
                valid[row, slot, : h * w] = True
                rowcol[row, at: at + h * w], pos_index[row, at: at + h * w] = rc, index
                pos_weight[row, at: at + h * w] = weight
                order.extend(range(at // unit, (at + h * w) // unit))
                slot += 1
        rest = np.setdiff1d(np.arange(n // unit), order)
        merge_restore[row] = np.concatenate([order, rest]).astype(np.int32)
    return VisionInputs(patches, valid, rowcol, merge_restore, pos_index, pos_weight)


class VisionMLP(nnx.Module):
    """``linear_fc2(gelu_tanh(linear_fc1(x)))`` with biases (hub ``mlp.linear_fc{1,2}``)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.linear_fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x):
        return self.linear_fc2(constrain(jax.nn.gelu(self.linear_fc1(x), approximate=True), ("batch", "act_mlp")))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, implementation: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.hidden_size, 1e-6, **kw)
        self.norm2 = LayerNorm(cfg.hidden_size, 1e-6, **kw)
        self.attn = VisionAttention(cfg, implementation=implementation, **kw)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, carry, tap, cos, sin, segments):
        """``carry`` = (rows ``[N, hidden]``, DeepStack taps ``[n, N, hidden]``); this block's output becomes tap
        ``tap`` (-1: none)."""
        x, taps = carry
        x = constrain(x, ROWS)
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        x = x + self.mlp(self.norm2(x))
        if taps.shape[0]:
            taps = jnp.where(tap >= 0, jax.lax.dynamic_update_index_in_dim(taps, x, jnp.maximum(tap, 0), 0), taps)
        return x, taps


class PatchMerger(nnx.Module):
    """LayerNorm (per patch, or per merged group for the DeepStack mergers: ``postshuffle``), then each
    ``merge_unit`` consecutive patches -> Linear -> GELU(erf) -> Linear (hub ``norm``, ``linear_fc1``,
    ``linear_fc2``)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        wide = cfg.hidden_size * cfg.merge_unit
        self.postshuffle = postshuffle
        self.norm = LayerNorm(wide if postshuffle else cfg.hidden_size, 1e-6, **kw)
        self.linear_fc1 = Dense(wide, wide, ("vision_merge", "vision_mlp"), bias=True, **kw)
        self.linear_fc2 = Dense(wide, cfg.out_hidden_size, ("vision_mlp", "embed"), bias=True, **kw)

    def __call__(self, x):
        wide = self.linear_fc1.kernel.shape[0]
        x = self.norm(x.reshape(-1, wide)) if self.postshuffle else self.norm(x).reshape(-1, wide)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    """The Conv3d with bias as one matmul (hub ``patch_embed.proj.{weight,bias}``)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Dense(cfg.patch_dim, cfg.hidden_size, ("vision_patch", "vision_embed"), bias=True, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)


class PositionTable(nnx.Module):
    """The learned ``side x side`` position embeddings (hub ``pos_embed.weight``)."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.num_position_embeddings, cfg.hidden_size),
                               param_dtype, (None, "vision_embed"))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool, scan: bool, attention: str,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg, self.remat, self.scan = cfg, remat, scan
        self.patch_embed = PatchEmbed(cfg, **kw, rngs=rngs)
        self.pos_embed = PositionTable(cfg, param_dtype=param_dtype, rngs=rngs)
        make = lambda r: VisionBlock(cfg, **kw, implementation=attention, rngs=r)  # noqa: E731
        self.blocks = (stack_layers(make, cfg.depth, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.depth)]))
        self.merger = PatchMerger(cfg, False, **kw, rngs=rngs)
        self.deepstack_merger_list = nnx.List([PatchMerger(cfg, True, **kw, rngs=rngs)
                                               for _ in cfg.deepstack_visual_indexes])

    def __call__(self, inputs: VisionInputs) -> tuple[jax.Array, jax.Array]:
        """(merged features ``[B, N / U, out_hidden_size]``, DeepStack features ``[n, B, N / U, out_hidden_size]``):
        each prompt's real tokens in raster order, then padding."""
        cfg = self.cfg
        b, n, _ = inputs.patches.shape
        assert inputs.pos_index is not None and inputs.pos_weight is not None  # qwen3_vl's vision_inputs sets them
        dtype = self.patch_embed.proj.dtype
        x = self.patch_embed.proj(inputs.patches.reshape(b * n, -1))
        table = self.pos_embed.embedding[...]
        taps = jnp.take(table, inputs.pos_index.reshape(b * n, 4), axis=0).astype(jnp.float32)
        pos = jnp.sum(taps * inputs.pos_weight.reshape(b * n, 4, 1), axis=1)
        x = constrain(x + pos.astype(dtype), ROWS)
        cos, sin = vision_cos_sin(inputs.rowcol.reshape(b * n, 2), cfg.head_dim, cfg.rope_theta)
        segments = inputs.valid.reshape(-1, inputs.valid.shape[-1]).astype(jnp.int32)  # one group per image slot
        tap_of_block = np.full(cfg.depth, -1, np.int32)
        tap_of_block[list(cfg.deepstack_visual_indexes)] = np.arange(len(cfg.deepstack_visual_indexes))
        deep = jnp.zeros((len(cfg.deepstack_visual_indexes), b * n, cfg.hidden_size), x.dtype)
        x, deep = run_layers(self.blocks, (x, deep), (jnp.asarray(tap_of_block),), (cos, sin, segments),
                             scan=self.scan, remat=self.remat)
        restore = lambda merged: jnp.take_along_axis(  # noqa: E731
            merged.reshape(b, n // cfg.merge_unit, -1), inputs.merge_restore[..., None], axis=1)
        deepstack = [restore(merger(d)) for merger, d in zip(self.deepstack_merger_list, deep, strict=True)]
        out = restore(self.merger(x))
        return out, (jnp.stack(deepstack) if deepstack else jnp.zeros((0, *out.shape), out.dtype))

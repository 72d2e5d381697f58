"""Vision pieces every Qwen-VL tower shares: the per-prompt vision inputs, layout row counts, and the attention
block over attention groups (windows or whole images). The towers themselves are family parts:
``qwen2_5_vl.vision`` (windowed attention) and ``qwen3_vl.vision`` (DeepStack, a learned position table).

The layout is **per prompt**: every array has a leading batch dimension (prompt b's images in its own
``num_images`` slots), so vision inputs are split over the mesh's batch axes like the token ids. A host holds only
its own prompts' pixels, and the tower runs data-parallel.
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx

from medix_jax.models import attention
from medix_jax.models.qwen_vl.config import VisionConfig
from medix_jax.models.qwen_vl.layers import AnyArray, Dense, apply_rotary
from medix_jax.parallel import constrain

ROWS = ("batch", "act_embed")  # the tower's [prompts x slots, hidden] rows: prompt-major, split like the batch
HEADS = ("batch", None, "act_heads", None)  # [groups (windows or images), rows, heads, head_dim]


class VisionInputs(NamedTuple):
    """Pixel rows in layout order plus the host-computed layout, per prompt (``N = I * R`` slots: ``I`` images of
    ``R`` rows; ``U`` = merge unit): numpy as built on the host, jax arrays once placed."""

    patches: AnyArray  # [B, N, C*T*P*P] processor rows in layout order, zeros in padding slots
    valid: AnyArray  # [B, I, R] bool: the slot holds a real patch
    rowcol: AnyArray  # [B, N, 2] int32 (row, col) of the patch in each slot
    merge_restore: AnyArray  # [B, N / U] int32: output order (raster, then padding) -> merged slot
    # Qwen3-VL: the 4 bilinear taps into the learned position table of each slot, and their weights
    pos_index: AnyArray | None = None  # [B, N, 4] int32
    pos_weight: AnyArray | None = None  # [B, N, 4] float32


def window_rows(cfg: VisionConfig) -> int:
    """Patch rows of one (padded) attention window."""
    return (cfg.window_size // cfg.patch_size) ** 2


def rows_per_frame(cfg: VisionConfig, h: int, w: int) -> int:
    """Layout rows of one frame of patch grid ``h x w``: its windows, each padded to ``window_rows``; for the
    Qwen3-VL tower (the one with a learned position table: no windows) its patches."""
    if cfg.num_position_embeddings:
        return h * w
    win = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merged tokens per window side
    mh, mw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
    return -(-mh // win) * -(-mw // win) * window_rows(cfg)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, implementation: str, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.implementation = implementation
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.qkv = Dense(d, (3, d), ("vision_embed", None, "vision_heads"), bias=True, **kw)
        self.proj = Dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)

    def __call__(self, x, cos, sin, segments):
        """Attention within each group of ``segments`` ``[G, rows]`` (images or windows; ``x`` holds ``G * rows``
        slots): real slots attend to the real slots of their group, padding to padding."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        shape = (*segments.shape, self.num_heads, self.head_dim)
        q, k, v = (constrain(a.reshape(shape), HEADS) for a in (q, k, v))
        out = attention.attention(q, k, v, segments, segments, causal=False, implementation=self.implementation)
        return self.proj(constrain(out, HEADS).reshape(n, -1))

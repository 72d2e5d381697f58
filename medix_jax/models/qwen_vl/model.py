"""Qwen2.5-VL for conditional generation: vision tower + Qwen2 decoder + LM head.

Two layers of API:

* ``prepare_inputs`` (host, numpy) turns what the Hugging Face processor gives -- ``input_ids``,
  ``attention_mask``, ``pixel_values``, ``image_grid_thw`` -- into fixed-shape ``ModelInputs``: 3-D M-RoPE
  positions, ``rope_delta`` and each prompt's vision window layout, optionally padded to buckets.
* ``QwenVL.__call__(inputs)`` (jit-able) returns logits ``[B, S, vocab]``. ``forward`` does both steps, under
  ``jax.jit``, for callers that hold processor outputs.

Image features replace the embeddings of image placeholder tokens in row-major order (transformers
``masked_scatter``); each prompt's number of placeholders must equal its images' merged tokens.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax.models import moe  # a module, not its names: moe itself imports layers from this package
from medix_jax.models.qwen2_5_vl.vision import VisionTower, vision_inputs
from medix_jax.models.qwen3_vl import vision as qwen3_vision
from medix_jax.models.qwen3_vl.vision import vision_inputs as qwen3_vision_inputs
from medix_jax.models.qwen_vl.config import ModelConfig
from medix_jax.models.qwen_vl.language import HIDDEN, KVCache, Segments, TextModel
from medix_jax.models.qwen_vl.layers import AnyArray, Dense
from medix_jax.models.qwen_vl.rope import mrope_cos_sin, mrope_positions
from medix_jax.models.qwen_vl.vision import VisionInputs
from medix_jax.parallel import constrain


class ModelInputs(NamedTuple):
    """The model's inputs: numpy as ``prepare_inputs`` builds them on the host, jax arrays once placed."""

    input_ids: AnyArray  # [B, S] int32
    attention_mask: AnyArray  # [B, S] bool, False at padding
    positions: AnyArray  # [3, B, S] int32 (t, h, w)
    rope_delta: AnyArray  # [B] int32: decode step k uses position (number of tokens) + rope_delta + k
    vision: VisionInputs | None  # None for a text-only batch


def prepare_inputs(
    cfg: ModelConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    num_images: int | None = None,
    rows_per_image: int | None = None,
) -> ModelInputs:
    """Host-side preparation of processor outputs (numpy in, numpy out).

    Images are assigned to prompts in the processor's order (row-major over their placeholders); each prompt's
    placeholder count must equal its images' merged tokens. Buckets (static shapes): ``num_images`` (images per
    prompt) and ``rows_per_image`` pad the vision layout (see ``vision.vision_inputs``). Defaults are the exact
    sizes.
    """
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    grids = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    positions, rope_delta = mrope_positions(
        input_ids, mask, grids, cfg.tokens.image_token_id, cfg.vision.spatial_merge_size
    )
    vision = None
    if grids is not None and len(grids):
        if pixel_values is None:
            raise ValueError("image_grid_thw given without pixel_values")
        pixel_values = np.asarray(pixel_values, np.float32)
        rows = int(np.prod(grids, axis=1).sum())
        if pixel_values.shape != (rows, cfg.vision.patch_dim):
            raise ValueError(
                f"pixel_values shape {pixel_values.shape} does not match image_grid_thw: expected "
                f"({rows}, {cfg.vision.patch_dim})"
            )
        placeholders = ((input_ids == cfg.tokens.image_token_id) & mask).sum(1)
        per_prompt = images_per_prompt(placeholders, grids, cfg.vision.merge_unit)
        layout = vision_inputs if cfg.family == "qwen2_5_vl" else qwen3_vision_inputs
        vision = layout(cfg.vision, pixel_values, grids, per_prompt, num_images, rows_per_image)
    elif np.any((input_ids == cfg.tokens.image_token_id) & mask):
        raise ValueError("input_ids contain image placeholder tokens but no image_grid_thw was given")
    return ModelInputs(input_ids, mask, positions, rope_delta, vision)


def images_per_prompt(placeholders: np.ndarray, grids: np.ndarray, merge_unit: int) -> list[int]:
    """How many of ``grids`` (in order) each prompt holds, from its count of image placeholder tokens."""
    tokens = (np.prod(grids, axis=1) // merge_unit).tolist()
    counts, taken = [], 0
    for row, want in enumerate(placeholders.tolist()):
        start, got = taken, 0
        while got < want and taken < len(tokens):
            got += tokens[taken]
            taken += 1
        if got != want:
            raise ValueError(f"prompt {row} has {want} image placeholder tokens, but the images in order give "
                             f"{got} merged tokens (images {start}..{taken - 1})")
        counts.append(taken - start)
    if taken != len(tokens):
        raise ValueError(f"{len(tokens) - taken} images have no placeholder tokens in any prompt")
    return counts


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """Per prompt b: ``features[b, k]`` at its k-th image placeholder (row-major), ``embeds`` elsewhere."""
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    picked = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


class Decoded(NamedTuple):
    hidden: jax.Array  # [B, S, hidden] after the final norm
    cache: KVCache | None
    router: moe.RouterStats | None  # mixture of experts: routing statistics summed over the layers


class QwenVL(nnx.Module):
    """Qwen2.5-VL, and Qwen3-VL (dense and MoE) by ``config.family``: the families differ in the vision tower
    (``qwen3_vl.vision``: DeepStack features for the decoder's first layers) and in decoder options of
    ``TextConfig`` (q/k norm, interleaved M-RoPE, experts).

    Parameter tree mirrors the hub checkpoint: ``visual.*``, ``model.*`` (decoder), ``lm_head`` (if untied)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, scan=cfg.scan_layers,
                                  attention=cfg.attention, rngs=rngs)
        tower = VisionTower if cfg.family == "qwen2_5_vl" else qwen3_vision.VisionTower
        self.visual = tower(cfg.vision, **kw)
        self.model = TextModel(cfg.text, **kw)
        untied = not cfg.text.tie_word_embeddings
        self.lm_head = nnx.data(Dense(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs) if untied else None)

    def embed(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array | None]:
        """(token embeddings with image features scattered at the placeholders ``[B, S, hidden]``, DeepStack
        features ``[n, B, S, hidden]`` scattered the same way onto zeros, or None: Qwen2.5-VL, no images)."""
        embeds = constrain(self.model.embed_tokens(inputs.input_ids), HIDDEN)
        if inputs.vision is None:
            return embeds, None
        is_image = (inputs.input_ids == self.config.tokens.image_token_id) & inputs.attention_mask
        if self.config.family == "qwen2_5_vl":
            features = self.visual(inputs.vision)
            assert not isinstance(features, tuple)  # the windowed tower has no DeepStack features
            return constrain(scatter_image_features(embeds, is_image, features), HIDDEN), None
        features, deep = self.visual(inputs.vision)
        zeros = jnp.zeros_like(embeds)
        deepstack = jnp.stack([scatter_image_features(zeros, is_image, d) for d in deep]) if len(deep) else None
        return constrain(scatter_image_features(embeds, is_image, features), HIDDEN), deepstack

    def hidden_states(self, inputs: ModelInputs) -> jax.Array:
        """Final-norm hidden states ``[B, S, hidden]``, causal, padding hidden from real tokens."""
        segments = inputs.attention_mask.astype(jnp.int32)
        embeds, deepstack = self.embed(inputs)
        return self.decode(embeds, inputs.positions, Segments(segments, segments), deepstack=deepstack).hidden

    def decode(self, embeds, positions, segments: Segments, cache: KVCache | None = None, index=0,
               deepstack: jax.Array | None = None) -> Decoded:
        """The decoder on embeddings ``[B, S, hidden]`` at 3-D ``positions`` ``[3, B, S]``; with a KV ``cache``
        the step's keys/values are stored at ``index``, and ``segments.kv`` covering the whole cache makes the
        queries attend over it (decode) instead of over the step's own tokens (prefill). ``deepstack`` (``embed``)
        is added over the first positions, those of the prompt it was computed for."""
        t = self.config.text
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, t.mrope_interleaved)
        return Decoded(*self.model(embeds, cos, sin, segments, cache, index, deepstack))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., vocab]``: the matmul takes compute-dtype inputs and accumulates in float32, since
        log-probabilities (importance ratios, KL) are computed from them. Tied models reuse the embedding."""
        dtype = jnp.dtype(self.config.dtype)
        w = self.model.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.dot(hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)

    def __call__(self, inputs: ModelInputs) -> jax.Array:
        return self.logits(self.hidden_states(inputs))


@functools.partial(jax.jit, static_argnums=0)
def apply_split(graphdef, state, inputs: ModelInputs) -> jax.Array:
    """Logits of the model split as ``nnx.split(model)`` on placed ``inputs``, jitted (``forward``'s compiled step)."""
    return nnx.merge(graphdef, state)(inputs)




def forward(model: QwenVL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
    """Logits for Hugging Face processor outputs; positions and the vision layout are computed here.

    >>> logits = forward(model, **processor(text=..., images=..., return_tensors="np"))  # doctest: +SKIP
    """
    inputs = prepare_inputs(model.config, input_ids, attention_mask, pixel_values, image_grid_thw)
    graphdef, state = nnx.split(model)
    return apply_split(graphdef, state, inputs)


def init_model(cfg: ModelConfig, seed: int = 0) -> QwenVL:
    """A randomly initialised model (unsharded; see ``medix_jax.parallel.init_sharded`` for a mesh)."""
    return QwenVL(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> QwenVL:
    """The model with ``ShapeDtypeStruct`` leaves: shapes and logical axes, no memory allocated."""
    return nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))


def param_count(model: QwenVL) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

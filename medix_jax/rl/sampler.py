"""In-JAX rollout sampler: one compiled prefill, then a compiled ``lax.while_loop`` decode over a donated KV cache.

* **Prefill** (jit): the vision tower runs once per image, features are scattered at the placeholders, the decoder
  fills a preallocated KV cache of length ``prompt + max_new_tokens`` and returns the last position's logits; the
  cache, logits and positions are then repeated ``num_samples`` (G) times -- the prefill never runs G times.
* **Decode** (jit, cache donated): step k samples token ``y_k`` from the current logits, stores it, and feeds it
  back at cache slot ``prompt_len + k`` with M-RoPE position ``num_prompt_tokens + rope_delta + k`` on all three
  axes (``rope.py``). A row stops at any end token (``TokenIds.end_token_ids``: ``<|im_end|>``,
  ``<|endoftext|>`` and what the checkpoint's ``generation_config.json`` declares); the loop exits early once every
  row has stopped.
* **Log-probabilities** returned are ``log softmax(logits / T)[y_k]`` in float32 over the *full* vocabulary
  (top-k/top-p truncation only restricts which tokens can be drawn, it does not renormalise the returned value):
  exactly what the GRPO loss recomputes from the policy with the same temperature. Greedy (T = 0) reports T = 1.
* Prompts must be **left-padded** (the last column is every row's last prompt token). Shapes come from buckets
  (``Buckets``), so a new batch with the same buckets reuses the compiled programs (``Sampler.compile_count``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from medix_jax import parallel
from medix_jax.models.qwen2_5_vl.language import KVCache, Segments
from medix_jax.models.qwen2_5_vl.model import ModelInputs, Qwen2_5_VL, images_per_prompt, prepare_inputs
from medix_jax.models.qwen2_5_vl.vision import rows_per_frame


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    num_samples: int = 1  # G completions per prompt
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end tokens; (): never stop early
    # A copy of the weights in this dtype for rollouts (e.g. bfloat16: decode is memory-bound and streams half the
    # bytes); None samples from the parameters as stored. The trainer refreshes the copy after every update.
    weights_dtype: str | None = None
    # continuous: decode slots refilled with the next waiting sample as rows end (rl/continuous.py); static: the
    # whole batch decodes until its longest row ends (rows that ended still compute).
    batching: str = "continuous"
    slots: int = 0  # continuous: decode slots; 0 = a quarter of the batch's samples (at least one prompt's G)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"invalid sampling settings {self}")
        if self.weights_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.weights_dtype {self.weights_dtype!r} is not one of float32, bfloat16, float16")
        if self.batching not in ("continuous", "static") or self.slots < 0:
            raise ValueError(f"rollout.batching {self.batching!r} must be continuous or static and rollout.slots "
                             f"{self.slots} >= 0")


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes: each batch is padded up to the smallest bucket that fits (no bucket fits -> error).
    ``images`` counts images (frames) per prompt; ``rows_per_image`` is the vision layout rows of one image."""

    prompt_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4352)
    images: tuple[int, ...] = (1, 2, 4)
    rows_per_image: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 21504)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B*G, max_new_tokens] int32; pad after EOS. Row r is sample r % G of prompt r // G
    mask: jax.Array  # [B*G, max_new_tokens] bool: completion tokens (EOS included)
    logprobs: jax.Array  # [B*G, max_new_tokens] float32, 0 where mask is False
    lengths: jax.Array  # [B*G] int32


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


# ----------------------------------------------------------------------------------------------------------------
# Token choice


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Keep the ``top_k`` largest logits and the smallest prefix of tokens (by probability) whose mass reaches
    ``top_p`` (the token that crosses ``top_p`` is kept); everything else becomes -inf."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def sample_keys(key: jax.Array, samples: jax.Array, steps: jax.Array) -> jax.Array:
    """One key per row: ``fold_in(fold_in(key, sample id), step)``. A token's randomness depends only on which
    sample it belongs to and how far that sample is, never on the row (slot) or batch it was computed in."""
    return jax.vmap(lambda i, t: jax.random.fold_in(jax.random.fold_in(key, i), t))(samples, steps)


def choose_tokens(logits: jax.Array, keys: jax.Array, s: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(tokens, float32 logprobs under ``softmax(logits / T)``) for float32 ``logits`` ``[rows, vocab]``, drawing
    row r with ``keys[r]`` (``sample_keys``)."""
    if s.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / s.temperature
        tokens = jax.vmap(jax.random.categorical)(keys, filter_logits(scaled, s.top_k, s.top_p))
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


# ----------------------------------------------------------------------------------------------------------------
# Compiled programs


def _constrain(tree, mesh: Mesh | None, axes_of):
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, parallel.logical_spec(axes_of(a), a.shape, mesh))), tree)


def _cache_axes(a):
    return ("layers", "batch", None, "kv_heads", None)


def _batch_axes(a):
    return ("batch",) + (None,) * (a.ndim - 1)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _prefill(graphdef, state, inputs: ModelInputs, max_new_tokens: int, num_samples: int, mesh: Mesh | None):
    """The prompt through the decoder once: its keys/values fill the cache's first slots (the queries attend over
    the prompt only, not over the empty completion slots); returns the cache repeated G times and the last
    position's logits."""
    with parallel.activation_sharding(mesh):
        model: Qwen2_5_VL = nnx.merge(graphdef, state)
        b, s = inputs.input_ids.shape
        cache = KVCache.zeros(model.config.text, b, s + max_new_tokens, jnp.dtype(model.config.dtype))
        cache = _constrain(cache, mesh, _cache_axes)
        segments = inputs.attention_mask.astype(jnp.int32)
        embeds, deepstack = model.embed(inputs)
        hidden, cache, _ = model.decode(embeds, inputs.positions, Segments(segments, segments), cache, 0, deepstack)
        logits = model.logits(hidden[:, -1])
    next_position = inputs.attention_mask.sum(1).astype(jnp.int32) + inputs.rope_delta
    key_valid = jnp.pad(inputs.attention_mask, ((0, 0), (0, max_new_tokens)), constant_values=True)
    repeat = lambda a, axis=0: jnp.repeat(a, num_samples, axis=axis)  # noqa: E731
    cache = _constrain(KVCache(repeat(cache.k, 1), repeat(cache.v, 1)), mesh, _cache_axes)
    rest = _constrain((repeat(logits), repeat(next_position), repeat(key_valid)), mesh, _batch_axes)
    return cache, *rest


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 11), donate_argnums=(2,))
def _decode(graphdef, state, cache: KVCache, logits, next_position, key_valid, sampling: SamplingConfig,
            prompt_len: int, ends: tuple[int, ...], key, limits, mesh: Mesh | None):
    """Every row decodes until it ends (an end token, or ``limits[row]`` tokens) and the loop until all have."""
    rows, steps = logits.shape[0], sampling.max_new_tokens
    pad = nnx.merge(graphdef, state).config.tokens.pad_token_id
    kv_segments = key_valid.astype(jnp.int32)  # causality with the step's cache index hides unwritten slots
    q_segments = jnp.ones((rows, 1), jnp.int32)

    samples = jnp.arange(rows, dtype=jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, tokens, logprobs, alive, done, cache, logits = carry
        # Fresh Variables at this trace level (nnx.scan refuses ones created outside the loop body).
        model: Qwen2_5_VL = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        token, logprob = choose_tokens(logits, sample_keys(key, samples, jnp.full((rows,), step)), sampling)
        token = jnp.where(done, pad, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        alive = alive.at[:, step].set(~done)
        done = done | jnp.isin(token, jnp.asarray(ends, jnp.int32)) | (step + 1 >= limits)
        # Feed the token back: cache slot prompt_len + step, position num_prompt_tokens + rope_delta + step.
        index = prompt_len + step
        positions = jnp.broadcast_to((next_position + step)[None, :, None], (3, rows, 1))
        hidden, cache, _ = model.decode(model.model.embed_tokens(token[:, None]), positions,
                                     Segments(q_segments, kv_segments), cache, index)
        return step + 1, tokens, logprobs, alive, done, cache, model.logits(hidden[:, 0])

    init = (jnp.int32(0), jnp.full((rows, steps), pad, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
            jnp.zeros((rows, steps), bool), jnp.zeros((rows,), bool), cache, logits)
    with parallel.activation_sharding(mesh):
        _, tokens, logprobs, alive, _, cache, _ = jax.lax.while_loop(cond, body, init)
    # The cache is returned so that XLA can alias the donated input buffer to it (updated in place).
    out = SampleOutput(tokens, alive, logprobs, alive.sum(1).astype(jnp.int32))
    return _constrain(out, mesh, _batch_axes), cache  # rows stay where their prompts are (parallel.local_rows)


class Sampler:
    """Rollouts for GRPO: ``Sampler(sampling, mesh).generate(model, prompts, key)``.

    ``model`` is used as the caller holds it (e.g. the trainer's sharded parameters); nothing is copied. With a
    ``mesh``, the batch is sharded over the ``batch`` rule (data x fsdp) and the KV cache's heads over ``tensor``.
    """

    def __init__(self, sampling: SamplingConfig, mesh: Mesh | None = None):
        self.sampling = sampling
        self.mesh = mesh

    @property
    def compile_count(self) -> int:
        """Programs compiled so far by the static and continuous samplers' functions (all in this process)."""
        from medix_jax.rl import continuous
        return _prefill._cache_size() + _decode._cache_size() + continuous.compile_count()

    def generate(self, model: Qwen2_5_VL, prompts: ModelInputs, key: jax.Array,
                 max_lengths: np.ndarray | None = None) -> SampleOutput:
        """G samples per prompt; row r of the output is sample r % G of prompt r // G. ``max_lengths`` (optional,
        ``[B*G]`` int, this process's rows): a sample also ends after that many tokens (benchmarks force lengths)."""
        mask = np.asarray(prompts.attention_mask)
        if not mask[:, -1].all():
            raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
        s = self.sampling
        rows = len(mask) * s.num_samples
        limits = np.full(rows, s.max_new_tokens, np.int32)
        if max_lengths is not None:
            limits = np.minimum(limits, np.asarray(max_lengths, np.int32).reshape(rows))
            if (limits < 1).any():
                raise ValueError("max_lengths must be >= 1")
        limits = parallel.batch_array(limits, self.mesh)
        prompts = parallel.shard_prompts(prompts, self.mesh)
        graphdef, state = nnx.split(model)
        ends = model.config.tokens.end_token_ids if s.stop_token_ids is None else s.stop_token_ids
        if s.batching == "continuous":
            from medix_jax.rl import continuous
            return continuous.generate(graphdef, state, prompts, key, limits, s, ends, self.mesh)
        cache, logits, next_position, key_valid = _prefill(
            graphdef, state, prompts, s.max_new_tokens, s.num_samples, self.mesh)
        out, _ = _decode(graphdef, state, cache, logits, next_position, key_valid, s,
                         prompts.input_ids.shape[1], ends, key, limits, self.mesh)
        return out

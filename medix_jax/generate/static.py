"""The static sampler: one compiled prefill, then a compiled ``lax.while_loop`` decode over a donated KV cache.

* **Prefill** (jit): the vision tower runs once per image, features are scattered at the placeholders, the decoder
  fills a preallocated KV cache of length ``prompt + max_new_tokens`` and returns the last position's logits; the
  cache, logits and positions are then repeated ``num_samples`` (G) times -- the prefill never runs G times.
* **Decode** (jit, cache donated): step k samples token ``y_k`` from the current logits, stores it, and feeds it
  back at cache slot ``prompt_len + k`` with M-RoPE position ``num_prompt_tokens + rope_delta + k`` on all three
  axes (``rope.py``). A row stops at any end token (``TokenIds.end_token_ids``: ``<|im_end|>``,
  ``<|endoftext|>`` and what the checkpoint's ``generation_config.json`` declares); the loop exits early once every
  row has stopped. The whole batch decodes until its longest row ends (rows that ended still compute); continuous
  batching (``continuous.py``) refills rows instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medix_jax import parallel
from medix_jax.generate import sampling
from medix_jax.generate.sampling import (
    SampleOutput,
    SamplingConfig,
    batch_axes,
    cache_axes,
    choose_tokens,
    constrain,
    sample_keys,
)
from medix_jax.models.qwen_vl.language import KVCache, Segments
from medix_jax.models.qwen_vl.model import ModelInputs, QwenVL


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def prefill(graphdef, state, inputs: ModelInputs, max_new_tokens: int, num_samples: int, mesh: Mesh | None):
    """The prompt through the decoder once: its keys/values fill the cache's first slots (the queries attend over
    the prompt only, not over the empty completion slots); returns the cache repeated G times and the last
    position's logits."""
    with parallel.activation_sharding(mesh):
        model: QwenVL = nnx.merge(graphdef, state)
        b, s = inputs.input_ids.shape
        cache = KVCache.zeros(model.config.text, b, s + max_new_tokens, jnp.dtype(model.config.dtype))
        cache = constrain(cache, mesh, cache_axes)
        segments = inputs.attention_mask.astype(jnp.int32)
        embeds, deepstack = model.embed(inputs)
        hidden, filled, _ = model.decode(embeds, inputs.positions, Segments(segments, segments), cache, 0, deepstack)
        logits = model.logits(hidden[:, -1])
        assert filled is not None  # a decode with a cache returns it filled
    next_position = inputs.attention_mask.sum(1).astype(jnp.int32) + inputs.rope_delta
    key_valid = jnp.pad(inputs.attention_mask, ((0, 0), (0, max_new_tokens)), constant_values=True)
    repeat = lambda a, axis=0: jnp.repeat(a, num_samples, axis=axis)  # noqa: E731
    cache = constrain(KVCache(repeat(filled.k, 1), repeat(filled.v, 1)), mesh, cache_axes)
    rest = constrain((repeat(logits), repeat(next_position), repeat(key_valid)), mesh, batch_axes)
    return cache, *rest


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 11), donate_argnums=(2,))
def decode(graphdef, state, cache: KVCache, logits, next_position, key_valid, sampling: SamplingConfig,
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
        model: QwenVL = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
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
    return constrain(out, mesh, batch_axes), cache  # rows stay where their prompts are (parallel.local_rows)


def compile_count() -> int:
    return sampling.compile_count(prefill, decode)

"""Continuous batching: a fixed number of decode slots, each refilled with the next waiting sample when its row ends.

The static sampler (``static.decode``) runs every row until the batch's longest one ends, over a cache of
``prompt + max_new_tokens`` for every row. Here (vLLM's scheduling idea, in compiled JAX programs):

* **Prefill, shared by the G samples** (``static.prefill`` with no completion room): each prompt's keys/values,
  last logits and next M-RoPE position, once per prompt, into a pool ``[layers, B, P, kv_heads, head_dim]``.
* **Slots**: a contiguous KV cache ``[layers, S, P + max_new_tokens, ...]`` for ``S`` slots (``rollout.slots``).
  ``admit`` copies a waiting sample's prompt from the pool into a free slot (its completion part needs no
  clearing: nothing past a slot's length is ever read).
* **Rounds** (``decode_round``, host-driven): a ``lax.while_loop`` of decode steps over all slots, each slot at its own
  step: a token is written at its own cache index (``KVCache.write`` with a per-row index) and attends over its
  own filled length only, in blocks (``attention.ragged_decode_attention``). The round returns to the host as soon
  as enough slots are free for the waiting samples (``refill``) or every slot has ended; the host admits the next
  samples (in sample order, so a prompt's G samples run close together) and starts the next round.
* **The tail** (``compact``): once nothing waits, the last long samples would decode in nearly empty slots, and a
  step's cost follows the slot count, not the live rows. When at most half the slots are live, the host moves them
  into half as many slots (``shrink_levels``: down to an eighth, no fewer than ``MIN_SLOTS``).
* **Outputs** are written straight into ``[B*G, max_new_tokens]`` buffers at (sample id, step), so the result is
  laid out exactly as the static sampler's. Randomness is ``sampling.sample_keys`` (sample id, step): the same
  samples come out for any slot count, and as from the static sampler.

All shapes are fixed by (prompt bucket, batch, G, slots, max_new_tokens): a round and a compaction per slot level
besides the prefill and admission, compiled once per batch shape, whatever the lengths (a long-tailed batch passes
through every level). Several processes run the same admission plan: each reads the whole end-flag vector
(``process_allgather``) every round.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
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
from medix_jax.generate.static import prefill
from medix_jax.models.qwen_vl.language import KVCache, Segments
from medix_jax.models.qwen_vl.model import ModelInputs


class Pool(NamedTuple):
    """The prefilled prompts, one row each (``static.prefill`` with no completion room)."""

    cache: KVCache  # [layers, B, P, kv_heads, head_dim]
    logits: jax.Array  # [B, vocab] float32: the first completion token's
    position: jax.Array  # [B] int32: M-RoPE position of the first completion token
    valid: jax.Array  # [B, P] bool: real prompt tokens


class Slots(NamedTuple):
    cache: KVCache  # [layers, S, P + N, kv_heads, head_dim]
    logits: jax.Array  # [S, vocab] float32: the slot's next token's
    position: jax.Array  # [S] int32: the slot's first completion position (add step)
    kv: jax.Array  # [S, P + N] int32 key segment ids: the prompt's mask, then ones
    step: jax.Array  # [S] int32: tokens the slot's sample has so far
    sample: jax.Array  # [S] int32: its sample id (row of the output), -1 for none yet
    limit: jax.Array  # [S] int32: the sample ends after this many tokens
    done: jax.Array  # [S] bool: free (ended, or never filled); the host reads all of it every round
    out: SampleOutput  # [B*G, N] buffers (lengths: [B*G] zeros until the end)


def _done_axes(a):
    return (None,)  # asked replicated; XLA may still split it over the batch axes (the host gathers it whole)


def _logits_axes(a):
    return ("batch", "act_vocab")  # split like the output projection: pinned whole, XLA gathers the projection


def _constrain_slots(slots: Slots, mesh: Mesh | None) -> Slots:
    """The slots' arrays pinned to the mesh: rows over the batch axes, the cache's heads and the logits' vocabulary
    over tensor (replicated logits made XLA all-gather the 1.2 GiB output projection on every step: issue 30)."""
    position, kv, step, sample, limit = constrain(
        (slots.position, slots.kv, slots.step, slots.sample, slots.limit), mesh, batch_axes)
    logits = constrain(slots.logits, mesh, _logits_axes)
    return Slots(constrain(slots.cache, mesh, cache_axes), logits, position, kv, step, sample, limit,
                 constrain(slots.done, mesh, _done_axes), constrain(slots.out, mesh, batch_axes))


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5, 6))
def empty_slots(graphdef, state, num_slots: int, prompt_len: int, samples: int, max_new_tokens: int,
           mesh: Mesh | None) -> Slots:
    """Every slot free; output buffers of pad tokens with empty masks."""
    cfg = nnx.merge(graphdef, state).config
    dtype = jnp.dtype(cfg.dtype)
    width = prompt_len + max_new_tokens
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    out = SampleOutput(jnp.full((samples, max_new_tokens), cfg.tokens.pad_token_id, jnp.int32),
                       jnp.zeros((samples, max_new_tokens), bool), jnp.zeros((samples, max_new_tokens), jnp.float32),
                       zeros(samples))
    slots = Slots(KVCache.zeros(cfg.text, num_slots, width, dtype), jnp.zeros((num_slots, cfg.text.vocab_size)),
                  zeros(num_slots), zeros(num_slots, width), zeros(num_slots), jnp.full((num_slots,), -1, jnp.int32),
                  zeros(num_slots), jnp.ones((num_slots,), bool), out)
    return _constrain_slots(slots, mesh)


@functools.partial(jax.jit, static_argnums=(4, 5), donate_argnums=(0,))
def admit(slots: Slots, pool: Pool, assign, limits, num_samples: int, mesh: Mesh | None) -> Slots:
    """Slot s takes sample ``assign[s]`` (-1: unchanged): its prompt's cache, logits, position and mask from the
    pool, step 0. ``limits`` ``[B*G]``: each sample's most tokens."""
    s, p = assign.shape[0], pool.valid.shape[1]
    take = assign >= 0
    prompt = jnp.clip(assign // num_samples, 0, pool.valid.shape[0] - 1)
    at = jnp.where(take, jnp.arange(s), s)  # out of bounds: dropped
    fill = lambda c, src: c.at[:, at, :p].set(src[:, prompt], mode="drop")  # noqa: E731
    cache = KVCache(fill(slots.cache.k, pool.cache.k), fill(slots.cache.v, pool.cache.v))
    kv = slots.kv.at[at, :p].set(pool.valid[prompt].astype(jnp.int32), mode="drop").at[at, p:].set(1, mode="drop")
    pick = lambda new, old: jnp.where(take.reshape(-1, *(1,) * (old.ndim - 1)), new, old)  # noqa: E731
    sample = jnp.where(take, assign, slots.sample)
    updated = Slots(cache, pick(pool.logits[prompt], slots.logits), pick(pool.position[prompt], slots.position), kv,
                    pick(0, slots.step), sample, pick(limits[jnp.clip(assign, 0)], slots.limit),
                    slots.done & ~take, slots.out)
    return _constrain_slots(updated, mesh)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 7), donate_argnums=(2,))
def decode_round(graphdef, state, slots: Slots, sampling: SamplingConfig, prompt_len: int, ends: tuple[int, ...], key,
           mesh: Mesh | None, refill) -> Slots:
    """Decode steps over every slot until every slot has ended or ``refill`` slots are free. A step draws each
    live slot's token (``sample_keys`` of its sample and step), writes it to the output at (sample, step), feeds it
    back at cache index ``prompt_len + step`` with position ``position + step``; a slot ends at an end token or
    at its limit. Ended slots compute too (static shapes) but write nothing anyone reads."""
    n = sampling.max_new_tokens
    pad = nnx.merge(graphdef, state).config.tokens.pad_token_id
    rows = slots.step.shape[0]
    samples = slots.out.tokens.shape[0]
    q_segments = jnp.ones((rows, 1), jnp.int32)

    def cond(carry):
        return ~jnp.all(carry.done) & (jnp.sum(carry.done) < refill)

    def body(slots: Slots) -> Slots:
        model = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # fresh Variables at this trace level
        live = ~slots.done
        token, logprob = choose_tokens(slots.logits, sample_keys(key, slots.sample, slots.step), sampling)
        token = jnp.where(live, token, pad)
        row, col = jnp.where(live, slots.sample, samples), jnp.minimum(slots.step, n - 1)  # row out of bounds: dropped
        out = slots.out._replace(tokens=slots.out.tokens.at[row, col].set(token, mode="drop"),
                                 mask=slots.out.mask.at[row, col].set(True, mode="drop"),
                                 logprobs=slots.out.logprobs.at[row, col].set(logprob, mode="drop"))
        ended = live & (jnp.isin(token, jnp.asarray(ends, jnp.int32)) | (slots.step + 1 >= slots.limit))
        positions = jnp.broadcast_to((slots.position + col)[None, :, None], (3, rows, 1))
        hidden, cache, _ = model.decode(model.model.embed_tokens(token[:, None]), positions,
                                        Segments(q_segments, slots.kv), slots.cache, prompt_len + col)
        step = jnp.where(live, slots.step + 1, slots.step)
        return _constrain_slots(slots._replace(cache=cache, logits=model.logits(hidden[:, 0]), step=step,
                                               done=slots.done | ended, out=out), mesh)

    with parallel.activation_sharding(mesh):
        return jax.lax.while_loop(cond, body, slots)


@functools.partial(jax.jit, static_argnums=(2,))  # no donation: the slots shrink
def compact(slots: Slots, keep, mesh: Mesh | None) -> Slots:
    """The slots ``keep`` ``[S']`` (the live ones, then free ones), in that order: S' slots instead of S."""
    rows = {f: getattr(slots, f)[keep] for f in ("logits", "position", "kv", "step", "sample", "limit", "done")}
    return _constrain_slots(slots._replace(cache=KVCache(slots.cache.k[:, keep], slots.cache.v[:, keep]), **rows),
                            mesh)


def compile_count() -> int:
    return sampling.compile_count(empty_slots, admit, decode_round, compact)


MIN_SLOTS = 4  # the tail is not moved into fewer slots than this (a step's fixed cost dominates below it)
SHRINKS = 3  # at most S -> S/2 -> S/4 -> S/8: a round and a compaction program per level


def shrink_levels(num_slots: int, split: int) -> list[int]:
    """The slot counts the tail moves through (``compact``), largest first: halves of ``num_slots``, multiples of
    the mesh's batch split ``split``, at least ``MIN_SLOTS``."""
    levels = [num_slots]
    for _ in range(SHRINKS):
        half = -(-levels[-1] // 2 // split) * split
        if half < max(MIN_SLOTS, split) or half >= levels[-1]:
            break
        levels.append(half)
    return levels


def default_slots(samples: int, num_samples: int, mesh: Mesh | None) -> int:
    """A quarter of the samples, at least one prompt's G, rounded up to a multiple of the mesh's batch split."""
    split = parallel.batch_split(mesh)
    slots = max(-(-samples // 4), num_samples)
    return min(-(-slots // split) * split, -(-samples // split) * split)


def generate(graphdef, state, prompts: ModelInputs, key, limits, sampling: SamplingConfig, ends: tuple[int, ...],
             mesh: Mesh | None) -> SampleOutput:
    """``sampler.Sampler.generate`` with continuous batching (module docstring); ``prompts`` and ``limits`` are
    global (placed) arrays."""
    b, p = prompts.input_ids.shape
    g = sampling.num_samples
    samples = b * g
    num_slots = sampling.slots or default_slots(samples, g, mesh)
    cache, logits, position, valid = prefill(graphdef, state, prompts, 0, 1, mesh)
    pool = Pool(cache, logits, position, valid)
    slots = empty_slots(graphdef, state, num_slots, p, samples, sampling.max_new_tokens, mesh)
    free = np.ones(num_slots, bool)
    waiting = 0  # next sample id to admit
    smaller = shrink_levels(num_slots, parallel.batch_split(mesh))[1:]
    while True:
        assign = np.full(num_slots, -1, np.int32)
        for slot in np.flatnonzero(free)[: samples - waiting]:
            assign[slot], waiting = waiting, waiting + 1
        if (assign >= 0).any():
            slots = admit(slots, pool, jnp.asarray(assign), limits, g, mesh)
        elif free.all():
            break
        # Back to the host once enough slots are free for what waits (an eighth of them), or all have ended.
        # With nothing waiting: back once the live slots fit the next smaller level, or all have ended.
        left = samples - waiting
        if left:
            refill = min(left, max(1, num_slots // 8))
        else:
            refill = num_slots - smaller[0] if smaller else num_slots + 1
        slots = decode_round(graphdef, state, slots, sampling, p, ends, key, mesh, jnp.int32(refill))
        # The whole flag vector on every process, however XLA laid it out (one process's first shard may hold part
        # of it: then the processes' admission plans differ, and their next programs wait on each other forever).
        free = np.asarray(multihost_utils.process_allgather(slots.done, tiled=True))
        if not left and smaller and 0 < (~free).sum() <= smaller[0]:  # the tail: move it into fewer slots
            keep = np.argsort(free, kind="stable")[: smaller[0]]  # live slots first
            slots, free, num_slots = compact(slots, jnp.asarray(keep, jnp.int32), mesh), free[keep], smaller.pop(0)
    out = slots.out
    return out._replace(lengths=constrain(out.mask.sum(1).astype(jnp.int32), mesh, batch_axes))

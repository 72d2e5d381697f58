"""The policy's forward pass over completions: hidden states of a prompt's completions (one per row, or several
packed to a row), and their per-token log-probabilities and entropies without ever holding ``[N, T, vocab]``
logits. The step's programs (``programs.py``) are built from these."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medix_jax import parallel
from medix_jax.models.moe import RouterStats
from medix_jax.models.qwen_vl.language import Segments
from medix_jax.models.qwen_vl.model import ModelInputs, QwenVL
from medix_jax.rl import grpo, packing

Arrays = jax.Array | np.ndarray  # on the device, or on the host while a micro-batch is assembled


class Completions(NamedTuple):
    tokens: Arrays  # [N, T]
    mask: Arrays  # [N, T]
    old_logprobs: Arrays  # [N, T]
    advantages: Arrays  # [N]
    ref_logprobs: Arrays | None = None  # [N, T], when loss.kl_coef > 0
    sampler_logprobs: Arrays | None = None  # [N, T], the sampler's, when loss.rollout_correction is not none


LOGPROB_CHUNK = 512  # completion tokens per step of the log-probability scan (``completion_logprobs``)


def completion_hidden(model: QwenVL, prompts: ModelInputs, tokens: jax.Array, mask: jax.Array, rows=None,
                      embedded=None) -> tuple[jax.Array, RouterStats | None]:
    """(final-norm hidden states ``[N, T, hidden]`` that predict completion tokens ``[N, T]`` -- state t predicts
    token t --, the mixture of experts' routing statistics or None). Completion n continues prompt ``rows[n]`` of
    the left-padded prompts ``[B, P]``, an index within its batch shard (``parallel.take_rows``; None: prompt n);
    ``embedded`` is ``model.embed(prompts)``, computed here when None.

    Positions continue each prompt's M-RoPE positions exactly as the sampler does (``num_prompt_tokens +
    rope_delta + t`` on all three axes); a prompt (with its images) is embedded once, whatever number of
    completions continue it.
    """
    p, t = prompts.input_ids.shape[1], tokens.shape[1]
    take = lambda a, axis=0: a if rows is None else parallel.take_rows(a, rows, axis)  # noqa: E731
    prompt_embeds, deepstack = model.embed(prompts) if embedded is None else embedded
    embeds = jnp.concatenate([take(prompt_embeds), model.model.embed_tokens(tokens)], axis=1)
    start = take(prompts.attention_mask.sum(1).astype(jnp.int32) + prompts.rope_delta)
    completion_positions = jnp.broadcast_to((start[:, None] + jnp.arange(t))[None], (3, start.shape[0], t))
    positions = jnp.concatenate([take(prompts.positions, 1), completion_positions], axis=2)
    segments = jnp.concatenate([take(prompts.attention_mask), mask], axis=1).astype(jnp.int32)
    deepstack = None if deepstack is None else take(deepstack, 1)
    hidden, _, router = model.decode(embeds, positions, Segments(segments, segments), deepstack=deepstack)
    return hidden[:, p - 1: p + t - 1], router


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / T)[token]`` -- what the sampler reports (greedy: T = 1)."""
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]


def completion_logprobs(model: QwenVL, hidden: jax.Array, tokens: jax.Array, temperature: float,
                        with_entropy: bool = True, chunk: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """(``token_logprobs`` ``[N, T]``, per-token entropies of ``softmax(logits / T)`` ``[N, T]`` or None) of
    ``hidden`` ``[N, T, hidden]`` (``completion_hidden``), without ever holding ``[N, T, vocab]`` logits.

    A ``lax.scan`` over chunks of ``chunk`` tokens (default ``LOGPROB_CHUNK``; T is padded to a multiple and the
    outputs sliced back) computes each chunk's float32 logits with ``model.logits``, and its body is
    ``jax.checkpoint``-ed: the backward pass recomputes a chunk's logits instead of storing them, so the largest
    temporary is ``[N, chunk, vocab]``. The entropy is a metric: no gradient flows through it.
    """
    n, t = tokens.shape
    c = min(chunk or LOGPROB_CHUNK, t)
    steps = -(-t // c)
    pad = steps * c - t
    temp = temperature if temperature > 0 else 1.0

    @functools.partial(jax.checkpoint, prevent_cse=False)  # the scan already keeps the recomputation apart
    def body(carry, xs):
        h, tok = xs
        logits = parallel.constrain(model.logits(h), ("batch", None, "act_vocab"))
        logp = token_logprobs(logits, tok, temperature)
        ent = grpo.token_entropy(jax.lax.stop_gradient(logits) / temp) if with_entropy else None
        return carry, (logp, ent)

    split = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)).reshape(  # noqa: E731
        n, steps, c, *a.shape[2:]).swapaxes(0, 1)
    _, (logp, ent) = jax.lax.scan(body, None, (split(hidden), split(tokens)))
    def join(a):
        return a.swapaxes(0, 1).reshape(n, steps * c)[:, :t]

    return join(logp), None if ent is None else join(ent)


def activations(mesh):
    """``parallel.activation_sharding(mesh)`` (the model pins its activations to the mesh), or nothing (an outer
    context, if any, stays in force) without a mesh."""
    return contextlib.nullcontext() if mesh is None else parallel.activation_sharding(mesh)


def packed_hidden(model: QwenVL, embedded, layout: packing.Layout) -> tuple[jax.Array, jax.Array,
                                                                             RouterStats | None]:
    """(final-norm hidden states ``[R, T, hidden]`` of each packed row's completion tokens one after the other --
    state (r, c) predicts token (r, c) --, those tokens ``[R, T]``, the routing statistics or None) of the rows
    ``layout`` (``packing.Layout``) over the embedded prompts ``embedded`` (``programs.embed``: ``[M, P, hidden]`` and
    DeepStack features or None). A prompt token is gathered from its prompt's embedding on its own chip
    (``parallel.take_rows``), a completion token embedded from its id; each sample keeps its own M-RoPE positions
    and attends only within its segment, so it sees exactly what it sees alone (``completion_hidden``)."""
    prompt_embeds, deepstack = embedded
    m, p = prompt_embeds.shape[:2]
    r, length = layout.ids.shape
    source = jnp.maximum(layout.source, 0).reshape(-1)
    from_prompt = (layout.source >= 0)[..., None]

    def gather(a, axis):  # [.., M, P, ..] at axis -> [.., R, L, ..]: each position's prompt token
        flat = a.reshape(a.shape[:axis] + (m * p,) + a.shape[axis + 2:])
        out = parallel.take_rows(flat, source, axis)
        return out.reshape(a.shape[:axis] + (r, length) + a.shape[axis + 2:])

    embeds = jnp.where(from_prompt, gather(prompt_embeds, 0), model.model.embed_tokens(layout.ids))
    deepstack = None if deepstack is None else jnp.where(from_prompt[None], gather(deepstack, 1), 0)
    segments = Segments(layout.segments, layout.segments)
    hidden, _, router = model.decode(embeds, layout.positions, segments, deepstack=deepstack)
    hidden = jnp.take_along_axis(hidden, layout.predict[..., None], axis=1)
    return hidden, jnp.take_along_axis(layout.ids, layout.predict + 1, axis=1), router


def unpack(a: jax.Array, layout: packing.Layout) -> jax.Array:
    """Per-token values of the packed rows ``[R, T]`` (``packed_hidden``'s order) -> per sample slot ``[S, T]``."""
    index = layout.slot_row * a.shape[1] + layout.slot_col
    return parallel.take_rows(a.reshape(-1), index.reshape(-1)).reshape(index.shape)

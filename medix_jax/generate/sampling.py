"""What both samplers share: the sampling settings, the output layout, the token choice (temperature, top-k, top-p)
with per-sample randomness, and the shardings their compiled programs pin.

Log-probabilities returned are ``log softmax(logits / T)[y_k]`` in float32 over the *full* vocabulary (top-k/top-p
truncation only restricts which tokens can be drawn, it does not renormalise the returned value): exactly what the
GRPO loss recomputes from the policy with the same temperature. Greedy (T = 0) reports T = 1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from medix_jax import parallel


@dataclasses.dataclass(frozen=True)
class RolloutMesh:
    """The sampler's own layout (``rollout.mesh``): the trainer's devices regrouped into replicas over ``data`` (and
    ``fsdp``) with ``tensor``-parallel weights inside each (``parallel.rollout_mesh``). The default, every chip a
    whole replica, gathers nothing while decoding; ``tensor`` > 1 splits a replica's weights (and KV heads) over
    that many chips, for a model whose copy does not fit one chip beside the training state. Here ``fsdp`` splits
    only a mixture's experts (expert parallelism, ``parallel.rollout_shardings``): a replica of ``fsdp`` chips each
    holding ``E / fsdp`` experts and every other weight whole, the decode step's tokens sent to their experts."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


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
    # The sampler's own layout (issue 30): the weights' copy resharded once per update to replicas x tensor
    # parallelism, so that no weight is gathered on every decode step. None: the trainer's mesh and layout.
    mesh: RolloutMesh | None = None
    # Rollouts ahead of the update (rl/ahead.py): step n trains on a batch sampled by the policy of step n - k at
    # the oldest, while the next k batches are sampled and scored in the background. 0: the synchronous step.
    staleness: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"invalid sampling settings {self}")
        if self.weights_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.weights_dtype {self.weights_dtype!r} is not one of float32, bfloat16, float16")
        if self.staleness < 0:
            raise ValueError(f"rollout.staleness must be >= 0, got {self.staleness}")
        if self.batching not in ("continuous", "static") or self.slots < 0:
            raise ValueError(f"rollout.batching {self.batching!r} must be continuous or static and rollout.slots "
                             f"{self.slots} >= 0")


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B*G, max_new_tokens] int32; pad after EOS. Row r is sample r % G of prompt r // G
    mask: jax.Array  # [B*G, max_new_tokens] bool: completion tokens (EOS included)
    logprobs: jax.Array  # [B*G, max_new_tokens] float32, 0 where mask is False
    lengths: jax.Array  # [B*G] int32


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


def compile_count(*jitted) -> int:
    """Programs compiled so far by the ``jitted`` functions (each one's compilation cache, all in this process)."""
    return sum(f._cache_size() for f in jitted)


# ----------------------------------------------------------------------------------------------------------------
# Shardings the samplers' programs pin


def constrain(tree, mesh: Mesh | None, axes_of):
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, parallel.logical_spec(axes_of(a), a.shape, mesh))), tree)


def cache_axes(a):
    return ("layers", "batch", None, "kv_heads", None)


def batch_axes(a):
    return ("batch",) + (None,) * (a.ndim - 1)

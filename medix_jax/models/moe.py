"""Top-k mixture of SwiGLU experts (transformers ``Qwen3VLMoeTextSparseMoeBlock``), with grouped matmuls.

Routing: ``p = softmax(x @ W_router)`` in float32 over ``E`` experts, the ``k`` largest kept and renormalised to sum
to 1; the token's output is ``sum_i p_i * down_i(silu(gate_i(x)) * up_i(x))`` over its k experts. Every token is
routed (no capacity, nothing dropped).

Compute: the ``T * k`` (token, expert) assignments are sorted by expert and each expert's run is one group of
``jax.lax.ragged_dot`` (a grouped matmul: no per-expert Python loop, no ``[T, E, ...]`` dispatch tensor); outputs are
weighted and scatter-added back to their tokens. The experts' weights are stacked on a leading ``expert`` logical
axis (``[E, hidden, 2 * moe_intermediate]`` and ``[E, moe_intermediate, hidden]``, the hub layout), which the mesh
rules shard (``parallel.DEFAULT_RULES``: expert over fsdp).

Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4; transformers ``load_balancing_loss_func``):
``aux = E * sum_e f_e * P_e`` with ``f_e`` the share of real tokens' assignments going to expert e (over all layers,
summing to k) and ``P_e`` the mean router probability of e. ``RouterStats`` carries the sums through the layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from medix_jax import parallel
from medix_jax.models.qwen_vl.layers import Dense, param


class RouterStats(NamedTuple):
    """Sums over layers and real tokens: assignments per expert ``[E]``, router probability per expert ``[E]``, and
    the number of (layer, token) rows."""

    assignments: jax.Array
    probability: jax.Array
    rows: jax.Array

    @classmethod
    def zeros(cls, num_experts: int) -> RouterStats:
        return cls(jnp.zeros((num_experts,), jnp.float32), jnp.zeros((num_experts,), jnp.float32),
                   jnp.zeros((), jnp.float32))

    # Elementwise sums, not tuple concatenation: a deliberate change of tuple's ``+`` (mypy: incompatible override).
    def __add__(self, other: RouterStats) -> RouterStats:  # type: ignore[override]
        return RouterStats(*(a + b for a, b in zip(self, other, strict=True)))

    def aux_loss(self) -> jax.Array:
        """``E * sum_e f_e * P_e`` (transformers ``load_balancing_loss_func`` with an attention mask)."""
        rows = jnp.maximum(self.rows, 1.0)
        return self.assignments.shape[0] * jnp.sum((self.assignments / rows) * (self.probability / rows))

    def load(self) -> jax.Array:
        """Each expert's share of all assignments ``[E]`` (sums to 1; uniform routing gives 1 / E)."""
        return self.assignments / jnp.maximum(self.assignments.sum(), 1.0)


class Experts(nnx.Module):
    """The stacked expert weights (hub ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, *, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate_up_proj = param(rngs, init, (num_experts, dim, 2 * hidden), param_dtype, ("expert", "embed", "mlp"))
        self.down_proj = param(rngs, init, (num_experts, hidden, dim), param_dtype, ("expert", "mlp", "embed"))


class MoE(nnx.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, experts_per_token: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype, self.k, self.num_experts = dtype, experts_per_token, num_experts
        self.gate = Dense(dim, num_experts, ("embed", None), bias=False, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)  # the router (hub mlp.gate.weight)
        self.experts = Experts(dim, hidden, num_experts, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, real: jax.Array) -> tuple[jax.Array, RouterStats]:
        """``x`` ``[B, S, hidden]`` -> (same shape, this layer's ``RouterStats`` over the ``real`` ``[B, S]``
        tokens).

        Under ``parallel.activation_sharding`` the tokens are routed where they are, in ``shard_map`` over the mesh
        axes that divide them (the batch's first, then the rest): XLA cannot split a sort or a ragged dimension, and
        left to itself routed every token of the batch on every chip (a v5p-64 update of Qwen3-VL-30B-A3B needed
        160 GiB per chip). Each shard sees the whole expert weights (all-gathered per layer, as FSDP gathers every
        weight) and the statistics are summed over the shards."""
        shape, d = x.shape, x.shape[-1]
        flat = x.reshape(-1, d).astype(self.dtype)
        mask = real.reshape(-1).astype(jnp.float32)
        weights = (self.gate.kernel[...].astype(self.dtype), self.experts.gate_up_proj[...].astype(self.dtype),
                   self.experts.down_proj[...].astype(self.dtype))
        context = parallel.current_mesh()
        axes = () if context is None else _token_axes(shape[0], flat.shape[0], *context)
        if not axes:
            y, stats = self._route(flat, mask, *weights)
            return y.reshape(shape), stats
        assert context is not None  # _token_axes found axes: there is a mesh

        def local(flat, mask, *weights):
            y, stats = self._route(flat, mask, *weights)
            return y, jax.tree.map(lambda v: jax.lax.psum(v, axes), stats)

        rows, whole = PartitionSpec(axes, None), PartitionSpec()
        y, stats = jax.shard_map(local, mesh=context[0], in_specs=(rows, PartitionSpec(axes), whole, whole, whole),
                                 out_specs=(rows, whole), check_vma=False)(flat, mask, *weights)
        return y.reshape(shape), stats

    def _route(self, flat, mask, router, gate_up_proj, down_proj) -> tuple[jax.Array, RouterStats]:
        """Route the tokens ``flat`` ``[T, hidden]`` (``mask`` ``[T]``: 1 for real tokens) through their top-k
        experts."""
        probs = jax.nn.softmax(jnp.dot(flat, router, preferred_element_type=jnp.float32), axis=-1)  # [T, E]
        top_p, top_e = jax.lax.top_k(probs, self.k)  # [T, k]
        top_p = (top_p / top_p.sum(-1, keepdims=True)).astype(self.dtype)

        expert_of = top_e.reshape(-1)  # assignment a = token * k + slot
        order = jnp.argsort(expert_of, stable=True)  # assignments grouped by expert
        token_of = order // self.k
        sizes = jnp.bincount(expert_of, length=self.num_experts).astype(jnp.int32)
        gate_up = jax.lax.ragged_dot(flat[token_of], gate_up_proj, sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_proj, sizes)
        out = out * top_p.reshape(-1)[order][:, None]
        y = jnp.zeros_like(flat).at[token_of].add(out)

        assigned = jnp.zeros((self.num_experts,), jnp.float32).at[expert_of].add(jnp.repeat(mask, self.k))
        stats = RouterStats(assigned, (probs * mask[:, None]).sum(0), mask.sum())
        return y, stats


def _token_axes(batch: int, tokens: int, mesh, rules) -> tuple[str, ...]:
    """The mesh axes (size > 1) to split ``tokens`` flattened ``[batch * length]`` rows over: the batch rule's axes
    first (so the split follows the rows' own sharding), then the others, dropped from the end until they divide."""
    batch_spec = parallel.logical_spec(("batch",), (batch,), mesh, rules)[0]
    first = () if batch_spec is None else (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec)
    axes = [*first, *(a for a in mesh.axis_names if a not in first and mesh.shape[a] > 1)]
    while axes and tokens % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def router_terms(stats: RouterStats | None, coef: float, share) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(``coef * aux_loss`` for the training loss, routing metrics) of one micro-batch, both scaled by its
    ``share`` of the mini-batch so that they add up over micro-batches: ``router_load_e{i}`` (expert i's share of the
    assignments; 1/E each when balanced), ``router_imbalance`` (the busiest expert's load times E; 1 is perfect)
    and ``router_aux_loss``. Nothing for a dense model (``stats`` None)."""
    if stats is None:
        return jnp.zeros((), jnp.float32), {}
    load, aux = stats.load(), stats.aux_loss()
    metrics = {f"router_load_e{e}": load[e] * share for e in range(load.shape[0])}
    metrics.update(router_imbalance=load.max() * load.shape[0] * share, router_aux_loss=aux * share)
    return coef * aux * share, metrics

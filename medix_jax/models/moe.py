"""Top-k mixture of SwiGLU experts (transformers ``Qwen3VLMoeTextSparseMoeBlock``), with grouped matmuls.

Routing: ``p = softmax(x @ W_router)`` in float32 over ``E`` experts, the ``k`` largest kept and renormalised to sum
to 1; the token's output is ``sum_i p_i * down_i(silu(gate_i(x)) * up_i(x))`` over its k experts. Every token is
routed (no capacity, nothing dropped).

Compute: the ``T * k`` (token, expert) assignments are sorted by expert and each expert's run is one group of
``jax.lax.ragged_dot`` (a grouped matmul: no per-expert Python loop, no ``[T, E, ...]`` dispatch tensor); outputs are
weighted and scatter-added back to their tokens. The experts' weights are stacked on a leading ``expert`` logical
axis (``[E, hidden, 2 * moe_intermediate]`` and ``[E, moe_intermediate, hidden]``, the hub layout), which the mesh
rules shard (``parallel.DEFAULT_RULES``: expert over fsdp).

Expert parallelism (``dispatch``): on a mesh each device keeps its share of the experts and the tokens travel to
them and back (all-gather of the tokens, reduce-scatter of the outputs), in the update, prefill and decode alike;
the experts' weights are never gathered.

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

        Under ``parallel.activation_sharding`` the layer runs in ``shard_map``: the tokens are routed where they are
        (over the mesh axes that divide them, the batch's first; XLA cannot split a sort or a ragged dimension, and
        left to itself routed every token of the batch on every chip) and each device keeps only its own experts
        (the ``expert`` rule's axes), which the tokens travel to (``dispatch``) -- unless moving the tokens costs
        more than moving the experts (``tokens_travel``): then the experts are gathered, as FSDP gathers every
        weight. Statistics are summed over the token shards."""
        shape, d = x.shape, x.shape[-1]
        flat = x.reshape(-1, d).astype(self.dtype)
        mask = real.reshape(-1).astype(jnp.float32)
        weights = (self.gate.kernel[...].astype(self.dtype), self.experts.gate_up_proj[...].astype(self.dtype),
                   self.experts.down_proj[...].astype(self.dtype))
        context = parallel.current_mesh()
        mesh, rules = context if context is not None else (None, None)
        tokens = () if mesh is None else _token_axes(shape[0], flat.shape[0], mesh, rules)
        experts = () if mesh is None else expert_axes(self.num_experts, mesh, rules)
        _, intermediate, dim = weights[2].shape  # down_proj [E, moe_intermediate, hidden]
        if experts and not tokens_travel(flat.shape[0] // _size(mesh, tokens), self.k,
                                         self.num_experts // _size(mesh, experts), intermediate, dim):
            experts = ()
        if not tokens and not experts:
            y, stats = self._route(flat, mask, *weights)
            return y.reshape(shape), stats

        def local(flat, mask, *weights):
            y, stats = self._route(flat, mask, *weights, tokens=tokens, experts=experts)
            return y, jax.tree.map(lambda v: jax.lax.psum(v, tokens), stats) if tokens else stats

        rows, whole, split = PartitionSpec(tokens or None), PartitionSpec(), PartitionSpec(experts or None)
        y, stats = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, whole, split, split),
                                 out_specs=(rows, whole), check_vma=False)(flat, mask, *weights)
        return y.reshape(shape), stats

    def _route(self, flat, mask, router, gate_up_proj, down_proj, *, tokens=(), experts=()
               ) -> tuple[jax.Array, RouterStats]:
        """Route the tokens ``flat`` ``[T, hidden]`` (``mask`` ``[T]``: 1 for real tokens) through their top-k
        experts, of which ``gate_up_proj`` / ``down_proj`` hold this device's share (all of them off a mesh)."""
        probs = jax.nn.softmax(jnp.dot(flat, router, preferred_element_type=jnp.float32), axis=-1)  # [T, E]
        top_p, top_e = jax.lax.top_k(probs, self.k)  # [T, k]
        top_p = (top_p / top_p.sum(-1, keepdims=True)).astype(self.dtype)
        assigned = jnp.zeros((self.num_experts,), jnp.float32).at[top_e.reshape(-1)].add(jnp.repeat(mask, self.k))
        stats = RouterStats(assigned, (probs * mask[:, None]).sum(0), mask.sum())
        return dispatch(flat, top_p, top_e, gate_up_proj, down_proj, tokens, experts), stats


def dispatch(flat, top_p, top_e, gate_up_proj, down_proj, tokens=(), experts=()) -> jax.Array:
    """``sum_i p_i * expert_i(x)`` for each token of ``flat`` ``[T, hidden]`` over its experts ``top_e`` ``[T, k]``
    (weights ``top_p``), inside ``shard_map`` where this device holds experts ``[first, first + E_local)`` of the
    ``experts`` mesh axes and its own block of tokens over the ``tokens`` axes.

    Expert parallelism by token all-gather (Megatron-LM's "allgather" token dispatcher): the tokens of the devices
    that share the token axes among ``experts`` are gathered (``[G * T, hidden]`` with their routing), each device
    runs only its own experts' assignments, and the partial outputs are summed back to their tokens' devices by a
    reduce-scatter (a psum over expert axes the tokens are not split over). Per layer a device receives
    ``2 (G - 1) T hidden`` values, against ``2 k T hidden (G - 1) / G`` for an all-to-all: no more while the group
    ``G`` is at most the ``k`` experts per token, and no capacity, so nothing is ever dropped. The experts' weights
    never move."""
    gathered = tuple(a for a in experts if a in tokens)
    if gathered:
        flat, top_p, top_e = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (flat, top_p, top_e))
    local = gate_up_proj.shape[0]
    first = jax.lax.axis_index(experts) * local if experts else 0
    y = _grouped_experts(flat, top_p, top_e - first, gate_up_proj, down_proj)
    if gathered:
        y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
    rest = tuple(a for a in experts if a not in tokens)
    return jax.lax.psum(y, rest) if rest else y


def _grouped_experts(flat, top_p, local_e, gate_up_proj, down_proj) -> jax.Array:
    """The assignments ``(token, slot)`` whose expert ``local_e`` is one of the ``E_local`` held here, sorted by
    expert into the groups of ``jax.lax.ragged_dot`` (a grouped matmul: no per-expert Python loop, no
    ``[T, E, ...]`` dispatch tensor); the others sort last, outside every group, and add nothing. Outputs are
    weighted and scatter-added back to their tokens."""
    local, k = gate_up_proj.shape[0], local_e.shape[-1]
    expert_of = local_e.reshape(-1)  # assignment a = token * k + slot
    held = (expert_of >= 0) & (expert_of < local)
    key = jnp.where(held, expert_of, local)
    order = jnp.argsort(key, stable=True)  # assignments grouped by expert, those of other devices' experts last
    token_of = order // k
    sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
    gate, up = jnp.split(jax.lax.ragged_dot(flat[token_of], gate_up_proj, sizes), 2, axis=-1)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_proj, sizes)
    weight = jnp.where(held, top_p.reshape(-1), 0)[order]
    out = jnp.where(held[order][:, None], out * weight[:, None], 0)  # rows outside the groups: zero, not whatever
    return jnp.zeros_like(flat).at[token_of].add(out)


def tokens_travel(tokens: int, k: int, local_experts: int, intermediate: int, dim: int) -> bool:
    """Whether ``dispatch`` pays for a device with ``tokens`` tokens and ``local_experts`` experts (hidden size
    ``dim``, ``moe_intermediate`` ``intermediate``): the group's assignments it works on (``G * tokens * k`` rows of
    ``2 dim + 3 intermediate`` values: gathered tokens, gate/up and outputs) take no more than the experts it spares
    gathering (``G * local_experts * 3 dim intermediate``). This also keeps its traffic, ``2 (G - 1) tokens dim``,
    below the experts' ``(G - 1) local_experts 3 dim intermediate``. True for decode (a few tokens per chip);
    false for a long prefill or an update of thousands of tokens per chip, where an all-to-all would move as much
    as the experts (``k`` copies of each token) and the buffer would need a capacity."""
    return tokens * k * (2 * dim + 3 * intermediate) <= local_experts * 3 * dim * intermediate


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def expert_axes(num_experts: int, mesh, rules) -> tuple[str, ...]:
    """The mesh axes the ``expert`` rule splits ``num_experts`` stacked experts over (none where they do not
    divide: every device then holds them all)."""
    entry = parallel.logical_spec(("expert",), (num_experts,), mesh, rules)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


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

"""The mixture of experts on a mesh: routed where the tokens are (shard_map), equal to one device in values and
gradients, no longer routing every token of the batch on every device, and, where tokens are few, expert-parallel:
the tokens travel to the experts' devices instead of the experts being gathered."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medix_jax import parallel
from medix_jax.models.moe import MoE, tokens_travel


def _loss_and_grads(moe, x, real, mesh):
    graphdef, state = nnx.split(moe)

    @jax.jit
    def run(state, x):
        def loss(state):
            with parallel.activation_sharding(mesh):
                y, stats = nnx.merge(graphdef, state)(x, real)
            return jnp.sum(y * jnp.cos(x)) + stats.aux_loss(), (y, stats)

        return jax.grad(loss, has_aux=True)(state)

    return run(state, x)


@pytest.mark.parametrize("sizes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2},
                                   {"data": 1, "fsdp": 8, "tensor": 1}])
def test_sharded_routing_equals_one_device_in_values_and_gradients(sizes):
    """Expert-parallel on every mesh here (3 tokens per device: the tokens travel), values and gradients <= 1e-5."""
    mesh = parallel.make_mesh(sizes)
    moe = MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3, 16)), jnp.float32)
    real = jnp.asarray(rng.random((8, 3)) < 0.8)
    grads, (y, stats) = _loss_and_grads(moe, x, real, None)
    sharded = parallel.init_sharded(lambda: MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)), mesh)
    assert sharded.experts.gate_up_proj[...].addressable_shards[0].data.shape[0] == 8 // sizes["fsdp"]
    assert tokens_travel(8 * 3 // 8, 2, 8 // sizes["fsdp"], 24, 16)
    rows = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    got_grads, (got_y, got_stats) = _loss_and_grads(sharded, rows, real, mesh)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(y), atol=1e-5)
    for a, b in zip(got_stats, stats, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(stats.rows) == float(real.sum())
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads), strict=True):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_each_device_routes_only_its_share_of_the_tokens():
    """The grouped matmuls of the compiled program work on T * k / devices assignments, not on all T * k."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    moe = parallel.init_sharded(lambda: MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                                            rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(moe)
    x = jax.device_put(jnp.ones((8, 32, 16)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def run(state, x):
        with parallel.activation_sharding(mesh):
            return nnx.merge(graphdef, state)(x, jnp.ones(x.shape[:2], bool))[0]

    hlo = jax.jit(run).lower(state, x).compile().as_text()
    assigned = 8 * 32 * 2
    assert f"f32[{assigned // 8},48]" in hlo and f"f32[{assigned},48]" not in hlo  # gate_up: [T * k, 2 * 24]


def _collectives(sizes, batch):
    """The all-gathers' and reduce-scatters' result shapes in the compiled forward of an 8-expert MoE (hidden 16,
    intermediate 24, k 2) on ``sizes``, for ``batch`` rows of 4 tokens."""
    mesh = parallel.make_mesh(sizes)
    moe = parallel.init_sharded(lambda: MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                                            rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(moe)
    x = jax.device_put(jnp.ones((batch, 4, 16)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))

    def run(state, x):
        with parallel.activation_sharding(mesh):
            return nnx.merge(graphdef, state)(x, jnp.ones(x.shape[:2], bool))[0]

    hlo = jax.jit(run).lower(state, x).compile().as_text()
    return re.findall(r"= (\w+\[[\d,]*\])\S* (all-gather|reduce-scatter)\(", hlo)


def test_expert_parallel_moves_tokens_not_experts_and_each_device_holds_only_its_experts():
    """fsdp 4 x tensor 2, 8 experts (2 per fsdp shard), 8 rows of 4 tokens: 4 tokens per device. The tokens (and
    their routing) are all-gathered over the 4 fsdp devices that share the experts and the outputs reduce-scattered
    back; no collective ever yields more than the device's 2 experts, so each device computes its own experts'
    assignments only (the value and gradient test above shows they are all computed)."""
    collectives = _collectives({"data": 1, "fsdp": 4, "tensor": 2}, batch=8)
    shapes = [shape for shape, _ in collectives]
    assert ("f32[16,16]", "all-gather") in collectives  # 4 tokens x 4 devices, hidden 16
    assert ("f32[4,16]", "reduce-scatter") in collectives  # the outputs back to their 4 tokens
    experts = [s for s in shapes if re.fullmatch(r"f32\[\d+,(16,48|24,16|16,24|48,16)\]", s)]
    assert experts and all(s.startswith("f32[2,") for s in experts), shapes  # only the tensor halves: 2 experts


def test_many_tokens_per_device_gather_the_experts_instead():
    """At 64 tokens per device moving them would cost more than the 2 experts (``tokens_travel``): the experts are
    gathered, whole, and nothing is reduce-scattered."""
    assert not tokens_travel(64, 2, 2, 24, 16)
    collectives = _collectives({"data": 1, "fsdp": 4, "tensor": 2}, batch=128)
    assert any(s.startswith("f32[8,") for s, _ in collectives) and all(c != "reduce-scatter" for _, c in collectives)


def test_tokens_travel_at_the_30b_a3bs_decode_not_at_its_update():
    """Qwen3-VL-30B-A3B (k 8, hidden 2048, intermediate 768) with 8 experts per chip: a decode step's 5 tokens per
    chip travel; an update micro-batch's ~21,000 tokens per chip (and a 4,352-token prefill) gather the experts."""
    assert tokens_travel(5, 8, 8, 768, 2048)
    assert not tokens_travel(4352, 8, 8, 768, 2048) and not tokens_travel(21_000, 8, 8, 768, 2048)

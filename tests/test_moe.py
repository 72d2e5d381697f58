"""The mixture of experts on a mesh: routed where the tokens are (shard_map), equal to one device in values and
gradients, and no longer routing every token of the batch on every device."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax import parallel
from medix_jax.models.moe import MoE


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


def test_sharded_routing_equals_one_device_in_values_and_gradients():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    moe = MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.float32)
    real = jnp.asarray(rng.random((4, 6)) < 0.8)
    grads, (y, stats) = _loss_and_grads(moe, x, real, None)
    sharded = parallel.init_sharded(lambda: MoE(16, 24, 8, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)), mesh)
    assert sharded.experts.gate_up_proj[...].addressable_shards[0].data.shape[0] == 8 // 2  # experts over fsdp
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

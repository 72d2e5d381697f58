"""The optimizer: clipped AdamW, its moments in float32 or bfloat16 (optim.state_dtype), and Kahan-compensated
updates for bfloat16 parameters (EasyR1's adamw_bf16, which the reference's 30B run trains with)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medix_jax import parallel
from medix_jax.rl.policy import OptimConfig, apply_updates, make_optimizer, optimizer_programs


def run(tx, params, grad, steps):
    state = tx.init(params)
    step = jax.jit(lambda p, s: apply_updates(tx, p, s, jax.tree.map(lambda g, q: g.astype(q.dtype), grad, p))[:2])
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


# Weights near 1 (bf16 steps of 2^-7 there) under a constant gradient: Adam moves each by about the learning rate
# per update, 1e-4, far below half a bf16 step, so a plain bf16 update rounds back to where it was.
CFG = OptimConfig(learning_rate=1e-4, weight_decay=0.01, grad_clip=1e9)
START = {"w": jnp.linspace(0.9, 1.1, 64, dtype=jnp.float32), "b": jnp.full((8,), -0.5, jnp.float32)}
GRAD = {"w": jnp.linspace(-1.0, 1.0, 64), "b": jnp.full((8,), 0.3)}


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_bf16_parameters_follow_the_float32_run_by_kahan_summation(state_dtype):
    cfg = OptimConfig(**{**CFG.__dict__, "state_dtype": state_dtype})
    reference, _ = run(make_optimizer(cfg, 1), START, GRAD, 300)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), START)
    ours, state = run(make_optimizer(cfg, 1, "bfloat16"), low, GRAD, 300)
    plain, _ = run(optax.chain(optax.clip_by_global_norm(1e9), optax.adamw(1e-4, weight_decay=0.01)), low, GRAD, 300)
    for name in START:
        moved = np.abs(np.asarray(reference[name]) - np.asarray(START[name]))
        assert moved.min() > 0.02  # 300 steps of ~1e-4 (plus the decay): several bf16 steps
        np.testing.assert_array_equal(np.asarray(plain[name], np.float32), np.asarray(low[name], np.float32))
        assert ours[name].dtype == jnp.bfloat16
        # within one bf16 step of the float32 run (2^-7 near 1, 2^-8 near 0.5)
        np.testing.assert_allclose(np.asarray(ours[name], np.float32), np.asarray(reference[name]), atol=2**-7)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(state_dtype)} | {jnp.dtype(jnp.bfloat16)}  # the moments, the compensation


def test_float32_parameters_take_optax_adamws_updates_bit_for_bit():
    ours, _ = run(make_optimizer(CFG, 1), START, GRAD, 20)
    plain, _ = run(optax.chain(optax.clip_by_global_norm(1e9), optax.adamw(1e-4, weight_decay=0.01)), START, GRAD, 20)
    for name in START:
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(plain[name]))


def test_bfloat16_moments_are_stored_in_bfloat16_and_follow_the_float32_ones():
    tx = make_optimizer(OptimConfig(learning_rate=1e-4, state_dtype="bfloat16"), 1)
    moments = [leaf for leaf in jax.tree.leaves(tx.init(START)) if leaf.ndim]
    assert moments and {m.dtype for m in moments} == {jnp.dtype(jnp.bfloat16)}
    ours, _ = run(tx, START, GRAD, 50)
    reference, _ = run(make_optimizer(OptimConfig(learning_rate=1e-4), 1), START, GRAD, 50)
    for name in START:  # 50 updates of ~1e-4 each; bf16 moments (8-bit mantissas) err by ~1 % of that
        moved = np.abs(np.asarray(reference[name]) - np.asarray(START[name]))
        assert moved.min() > 4e-3
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(reference[name]), atol=0.02 * moved.max())


def test_the_compensation_is_sharded_like_its_parameter_on_a_mesh():
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"w": jax.device_put(jnp.ones((64,), jnp.bfloat16), spec)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-4, state_dtype="bfloat16"), 1, "bfloat16")
    init, apply = optimizer_programs(tx, params, mesh)
    state = init(params)
    params, state, _ = apply(params, state, {"w": jnp.full((64,), 0.5, jnp.bfloat16)})
    arrays = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim]
    assert len(arrays) == 3 and all(a.sharding.spec == spec.spec for a in arrays)  # mu, nu, compensation
    assert params["w"].sharding.spec == spec.spec


def test_state_dtype_is_checked():
    with pytest.raises(ValueError, match="optim.state_dtype must be float32 or bfloat16"):
        OptimConfig(state_dtype="float16")

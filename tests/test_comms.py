"""``comms``: the collectives of a compiled program read from its optimized HLO -- kinds, bytes per chip, and the
loops they run in, on programs compiled here for 8 CPU devices."""

from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medix_jax import comms, parallel


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"fsdp": 8})


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_a_sum_in_a_loop_of_known_trip_count_counts_every_trip(mesh):
    x = jax.device_put(jnp.ones((8, 1024), jnp.float32), NamedSharding(mesh, P("fsdp")))

    @partial(jax.shard_map, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"))
    def five_sums(block):
        return jax.lax.fori_loop(0, 5, lambda i, b: b * 0.5 + jax.lax.psum(b, "fsdp"), block)

    found, notes = comms.collectives(compiled_text(five_sums, x), 8)
    sums = [c for c in found if c.kind == "all-reduce"]
    assert len(sums) == 1 and sums[0].in_loop and sums[0].trips == 5 and sums[0].group == 8 and not notes
    assert sums[0].bytes_each == pytest.approx(2 * 1024 * 4 * 7 / 8)  # a ring all-reduce of one 4 KiB block
    summary = comms.summarize(found, bandwidth=1e9)
    assert summary["by_kind"]["all-reduce"]["count"] == 5
    assert summary["seconds"] == pytest.approx(summary["bytes_per_chip"] / 1e9)


def stacked_gathers(mesh, bounded: bool) -> str:
    """A stack of weights carried unchanged through a loop with a data-dependent exit, one of them gathered per
    trip (as scanned layers are in the decode loop); ``bounded``: the loop also stops after 100 trips."""
    w = jax.device_put(jnp.ones((4, 64, 64), jnp.float32), NamedSharding(mesh, P(None, "fsdp")))
    h = jax.device_put(jnp.ones((8, 64), jnp.float32), NamedSharding(mesh, P()))

    def until_small(w, h):
        def body(carry):
            w, h, i = carry
            full = jax.lax.with_sharding_constraint(w[i % 4], NamedSharding(mesh, P()))  # gathered every trip
            return w, jnp.tanh(h @ full), i + 1

        def more(c):
            return (c[2] < 100) & (c[1].sum() > 1e-3) if bounded else c[1].sum() > 1e-3
        return jax.lax.while_loop(more, body, (w, h, 0))[1]

    return compiled_text(until_small, w, h)


def test_a_gather_of_a_loop_invariant_is_found_and_counted_per_trip(mesh):
    text = stacked_gathers(mesh, bounded=False)
    found, _ = comms.collectives(text, 8, while_trips=40)  # no bound in the condition: the one given
    gathers = [c for c in found if c.kind == "all-gather"]
    assert gathers and all(c.in_loop and c.trips == 40 and c.group == 8 for c in gathers)
    assert gathers[0].bytes_each == pytest.approx(64 * 64 * 4 * 7 / 8)
    assert comms.loop_invariant_gathers(text) == [gathers[0].name]
    assert comms.collectives(text, 8)[1]  # no bound at all: counted once, with a note
    # a condition i < 100 and ... (the decode loop's form): 100 trips at most, whatever is given
    found, notes = comms.collectives(stacked_gathers(mesh, bounded=True), 8, while_trips=40)
    assert not notes and all(c.trips == 100 for c in found if c.kind == "all-gather")


def test_a_gather_of_a_value_the_loop_changes_is_not_flagged(mesh):
    h = jax.device_put(jnp.ones((64, 64), jnp.float32), NamedSharding(mesh, P("fsdp")))

    def grow(h):
        def body(carry):
            h, i = carry
            full = jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P()))
            return jax.lax.with_sharding_constraint(jnp.tanh(full @ full), NamedSharding(mesh, P("fsdp"))), i + 1
        return jax.lax.while_loop(lambda c: (c[1] < 100) & (c[0].sum() > 1e-3), body, (h, 0))[0]

    text = compiled_text(grow, h)
    assert any(c.kind == "all-gather" and c.in_loop for c in comms.collectives(text, 8, while_trips=3)[0])
    assert comms.loop_invariant_gathers(text) == []


def test_replica_group_forms():
    assert comms.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 8) == 4
    assert comms.group_size("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", 8) == 4
    assert comms.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}", 8) == 4
    assert comms.group_size("channel_id=1, dimensions={0}", 8) == 8
    assert comms.array_bytes("bf16[16,1024]{1,0}") == 32768
    assert comms.array_bytes("(f32[2,4]{1,0}, s8[10]{0})") == 42


def test_of_a_conditional_only_the_branch_that_receives_the_most_counts(mesh):
    """One branch of a ``switch`` runs: a small and a 4x larger sum, counted as the larger alone (not both)."""
    x = jax.device_put(jnp.ones((8, 1024), jnp.float32), NamedSharding(mesh, P("fsdp")))
    which = jnp.int32(1)

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("fsdp"), P()), out_specs=P("fsdp"), check_vma=False)
    def one_of_two(block, which):
        small = lambda b: b.at[:, :256].set(jax.lax.psum(b[:, :256], "fsdp"))  # noqa: E731
        large = lambda b: jax.lax.psum(b, "fsdp") * 2.0  # noqa: E731
        return jax.lax.switch(which, [small, large], block)

    found, notes = comms.collectives(compiled_text(one_of_two, x, which), 8)
    assert [c.kind for c in found] == ["all-reduce"]
    assert found[0].bytes_each == pytest.approx(2 * 1024 * 4 * 7 / 8)  # the large branch's 4 KiB block
    assert "a conditional's branch that receives the most is counted" in notes

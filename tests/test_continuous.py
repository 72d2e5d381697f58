"""Continuous batching (rl/continuous.py) gives what the static sampler gives: the same greedy tokens, the same
log-probabilities, the same samples for any slot count; its compiled programs do not depend on the lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medix_jax import parallel
from medix_jax.data.buckets import prepare_prompts
from medix_jax.generate import continuous
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models import attention
from medix_jax.models.qwen_vl.hf_io import load_hf
from tests.test_sampler import BUCKETS, mixed_batch


def _generate(model, prompts, key, limits=None, **kw):
    out = Sampler(SamplingConfig(**kw)).generate(model, prompts, key, max_lengths=limits)
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(np.random.default_rng(0))  # an image, two images, text only
    return model, prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS)


def test_ragged_decode_attention_equals_attention_over_the_filled_cache():
    rng = np.random.default_rng(0)
    b, s, h, k, d = 4, 700, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(b, s, k, d)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([1, 300, 513, 700], jnp.int32)
    kv_ids = np.ones((b, s), np.int32)
    kv_ids[1, :280] = 0  # left padding longer than a block: the first block has no key to attend
    kv_ids[2, 10:20] = 0
    q_ids = jnp.ones((b, 1), jnp.int32)
    got = attention.ragged_decode_attention(q, keys, values, q_ids, jnp.asarray(kv_ids), lengths, block_kv=256)
    valid = jnp.asarray(kv_ids) * (jnp.arange(s)[None] < lengths[:, None])
    expected = attention.xla_attention(q, keys, values, q_ids, valid, causal=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6)


@pytest.fixture
def compactions(monkeypatch):
    """Tails moved into fewer slots, down to one (``continuous.MIN_SLOTS`` 1): the calls of ``compact``."""
    monkeypatch.setattr(continuous, "MIN_SLOTS", 1)
    calls = []
    compact = continuous.compact
    monkeypatch.setattr(continuous, "compact", lambda slots, keep, mesh: calls.append(len(keep)) or compact(
        slots, keep, mesh))
    return calls


def test_shrink_levels():
    assert continuous.shrink_levels(32, 1) == [32, 16, 8, 4]
    assert continuous.shrink_levels(6, 1) == [6]  # no fewer than MIN_SLOTS
    assert continuous.shrink_levels(24, 8) == [24, 16, 8]  # multiples of the batch split


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 4, 6])
def test_greedy_tokens_and_logprobs_equal_the_static_sampler(setup, slots, compactions):
    model, prompts = setup
    g = 2
    limits = np.array([3, 24, 11, 1, 24, 7])  # forced lengths per sample: rows end at different steps
    # An end token that some rows reach: the static sampler's own greedy tokens say which.
    free = _generate(model, prompts, jax.random.key(0), max_new_tokens=24, temperature=0, num_samples=g,
                     batching="static")
    stop = int(free.tokens[2, 5])
    kw = dict(max_new_tokens=24, temperature=0, num_samples=g, stop_token_ids=(stop,))
    static = _generate(model, prompts, jax.random.key(0), limits, batching="static", **kw)
    ours = _generate(model, prompts, jax.random.key(0), limits, batching="continuous", slots=slots, **kw)
    assert len(set(static.lengths.tolist())) >= 4  # lengths really differ
    assert bool(compactions) == (slots > 1)  # the tail ran in fewer slots (4 -> 2 -> 1, 6 -> 3 -> 2 -> 1)
    np.testing.assert_array_equal(ours.tokens, static.tokens)
    np.testing.assert_array_equal(ours.mask, static.mask)
    np.testing.assert_array_equal(ours.lengths, static.lengths)
    assert np.abs(ours.logprobs - static.logprobs).max() <= 1e-5


@pytest.mark.slow
def test_samples_do_not_depend_on_the_slot_they_ran_in(setup, compactions):
    model, prompts = setup
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, num_samples=4)
    limits = np.tile([16, 5, 9, 2], 3)
    static = _generate(model, prompts, jax.random.key(5), limits, batching="static", **kw)
    for slots in (1, 3, 5, 12):
        ours = _generate(model, prompts, jax.random.key(5), limits, batching="continuous", slots=slots, **kw)
        np.testing.assert_array_equal(ours.tokens, static.tokens)
        assert np.abs(ours.logprobs - static.logprobs).max() <= 1e-5
    assert compactions  # some tails moved
    other = _generate(model, prompts, jax.random.key(6), limits, batching="continuous", slots=3, **kw)
    assert not np.array_equal(other.tokens, static.tokens)  # the key matters
    assert not np.array_equal(static.tokens[0], static.tokens[4])  # so does the sample id


def test_compile_count_stays_flat_over_varying_lengths(setup):
    model, prompts = setup
    sampler = Sampler(SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2, slots=2))
    rng = np.random.default_rng(1)
    sampler.generate(model, prompts, jax.random.key(0), max_lengths=rng.integers(1, 13, 6))
    compiled = sampler.compile_count
    for step in range(20):
        sampler.generate(model, prompts, jax.random.key(step), max_lengths=rng.integers(1, 13, 6))
    assert sampler.compile_count == compiled


@pytest.mark.slow
def test_sharded_continuous_batching_equals_one_device(tiny_checkpoint, monkeypatch, request):
    """Same samples on a 2 x 2 x 2 mesh, and the same admission plan: as many rounds as on one device (XLA splits
    the slots' end flags over the batch axes; a host that read only its first shard admitted into too few slots).
    Eight slots on the mesh move their tail into four (a multiple of its batch split), with the same samples."""
    _, path = tiny_checkpoint
    rounds = []
    run_round = continuous.decode_round
    monkeypatch.setattr(continuous, "decode_round", lambda *a: rounds.append(1) or run_round(*a))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids, mask, pixels, grids = mixed_batch(np.random.default_rng(0))
    ids, mask = np.concatenate([ids, ids[::-1], ids[:2]]), np.concatenate([mask, mask[::-1], mask[:2]])
    grids = np.concatenate([grids, grids[[1, 2, 0]], grids])
    n0 = 64
    pixels = np.concatenate([pixels, pixels[n0:], pixels[:n0], pixels])
    kw = dict(max_new_tokens=10, temperature=0.8, num_samples=2)
    limits = np.arange(16) % 10 + 1
    single = load_hf(path)
    single_prompts = prepare_prompts(single.config, ids, mask, pixels, grids, BUCKETS)
    expected = Sampler(SamplingConfig(batching="static", **kw)).generate(single, single_prompts, jax.random.key(0),
                                                                          limits)
    Sampler(SamplingConfig(slots=4, **kw)).generate(single, single_prompts, jax.random.key(0), limits)
    one_device, rounds[:] = len(rounds), []
    sharded = load_hf(path, mesh=mesh)
    out = Sampler(SamplingConfig(slots=4, **kw), mesh=mesh).generate(
        sharded, prepare_prompts(sharded.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0), limits)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)
    assert len(rounds) == one_device
    compactions = request.getfixturevalue("compactions")
    out = Sampler(SamplingConfig(slots=8, **kw), mesh=mesh).generate(
        sharded, prepare_prompts(sharded.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0), limits)
    assert compactions == [4]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)

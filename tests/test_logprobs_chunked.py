"""Chunked log-probabilities and entropy (forward.completion_logprobs): the same values and gradients as full
[N, T, vocab] logits, and a gradient program whose temporaries do not grow like N x T x vocab."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medix_jax import parallel
from medix_jax.models.qwen_vl.families import preset
from medix_jax.models.qwen_vl.model import init_model, prepare_inputs
from medix_jax.rl import forward, grpo, programs
from medix_jax.rl.forward import Completions, completion_hidden, completion_logprobs
from medix_jax.rl.update import pack_micro_batch
from tests.support.weights import spread_weights

TEMPERATURE = 0.7
LOSS = grpo.LossConfig(kl_coef=0.05, aggregation="token_mean")


def tiny_model(tied=True, vocab=None, seed=0):
    """The tiny preset with O(1) logits (``support.weights.spread_weights``)."""
    cfg = preset("tiny")
    text = dataclasses.replace(cfg.text, tie_word_embeddings=tied, vocab_size=vocab or cfg.text.vocab_size)
    model = spread_weights(init_model(dataclasses.replace(cfg, text=text), seed), seed + 1)
    return nnx.split(model, nnx.Param)


def batch_for(cfg, prompts=4, samples=2, length=8, seed=0):
    """Left-padded text prompts and ``prompts x samples`` completions of ``length`` tokens (some cut short)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, prompts)
    ids = np.full((prompts, 9), cfg.tokens.pad_token_id, np.int32)
    mask = np.zeros((prompts, 9), bool)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = rng.integers(0, 400, n)
        mask[i, 9 - n:] = True
    inputs = prepare_inputs(cfg, ids, mask)
    n = prompts * samples
    tokens = rng.integers(0, cfg.text.vocab_size, (n, length)).astype(np.int32)
    keep = np.arange(length)[None] < rng.integers(1, length + 1, n)[:, None]
    completions = Completions(jnp.asarray(tokens), jnp.asarray(keep), jnp.asarray(rng.normal(-6, 0.3, (n, length)),
                              jnp.float32), jnp.asarray(rng.normal(size=n), jnp.float32),
                              jnp.asarray(rng.normal(-6, 0.3, (n, length)), jnp.float32))
    return inputs, completions


def reference_logprobs(model, hidden, tokens, temperature):
    """The full-logits computation the chunked one replaces: [N, T, V] logits, log_softmax, take."""
    scaled = model.logits(hidden) / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]
    return logp, scaled


def repeated(samples, prompts=4):
    """Each prompt's row for its ``samples`` completions, in order."""
    return jnp.repeat(jnp.arange(prompts, dtype=jnp.int32), samples)


def reference_loss(params, graphdef, prompts, batch, totals, samples, temperature):
    """The trainer's loss before chunking (same terms, same metrics)."""
    model = nnx.merge(graphdef, params)
    hidden, _ = completion_hidden(model, prompts, batch.tokens, batch.mask,
                                  repeated(samples, prompts.input_ids.shape[0]))
    logp, scaled = reference_logprobs(model, hidden, batch.tokens, temperature)
    loss, metrics = grpo.policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, LOSS, totals,
                                     batch.ref_logprobs)
    metrics["entropy"] = grpo.entropy(grpo.token_entropy(jax.lax.stop_gradient(scaled)), batch.mask, totals)
    metrics["loss"] = loss
    return loss, (metrics, jax.lax.stop_gradient(logp))


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def close(a, b, tol=1e-6):
    """Equal to ``tol``, relative for entries beyond 1 in size (log-probs near -10 are float32 to ~1e-6)."""
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_logprobs_entropy_and_gradients_equal_full_logits(tied):
    """T = 8 in chunks of 3 (padded to 9), temperature 0.7: log-probs, entropies and the gradient of a weighted
    mean of log-probs w.r.t. every parameter equal the full-logits computation to 1e-6. (The gradients differ only
    in the head weights' sum over tokens, added up chunk by chunk: float32 rounding, ~2e-7 of their largest.)"""
    graphdef, params = tiny_model(tied)
    prompts, batch = batch_for(nnx.merge(graphdef, params).config)
    weights = jax.random.normal(jax.random.key(3), batch.tokens.shape)

    def chunked(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = completion_hidden(model, prompts, batch.tokens, batch.mask, repeated(2))
        logp, h = completion_logprobs(model, hidden, batch.tokens, TEMPERATURE, chunk=3)
        return (logp * weights).mean(), (logp, h)

    def full(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = completion_hidden(model, prompts, batch.tokens, batch.mask, repeated(2))
        logp, scaled = reference_logprobs(model, hidden, batch.tokens, TEMPERATURE)
        return (logp * weights).mean(), (logp, grpo.token_entropy(scaled))

    (_, (logp, h)), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (_, (ref_logp, ref_h)), ref_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    assert logp.shape == h.shape == batch.tokens.shape
    assert float(jnp.abs(ref_logp).min()) > 1.0 and float(ref_h.std()) > 0.01  # a real, non-uniform test case
    assert close(logp, ref_logp) and close(h, ref_h), (max_diff(logp, ref_logp), max_diff(h, ref_h))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 0.05
    assert max_diff(grads, ref_grads) <= 1e-6
    # without entropy: the same log-probabilities

    @jax.jit
    def without_entropy(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = completion_hidden(model, prompts, batch.tokens, batch.mask, repeated(2))
        return completion_logprobs(model, hidden, batch.tokens, TEMPERATURE, with_entropy=False, chunk=3)

    alone, none = without_entropy(params)
    assert none is None and close(alone, ref_logp)


def packed(prompts, batch, prompt_of, shards, rows, per_row=4):
    """(the device ``Layout`` and completions of a micro-batch -- ``shards``: per batch shard, rows of sample
    indices into ``batch`` --, the sample in each slot or None) as ``PolicyUpdate.device_batch`` packs them."""
    host = jax.tree.map(np.asarray, prompts)
    layout, slotted, _ = pack_micro_batch(host, jax.tree.map(np.asarray, batch), np.asarray(prompt_of),
                                                  shards, rows, per_row)
    slots = [row[j] if j < len(row) else None for shard in shards for row in shard + [[]] * (rows - len(shard))
             for j in range(per_row)]
    return layout, slotted, slots


def in_slots(a, slots):
    """Per-sample rows of ``a`` in slot order (zeros in empty slots)."""
    a = np.asarray(a)
    return np.stack([np.zeros_like(a[0]) if i is None else a[i] for i in slots])


def trainer_gradients(graphdef, params, prompts, layout, batch, totals, own, mesh=None, param_shardings=None,
                      chunks=1):
    """The trainer's gradient of one micro-batch, as ``Trainer.update`` computes it: the prompts embedded
    (``programs.embed``), the packed micro-batch's gradient with the embeddings' cotangent (``programs.gradients``,
    at the batch's own width), the chain rule through the embedding (``programs.embed_gradients``)."""
    shard = dict(param_shardings=param_shardings, mesh=mesh)
    embedded = jax.jit(functools.partial(programs.embed, graphdef, chunks=chunks, mesh=mesh))(params, prompts)
    grads, d_embedded, metrics, logp = jax.jit(functools.partial(
        programs.gradients, graphdef, loss_cfg=LOSS, temperature=TEMPERATURE, widths=None, **shard))(
        params, embedded, layout, batch, totals, own, jnp.int32(0))
    grads = jax.jit(functools.partial(programs.embed_gradients, graphdef, chunks=chunks, **shard))(
        params, prompts, d_embedded, grads)
    return grads, metrics, logp, embedded


def trainer_logprobs(graphdef, params, embedded, layout, batch, mesh):
    """The old / reference log-probabilities of a packed micro-batch (``programs.logprobs``, its own width)."""
    return jax.jit(functools.partial(programs.logprobs, graphdef, temperature=TEMPERATURE, widths=None, mesh=mesh))(
        params, embedded, layout, batch, jnp.int32(0))


def test_trainer_gradients_and_logprobs_equal_full_logits(monkeypatch):
    """The trainer's own programs (chunks of 3 tokens, mesh or none; completions packed several to a row, in any
    order, each gathering its prompt's embedding) against the pre-chunking loss with every prompt embedded per
    completion, one completion per row: gradients (the embedding's share through ``_embed_gradients``), loss,
    entropy and every other metric, and the old/reference log-probabilities."""
    monkeypatch.setattr(forward, "LOGPROB_CHUNK", 3)
    graphdef, params = tiny_model(tied=False)
    prompts, batch = batch_for(nnx.merge(graphdef, params).config, length=24)
    totals = grpo.totals(batch.mask)
    own = jnp.asarray(False)
    ref_grads, (ref_metrics, ref_logp) = jax.jit(jax.grad(reference_loss, has_aux=True), static_argnums=(1, 5, 6))(
        params, graphdef, prompts, batch, totals, 2, TEMPERATURE)
    mask = np.asarray(batch.mask)
    # rows of 9 + 24 tokens (prompts of 8, 6, 6, 4 tokens; completions of 5, 15, 13, 1, 23, 18, 8, 1): three
    # samples (of two prompts) in a row, two in another, and rows with one sample
    assert np.asarray(batch.mask).sum(1).tolist() == [5, 15, 13, 1, 23, 18, 8, 1]
    shards = [[[3, 7, 6], [0, 2], [1], [4], [5]]]
    layout, slotted, slots = packed(prompts, batch, np.repeat(np.arange(4), 2), shards, rows=6)
    grads, metrics, logp, embedded = trainer_gradients(graphdef, params, prompts, layout, slotted, totals, own,
                                                       chunks=2)  # the vision tower over two chunks of prompts
    ref_slots, mask_slots = in_slots(ref_logp, slots), in_slots(mask, slots)
    assert max_diff(grads, ref_grads) <= 1e-6
    assert close(np.where(mask_slots, logp, 0), np.where(mask_slots, ref_slots, 0))
    assert metrics.keys() == ref_metrics.keys() and float(ref_metrics["entropy"]) > 1.0
    assert close(metrics, ref_metrics), (metrics, ref_metrics)
    mesh = parallel.make_mesh({}, jax.devices()[:1])
    again = trainer_logprobs(graphdef, params, embedded, layout, slotted, mesh)
    assert close(np.where(mask_slots, again, 0), np.where(mask_slots, ref_slots, 0))
    # An 8-device mesh (data 2, fsdp 2, tensor 2): activations and each chunk's logits pinned by the rules; each of
    # the 4 batch shards holds one prompt and its two completions, in two rows or packed into one.
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.param_shardings(params, mesh)
    flat = dict(nnx.to_flat_state(jax.tree.map(lambda a: a, params)))  # fresh Variables
    for path, variable in flat.items():
        variable.set_value(jax.device_put(variable[...], shardings[path]))
    sharded = nnx.from_flat_state(flat)
    shards = [[[0], [1]], [[2], [3]], [[4], [5]], [[6, 7]]]  # the last shard's two completions fit one row
    layout, slotted, slots = packed(prompts, batch, np.zeros(8, np.int32), shards, rows=2)
    place = lambda tree, axis=0: jax.tree.map(  # noqa: E731
        lambda a: parallel.batch_array(np.asarray(a), mesh, axis=int(np.ndim(a) == 3) * axis), tree)
    placed, layout, slotted = parallel.shard_prompts(prompts, mesh), place(layout, 1), place(slotted)
    grads, metrics, logp, embedded = trainer_gradients(
        graphdef, sharded, placed, layout, slotted, totals, own, mesh, jax.tree.map(lambda a: a.sharding, sharded))
    ref_slots, mask_slots = in_slots(ref_logp, slots), in_slots(mask, slots)
    assert max_diff(grads, ref_grads) <= 1e-5 and close(metrics, ref_metrics, 1e-5)
    assert close(np.where(mask_slots, logp, 0), np.where(mask_slots, ref_slots, 0), 1e-5)
    again = trainer_logprobs(graphdef, sharded, embedded, layout, slotted, mesh)
    assert close(np.where(mask_slots, again, 0), np.where(mask_slots, ref_slots, 0), 1e-5)


def test_gradient_temporaries_do_not_scale_with_tokens_times_vocab(monkeypatch):
    """vocab 16384, T = 64, N = 4: the compiled gradient program's temporaries with chunks of 8 tokens are several
    times smaller than with [N, T, vocab] logits, and smaller than one such float32 array (16 MiB here). (What is
    left grows with T like the tiny model's attention, the same for any vocabulary.)"""
    monkeypatch.setattr(forward, "LOGPROB_CHUNK", 8)
    vocab, length = 16384, 64
    graphdef, params = tiny_model(tied=True, vocab=vocab)
    prompts, batch = batch_for(nnx.merge(graphdef, params).config, prompts=2, length=length)
    totals = grpo.totals(batch.mask)
    embedded = jax.eval_shape(functools.partial(programs.embed, graphdef, chunks=1, mesh=None), params, prompts)
    layout, slotted, _ = packed(prompts, batch, np.repeat(np.arange(2), 2), [[[0], [1], [2], [3]]], rows=4,
                                per_row=1)
    chunked = jax.jit(functools.partial(programs.gradients, graphdef, loss_cfg=LOSS, temperature=TEMPERATURE,
                                        widths=None, param_shardings=None, mesh=None)).lower(
        params, embedded, layout, slotted, totals, jnp.asarray(False), jnp.int32(0)).compile()
    full = jax.jit(jax.grad(reference_loss, has_aux=True), static_argnums=(1, 5, 6)).lower(
        params, graphdef, prompts, batch, totals, 2, TEMPERATURE).compile()
    sizes = {name: program.memory_analysis().temp_size_in_bytes for name, program in
             (("chunked", chunked), ("full", full))}
    print(f"gradient program temporaries (N=4, T={length}, V={vocab}): chunked (C=8) "
          f"{sizes['chunked'] / 2**20:.2f} MiB, full logits {sizes['full'] / 2**20:.2f} MiB")
    logits_bytes = 4 * length * vocab * 4
    assert sizes["full"] >= 3 * logits_bytes  # the full program holds several [N, T, V] arrays
    assert sizes["chunked"] * 4 <= sizes["full"] and sizes["chunked"] < logits_bytes, sizes

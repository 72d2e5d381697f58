"""The jitted programs of a training step, built once: ``StepPrograms``. The trainer, the supervised stage, ``plan``
(which compiles them ahead of time for a TPU slice from abstract arguments) and ``bench`` all run these objects,
so what is planned and measured is what trains.

The pure functions they are built from:

* ``embed`` -- a mini-batch's prompts through the vision tower and token embeddings, once for all its
  micro-batches, in chunks (``lax.map``) so the tower's memory is one chunk's;
* ``gradients`` -- one micro-batch of packed completions (``rl/packing.py``) on the embedded prompts: the gradient
  of eq. 2-5 of ``grpo.py`` and the cotangent of the embeddings, at a completion width bucket (``at_width``);
* ``embed_gradients`` -- the mini-batch's summed embedding cotangent back through ``embed`` (chain rule split at
  the prompt embeddings: the vision tower runs forward and backward once per prompt);
* ``logprobs`` -- old / reference log-probabilities of a micro-batch, outside the gradient;
* ``sft_gradients`` -- eq. 6 (the supervised stage's NLL) of one micro-batch, one target per prompt;
* the optimizer update (``policy.apply_updates``), the rollout cast (``policy.cast_floats``), gradient sums.

The samplers' programs (``generate.static.prefill`` / ``decode``, ``generate.continuous``) are defined once in
``generate/``, with the static arguments ``generate.sampler.Sampler`` passes; ``plan`` compiles those.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from medix_jax import parallel
from medix_jax.generate.sampling import SamplingConfig, compile_count
from medix_jax.models.moe import router_terms
from medix_jax.models.qwen_vl.model import ModelInputs
from medix_jax.rl import grpo, packing
from medix_jax.rl.forward import (
    Completions,
    activations,
    completion_hidden,
    completion_logprobs,
    packed_hidden,
    unpack,
)
from medix_jax.rl.policy import cast_floats, optimizer_programs, rollout_dtype


def policy_loss(params, embedded, graphdef, layout: packing.Layout, batch: Completions, totals: grpo.Totals, own_old,
                loss_cfg: grpo.LossConfig, temperature: float):
    """(eq. 2-5 of ``grpo.py`` plus the experts' balance term, (metrics, per-token log-probabilities)) of the packed
    micro-batch ``batch`` / ``layout`` over the embedded prompts."""
    model = nnx.merge(graphdef, params)
    hidden, targets, router = packed_hidden(model, embedded, layout)
    logp, token_entropy = completion_logprobs(model, hidden, targets, temperature)
    assert token_entropy is not None  # with_entropy
    logp, token_entropy = unpack(logp, layout), unpack(token_entropy, layout)
    old = jnp.where(own_old, jax.lax.stop_gradient(logp), batch.old_logprobs)
    loss, metrics = grpo.policy_loss(logp, old, batch.advantages, batch.mask, loss_cfg, totals, batch.ref_logprobs,
                                     batch.sampler_logprobs)
    metrics["entropy"] = grpo.entropy(token_entropy, batch.mask, totals)
    balance, routing = router_terms(router, model.config.text.router_aux_loss_coef, batch.mask.sum() / totals.tokens)
    loss = loss + balance
    metrics.update(routing, loss=loss)
    return loss, (metrics, jax.lax.stop_gradient(logp))


COMPLETION_BUCKETS = 4  # completion widths of the update: max_new_tokens / 2^k, k < 4 (``completion_widths``)
MIN_WIDTH = 64  # no narrower bucket than this (below it, trimming saves less than a program costs)


def completion_widths(max_new_tokens: int) -> tuple[int, ...]:
    """The widths (ascending) a micro-batch's completions are trimmed to: ``max_new_tokens / 2^k`` for k <
    ``COMPLETION_BUCKETS``, rounded up to a multiple of 8, none under ``MIN_WIDTH``; e.g. 4096 -> (512, 1024, 2048,
    4096)."""
    halves = {-(-max_new_tokens // (8 * 2**k)) * 8 for k in range(1, COMPLETION_BUCKETS)}  # ceil(n / 2^k / 8) * 8
    return tuple(sorted({max_new_tokens} | {w for w in halves if MIN_WIDTH <= w < max_new_tokens}))


def at_width(widths: tuple[int, ...] | None, index, run, batch: Completions, layout: packing.Layout, *args):
    """``run(batch, layout, *args)`` with both trimmed to completion width ``widths[index]`` (their last
    ``T - width`` columns dropped: every row's tokens and every sample's completion lie before them), its ``[N,
    w]`` last output padded back to the batch's width T (``widths`` None: T itself). One program holds a branch
    per width (``lax.switch``) and only the chosen one runs: the update's work follows the micro-batch's fullest
    row without a program per length."""
    t = batch.tokens.shape[1]
    widths = widths or (t,)

    def branch(w):
        def trimmed(batch, layout, *args):
            cut = lambda a: None if a is None else a[..., :a.shape[-1] - (t - w)]  # noqa: E731
            out = run(batch._replace(tokens=cut(batch.tokens), mask=cut(batch.mask),
                                     old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs),
                                     sampler_logprobs=cut(batch.sampler_logprobs)),
                      packing.Layout(*map(cut, layout)), *args)
            return (*out[:-1], jnp.pad(out[-1], ((0, 0), (0, t - w))))
        return trimmed

    if len(widths) == 1:
        return branch(widths[0])(batch, layout, *args)
    return jax.lax.switch(index, [branch(w) for w in widths], batch, layout, *args)


def _chunks(a, axis: int, chunks: int, split: int):
    """``[.., M, ..]`` (``M`` split over ``split`` batch shards at ``axis``) -> ``[chunks, .., M / chunks, ..]``: chunk
    c holds the c-th part of every shard's rows, so each chunk is split over the shards as ``M`` is and stays on
    its chips (no data moves)."""
    shape, m = a.shape, a.shape[axis] // (split * chunks)
    a = jnp.moveaxis(a.reshape(shape[:axis] + (split, chunks, m) + shape[axis + 1:]), axis + 1, 0)
    a = a.reshape((chunks,) + shape[:axis] + (split * m,) + shape[axis + 1:])
    return parallel.constrain(a, tuple("batch" if i == axis + 1 else None for i in range(a.ndim)))


def _unchunk(a, axis: int, split: int):
    """The inverse of ``_chunks``: ``[chunks, .., M / chunks, ..]`` -> ``[.., M, ..]``."""
    chunks, shape = a.shape[0], a.shape[1:]
    m = shape[axis] // split
    a = jnp.moveaxis(a.reshape((chunks,) + shape[:axis] + (split, m) + shape[axis + 1:]), 0, axis + 1)
    a = a.reshape(shape[:axis] + (split * chunks * m,) + shape[axis + 1:])
    return parallel.constrain(a, tuple("batch" if i == axis else None for i in range(a.ndim)))


def _prompt_chunks(prompts: ModelInputs, chunks: int, split: int) -> ModelInputs:
    """``prompts`` cut into ``chunks`` (``_chunks``; positions carry the batch at axis 1)."""
    cut = lambda axis: lambda a: _chunks(a, axis, chunks, split)  # noqa: E731
    vision = None if prompts.vision is None else jax.tree.map(cut(0), prompts.vision)
    return ModelInputs(cut(0)(prompts.input_ids), cut(0)(prompts.attention_mask), cut(1)(prompts.positions),
                       cut(0)(prompts.rope_delta), vision)


def _per_embedding(fn, embedded):
    """``fn(array, batch axis)`` of each part of ``embed``'s output: embeddings ``[M, P, h]`` (axis 0), DeepStack
    features ``[n, M, P, h]`` (axis 1) or None."""
    return tuple(None if a is None else fn(a, axis) for a, axis in zip(embedded, (0, 1), strict=True))


def embed(graphdef, params, prompts, *, chunks: int, mesh):
    """``model.embed(prompts)``: a mini-batch's prompts, embedded once for all its micro-batches (vision tower,
    token embeddings; DeepStack features or None), ``chunks`` chunks of prompts one after the other (``lax.map``;
    the trainer's micro-batch count): the vision tower's memory is one chunk's."""
    split = parallel.batch_split(mesh)
    with activations(mesh):
        out = jax.lax.map(lambda chunk: nnx.merge(graphdef, jax.tree.map(lambda a: a, params)).embed(chunk),
                          _prompt_chunks(prompts, chunks, split))  # fresh Variables at the loop's trace level
        return _per_embedding(lambda a, axis: _unchunk(a, axis, split), out)


def gradients(graphdef, params, embedded, layout, batch, totals, own_old, width, *, loss_cfg, temperature, widths,
              param_shardings, mesh):
    """(gradients, the cotangent of ``embedded``, metrics, per-token log-probabilities) of one micro-batch:
    completions ``batch`` packed into rows as ``layout`` says (``forward.packed_hidden``), over the prompt
    embeddings ``embedded`` (``embed``), an input: the vision tower's share of the gradient is ``embed_gradients``,
    once per mini-batch. Computed at completion width ``widths[width]`` (``at_width``; None: the batch's own).
    ``own_old`` (a boolean array): the old log-probabilities are this forward's own -- exact for a mini-batch the
    parameters have not moved on since sampling, where a second program's bf16 forward would differ in the last
    bits. With ``param_shardings`` the gradients keep the parameters' shardings and the log-probabilities are split
    over the mesh's batch axes; with ``mesh`` the model's activations are pinned to it."""
    def run(batch, layout, params, embedded, totals, own_old):
        (grads, d_embedded), (metrics, logp) = jax.grad(policy_loss, argnums=(0, 1), has_aux=True)(
            params, embedded, graphdef, layout, batch, totals, own_old, loss_cfg, temperature)
        return grads, d_embedded, metrics, logp

    with activations(mesh):
        grads, d_embedded, metrics, logp = at_width(widths, width, run, batch, layout, params, embedded, totals,
                                                    own_old)
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        logp = split_batch(logp, mesh)
    return grads, d_embedded, metrics, logp


def embed_gradients(graphdef, params, prompts, d_embedded, grads, *, chunks: int, param_shardings, mesh):
    """``grads`` plus the gradient through ``embed`` of the mini-batch's summed embedding cotangent ``d_embedded``
    (``gradients``): the chain rule, split at the prompt embeddings, so the vision tower runs forward and backward
    once per prompt however its G completions are spread over micro-batches; chunk by chunk (``lax.scan``,
    ``chunks`` as in ``embed``), so its activations are one chunk's."""
    split = parallel.batch_split(mesh)

    def body(total, chunk):
        prompts, d_embedded = chunk
        _, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p).embed(prompts), params)
        total = jax.tree.map(jnp.add, total, pullback(d_embedded)[0])
        return (total if param_shardings is None else jax.lax.with_sharding_constraint(total, param_shardings)), None

    with activations(mesh):
        cotangents = _per_embedding(lambda a, axis: _chunks(a, axis, chunks, split), d_embedded)
        total, _ = jax.lax.scan(body, grads, (_prompt_chunks(prompts, chunks, split), cotangents))
    return total


def split_batch(a, mesh):
    """``a`` split over the mesh's batch axes along its first axis."""
    return jax.lax.with_sharding_constraint(
        a, NamedSharding(mesh, parallel.logical_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)))


def logprobs(graphdef, params, embedded, layout, batch: Completions, width, *, temperature, widths, mesh):
    """Per-token log-probabilities ``[N, T]`` of the completions ``batch`` packed as ``layout`` says, under
    ``params`` (old or reference policy; ``embedded`` its ``embed`` of the prompts), at completion width
    ``widths[width]`` (``at_width``; None: the batch's own), split over the batch axes like the completions."""
    def run(batch, layout, params, embedded):
        model = nnx.merge(graphdef, params)
        hidden, targets, _ = packed_hidden(model, embedded, layout)
        return (unpack(completion_logprobs(model, hidden, targets, temperature, with_entropy=False)[0], layout),)

    with activations(mesh):
        (logp,) = at_width(widths, width, run, batch, layout, params, embedded)
    return split_batch(logp, mesh)


def sft_gradients(graphdef, params, prompts, tokens, mask, totals: grpo.Totals, *, param_shardings, mesh):
    """(gradients, metrics) of eq. 6 for one micro-batch: prompts ``ModelInputs`` ``[B, P]``, target completions
    ``tokens``/``mask`` ``[B, T]`` (one per prompt); ``totals`` the mini-batch's denominators. Gradients keep
    ``param_shardings``; activations are pinned to ``mesh`` (as the GRPO gradient's)."""
    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        hidden, router = completion_hidden(model, prompts, tokens, mask)
        logp, entropy = completion_logprobs(model, hidden, tokens, 1.0)
        loss = grpo.sft_loss(logp, mask, totals)
        balance, routing = router_terms(router, model.config.text.router_aux_loss_coef, mask.sum() / totals.tokens)
        return loss + balance, {"sft_loss": loss, "entropy": grpo.entropy(entropy, mask, totals), **routing}

    with activations(mesh):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    return grads, metrics


def add_trees(total, more):
    return jax.tree.map(jnp.add, total, more)


@jax.jit
def mismatch(sampler, trainer, mask):
    """(sum, count, max) of ``|sampler - trainer|`` over completion tokens."""
    diff = jnp.where(mask, jnp.abs(sampler - trainer), 0.0)
    return diff.sum(), mask.sum(), diff.max()


class StepPrograms:
    """Every jitted program of a training step, built once from its static settings: the model (``graphdef``), the
    parameters' shardings (``params``: arrays or abstract ``ShapeDtypeStruct``s carrying them), the ``mesh``, the
    micro-batch count (embedding chunks), the loss, the rollout (temperature, completion widths, weights dtype) and
    the optimizer ``tx``; ``widths``: the completion width buckets (default ``completion_widths``; a single width
computes every micro-batch at full width). Programs take arrays only:

    * ``embed(params, prompts)``; ``gradients(params, embedded, layout, batch, totals, own_old, width)``;
      ``embed_gradients(params, prompts, d_embedded, grads)`` (``grads`` donated);
      ``logprobs(params, embedded, layout, batch, width)``; ``sft_gradients(params, prompts, tokens, mask, totals)``;
    * ``accumulate(total, grads)`` (keeps the parameters' shardings) and ``add(total, more)``, ``total`` donated;
    * ``init(params)`` and ``apply(params, opt_state, grads)`` of ``tx`` (``policy.optimizer_programs``);
    * ``cast(params)``: the sampler's copy of the parameters -- in ``rollout.weights_dtype`` and resharded to
      ``rollout_shardings`` on ``rollout_mesh`` (``rollout.mesh``) -- or None when the sampler runs the parameters.

    ``compile_count`` counts what they compiled so far (with ``also``: other programs, e.g. another optimizer's).
    """

    def __init__(self, graphdef, params, mesh, *, micro_batches: int, loss: grpo.LossConfig, rollout: SamplingConfig,
                 tx: optax.GradientTransformation, widths: tuple[int, ...] | None = None):
        self.graphdef, self.mesh, self.rollout = graphdef, mesh, rollout
        self.param_shardings = jax.tree.map(lambda a: a.sharding, params)
        self.abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                            params)
        self.widths = widths or completion_widths(rollout.max_new_tokens)
        self.cast_dtype = rollout_dtype(params, rollout)
        shard = dict(param_shardings=self.param_shardings, mesh=mesh)
        self.embed = jax.jit(functools.partial(embed, graphdef, chunks=micro_batches, mesh=mesh))
        self.gradients = jax.jit(functools.partial(gradients, graphdef, loss_cfg=loss,
                                                   temperature=rollout.temperature, widths=self.widths, **shard))
        self.embed_gradients = jax.jit(functools.partial(embed_gradients, graphdef, chunks=micro_batches, **shard),
                                       donate_argnums=(3,))
        self.logprobs = jax.jit(functools.partial(logprobs, graphdef, temperature=rollout.temperature,
                                                  widths=self.widths, mesh=mesh))
        self.sft_gradients = jax.jit(functools.partial(sft_gradients, graphdef, **shard))
        self.accumulate = jax.jit(add_trees, donate_argnums=(0,), out_shardings=self.param_shardings)
        self.add = jax.jit(add_trees, donate_argnums=(0,))
        self.init, self.apply = optimizer_programs(tx, params, mesh)
        self.rollout_mesh = parallel.rollout_mesh(
            mesh, None if rollout.mesh is None else dataclasses.asdict(rollout.mesh))
        self.rollout_shardings = self.param_shardings if rollout.mesh is None else parallel.rollout_shardings(
            params, self.rollout_mesh)
        copy = self.cast_dtype is not None or rollout.mesh is not None
        self.cast = jax.jit(functools.partial(cast_floats, dtype=self.cast_dtype),
                            out_shardings=self.rollout_shardings) if copy else None
        self.also: list = []  # further jitted programs of the run (rl/sft.py's optimizer), counted too

    def optimizer(self, tx: optax.GradientTransformation):
        """(jitted init, jitted apply) of another optimizer over the same parameters, counted in
        ``compile_count``."""
        init, apply = optimizer_programs(tx, self.abstract_params, self.mesh)
        self.also += [init, apply]
        return init, apply

    @property
    def compile_count(self) -> int:
        jitted = [self.embed, self.gradients, self.embed_gradients, self.logprobs, self.sft_gradients,
                  self.accumulate, self.add, self.apply, *self.also, *([self.cast] if self.cast is not None else [])]
        return compile_count(*jitted)

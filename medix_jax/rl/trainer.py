"""The GRPO training loop: prompts -> sampler (G each) -> text -> reward pool -> advantages -> jit update steps.

One step (``Trainer.step``):

1. **Collect.** Draw ``rollout_batches`` prompt batches, sample G completions per prompt with the in-JAX sampler
   (``rl/sampler.py``), decode them, score them on the host (``rewards/pool.py``; batch k is scored while batch k+1
   is sampled) and compute group advantages (``grpo.py`` eq. 1). With ``dynamic_filtering`` (DAPO, the
   reference's ``online_filtering``) a group is kept only if the mean of its valid composite rewards lies strictly
   between ``filter_low`` and ``filter_high`` (``filter_rule: mean_band``; ``distinct`` keeps groups whose rewards
   are not all equal), and more prompt batches are drawn until the step has its prompts. ``max_tries`` counts the
   prompt batches (``data.batch_size`` prompts each, the reference's ``mini_rollout_batch_size``) drawn in the
   step, the first ones included (the reference's ``max_try_make_batch``); where the reference then raises, a
   shortfall here is filled with masked copies (static shapes; they contribute nothing), reported on stdout and
   in ``groups_kept``. With ``rollout.weights_dtype`` (e.g. ``bfloat16``: decode streams half the bytes) the
   sampler runs a copy of the parameters cast to that dtype, in the parameters' shardings, made on first use after
   every change of the parameters (rollouts always come from the current policy) and released when the update
   begins (its memory goes to the backward pass); the gradient, the old and reference log-probabilities and the
   optimizer use the stored parameters, and the old log-probabilities are then recomputed by default (below).
2. **Update.** ``ppo_epochs`` passes over ``mini_batches`` mini-batches; each is one AdamW update (``optim``) whose
   gradient is accumulated over ``micro_batches`` micro-batches (``grpo.Totals`` keeps the mini-batch denominators,
   so accumulation is exact). Mini-batch k holds the groups m, m + n, m + 2n, ... of the step for its micro-batch
   strides m (n = mini x micro). Its prompts are embedded once (``_embed``: vision tower and token embeddings); its
   *samples* are packed several to a row -- each its prompt's real tokens, then its completion, told apart by
   segment ids and keeping its own M-RoPE positions (``rl/packing.py``, EasyR1's ``padding_free``) -- within each
   batch shard, and the rows cut into micro-batches of as many rows as a micro-batch had samples
   (``micro_batches``): fewer micro-batches where samples are short, each computed only up to its fullest row,
   rounded up to a width bucket (``completion_widths``; one program, a branch per width: ``_at_width``). A row's
   prompt tokens are gathered from their prompts' embeddings on their own chip (``parallel.take_rows``), and a
   micro-batch's gradient comes with the cotangent of those embeddings; the mini-batch's summed cotangent then goes
   back through the embedding once (``_embed_gradients``): the vision tower runs once per prompt, however its G
   samples are spread over micro-batches. The policy's log-probabilities come from one forward pass over the packed
   rows (``packed_hidden``). The vocabulary projection, log-softmax and entropy run chunk by chunk along the completion
   (``completion_logprobs``, rematerialised in the backward pass), so no program holds ``[N, T, vocab]`` logits. Old
   log-probabilities are recomputed by the trainer's own forward before the update (as the reference always does)
   whenever the compute dtype is not float32 -- the sampler's KV-cache decode in bf16 differs from the full forward
   by up to ~1e-2 per token, which alone would clip GSPO's 3e-4 band -- or the sampler ran a copy of the weights in
   another dtype, and the sampler's otherwise (``recompute_old_logprobs`` overrides). ``logprob_mismatch_{mean,max}``
   logs the sampler-vs-trainer |delta log p| over completion tokens every step. The reference policy exists only when
   ``loss.kl_coef > 0``: the initial weights, or after a supervised stage the policy at its end (``set_reference``,
   restored on resume from the checkpoint of that step, which is always kept); its log-probabilities are computed
   once per step, outside the gradient, like the old ones. A mini-batch with nothing to learn from (only masked
   filler, or all advantages 0 without a KL term) makes no optimizer update: AdamW would only decay the weights.
   Gradients and their accumulator keep the parameters' shardings.

Randomness is ``fold_in(seed, step)``, so a run resumed from a checkpoint (parameters, optimizer, step, data
iterator state) repeats exactly what the uninterrupted run would have done.

**Several processes** (``jax.distributed``). Every process runs this loop in step with the others. Each one holds
its own rows of every prompt batch (``data.rows``), samples them as part of one global batch, scores them in its
own reward pool and keeps its own groups. An update's global micro-batch is every process's micro-batch m.
Strided micro-batches make this the same computation as one process running the whole batch, given two things:
each process's rows are one block (GPU nodes, CPUs), and ``mini_batches`` divides them. Otherwise a mini-batch
is another, equally random, subset of the step. (Samples are packed into micro-batches within each batch shard, so
the micro-batches differ from one process's, not their sum.) DAPO filtering fills each process's share of the step
separately. Step metrics are combined across processes (``_combine``): counts add up, and rates and means are
averaged over the processes. A step in which a large share of the samples has no judge reward prints one warning
line (``rewards.pool.judge_warning``: the counts by reason and the judge's URL) on process 0.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medix_jax import parallel
from medix_jax.data.pipeline import PromptBatch, collate, sizes
from medix_jax.models.moe import RouterStats, router_terms
from medix_jax.models.qwen_vl.language import Segments
from medix_jax.models.qwen_vl.model import ModelInputs, QwenVL
from medix_jax.rewards.pool import judge_warning
from medix_jax.rl import grpo, packing
from medix_jax.rl.packing import width_index
from medix_jax.data.buckets import Buckets
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SampleOutput, SamplingConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6  # REFERENCE §1: AdamW 1e-6 constant, no warm-up, wd 0.01, clip 1.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    warmup_steps: int = 0  # optimizer updates
    schedule: Literal["constant", "cosine"] = "constant"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 200  # GRPO steps (after the ``sft`` stage's, if any; 0: supervised only)
    loss: grpo.LossConfig = dataclasses.field(default_factory=grpo.LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    rollout_batches: int = 1  # prompt batches (data.batch_size each) per step; rewards of one overlap the next
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer updates per epoch (reference: 512 prompts / 128 = 4)
    micro_batches: int = 1  # gradient accumulation inside each update
    recompute_old_logprobs: bool | None = None  # None: when model.dtype is not float32 (module docstring)
    dynamic_filtering: bool = False  # DAPO online filtering (module docstring)
    filter_rule: Literal["mean_band", "distinct"] = "mean_band"  # reference: filter_low < mean reward < filter_high
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_tries: int = 20  # prompt batches drawn per step at most when filtering, the first ones included
    max_missing_steps: int = 3  # stop (after a save) when every reward is missing this many steps in a row; 0: never
    save_every: int = 50  # checkpoint every this many steps (and at the end, and on SIGTERM / SIGINT)
    keep_checkpoints: int = 3
    export_hf: bool = True  # write an HF directory (run_dir/hf) at the end

    def __post_init__(self):
        if self.steps < 0 or min(self.rollout_batches, self.ppo_epochs, self.mini_batches, self.micro_batches,
               self.max_tries, self.save_every, self.keep_checkpoints) < 1 or self.max_missing_steps < 0:
            raise ValueError(f"train: counts must be >= 1 ({self})")
        if not 0 <= self.filter_low < self.filter_high <= 1:
            raise ValueError(f"train: need 0 <= filter_low < filter_high <= 1, got {self.filter_low}, "
                             f"{self.filter_high}")


def make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(total_updates, cfg.warmup_steps + 1))
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                   optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay))


class Group(NamedTuple):
    """One prompt's G rollouts, on the host."""

    example: dict  # the unpadded prompt (pipeline.Preprocess output)
    tokens: np.ndarray  # [G, T] int32
    mask: np.ndarray  # [G, T] bool, completion tokens of valid samples
    logprobs: np.ndarray  # [G, T] float32, the sampler's
    advantages: np.ndarray  # [G] float32
    rewards: np.ndarray  # [G] composite


class Completions(NamedTuple):
    tokens: jax.Array  # [N, T]
    mask: jax.Array  # [N, T]
    old_logprobs: jax.Array  # [N, T]
    advantages: jax.Array  # [N]
    ref_logprobs: jax.Array | None = None  # [N, T], when loss.kl_coef > 0


LOGPROB_CHUNK = 512  # completion tokens per step of the log-probability scan (``completion_logprobs``)


def completion_hidden(model: QwenVL, prompts: ModelInputs, tokens: jax.Array, mask: jax.Array, rows=None,
                      embedded=None) -> tuple[jax.Array, RouterStats | None]:
    """(final-norm hidden states ``[N, T, hidden]`` that predict completion tokens ``[N, T]`` -- state t predicts
    token t --, the mixture of experts' routing statistics or None). Completion n continues prompt ``rows[n]`` of
    the left-padded prompts ``[B, P]``, an index within its batch shard (``parallel.take_rows``; None: prompt n);
    ``embedded`` is ``model.embed(prompts)``, computed here when None.

    Positions continue each prompt's M-RoPE positions exactly as the sampler does (``num_prompt_tokens +
    rope_delta + t`` on all three axes); a prompt (with its images) is embedded once, whatever number of
    completions continue it.
    """
    p, t = prompts.input_ids.shape[1], tokens.shape[1]
    take = lambda a, axis=0: a if rows is None else parallel.take_rows(a, rows, axis)  # noqa: E731
    prompt_embeds, deepstack = model.embed(prompts) if embedded is None else embedded
    embeds = jnp.concatenate([take(prompt_embeds), model.model.embed_tokens(tokens)], axis=1)
    start = take(prompts.attention_mask.sum(1).astype(jnp.int32) + prompts.rope_delta)
    completion_positions = jnp.broadcast_to((start[:, None] + jnp.arange(t))[None], (3, start.shape[0], t))
    positions = jnp.concatenate([take(prompts.positions, 1), completion_positions], axis=2)
    segments = jnp.concatenate([take(prompts.attention_mask), mask], axis=1).astype(jnp.int32)
    deepstack = None if deepstack is None else take(deepstack, 1)
    hidden, _, router = model.decode(embeds, positions, Segments(segments, segments), deepstack=deepstack)
    return hidden[:, p - 1: p + t - 1], router


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / T)[token]`` -- what the sampler reports (greedy: T = 1)."""
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]


def completion_logprobs(model: QwenVL, hidden: jax.Array, tokens: jax.Array, temperature: float,
                        with_entropy: bool = True, chunk: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """(``token_logprobs`` ``[N, T]``, per-token entropies of ``softmax(logits / T)`` ``[N, T]`` or None) of
    ``hidden`` ``[N, T, hidden]`` (``completion_hidden``), without ever holding ``[N, T, vocab]`` logits.

    A ``lax.scan`` over chunks of ``chunk`` tokens (default ``LOGPROB_CHUNK``; T is padded to a multiple and the
    outputs sliced back) computes each chunk's float32 logits with ``model.logits``, and its body is
    ``jax.checkpoint``-ed: the backward pass recomputes a chunk's logits instead of storing them, so the largest
    temporary is ``[N, chunk, vocab]``. The entropy is a metric: no gradient flows through it.
    """
    n, t = tokens.shape
    c = min(chunk or LOGPROB_CHUNK, t)
    steps = -(-t // c)
    pad = steps * c - t
    temp = temperature if temperature > 0 else 1.0

    @functools.partial(jax.checkpoint, prevent_cse=False)  # the scan already keeps the recomputation apart
    def body(carry, xs):
        h, tok = xs
        logits = parallel.constrain(model.logits(h), ("batch", None, "act_vocab"))
        logp = token_logprobs(logits, tok, temperature)
        ent = grpo.token_entropy(jax.lax.stop_gradient(logits) / temp) if with_entropy else None
        return carry, (logp, ent)

    split = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)).reshape(  # noqa: E731
        n, steps, c, *a.shape[2:]).swapaxes(0, 1)
    _, (logp, ent) = jax.lax.scan(body, None, (split(hidden), split(tokens)))
    join = lambda a: None if a is None else a.swapaxes(0, 1).reshape(n, steps * c)[:, :t]  # noqa: E731
    return join(logp), join(ent)


def _activations(mesh):
    """``parallel.activation_sharding(mesh)`` (the model pins its activations to the mesh), or nothing (an outer
    context, if any, stays in force) without a mesh."""
    return contextlib.nullcontext() if mesh is None else parallel.activation_sharding(mesh)


def packed_hidden(model: QwenVL, embedded, layout: packing.Layout) -> tuple[jax.Array, jax.Array,
                                                                             RouterStats | None]:
    """(final-norm hidden states ``[R, T, hidden]`` of each packed row's completion tokens one after the other --
    state (r, c) predicts token (r, c) --, those tokens ``[R, T]``, the routing statistics or None) of the rows
    ``layout`` (``packing.Layout``) over the embedded prompts ``embedded`` (``_embed``: ``[M, P, hidden]`` and
    DeepStack features or None). A prompt token is gathered from its prompt's embedding on its own chip
    (``parallel.take_rows``), a completion token embedded from its id; each sample keeps its own M-RoPE positions
    and attends only within its segment, so it sees exactly what it sees alone (``completion_hidden``)."""
    prompt_embeds, deepstack = embedded
    m, p = prompt_embeds.shape[:2]
    r, length = layout.ids.shape
    source = jnp.maximum(layout.source, 0).reshape(-1)
    from_prompt = (layout.source >= 0)[..., None]

    def gather(a, axis):  # [.., M, P, ..] at axis -> [.., R, L, ..]: each position's prompt token
        flat = a.reshape(a.shape[:axis] + (m * p,) + a.shape[axis + 2:])
        out = parallel.take_rows(flat, source, axis)
        return out.reshape(a.shape[:axis] + (r, length) + a.shape[axis + 2:])

    embeds = jnp.where(from_prompt, gather(prompt_embeds, 0), model.model.embed_tokens(layout.ids))
    deepstack = None if deepstack is None else jnp.where(from_prompt[None], gather(deepstack, 1), 0)
    segments = Segments(layout.segments, layout.segments)
    hidden, _, router = model.decode(embeds, layout.positions, segments, deepstack=deepstack)
    hidden = jnp.take_along_axis(hidden, layout.predict[..., None], axis=1)
    return hidden, jnp.take_along_axis(layout.ids, layout.predict + 1, axis=1), router


def unpack(a: jax.Array, layout: packing.Layout) -> jax.Array:
    """Per-token values of the packed rows ``[R, T]`` (``packed_hidden``'s order) -> per sample slot ``[S, T]``."""
    index = layout.slot_row * a.shape[1] + layout.slot_col
    return parallel.take_rows(a.reshape(-1), index.reshape(-1)).reshape(index.shape)


def _loss(params, embedded, graphdef, layout: packing.Layout, batch: Completions, totals: grpo.Totals, own_old,
          loss_cfg: grpo.LossConfig, temperature: float):
    model = nnx.merge(graphdef, params)
    hidden, targets, router = packed_hidden(model, embedded, layout)
    logp, token_entropy = (unpack(a, layout) for a in completion_logprobs(model, hidden, targets, temperature))
    old = jnp.where(own_old, jax.lax.stop_gradient(logp), batch.old_logprobs)
    loss, metrics = grpo.policy_loss(logp, old, batch.advantages, batch.mask, loss_cfg, totals, batch.ref_logprobs)
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


def _at_width(widths: tuple[int, ...] | None, index, run, batch: Completions, layout: packing.Layout, *args):
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
                                     old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs)),
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
    return ModelInputs(*map(cut(0), prompts[:2]), cut(1)(prompts.positions), cut(0)(prompts.rope_delta), vision)


def _per_embedding(fn, embedded):
    """``fn(array, batch axis)`` of each part of ``_embed``'s output: embeddings ``[M, P, h]`` (axis 0), DeepStack
    features ``[n, M, P, h]`` (axis 1) or None."""
    return tuple(None if a is None else fn(a, axis) for a, axis in zip(embedded, (0, 1), strict=True))


def _embed(graphdef, params, prompts, chunks: int, mesh):
    """``model.embed(prompts)``: a mini-batch's prompts, embedded once for all its micro-batches (vision tower,
    token embeddings; DeepStack features or None), ``chunks`` chunks of prompts one after the other (``lax.map``;
    the trainer's micro-batch count): the vision tower's memory is one chunk's."""
    split = parallel.batch_split(mesh)
    with _activations(mesh):
        out = jax.lax.map(lambda chunk: nnx.merge(graphdef, jax.tree.map(lambda a: a, params)).embed(chunk),
                          _prompt_chunks(prompts, chunks, split))  # fresh Variables at the loop's trace level
        return _per_embedding(lambda a, axis: _unchunk(a, axis, split), out)


def _gradients(graphdef, params, embedded, layout, batch, totals, own_old, loss_cfg, temperature, widths=None,
               width=0, param_shardings=None, mesh=None):
    """(gradients, the cotangent of ``embedded``, metrics, per-token log-probabilities) of one micro-batch:
    completions ``batch`` packed into rows as ``layout`` says (``packed_hidden``), over the prompt embeddings
    ``embedded`` (``_embed``), an input: the vision tower's share of the gradient is ``_embed_gradients``, once per
    mini-batch. Computed at completion width ``widths[width]`` (``_at_width``; None: the batch's own). ``own_old``
    (a boolean array): the old log-probabilities are this forward's own -- exact for a mini-batch the parameters
    have not moved on since sampling, where a second program's bf16 forward would differ in the last bits. With
    ``param_shardings`` the gradients keep the parameters' shardings and the log-probabilities are split over the
    mesh's batch axes; with ``mesh`` the model's activations are pinned to it (``parallel.activation_sharding``)."""
    def run(batch, layout, params, embedded, totals, own_old):
        (grads, d_embedded), (metrics, logp) = jax.grad(_loss, argnums=(0, 1), has_aux=True)(
            params, embedded, graphdef, layout, batch, totals, own_old, loss_cfg, temperature)
        return grads, d_embedded, metrics, logp

    with _activations(mesh):
        grads, d_embedded, metrics, logp = _at_width(widths, width, run, batch, layout, params, embedded, totals,
                                                     own_old)
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        logp = _split_batch(logp, mesh)
    return grads, d_embedded, metrics, logp


def _embed_gradients(graphdef, params, prompts, d_embedded, grads, chunks: int, param_shardings=None, mesh=None):
    """``grads`` plus the gradient through ``_embed`` of the mini-batch's summed embedding cotangent
    ``d_embedded`` (``_gradients``): the chain rule, split at the prompt embeddings, so the vision tower runs
    forward and backward once per prompt however its G completions are spread over micro-batches; chunk by chunk
    (``lax.scan``, ``chunks`` as in ``_embed``), so its activations are one chunk's."""
    split = parallel.batch_split(mesh)

    def body(total, chunk):
        prompts, d_embedded = chunk
        _, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p).embed(prompts), params)
        total = jax.tree.map(jnp.add, total, pullback(d_embedded)[0])
        return (total if param_shardings is None else jax.lax.with_sharding_constraint(total, param_shardings)), None

    with _activations(mesh):
        cotangents = _per_embedding(lambda a, axis: _chunks(a, axis, chunks, split), d_embedded)
        total, _ = jax.lax.scan(body, grads, (_prompt_chunks(prompts, chunks, split), cotangents))
    return total


def _split_batch(a, mesh):
    return jax.lax.with_sharding_constraint(
        a, NamedSharding(mesh, parallel.logical_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)))


def _logprobs(graphdef, params, embedded, layout, batch: Completions, temperature, mesh, widths=None, width=0):
    """Per-token log-probabilities ``[N, T]`` of the completions ``batch`` packed as ``layout`` says, under
    ``params`` (old or reference policy; ``embedded`` its ``_embed`` of the prompts), at completion width
    ``widths[width]`` (``_at_width``; None: the batch's own), split over the batch axes like the completions."""
    def run(batch, layout, params, embedded):
        model = nnx.merge(graphdef, params)
        hidden, targets, _ = packed_hidden(model, embedded, layout)
        return (unpack(completion_logprobs(model, hidden, targets, temperature, with_entropy=False)[0], layout),)

    with _activations(mesh):
        (logp,) = _at_width(widths, width, run, batch, layout, params, embedded)
    return _split_batch(logp, mesh)


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings of ``tx``'s state: Adam's moments like their parameters, scalars (the step count) replicated."""
    return optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), jax.tree.map(lambda a: a.sharding, params),
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def rollout_dtype(params, rollout: SamplingConfig):
    """The dtype of the sampler's copy of the parameters (``rollout.weights_dtype``), or None: no copy (unset, or
    the parameters are already stored in it)."""
    cast = None if rollout.weights_dtype is None else jnp.dtype(rollout.weights_dtype)
    floats = [a.dtype for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    return None if cast is None or all(d == cast for d in floats) else cast


def recomputes_old_logprobs(train: TrainConfig, model_cfg, cast) -> bool:
    """Whether the old log-probabilities are recomputed by the trainer's forward: ``train.recompute_old_logprobs``,
    or by default whenever the sampler's differ from it by more than rounding (bf16 compute, or rollouts from a
    ``cast`` copy of the weights)."""
    if train.recompute_old_logprobs is not None:
        return train.recompute_old_logprobs
    return model_cfg.dtype != "float32" or cast is not None


def apply_updates(tx: optax.GradientTransformation, params, opt_state, grads):
    """One optimizer update: (new parameters, new state, global gradient norm)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def _cast_floats(params, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


@jax.jit
def _mismatch(sampler, trainer, mask):
    """(sum, count, max) of ``|sampler - trainer|`` over completion tokens."""
    diff = jnp.where(mask, jnp.abs(sampler - trainer), 0.0)
    return diff.sum(), mask.sum(), diff.max()


class Trainer:
    """Holds the policy (``graphdef`` + ``params``), optimizer state and step; ``step()`` runs one GRPO step."""

    def __init__(self, model: QwenVL, tokenizer, data, rewards, train: TrainConfig, rollout: SamplingConfig,
                 buckets: Buckets, mesh=None, seed: int = 0):
        if mesh is None:
            mesh = parallel.make_mesh({}, jax.devices()[:1])
        self.train, self.rollout, self.buckets, self.mesh, self.seed = train, rollout, buckets, mesh, seed
        self.tokenizer, self.data, self.rewards = tokenizer, data, rewards
        self.model_cfg = model.config
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.per_batch = len(data.rows)  # this process's prompts of each batch
        prompts, parts = self.per_batch * train.rollout_batches, train.mini_batches * train.micro_batches
        if prompts % parts:
            raise ValueError(f"{prompts} prompts per step (data.batch_size x train.rollout_batches, on this process "
                             f"of {jax.process_count()}) must divide into train.mini_batches {train.mini_batches} x "
                             f"train.micro_batches {train.micro_batches}")
        for rows in (prompts // parts, prompts // parts * rollout.num_samples):  # a micro-batch's, on every process
            parallel.process_rows(mesh, rows * jax.process_count())
        param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
        self.tx = make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches)
        self.opt_state, self._apply = self.optimizer(self.tx)
        self.ref_params = None
        self.set_reference()
        self.sampler = Sampler(rollout, mesh)
        # rollout.weights_dtype: the sampler's copy of the parameters in that dtype (None: the parameters
        # themselves, also when they are already stored in it), made on first use after each update.
        cast = rollout_dtype(self.params, rollout)
        self._cast = None if cast is None else jax.jit(functools.partial(_cast_floats, dtype=cast),
                                                       out_shardings=param_shardings)
        self.step_count = 0
        self.missing_steps = 0  # consecutive steps in which every reward was missing
        self.judge_errors: list[str | None] = []  # this step's per-sample judge reasons (RewardBatch.errors["llm"])
        # By default the old log-probabilities are recomputed whenever the sampler's differ from the trainer's
        # forward by more than rounding: a bf16 compute dtype, or rollouts from a copy of the weights in another dtype.
        self.recompute = recomputes_old_logprobs(train, model.config, cast)
        # Gradients and their running sum keep the parameters' shardings (else XLA may replicate them).
        self._embed = jax.jit(_embed, static_argnums=(0, 3, 4))
        self._gradients = jax.jit(functools.partial(_gradients, param_shardings=param_shardings, mesh=mesh),
                                  static_argnums=(0, 7, 8, 9))
        self._embed_gradients = jax.jit(functools.partial(_embed_gradients, param_shardings=param_shardings,
                                                          mesh=mesh), static_argnums=(0, 5), donate_argnums=(4,))
        self._accumulate = jax.jit(lambda total, grads: jax.tree.map(jnp.add, total, grads), donate_argnums=(0,),
                                   out_shardings=param_shardings)
        self._add = jax.jit(lambda total, more: jax.tree.map(jnp.add, total, more), donate_argnums=(0,))
        self._logprobs = jax.jit(_logprobs, static_argnums=(0, 5, 6, 7))
        self.widths = completion_widths(rollout.max_new_tokens)
        self.samples_per_row = packing.samples_per_row(model.config.attention, mesh.devices.flat[0].platform)
        self._extra_compiles = []  # other stages' jitted functions (rl/sft.py), counted in compile_count

    def set_reference(self, params=None) -> None:
        """The KL reference policy (``loss.kl_coef > 0``): a copy of ``params``, by default the current policy. The
        trainer starts from its initial weights (the run's ``checkpoint`` or the preset's initialisation); a run
        with a supervised stage sets the policy at that stage's end, the weights its GRPO stage starts from."""
        if self.train.loss.kl_coef > 0:
            self.ref_params = jax.tree.map(jnp.copy, self.params if params is None else params)

    def optimizer(self, tx: optax.GradientTransformation):
        """(initial state, jitted ``apply_updates(params, state, grads) -> (params, state, grad norm)``) of ``tx``
        over the parameters, with explicit shardings for the whole training state: Adam's moments like their
        parameters, scalars (the step count) replicated on the mesh, kept by every update -- so a restored
        checkpoint lands where it was. Parameters and state are donated."""
        param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
        opt_shardings = optimizer_shardings(tx, self.params, self.mesh)
        state = jax.jit(tx.init, out_shardings=opt_shardings)(self.params)
        apply = jax.jit(functools.partial(apply_updates, tx), donate_argnums=(0, 1),
                        out_shardings=(param_shardings, opt_shardings, NamedSharding(self.mesh, PartitionSpec())))
        return state, apply

    @property
    def params(self) -> nnx.State:
        return self._params

    @params.setter
    def params(self, value: nnx.State) -> None:
        """Every new value of the parameters (an update, a restored checkpoint) drops the rollout copy."""
        self._params = value
        self._rollout_params = None

    @property
    def model(self) -> QwenVL:
        return nnx.merge(self.graphdef, self.params)

    @property
    def rollout_model(self) -> QwenVL:
        """The policy the sampler runs: the current parameters, or (``rollout.weights_dtype``) their copy in that
        dtype, in the parameters' shardings, cast on first use after the parameters last changed."""
        if self._cast is None:
            return self.model
        if self._rollout_params is None:
            self._rollout_params = self._cast(self.params)
        return nnx.merge(self.graphdef, self._rollout_params)

    @property
    def compile_count(self) -> int:
        jitted = [self._embed, self._gradients, self._embed_gradients, self._add, self._logprobs, self._apply,
                  *self._extra_compiles]
        return (self.sampler.compile_count + sum(f._cache_size() for f in jitted)
                + (self._cast._cache_size() if self._cast is not None else 0))

    # -- collect ---------------------------------------------------------------------------------------------------

    def _sample(self, batch: PromptBatch, key) -> tuple[SampleOutput, list[str]]:
        out = jax.tree.map(parallel.local_rows, self.sampler.generate(self.rollout_model, batch.inputs, key))
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(out.tokens, out.lengths, strict=True)]
        return out, texts

    def _submit(self, texts: list[str], solutions: list[str]) -> cf.Future:
        """Score in the reward pool's threads (a plain ``score`` object is scored now)."""
        if hasattr(self.rewards, "submit"):
            return self.rewards.submit(texts, solutions)
        future: cf.Future = cf.Future()
        future.set_result(self.rewards.score(texts, solutions))
        return future

    def _informative(self, group: Group) -> bool:
        """DAPO online filtering (module docstring); a group needs two valid samples for a baseline."""
        rewards = group.rewards[group.mask.any(1)]
        if len(rewards) < 2:
            return False
        if self.train.filter_rule == "distinct":
            return float(rewards.max() - rewards.min()) > 0
        return self.train.filter_low < float(rewards.mean()) < self.train.filter_high

    def _groups(self, batch: PromptBatch, out: SampleOutput, scored) -> tuple[list[Group], dict]:
        g = self.rollout.num_samples
        advantages = np.asarray(grpo.group_advantages(scored.composite, scored.valid, g,
                                                      self.train.loss.scale_by_std, self.train.loss.eps))
        mask = out.mask & scored.valid[:, None]
        groups = [Group(ex, out.tokens[i * g:(i + 1) * g], mask[i * g:(i + 1) * g], out.logprobs[i * g:(i + 1) * g],
                        advantages[i * g:(i + 1) * g], scored.composite[i * g:(i + 1) * g])
                  for i, ex in enumerate(batch.examples)]
        metrics = dict(scored.metrics, response_length_mean=float(out.lengths.mean()),
                       response_tokens=float(out.lengths.sum()))
        self.judge_errors += getattr(scored, "errors", {}).get("llm", [])
        return groups, metrics

    def collect(self, key) -> tuple[list[Group], dict]:
        """``rollout_batches`` prompt batches of G rollouts each, scored and filtered. The reward pool scores batch
        k while the sampler generates batch k+1 (both on-policy); with dynamic filtering more batches are drawn,
        at most ``max_tries`` in all, only as long as the groups in flight cannot already fill the step (on any
        process: the sampler is one program over all of them). Always returns the step's ``per_batch x
        rollout_batches`` groups: a shortfall is made up with masked copies (static shapes; they contribute
        nothing)."""
        want = self.per_batch * self.train.rollout_batches
        filtering = self.train.dynamic_filtering
        limit = max(self.train.max_tries, self.train.rollout_batches) if filtering else self.train.rollout_batches
        kept: list[Group] = []
        per_try: list[dict] = []
        inflight: collections.deque = collections.deque()
        tries = 0
        sample_s = wait_s = 0.0
        g = self.rollout.num_samples
        template = None

        def short() -> bool:
            local = len(kept) + self.per_batch * len(inflight) < want
            return bool(parallel.host_max(local)) if filtering else local

        while True:
            while tries < limit and len(inflight) < 2 and short():
                start = time.perf_counter()
                batch = next(self.data)
                out, texts = self._sample(batch, jax.random.fold_in(key, tries))
                inflight.append((batch, out, self._submit(texts, [s for s in batch.solutions for _ in range(g)])))
                tries += 1
                sample_s += time.perf_counter() - start
            if not inflight:
                break
            batch, out, future = inflight.popleft()
            start = time.perf_counter()
            scored = future.result()
            wait_s += time.perf_counter() - start
            groups, m = self._groups(batch, out, scored)
            if template is None:
                template = groups[0]
            per_try.append(m)
            kept += [grp for grp in groups if self._informative(grp)] if filtering else groups
        metrics = {k: _combine(k, [m[k] for m in per_try if k in m]) for k in per_try[0]}
        metrics.update(rollout_seconds=sample_s, reward_wait_seconds=wait_s, rollout_batches=float(tries),
                       groups_kept=float(min(len(kept), want)))
        if len(kept) < want:
            print(f"trainer: step {self.step_count}: {len(kept)} of {want} groups kept after {tries} prompt batches "
                  f"(train.max_tries {self.train.max_tries}); the rest are masked filler", flush=True)
        filler = template._replace(mask=np.zeros_like(template.mask), advantages=np.zeros_like(template.advantages))
        kept = kept[:want] + [filler] * max(0, want - len(kept))
        adv = np.concatenate([grp.advantages for grp in kept])
        metrics.update(advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
                       advantage_abs_max=float(np.abs(adv).max()))
        return kept, metrics

    # -- update ----------------------------------------------------------------------------------------------------

    def _host_prompts(self, groups: list[Group]) -> ModelInputs:
        """The groups' prompts, on the host (numpy; ``shard_prompts`` at each use), bucketed alike on every
        process. A step holds every mini-batch's prompts at once, and their pixels are most of its bytes (one
        21,504-row image is 100 MB in float32): on the device, 31 idle micro-batches took 2.9 GiB of each v6e chip
        during the update."""
        examples = [grp.example for grp in groups]
        at_least = parallel.host_max(sizes(examples, self.model_cfg))
        return collate(examples, self.model_cfg, self.buckets, at_least).inputs

    def _device_batch(self, members: list[Group], prompts: ModelInputs, micro: list[list[list[tuple[int, int]]]],
                      rows: int) -> tuple[packing.Layout, Completions, int]:
        """This process's part of a micro-batch (``micro_batches``: packed rows of (member, sample) per batch
        shard; ``prompts`` the members' host prompts) -> the global micro-batch (``pack_micro_batch``) and the index
        of its completion width in ``self.widths``, the same on every process."""
        samples = [pair for shard in micro for row in shard for pair in row]
        where = {pair: j for j, pair in enumerate(samples)}
        fields = ("tokens", "mask", "logprobs", "advantages")
        completions = Completions(*(np.stack([getattr(members[i], f)[s] for i, s in samples]) if samples
                                    else getattr(members[0], f)[:0] for f in fields))
        per_shard = len(members) // len(micro)
        layout, batch, longest = pack_micro_batch(
            prompts, completions, np.array([i % per_shard for i, _ in samples], np.int32),
            [[[where[pair] for pair in row] for row in shard] for shard in micro], rows, self.samples_per_row)
        return (packing.Layout(*(parallel.batch_array(a, self.mesh, axis=int(a.ndim == 3)) for a in layout)),
                Completions(*(parallel.batch_array(a, self.mesh) for a in batch[:4])),
                width_index(int(parallel.host_max(longest)), self.widths))

    def update(self, groups: list[Group]) -> dict:
        t = self.train
        self._rollout_params = None  # the rollouts are done: the memory of a cast copy goes to the update
        temperature = self.rollout.temperature
        shards = parallel.batch_split(self.mesh) // jax.process_count()  # this process's
        minis = []  # (host prompts, micro-batches, denominators) per mini-batch that has something to learn from
        for k in range(t.mini_batches):
            members = mini_batch(groups, k, t.mini_batches, t.micro_batches)
            prompts = self._host_prompts(members)
            parts, rows = micro_batches(members, prompts.attention_mask.sum(1), prompts.input_ids.shape[1],
                                        t.micro_batches, self.widths, shards, self.samples_per_row)
            parts += [[[]] * shards] * (int(parallel.host_max(len(parts))) - len(parts))  # as many on every process
            chunk = [self._device_batch(members, prompts, part, rows) for part in parts]
            if not chunk:  # only masked filler
                continue
            mask = jnp.concatenate([b.mask for _, b, _ in chunk])  # the mini-batch's, over all processes
            signal = jnp.concatenate([b.mask.any(1) & (b.advantages != 0) for _, b, _ in chunk])
            if bool(signal.any()) or (t.loss.kl_coef > 0 and bool(mask.any())):
                minis.append((prompts, chunk, grpo.totals(mask)))
        # Old and reference log-probabilities: once per step, before any update. The first mini-batch's old ones come
        # from its own first gradient pass (the parameters have not moved yet); later ones from a forward pass now.
        mismatch = np.zeros(3)  # sum, count, max of |sampler - trainer| log-probs over completion tokens

        def measure(sampler_logp, trainer_logp, mask):
            total, count, peak = _mismatch(sampler_logp, trainer_logp, mask)
            mismatch[:] = mismatch[0] + float(total), mismatch[1] + float(count), max(mismatch[2], float(peak))

        for k, (prompts, chunk, _) in enumerate(minis):
            placed = parallel.shard_prompts(prompts, self.mesh)
            policies = [(name, p) for name, p, on in (("old", self.params, self.recompute and k > 0),
                                                      ("ref", self.ref_params, self.ref_params is not None)) if on]
            for name, params in policies:
                embedded = self._embed(self.graphdef, params, placed, t.micro_batches, self.mesh)
                for i, (layout, batch, width) in enumerate(chunk):
                    logp = self._logprobs(self.graphdef, params, embedded, layout, batch, temperature, self.mesh,
                                          self.widths, jnp.int32(width))
                    if name == "old":
                        measure(batch.old_logprobs, logp, batch.mask)
                    chunk[i] = (layout, batch._replace(**{f"{name}_logprobs": logp}), width)
        per_update: list[dict[str, float]] = []
        norms = []
        for epoch in range(t.ppo_epochs):
            for k, (prompts, chunk, totals) in enumerate(minis):
                own = self.recompute and epoch == 0 and k == 0
                placed = parallel.shard_prompts(prompts, self.mesh)
                embedded = self._embed(self.graphdef, self.params, placed, t.micro_batches, self.mesh)
                grads = d_embedded = None
                sums: dict[str, float] = {}
                for i, (layout, batch, width) in enumerate(chunk):
                    grad, d, m, logp = self._gradients(self.graphdef, self.params, embedded, layout, batch, totals,
                                                       jnp.asarray(own), t.loss, temperature, self.widths,
                                                       jnp.int32(width))
                    if own:  # later epochs reuse these old log-probabilities
                        measure(batch.old_logprobs, logp, batch.mask)
                        chunk[i] = (layout, batch._replace(old_logprobs=logp), width)
                    grads = grad if grads is None else self._accumulate(grads, grad)
                    d_embedded = d if d_embedded is None else self._add(d_embedded, d)
                    for key, value in m.items():  # per-token means over the mini-batch add up over its parts
                        sums[key] = max(sums.get(key, 0.0), float(value)) if key.endswith("_max") \
                            else sums.get(key, 0.0) + float(value)
                grads = self._embed_gradients(self.graphdef, self.params, placed, d_embedded, grads, t.micro_batches)
                per_update.append(sums)
                self.params, self.opt_state, norm = self._apply(self.params, self.opt_state, grads)
                norms.append(float(norm))
        metrics = {k: max(u[k] for u in per_update) if k.endswith("_max")
                   else float(np.mean([u[k] for u in per_update])) for k in (per_update[0] if per_update else {})}
        if not self.recompute and per_update:  # the first mini-batch saw the sampler's parameters unchanged
            mismatch = [per_update[0]["logprob_diff"], 1.0, per_update[0]["logprob_diff_max"]]
        metrics.update(grad_norm=float(np.mean(norms)) if norms else 0.0, optimizer_updates=float(len(norms)),
                       updates_skipped=float(t.mini_batches - len(minis)) * t.ppo_epochs,
                       logprob_mismatch_mean=mismatch[0] / max(mismatch[1], 1.0), logprob_mismatch_max=mismatch[2])
        return metrics

    def step(self) -> dict:
        """One GRPO step; returns its metrics (the job's, the same on every process)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.step_count)
        start = time.perf_counter()
        self.judge_errors = []
        groups, metrics = self.collect(key)
        update_start = time.perf_counter()
        metrics.update(self.update(groups))
        self.step_count += 1
        end = time.perf_counter()
        metrics.update(update_seconds=end - update_start, step_seconds=end - start,
                       compile_count=float(self.compile_count))
        for reason, n in getattr(self.data, "dropped", {}).items():
            metrics[f"data_dropped_{reason}"] = float(n)
        per_process = parallel.host_gather(metrics)
        if len(per_process) > 1:
            metrics = {k: _combine(k, [m.get(k, float("nan")) for m in per_process], over="processes")
                       for k in per_process[0]}
        metrics["tokens_per_second"] = metrics.get("response_tokens", 0.0) / metrics["step_seconds"]
        warning = judge_warning(metrics, self.step_count, getattr(self.rewards, "cfg", None), self.judge_errors)
        if warning and jax.process_index() == 0:
            print(warning, flush=True)
        no_reward = np.isnan(metrics.get("reward_composite_mean", np.nan))  # no valid reward in any process
        self.missing_steps = self.missing_steps + 1 if no_reward else 0
        return metrics

    def rewards_down(self, metrics: dict) -> str | None:
        """Why the run must stop: every reward missing for ``train.max_missing_steps`` steps in a row (the
        components that failed, from the step's metrics), or None."""
        if not self.train.max_missing_steps or self.missing_steps < self.train.max_missing_steps:
            return None
        failing = [f"{k[len('reward_'):-len('_missing')]} ({v:.0f} missing)" for k, v in metrics.items()
                   if k.startswith("reward_") and k.endswith("_missing") and v > 0]
        return (f"every reward was missing for {self.missing_steps} steps in a row; failing: "
                f"{', '.join(failing) or 'unknown (no component reported a missing value)'}. Check the reward "
                "services (e.g. rewards.judge.url) and resume: the run saved its state")


def mini_batch(groups: list[Group], k: int, mini_batches: int, micro_batches: int) -> list[Group]:
    """Mini-batch ``k``'s groups: m, m + n, m + 2n, ... of the step for its micro-batch strides m (n = mini x
    micro)."""
    parts = mini_batches * micro_batches
    return [grp for m in range(k * micro_batches, (k + 1) * micro_batches) for grp in groups[m::parts]]


def pack_micro_batch(prompts: ModelInputs, completions: Completions, prompt_of: np.ndarray,
                     shards: list[list[list[int]]], rows: int, per_row: int) -> tuple[packing.Layout, Completions, int]:
    """(``packing.Layout``, the completions one per sample slot -- an empty slot is masked --, the completion width
    the fullest row needs) of a micro-batch on the host: ``shards[b]`` batch shard b's rows (at most ``rows``) of
    sample indices into ``completions`` (numpy ``[n, T]``), sample i continuing prompt ``prompt_of[i]`` of its
    shard's part of ``prompts`` (the host ``ModelInputs``, the shards' prompts one after the other)."""
    p, t = prompts.input_ids.shape[1], completions.tokens.shape[1]
    lengths = [completion_length(m) for m in completions.mask]
    prompt_tokens = np.asarray(prompts.attention_mask).sum(1)
    per_shard = len(prompt_tokens) // len(shards)
    padded = [shard + [[]] * (rows - len(shard)) for shard in shards]
    slots = [row[j] if j < len(row) else None for shard in padded for row in shard for j in range(per_row)]
    layout = packing.layout(prompts.attention_mask, prompts.positions, prompts.rope_delta,
                            [[[(prompt_of[i], completions.tokens[i, :lengths[i]]) for i in row] for row in shard]
                             for shard in padded], rows, per_row, t)
    longest = max(packing.need([(int(prompt_tokens[b * per_shard + prompt_of[i]]), lengths[i]) for i in row], p)
                  for b, shard in enumerate(padded) for row in shard)

    def take(a):  # one row per sample slot, zeros in an empty one
        a = np.asarray(a)
        return np.stack([np.zeros(a.shape[1:], a.dtype) if i is None else a[i] for i in slots])

    return layout, Completions(*(None if a is None else take(a) for a in completions)), int(longest)


def completion_length(mask: np.ndarray) -> int:
    """The number of completion tokens of a sample's ``mask`` ``[T]``, which must be a prefix (the sampler's)."""
    n = int(mask.sum())
    if not mask[:n].all():
        raise ValueError("a completion mask with holes: the update packs each sample's first mask.sum() tokens")
    return n


def micro_batches(members: list[Group], prompt_tokens, prompt_width: int, micro_batches: int,
                  widths: tuple[int, ...], shards: int = 1, per_row: int = packing.PACK_SAMPLES
                  ) -> tuple[list[list[list[list[tuple[int, int]]]]], int]:
    """(the mini-batch's micro-batches -- each a list per batch shard of packed rows of samples (member, sample)
    --, rows per shard in a micro-batch). The members are split into ``shards`` blocks, one per batch shard of this
    process (``Trainer._host_prompts`` places them so); each block's samples with a completion (the others add
    nothing) are packed into rows of ``prompt_width`` + a width of ``widths`` (``packing.arrange``;
    ``prompt_tokens[i]``: member i's real prompt tokens), and its rows, fullest first, are cut into micro-batches
    of as many rows as a micro-batch of one sample per row had (the memory the plan budgets). So the update
    computes on real tokens: fewer micro-batches than ``micro_batches`` where samples are short, the last ones
    narrower. The gradient is the sum over the mini-batch's samples, so the arrangement changes nothing else."""
    per_block, (g, _) = len(members) // shards, members[0].mask.shape
    if len(members) % shards or per_block * g % micro_batches:
        raise ValueError(f"{len(members)} groups of {g} samples do not split into {shards} batch shards x "
                         f"{micro_batches} micro-batches")
    rows = per_block * g // micro_batches
    samples = [[(i, s) for i in range(b * per_block, (b + 1) * per_block) for s in range(g)
                if members[i].mask[s].any()] for b in range(shards)]
    lengths = [[(int(prompt_tokens[i]), completion_length(members[i].mask[s])) for i, s in block]
               for block in samples]
    packed = packing.arrange(lengths, prompt_width, widths, rows, per_row)
    blocks = [[[block[j] for j in row] for row in part] for block, part in zip(samples, packed, strict=True)]
    count = max(-(-len(block) // rows) for block in blocks)
    return [[block[c * rows:(c + 1) * rows] for block in blocks] for c in range(count)], rows


def _combine(key: str, values: list[float], over: str = "batches") -> float:
    """A metric over the step's rollout batches or over the job's processes: counts add up; wall-clock seconds add
    up over batches and take the slowest process; the judge's running totals are the last batch's value, summed
    over processes; maxima stay maxima; everything else is averaged (NaN = no data; the processes' batches are the
    same size)."""
    values = np.asarray(values, np.float64)
    processes = over == "processes"
    if key.startswith("judge_") and "latency" not in key and key != "judge_yes_low_similarity":
        return float(np.nansum(values) if processes else values[-1])
    if key.endswith("_seconds"):
        return float(np.nanmax(values) if processes else np.nansum(values))
    if key.endswith("_max"):
        return float(np.nanmax(values))
    if key in ("response_tokens", "judge_yes_low_similarity", "groups_kept", "reward_samples") \
            or key.startswith("data_dropped_") or key.endswith(("_missing", "_invalid")) or "_missing_" in key:
        return float(np.nansum(values))
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")

"""The GRPO training loop: prompts -> sampler (G each) -> text -> reward pool -> advantages -> jit update steps.

One step (``Trainer.step``):

1. **Collect.** Draw ``rollout_batches`` prompt batches, sample G completions per prompt with the in-JAX sampler
   (``rl/sampler.py``), decode them, score them on the host (``rewards/pool.py``; batch k is scored while batch k+1
   is sampled) and compute group advantages (``grpo.py`` eq. 1). With ``dynamic_filtering`` (DAPO) groups whose
   valid rewards are all equal are dropped and more batches are drawn, at most ``max_tries`` in all, until the step
   has its prompts; a shortfall is filled with masked copies (static shapes; they contribute nothing).
2. **Update.** ``ppo_epochs`` passes over ``mini_batches`` mini-batches; each is one AdamW update (``optim``)
   whose gradient is accumulated over ``micro_batches`` micro-batches (``grpo.Totals`` keeps the mini-batch
   denominators, so accumulation is exact). Micro-batch m of the n = mini x micro holds groups m, m + n, m + 2n, ...
   of the step. The policy's log-probabilities come from one forward pass over prompt + completion
   (``completion_logits``); the vision tower runs once per prompt, not once per sample. Old log-probabilities are
   the sampler's unless ``recompute_old_logprobs``; the reference policy exists only when ``loss.kl_coef > 0``.

Randomness is ``fold_in(seed, step)``, so a run resumed from a checkpoint (parameters, optimizer, step, data
iterator state) repeats exactly what the uninterrupted run would have done.

**Several processes** (``jax.distributed``). Every process runs this loop in step with the others. Each one holds
its own rows of every prompt batch (``data.rows``), samples them as part of one global batch, scores them in its
own reward pool and keeps its own groups. An update's global micro-batch is every process's micro-batch m.
Strided micro-batches make this the same computation as one process running the whole batch, given two things:
each process's rows are one block (GPU nodes, CPUs), and ``mini_batches`` divides them. Otherwise a mini-batch
is another, equally random, subset of the step. DAPO filtering fills each process's share of the step
separately. Step metrics are combined across processes (``_combine``): counts add up, and rates and means are
averaged over the processes.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
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
from medix_jax.models.qwen2_5_vl.model import ModelInputs, Qwen2_5_VL
from medix_jax.rl import grpo
from medix_jax.rl.sampler import Buckets, SampleOutput, Sampler, SamplingConfig


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
    steps: int = 200
    loss: grpo.LossConfig = dataclasses.field(default_factory=grpo.LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    rollout_batches: int = 1  # prompt batches (data.batch_size each) per step; rewards of one overlap the next
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer updates per epoch (reference: 512 prompts / 128 = 4)
    micro_batches: int = 1  # gradient accumulation inside each update
    recompute_old_logprobs: bool = False
    dynamic_filtering: bool = False  # DAPO
    max_tries: int = 20  # prompt batches drawn per step at most when filtering
    save_every: int = 50  # checkpoint every this many steps (and at the end, and on SIGTERM / SIGINT)
    keep_checkpoints: int = 3
    export_hf: bool = True  # write an HF directory (run_dir/hf) at the end

    def __post_init__(self):
        if min(self.steps, self.rollout_batches, self.ppo_epochs, self.mini_batches, self.micro_batches,
               self.max_tries, self.save_every, self.keep_checkpoints) < 1:
            raise ValueError(f"train: counts must be >= 1 ({self})")


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


def completion_logits(model: Qwen2_5_VL, prompts: ModelInputs, tokens: jax.Array, mask: jax.Array,
                      num_samples: int) -> jax.Array:
    """float32 logits ``[B*G, T, V]`` for completion tokens ``[B*G, T]`` of left-padded prompts ``[B, P]``.

    Logit t predicts token t. Positions continue each prompt's M-RoPE positions exactly as the sampler does
    (``num_prompt_tokens + rope_delta + t`` on all three axes); the prompt (with its images) is embedded once and
    repeated G times.
    """
    p, t = prompts.input_ids.shape[1], tokens.shape[1]
    repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    embeds = jnp.concatenate([repeat(model.embed(prompts)), model.model.embed_tokens(tokens)], axis=1)
    start = repeat(prompts.attention_mask.sum(1).astype(jnp.int32) + prompts.rope_delta)
    completion_positions = jnp.broadcast_to((start[:, None] + jnp.arange(t))[None], (3, start.shape[0], t))
    positions = jnp.concatenate([jnp.repeat(prompts.positions, num_samples, axis=1), completion_positions], axis=2)
    keys = jnp.concatenate([repeat(prompts.attention_mask), mask], axis=1)
    attention = jnp.tril(jnp.ones((p + t, p + t), bool))[None] & keys[:, None, :]
    hidden, _ = model.decode(embeds, positions, attention)
    return model.logits(hidden[:, p - 1: p + t - 1])


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / T)[token]`` -- what the sampler reports (greedy: T = 1)."""
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _loss(params, graphdef, ref_params, prompts, batch: Completions, totals: grpo.Totals, loss_cfg: grpo.LossConfig,
          num_samples: int, temperature: float):
    model = nnx.merge(graphdef, params)
    logits = completion_logits(model, prompts, batch.tokens, batch.mask, num_samples)
    logp = token_logprobs(logits, batch.tokens, temperature)
    ref = None
    if ref_params is not None:
        ref_logits = completion_logits(nnx.merge(graphdef, ref_params), prompts, batch.tokens, batch.mask,
                                       num_samples)
        ref = jax.lax.stop_gradient(token_logprobs(ref_logits, batch.tokens, temperature))
    loss, metrics = grpo.policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, loss_cfg, totals, ref)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    metrics["entropy"] = grpo.entropy(jax.lax.stop_gradient(scaled), batch.mask, totals)
    metrics["loss"] = loss
    return loss, metrics


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _gradients(graphdef, params, ref_params, prompts, batch, totals, loss_cfg, num_samples, temperature):
    grads, metrics = jax.grad(_loss, has_aux=True)(params, graphdef, ref_params, prompts, batch, totals, loss_cfg,
                                                   num_samples, temperature)
    return grads, metrics


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _logprobs(graphdef, params, prompts, batch: Completions, num_samples, temperature):
    logits = completion_logits(nnx.merge(graphdef, params), prompts, batch.tokens, batch.mask, num_samples)
    return token_logprobs(logits, batch.tokens, temperature)


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(total, grads):
    return jax.tree.map(jnp.add, total, grads)


class Trainer:
    """Holds the policy (``graphdef`` + ``params``), optimizer state and step; ``step()`` runs one GRPO step."""

    def __init__(self, model: Qwen2_5_VL, tokenizer, data, rewards, train: TrainConfig, rollout: SamplingConfig,
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
        self.tx = make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches)
        # Explicit shardings for the whole training state: Adam's moments like their parameters, scalars (the step
        # count) replicated on the mesh, kept by every update -- so a restored checkpoint lands where it was.
        replicated = NamedSharding(mesh, PartitionSpec())
        param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
        opt_shardings = optax.tree_utils.tree_map_params(
            self.tx, lambda _, sharding: sharding, jax.eval_shape(self.tx.init, self.params), param_shardings,
            transform_non_params=lambda _: replicated)
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(self.params)
        self.ref_params = jax.tree.map(jnp.copy, self.params) if train.loss.kl_coef > 0 else None
        self.sampler = Sampler(rollout, mesh)
        self.step_count = 0
        self._apply = jax.jit(self._apply_fn, donate_argnums=(0, 1),
                              out_shardings=(param_shardings, opt_shardings, replicated))

    @property
    def model(self) -> Qwen2_5_VL:
        return nnx.merge(self.graphdef, self.params)

    def _apply_fn(self, params, opt_state, grads):
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    @property
    def compile_count(self) -> int:
        return (self.sampler.compile_count + _gradients._cache_size() + _logprobs._cache_size()
                + self._apply._cache_size())

    # -- collect ---------------------------------------------------------------------------------------------------

    def _sample(self, batch: PromptBatch, key) -> tuple[SampleOutput, list[str]]:
        out = jax.tree.map(parallel.local_rows, self.sampler.generate(self.model, batch.inputs, key))
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
            kept += [grp for grp in groups if _informative(grp)] if filtering else groups
        metrics = {k: _combine(k, [m[k] for m in per_try if k in m]) for k in per_try[0]}
        metrics.update(rollout_seconds=sample_s, reward_wait_seconds=wait_s, rollout_batches=float(tries),
                       groups_kept=float(min(len(kept), want)))
        filler = template._replace(mask=np.zeros_like(template.mask), advantages=np.zeros_like(template.advantages))
        kept = kept[:want] + [filler] * max(0, want - len(kept))
        adv = np.concatenate([grp.advantages for grp in kept])
        metrics.update(advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
                       advantage_abs_max=float(np.abs(adv).max()))
        return kept, metrics

    # -- update ----------------------------------------------------------------------------------------------------

    def _device_batch(self, groups: list[Group]) -> tuple[ModelInputs, Completions]:
        """This process's groups of a micro-batch -> the global micro-batch (same buckets on every process)."""
        examples = [grp.example for grp in groups]
        prompts = collate(examples, self.model_cfg, self.buckets, parallel.host_max(sizes(examples, self.model_cfg)))
        stack = lambda field: np.concatenate([getattr(grp, field) for grp in groups])  # noqa: E731
        batch = Completions(stack("tokens"), stack("mask"), stack("logprobs"), stack("advantages"))
        batch = Completions(*(parallel.batch_array(a, self.mesh) for a in batch))
        return parallel.shard_prompts(prompts.inputs, self.mesh), batch

    def update(self, groups: list[Group]) -> dict:
        t = self.train
        parts = t.mini_batches * t.micro_batches
        temperature = self.rollout.temperature
        device = [self._device_batch(groups[m::parts]) for m in range(parts)]
        if t.recompute_old_logprobs:
            device = [(p, b._replace(old_logprobs=_logprobs(self.graphdef, self.params, p, b, self.rollout.num_samples,
                                                            temperature))) for p, b in device]
        minis = []  # (micro-batches, denominators) per mini-batch that has any token to learn from
        for k in range(t.mini_batches):
            chunk = device[k * t.micro_batches: (k + 1) * t.micro_batches]
            mask = jnp.concatenate([b.mask for _, b in chunk])  # the mini-batch's, over all processes
            if bool(mask.any()):  # only masked filler: no update at all (AdamW would still move the weights)
                minis.append((chunk, grpo.totals(mask)))
        sums: dict[str, float] = {}
        norms = []
        for _ in range(t.ppo_epochs):
            for chunk, totals in minis:
                grads = None
                for prompts, batch in chunk:
                    g, m = _gradients(self.graphdef, self.params, self.ref_params, prompts, batch, totals,
                                      t.loss, self.rollout.num_samples, temperature)
                    grads = g if grads is None else _accumulate(grads, g)
                    for key, value in m.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                self.params, self.opt_state, norm = self._apply(self.params, self.opt_state, grads)
                norms.append(float(norm))
        metrics = {k: v / max(len(norms), 1) for k, v in sums.items()}
        metrics.update(grad_norm=float(np.mean(norms)) if norms else 0.0, optimizer_updates=float(len(norms)))
        return metrics

    def step(self) -> dict:
        """One GRPO step; returns its metrics (the job's, the same on every process)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.step_count)
        start = time.perf_counter()
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
        return metrics


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
    if key in ("response_tokens", "judge_yes_low_similarity", "groups_kept") or key.startswith("data_dropped_") \
            or key.endswith(("_missing", "_invalid")):
        return float(np.nansum(values))
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def _informative(group: Group) -> bool:
    """DAPO dynamic sampling: a group is kept only if its valid rewards are not all equal (else no signal)."""
    valid = group.mask.any(1)
    rewards = group.rewards[valid]
    return len(rewards) >= 2 and float(rewards.max() - rewards.min()) > 0

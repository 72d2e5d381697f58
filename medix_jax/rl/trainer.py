"""The GRPO trainer: one step (``Trainer.step``) is a collection (``rollout.py``: sample G completions per prompt,
score them in the host reward pool, group advantages, DAPO filtering) and an update (``update.py``: mini-batches,
packed micro-batches, exact gradient accumulation, AdamW), both run with the step's programs built once
(``programs.py``).

The policy is ``graphdef`` + ``params`` with AdamW state (``policy.py``). With ``rollout.weights_dtype`` (e.g.
``bfloat16``: decode streams half the bytes) and/or ``rollout.mesh`` (the sampler's own layout: replicas x tensor
parallelism, no weight gathered per decode step) the sampler runs a copy of the parameters cast to that dtype and
resharded to that layout, made on first use after every change of the parameters (rollouts always come from the
current policy) and released when the update begins (its memory goes to the backward pass). The reference policy exists
only when ``loss.kl_coef > 0``: the initial weights, or after a supervised stage the policy at its end
(``set_reference``, restored on resume from the checkpoint of that step, which is always kept).

Randomness is ``fold_in(seed, step)``, so a run resumed from a checkpoint (parameters, optimizer, step, data
iterator state) repeats exactly what the uninterrupted run would have done.

**Several processes** (``jax.distributed``). Every process runs this loop in step with the others. Each one holds
its own rows of every prompt batch (``data.rows``), samples them as part of one global batch, scores them in its
own reward pool and keeps its own groups. An update's global micro-batch is every process's micro-batch m.
Strided micro-batches make this the same computation as one process running the whole batch, given two things:
each process's rows are one block (GPU nodes, CPUs), and ``mini_batches`` divides them. Otherwise a mini-batch
is another, equally random, subset of the step. (Samples are packed into micro-batches within each batch shard, so
the micro-batches differ from one process's, not their sum.) DAPO filtering fills each process's share of the step
separately. Step metrics are combined across processes (``rollout.combine``): counts add up, and rates and means are
averaged over the processes. A step in which a large share of the samples has no judge reward prints one warning
line (``rewards.pool.judge_warning``: the counts by reason and the judge's URL) on process 0.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medix_jax import parallel
from medix_jax.data.buckets import Buckets
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl.model import QwenVL
from medix_jax.rewards.pool import judge_warning
from medix_jax.rl import grpo
from medix_jax.rl.ahead import AheadRollouts
from medix_jax.rl.policy import OptimConfig, make_optimizer, recomputes_old_logprobs
from medix_jax.rl.programs import StepPrograms
from medix_jax.rl.rollout import Group, Rewards, RolloutCollector, combine
from medix_jax.rl.update import PolicyUpdate


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
    recompute_old_logprobs: bool | None = None  # None: when model.dtype is not float32 (rl/update.py docstring)
    dynamic_filtering: bool = False  # DAPO online filtering (rl/rollout.py docstring)
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


class Trainer:
    """Holds the policy (``graphdef`` + ``params``), optimizer state and step; ``step()`` runs one GRPO step.
    ``rewards``: a ``rollout.Rewards`` (the ``RewardPool``, or ``rollout.ScoredNow`` around a plain scorer);
    ``end``: the step count at which the run ends (rollouts ahead, ``rollout.staleness``, stop there; None: never).
    ``close()`` stops the rollouts ahead."""

    def __init__(self, model: QwenVL, tokenizer, data, rewards: Rewards, train: TrainConfig, rollout: SamplingConfig,
                 buckets: Buckets, mesh=None, seed: int = 0, end: int | None = None):
        if mesh is None:
            mesh = parallel.make_mesh({}, jax.devices()[:1])
        self.train, self.rollout, self.buckets, self.mesh, self.seed = train, rollout, buckets, mesh, seed
        self.tokenizer, self.data = tokenizer, data
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
        self.tx = make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches,
                                 self.model_cfg.param_dtype)
        self.programs = StepPrograms(self.graphdef, self.params, mesh, micro_batches=train.micro_batches,
                                     loss=train.loss, rollout=rollout, tx=self.tx)
        self.opt_state = self.programs.init(self.params)
        self.ref_params = None
        self.set_reference()
        self.sampler = Sampler(rollout, self.programs.rollout_mesh)
        parallel.process_rows(self.programs.rollout_mesh, self.per_batch * rollout.num_samples * jax.process_count())
        self.rollouts = RolloutCollector(data, self.sampler, tokenizer, rewards, train, rollout, self.per_batch)
        if rollout.staleness and jax.process_count() > 1:
            raise ValueError(f"rollout.staleness {rollout.staleness}: rollouts ahead of the update run in one process "
                             f"for now, this job has {jax.process_count()}")
        self.ahead = AheadRollouts(self.rollouts, data, rollout.staleness, seed, end) if rollout.staleness else None
        self.step_count = 0
        self.missing_steps = 0  # consecutive steps in which every reward was missing
        # By default the old log-probabilities are recomputed whenever the sampler's differ from the trainer's
        # forward by more than rounding: a bf16 compute dtype, or rollouts from a copy of the weights in another dtype.
        self.recompute = recomputes_old_logprobs(train.recompute_old_logprobs, model.config, self.programs.cast_dtype,
                                                 train.loss.rollout_correction, rollout.staleness)
        self.updater = PolicyUpdate(self.programs, train, model.config, buckets, mesh, self.recompute)

    def set_reference(self, params=None) -> None:
        """The KL reference policy (``loss.kl_coef > 0``): a copy of ``params``, by default the current policy. The
        trainer starts from its initial weights (the run's ``checkpoint`` or the preset's initialisation); a run
        with a supervised stage sets the policy at that stage's end, the weights its GRPO stage starts from."""
        if self.train.loss.kl_coef > 0:
            self.ref_params = jax.tree.map(jnp.copy, self.params if params is None else params)

    def optimizer(self, tx: optax.GradientTransformation):
        """(initial state, jitted ``apply(params, state, grads) -> (params, state, grad norm)``) of another
        optimizer ``tx`` over the parameters (``StepPrograms.optimizer``): the supervised stage's."""
        init, apply = self.programs.optimizer(tx)
        return init(self.params), apply

    @property
    def params(self) -> nnx.State:
        return self._params

    @params.setter
    def params(self, value: nnx.State) -> None:
        """Every new value of the parameters (an update, a restored checkpoint) drops the rollout copy."""
        self._params = value
        self.rollout_params = None

    @property
    def model(self) -> QwenVL:
        return nnx.merge(self.graphdef, self.params)

    @property
    def rollout_model(self) -> QwenVL:
        """The policy the sampler runs: the current parameters, or their copy (``StepPrograms.cast``: in
        ``rollout.weights_dtype``, in the sampler's layout ``rollout.mesh``), made on first use after the parameters
        last changed: one cast and reshard per update."""
        if self.programs.cast is None:
            return self.model
        if self.rollout_params is None:
            self.rollout_params = self.programs.cast(self.params)
        return nnx.merge(self.graphdef, self.rollout_params)

    def sampler_copy(self) -> QwenVL:
        """A copy of the policy for rollouts ahead of the update (``rollout_model``'s, in buffers of its own: the
        update donates the parameters' buffers while the copy still samples)."""
        if self.programs.cast is None:
            return nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.params))
        copy = self.programs.cast(self.params)  # a leaf that kept dtype and layout may be the parameter itself
        copy = jax.tree.map(lambda c, p: jnp.copy(c) if (c.dtype, c.sharding) == (p.dtype, p.sharding) else c,
                            copy, self.params)
        return nnx.merge(self.graphdef, copy)

    def data_state(self) -> dict:
        """The data position a checkpoint holds: after the last batch trained on (batches in flight are redone on
        resume, ``rl/ahead.py``)."""
        if self.ahead is not None and self.ahead.position is not None:
            return self.ahead.position
        return self.data.get_state()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()

    @property
    def compile_count(self) -> int:
        return self.sampler.compile_count + self.programs.compile_count

    def collect(self, key) -> tuple[list[Group], dict]:
        """The step's scored and filtered groups of rollouts of the current policy (``RolloutCollector.collect``)."""
        return self.rollouts.collect(self.rollout_model, key, self.step_count)

    def update(self, groups: list[Group]) -> dict:
        """The step's optimizer updates on ``groups`` (``PolicyUpdate.run``); returns their metrics."""
        self.rollout_params = None  # the rollouts are done: the memory of a cast copy goes to the update
        self.params, self.opt_state, metrics = self.updater.run(self.params, self.opt_state, self.ref_params, groups)
        return metrics

    def step(self) -> dict:
        """One GRPO step; returns its metrics (the job's, the same on every process)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.step_count)
        start = time.perf_counter()
        if self.ahead is None:
            self.rollouts.judge_errors = []
            groups, metrics = self.collect(key)
            errors = self.rollouts.judge_errors
        else:
            groups, metrics, errors = self.ahead.take(self.step_count, self.sampler_copy)
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
            metrics = {k: combine(k, [m.get(k, float("nan")) for m in per_process], over="processes")
                       for k in per_process[0]}
        metrics["tokens_per_second"] = metrics.get("response_tokens", 0.0) / metrics["step_seconds"]
        warning = judge_warning(metrics, self.step_count, self.rollouts.rewards.cfg, errors)
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

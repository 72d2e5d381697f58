"""Rollout collection for one GRPO step: prompt batches -> the sampler (G completions each) -> text -> the reward
pool (``Rewards``; batch k is scored while batch k+1 is sampled) -> group advantages (eq. 1 of ``grpo.py``) ->
DAPO's online filtering (``informative``) -> the step's groups.

With ``train.dynamic_filtering`` (the reference's ``online_filtering``) a group is kept only if the mean of its valid
composite rewards lies strictly between ``filter_low`` and ``filter_high`` (``filter_rule: mean_band``; ``distinct``
keeps groups whose rewards are not all equal), and more prompt batches are drawn until the step has its prompts.
``max_tries`` counts the prompt batches (``data.batch_size`` prompts each, the reference's
``mini_rollout_batch_size``) drawn in the step, the first ones included (the reference's ``max_try_make_batch``);
where the reference then raises, a shortfall here is filled with masked copies (static shapes; they contribute
nothing), reported on stdout and in ``groups_kept``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from medix_jax import parallel
from medix_jax.data.pipeline import PromptBatch
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SampleOutput, SamplingConfig
from medix_jax.models.qwen_vl.model import QwenVL
from medix_jax.rewards.pool import RewardBatch
from medix_jax.rl import grpo


class Rewards(Protocol):
    """What a run needs of a reward source: a batch's ``RewardBatch`` now (``score``) or as a future (``submit``:
    ``RewardPool`` scores in its threads), the names of its components (``active``), its config (``cfg``: the pool's
    ``RewardsConfig``, or None) for the step's judge warning, and ``close``. ``ScoredNow`` makes one of any plain
    ``score(completions, solutions)`` object."""

    cfg: Any

    @property
    def active(self) -> list[str]: ...

    def score(self, completions: list[str], solutions: list[str]) -> RewardBatch: ...

    def submit(self, completions: list[str], solutions: list[str]) -> cf.Future: ...

    def close(self) -> None: ...


class ScoredNow:
    """Any ``score(completions, solutions) -> RewardBatch`` object (e.g. a custom rule reward) as ``Rewards``: it
    scores when a batch is submitted; its components are its ``active`` list, if it has one."""

    cfg = None

    def __init__(self, scorer):
        self.scorer = scorer
        self.active: list[str] = list(getattr(scorer, "active", ["custom"]))

    def score(self, completions: list[str], solutions: list[str]) -> RewardBatch:
        return self.scorer.score(completions, solutions)

    def submit(self, completions: list[str], solutions: list[str]) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(self.score(completions, solutions))
        return future

    def close(self) -> None:
        """Nothing to release."""


class Group(NamedTuple):
    """One prompt's G rollouts, on the host."""

    example: dict  # the unpadded prompt (pipeline.Preprocess output)
    tokens: np.ndarray  # [G, T] int32
    mask: np.ndarray  # [G, T] bool, completion tokens of valid samples
    logprobs: np.ndarray  # [G, T] float32, the sampler's
    advantages: np.ndarray  # [G] float32
    rewards: np.ndarray  # [G] composite


class RolloutCollector:
    """A step's rollouts: ``collect(model, key, step)`` draws prompt batches from ``data``, samples them with
    ``sampler``, decodes with ``tokenizer`` and scores with ``rewards``; ``judge_errors`` keeps the step's per-sample
    judge reasons (``RewardBatch.errors["llm"]``) for the warning line. ``per_batch``: this process's prompts of
    each batch."""

    def __init__(self, data, sampler: Sampler, tokenizer, rewards: Rewards, train, rollout: SamplingConfig,
                 per_batch: int):
        self.data, self.sampler, self.tokenizer, self.rewards = data, sampler, tokenizer, rewards
        self.train, self.rollout, self.per_batch = train, rollout, per_batch
        self.judge_errors: list[str | None] = []

    def sample(self, model: QwenVL, batch: PromptBatch, key) -> tuple[SampleOutput, list[str]]:
        """G completions of each of the batch's prompts (this process's rows, on the host) and their text."""
        out = jax.tree.map(parallel.local_rows, self.sampler.generate(model, batch.inputs, key))
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(out.tokens, out.lengths, strict=True)]
        return out, texts

    def informative(self, group: Group) -> bool:
        """DAPO online filtering (module docstring); a group needs two valid samples for a baseline."""
        rewards = group.rewards[group.mask.any(1)]
        if len(rewards) < 2:
            return False
        if self.train.filter_rule == "distinct":
            return float(rewards.max() - rewards.min()) > 0
        return self.train.filter_low < float(rewards.mean()) < self.train.filter_high

    def groups(self, batch: PromptBatch, out: SampleOutput, scored) -> tuple[list[Group], dict]:
        g = self.rollout.num_samples
        advantages = np.asarray(grpo.group_advantages(scored.composite, scored.valid, g,
                                                      self.train.loss.scale_by_std, self.train.loss.eps))
        mask = out.mask & scored.valid[:, None]
        tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)  # this process's rows, on the host
        groups = [Group(ex, tokens[i * g:(i + 1) * g], mask[i * g:(i + 1) * g], logprobs[i * g:(i + 1) * g],
                        advantages[i * g:(i + 1) * g], scored.composite[i * g:(i + 1) * g])
                  for i, ex in enumerate(batch.examples)]
        metrics = dict(scored.metrics, response_length_mean=float(out.lengths.mean()),
                       response_tokens=float(out.lengths.sum()))
        self.judge_errors += scored.errors.get("llm", [])
        return groups, metrics

    def collect(self, model: QwenVL, key, step: int) -> tuple[list[Group], dict]:
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
                out, texts = self.sample(model, batch, jax.random.fold_in(key, tries))
                solutions = [s for s in batch.solutions for _ in range(g)]
                inflight.append((batch, out, self.rewards.submit(texts, solutions)))
                tries += 1
                sample_s += time.perf_counter() - start
            if not inflight:
                break
            batch, out, future = inflight.popleft()
            start = time.perf_counter()
            scored = future.result()
            wait_s += time.perf_counter() - start
            groups, m = self.groups(batch, out, scored)
            if template is None:
                template = groups[0]
            per_try.append(m)
            kept += [grp for grp in groups if self.informative(grp)] if filtering else groups
        metrics = {k: combine(k, [m[k] for m in per_try if k in m]) for k in per_try[0]}
        metrics.update(rollout_seconds=sample_s, reward_wait_seconds=wait_s, rollout_batches=float(tries),
                       groups_kept=float(min(len(kept), want)))
        if len(kept) < want:
            print(f"trainer: step {step}: {len(kept)} of {want} groups kept after {tries} prompt batches "
                  f"(train.max_tries {self.train.max_tries}); the rest are masked filler", flush=True)
        assert template is not None  # at least one prompt batch is drawn
        filler = template._replace(mask=np.zeros_like(template.mask), advantages=np.zeros_like(template.advantages))
        kept = kept[:want] + [filler] * max(0, want - len(kept))
        advantages = np.concatenate([grp.advantages for grp in kept])
        metrics.update(advantage_mean=float(advantages.mean()), advantage_std=float(advantages.std()),
                       advantage_abs_max=float(np.abs(advantages).max()))
        return kept, metrics


def combine(key: str, values: list[float], over: str = "batches") -> float:
    """A metric over the step's rollout batches or over the job's processes: counts add up; wall-clock seconds add
    up over batches and take the slowest process; the judge's running totals are the last batch's value, summed
    over processes; maxima stay maxima; everything else is averaged (NaN = no data; the processes' batches are the
    same size)."""
    series = np.asarray(values, np.float64)
    processes = over == "processes"
    if key.startswith("judge_") and "latency" not in key and key != "judge_yes_low_similarity":
        return float(np.nansum(series) if processes else series[-1])
    if key.endswith("_seconds"):
        return float(np.nanmax(series) if processes else np.nansum(series))
    if key.endswith("_max"):
        return float(np.nanmax(series))
    if key in ("response_tokens", "judge_yes_low_similarity", "groups_kept", "reward_samples") \
            or key.startswith("data_dropped_") or key.endswith(("_missing", "_invalid")) or "_missing_" in key:
        return float(np.nansum(series))
    return float(np.nanmean(series)) if not np.isnan(series).all() else float("nan")

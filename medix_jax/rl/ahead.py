"""Rollouts ahead of the update (``rollout.staleness`` k >= 1): while GRPO step n updates the policy, a background
thread samples and scores the batches of the next k steps, so that sampling, the reward pool's work and the
judge's latency overlap the update instead of waiting for it.

**Schedule.** Step n trains on the batch sampled by the policy of step ``max(s, n - k)``, s being the step at which
this process began the stage (its start, or a resume): at step n the trainer hands the thread a copy of the current
policy for batch n + k (the first call hands it batches s .. s + k). The thread runs one collection at a time, in
step order, so its draws from the data iterator and its keys (``fold_in(seed, i)`` for batch i) are those of the
synchronous trainer; only the policy that samples differs, by up to k updates (``policy_lag``). The update
recomputes the old log-probabilities with the current policy (``policy.recomputes_old_logprobs``) and can weigh
them by the sampler's (``loss.rollout_correction``, eq. 7 of ``grpo.py``).

**Checkpoints and resume.** A checkpoint after step n holds the data position after batch n, the last one trained
on (``position``): the batches in flight are **redone** on resume, sampled by the restored policy -- fresher than
the uninterrupted run's by up to k updates, so a resumed run is not bit-identical to an uninterrupted one across
those k batches, and no batch is trained on twice or skipped. A run of one process only (``Trainer`` refuses more).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass
class InFlight:
    step: int  # the GRPO step that trains on this batch
    version: int  # the step whose policy sampled it
    future: cf.Future  # -> (groups, metrics, judge errors, data position after its draws)


class AheadRollouts:
    """``take(step, policy)``: step's scored groups (``RolloutCollector.collect``), collected ahead under the
    staleness bound ``staleness`` (module docstring). ``policy()`` returns a copy of the current policy for the
    sampler (one the update does not donate); ``end``: the first step not to collect for (None: unbounded)."""

    def __init__(self, collector, data, staleness: int, seed: int, end: int | None = None):
        if staleness < 1:
            raise ValueError(f"AheadRollouts needs rollout.staleness >= 1, got {staleness}")
        self.collector, self.data, self.staleness, self.seed, self.end = collector, data, staleness, seed, end
        self.executor = cf.ThreadPoolExecutor(1, thread_name_prefix="medix-rollouts")
        self.pending: deque[InFlight] = deque()
        self.position: dict | None = None  # the data position after the last batch taken (what a checkpoint holds)

    def collect(self, model, step: int) -> tuple[list, dict, list, dict]:
        """One step's collection, in the background thread."""
        self.collector.judge_errors = []
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        groups, metrics = self.collector.collect(model, key, step)
        return groups, metrics, list(self.collector.judge_errors), self.data.get_state()

    def submit(self, step: int, version: int, model) -> None:
        self.pending.append(InFlight(step, version, self.executor.submit(self.collect, model, step)))

    def take(self, step: int, policy: Callable[[], Any]) -> tuple[list, dict, list]:
        """(groups, metrics, judge errors) of ``step``, after handing the thread the current policy for the batches
        up to ``step + staleness``."""
        if self.pending and self.pending[0].step != step:
            raise RuntimeError(f"rollouts ahead: step {step} asked for, step {self.pending[0].step} in flight")
        first = self.pending[-1].step + 1 if self.pending else step
        last = step + self.staleness if self.end is None else min(step + self.staleness, self.end - 1)
        if first <= last:
            model = policy()
            for i in range(first, last + 1):
                self.submit(i, step, model)
        entry = self.pending.popleft()
        start = time.perf_counter()
        groups, metrics, errors, self.position = entry.future.result()
        metrics.update(rollout_wait_seconds=time.perf_counter() - start, policy_lag=float(step - entry.version))
        return groups, metrics, errors

    def close(self) -> None:
        """Drop the batches not yet started and wait for the one running (its results are not used)."""
        for entry in self.pending:
            entry.future.cancel()
        self.pending.clear()
        self.executor.shutdown(wait=True)

"""The host-side reward pool: every MediX-R1 reward component for a batch, concurrently, off the accelerator.

Composite (docs/reference.md#reward-weights): ``0.9 * (0.575 * llm + 0.375 * embed + 0.05 * modality) + 0.1 * format``
= ``0.5175 * llm + 0.3375 * embed + 0.045 * modality + 0.1 * format`` (``RewardWeights``). A component that is
switched off (no judge URL) is left out of the composite; a component that could not be computed for a sample is
``NaN`` in its array, counted in the metrics, and makes the sample invalid (``valid`` False) -- it is never 0.
Missing means a transport failure or the deadline; an exception from a component (a bug) is raised, not missing.
Each missing value's reason is in ``RewardBatch.errors`` (``"KIND: detail"``, ``judge.FAILURE_KINDS``), and the
judge's are counted by kind (``reward_llm_missing_connection``, ``..._malformed``, ``..._rejected``,
``..._deadline``; ``reward_llm_missing`` is their total). ``judge_warning`` is the one line a training step logs
when a large share of its samples has no judge reward.

``RewardPool.submit`` returns a future, so the trainer can score batch k while it samples batch k+1; the judge
(asyncio HTTP) and the embedding model each run in their own worker thread, the regex rules inline. A batch is
returned within ``deadline_s`` whatever the judge does: its unfinished requests are cancelled then and their samples
are missing, so a hung batch never delays the next one.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
import types
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from medix_jax.rewards.embedding import EmbeddingConfig, EmbeddingScorer
from medix_jax.rewards.judge import DEADLINE, FAILURE_KINDS, JudgeClient, JudgeConfig
from medix_jax.rewards.rules import MEDIX_MODALITY_TAGS, RuleOptions, score_rules

_JUDGE_MARGIN_S = 0.25  # time left to cancel the judge's requests and hand back what it has


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    llm: float = 0.9 * 0.575
    embed: float = 0.9 * 0.375
    modality: float = 0.9 * 0.05
    format: float = 0.1


@dataclasses.dataclass(frozen=True)
class RewardsConfig:
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    embedding: EmbeddingConfig = dataclasses.field(default_factory=EmbeddingConfig)
    weights: RewardWeights = dataclasses.field(default_factory=RewardWeights)
    modality_tags: tuple[str, ...] = MEDIX_MODALITY_TAGS
    # Our fixes of the reference's rules (rules.RuleOptions; rules.REFERENCE_RULES reproduces it); the Thinking
    # config (configs/qwen3_vl_30b_a3b_dapo.yaml) turns on rules.modality_after_think.
    rules: RuleOptions = dataclasses.field(default_factory=RuleOptions)
    embedding_on: bool = True
    deadline_s: float = 600.0  # a batch's rewards are returned within this many seconds, complete or not
    low_similarity: float = 0.3  # judge YES with an embedding cosine below this is flagged (possible judge hack)
    # A training step in which at least this share of its samples has no judge reward logs one warning line
    # (``judge_warning``); above 1 never.
    judge_warn_share: float = 0.25


class RewardBatch(NamedTuple):
    components: dict[str, np.ndarray]  # name -> [N] float32, NaN where missing
    composite: np.ndarray  # [N] float32 (0 where invalid: masked out of the loss, not a score)
    valid: np.ndarray  # [N] bool
    metrics: dict[str, float]
    # component -> [N] why each value is missing ("KIND: detail", judge.FAILURE_KINDS) or None; never mutated
    errors: Mapping[str, list[str | None]] = types.MappingProxyType({})


class RewardPool:
    def __init__(self, cfg: RewardsConfig):
        self.cfg = cfg
        self.judge = JudgeClient(cfg.judge) if cfg.judge.url else None
        self.embedder = EmbeddingScorer(cfg.embedding) if cfg.embedding_on else None
        self._batches = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rewards")
        self._judge_worker = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._embed_worker = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    @property
    def active(self) -> list[str]:
        return ["format", "modality"] + (["llm"] if self.judge else []) + (["embed"] if self.embedder else [])

    def submit(self, completions: list[str], solutions: list[str]) -> cf.Future:
        """Score asynchronously; ``.result()`` gives a ``RewardBatch``."""
        if len(completions) != len(solutions):
            raise ValueError(f"{len(completions)} completions for {len(solutions)} solutions")
        return self._batches.submit(self.score, list(completions), list(solutions))

    def score(self, completions: list[str], solutions: list[str]) -> RewardBatch:
        start = time.perf_counter()
        deadline = start + self.cfg.deadline_s
        rules = [score_rules(c, s, self.cfg.rules, self.cfg.modality_tags)
                 for c, s in zip(completions, solutions, strict=True)]
        n = len(completions)
        components = {"format": np.array([r.format for r in rules], np.float32),
                      "modality": np.array([r.modality for r in rules], np.float32)}
        # Accuracy rewards: the rules settle an answer that is not gradable (0) or equals the truth (1); the judge and
        # the embedding model score the rest (rules.py, steps 5 and 6).
        settled = np.array([0.0 if r.accuracy is None else r.accuracy for r in rules], np.float32)
        asked = [i for i, r in enumerate(rules) if r.accuracy is None]
        pairs = [(rules[i].answer, rules[i].truth) for i in asked]
        jobs: dict[str, cf.Future] = {}
        if judge := self.judge:
            judge.latencies.clear()
            # The judge cancels its own requests a little before the deadline, so its partial verdicts are kept; the
            # budget is taken when the job starts (it may queue behind another batch's).
            jobs["llm"] = self._judge_worker.submit(
                lambda: judge.verdicts(pairs, max(0.0, deadline - time.perf_counter() - _JUDGE_MARGIN_S)))
        if embedder := self.embedder:
            jobs["embed"] = self._embed_worker.submit(lambda: (embedder.cosine(pairs), [None] * len(pairs)))
        cosine = None
        errors: dict[str, list[str | None]] = {}
        for name, job in jobs.items():
            values = settled.copy()
            try:
                got, why = job.result(timeout=max(0.0, deadline - time.perf_counter()))
            except (cf.TimeoutError, cf.CancelledError) as e:  # past the deadline, or the pool is closing: missing
                job.cancel()  # if it never started, it never will
                reason = (f"{DEADLINE}: no value within rewards.deadline_s {self.cfg.deadline_s:g} s"
                          if isinstance(e, cf.TimeoutError) else f"{DEADLINE}: the reward pool was closed")
                got, why = [None] * len(asked), [reason] * len(asked)
            # Any other exception is a bug and reaches the trainer: the judge turns transport failures (connection,
            # timeout, 429, 5xx, malformed replies) into None itself, so a TypeError here is never a missing reward.
            errors[name] = [None] * n
            for i, reason in zip(asked, why, strict=True):
                errors[name][i] = reason
            got = np.array([np.nan if v is None else v for v in got], np.float32)
            if name == "embed":
                cosine = np.full(n, np.nan, np.float32)
                cosine[asked] = got
                emb = self.cfg.embedding
                got = np.where(np.isnan(got), np.nan, (got >= emb.threshold) if emb.binary else got).astype(np.float32)
            values[asked] = got
            components[name] = values
        batch = self._assemble(components, cosine, errors, n, time.perf_counter() - start)
        batch.metrics["reward_exact_match"] = float(sum(r.accuracy == 1.0 for r in rules))
        batch.metrics["reward_not_gradable"] = float(sum(r.accuracy == 0.0 for r in rules))
        return batch

    def _assemble(self, components, cosine, errors, n, seconds) -> RewardBatch:
        w = dataclasses.asdict(self.cfg.weights)
        valid = np.ones(n, bool)
        composite = np.zeros(n, np.float32)
        metrics: dict[str, float] = {"reward_seconds": seconds, "reward_samples": float(n)}
        for name, values in components.items():
            missing = np.isnan(values)
            valid &= ~missing
            composite += w[name] * np.nan_to_num(values)
            metrics[f"reward_{name}_mean"] = float(np.nanmean(values)) if (~missing).any() else float("nan")
            metrics[f"reward_{name}_missing"] = float(missing.sum())
        composite = np.where(valid, composite, 0.0).astype(np.float32)
        metrics["reward_composite_mean"] = float(composite[valid].mean()) if valid.any() else float("nan")
        metrics["reward_invalid"] = float((~valid).sum())
        if self.judge:
            kinds = Counter(e.split(":", 1)[0] for e in errors["llm"] if e is not None)
            metrics.update({f"reward_llm_missing_{kind}": float(kinds[kind]) for kind in FAILURE_KINDS})
            stats = self.judge.stats
            for key in ("judge_calls", "judge_cache_hits", "judge_flagged",
                        "judge_invalid_replies", "judge_cancelled"):
                metrics[key] = float(stats[key])
            if self.judge.latencies:
                metrics["judge_latency_p50"] = float(np.percentile(self.judge.latencies, 50))
                metrics["judge_latency_p95"] = float(np.percentile(self.judge.latencies, 95))
            if cosine is not None:
                suspicious = (components["llm"] == 1.0) & (cosine < self.cfg.low_similarity)
                metrics["judge_yes_low_similarity"] = float(suspicious.sum())
        return RewardBatch(components, composite, valid, metrics, types.MappingProxyType(errors))

    def close(self) -> None:
        for executor in (self._batches, self._judge_worker, self._embed_worker):
            executor.shutdown(wait=False, cancel_futures=True)


_KIND_WORDS = {"connection": "connection errors", "malformed": "malformed replies", "rejected": "rejected requests",
               "deadline": "past the deadline"}


def judge_warning(metrics: Mapping[str, float], step: int, cfg: RewardsConfig | None = None,
                  errors: Iterable[str | None] = ()) -> str | None:
    """The one warning line of a step whose (summed) metrics show at least ``cfg.judge_warn_share`` of its
    ``reward_samples`` without a judge reward, or None: the counts by kind, the most frequent reason of each kind
    among ``errors`` (the step's per-sample judge reasons, as many as this process has) and the judge's URL.
    ``cfg``: the pool's (anything else, e.g. a custom reward's config: the defaults, no URL)."""
    cfg = cfg if isinstance(cfg, RewardsConfig) else RewardsConfig()
    samples, missing = metrics.get("reward_samples", 0.0), metrics.get("reward_llm_missing", 0.0)
    if not samples or not missing or missing < cfg.judge_warn_share * samples:
        return None
    seen = Counter(e for e in errors if e is not None)
    parts = []
    for kind in FAILURE_KINDS:
        count = metrics.get(f"reward_llm_missing_{kind}", 0.0)
        if count:
            reason = next((e.split(": ", 1)[-1] for e, _ in seen.most_common() if e.startswith(kind + ":")), None)
            parts.append(f"{count:.0f} {_KIND_WORDS[kind]}" + (f": {reason}" if reason else ""))
    return (f"judge: {missing:.0f} of {samples:.0f} samples of step {step} have no judge reward "
            f"({'; '.join(parts) or 'reason not reported'}) -- {cfg.judge.url or 'judge URL unknown'}")

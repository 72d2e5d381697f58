"""One model over a list of tasks (``evaluate``): generate what the cache lacks, judge or exact-match it (medix
tasks: the reward pool), and write ``results.json`` and ``results.md``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medix_jax.evaluate.cache import Cache
from medix_jax.evaluate.judging import EvalJudge
from medix_jax.evaluate.report import results_markdown
from medix_jax.evaluate.scoring import exact_match, judged_text, medix_result, task_result
from medix_jax.evaluate.tasks import Item, Task, load_items
from medix_jax.rewards.judge import JudgeConfig


def check_scorable(tasks: list[Task], judge: EvalJudge | None) -> None:
    """A ValueError naming the report tasks when there is no judge to score them."""
    reports = [t.name for t in tasks if t.kind == "report"]
    if judge is None and reports:
        raise ValueError(f"task(s) {', '.join(reports)}: a report task is scored by a judge only; it needs --judge")


def evaluate(tasks: list[Task], generator, judge: EvalJudge | None, out: Path, batch_size: int = 8,
             pool=None) -> dict:
    """Generate (resumably, cached in ``out/cache``), score and write ``out/results.{json,md}``; returns the summary
    ``{"scorer", "tasks": {name: result}, "overall", "counts"}``.

    ``generator``: ``.generate(items) -> list[str | None]`` (``SamplerGenerator``, ``OpenAIGenerator``).
    ``judge``: scores mcq/open/report tasks; None: mcq/open by exact match, report tasks refused. ``pool``: what
    scores medix tasks, an object with ``RewardPool.score(completions, solutions) -> RewardBatch`` (the training
    job's own pool, so the evaluation uses the run's reward settings); None: a ``RewardPool`` with the judge's
    config (none without a judge) and the default embedding, built when a medix task is present and closed here.
    """
    check_scorable(tasks, judge)
    out.mkdir(parents=True, exist_ok=True)
    own_pool = None
    if pool is None and any(t.kind == "medix" for t in tasks):
        from medix_jax.rewards.pool import RewardPool, RewardsConfig

        pool = own_pool = RewardPool(RewardsConfig(judge=judge.cfg if judge else JudgeConfig()))
    results: dict[str, dict] = {}
    counts: Counter[str] = Counter()
    try:
        for task in tasks:
            items = load_items(task)
            cache = Cache(out / "cache" / f"{task.name}.jsonl")
            try:
                _generate(task, items, generator, cache, batch_size, counts)
                if judge is not None and task.kind != "medix":
                    _judge(task, items, judge, cache, counts)
                if task.kind == "medix":
                    results[task.name] = medix_result(task, items, cache.generations, pool, cache)
            finally:
                cache.close()
            if task.kind == "medix":
                continue  # scored above, while the cache was open (its rewards are written to it)
            if judge is not None:
                scores = [cache.judgements.get(it.id, {}).get("score") for it in items]
                results[task.name] = task_result(task, scores)
            else:
                results[task.name] = task_result(task, [
                    None if cache.generations.get(it.id) is None else
                    exact_match(judged_text(cache.generations[it.id]), it.reference, it.letter) for it in items])
    finally:
        if own_pool is not None:
            own_pool.close()
    scored = [r["score"] for r in results.values() if r["score"] is not None]
    summary = {"scorer": "exact" if judge is None else "judge", "tasks": results,
               "overall": float(np.mean(scored)) if scored else None, "counts": {k: v for k, v in counts.items() if v}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_markdown(summary))
    return summary


def _generate(task: Task, items: list[Item], generator, cache: Cache, batch_size: int, counts: Counter[str]) -> None:
    """Generations for the items the cache has none for, ``batch_size`` at a time, each cached as it comes."""
    todo = [it for it in items if cache.generations.get(it.id) is None]
    counts["generations_reused"] += len(items) - len(todo)
    for start in tqdm(range(0, len(todo), batch_size), desc=f"{task.name}: generate", unit="batch"):
        chunk = todo[start:start + batch_size]
        for item, text in zip(chunk, generator.generate(chunk), strict=True):
            if text is not None:
                cache.add(item.id, generation=text)
                counts["generations_new"] += 1
            else:
                counts["generations_failed"] += 1


def _judge(task: Task, items: list[Item], judge: EvalJudge, cache: Cache, counts: Counter[str]) -> None:
    """Judgements for the generations the cache has no score for, each cached as it comes."""
    work = [(it, cache.generations[it.id]) for it in items if it.id in cache.generations
            and (cache.judgements.get(it.id) or {}).get("score") is None]
    counts["judgements_reused"] += sum((cache.judgements.get(it.id) or {}).get("score") is not None for it in items)
    bar = tqdm(total=len(work), desc=f"{task.name}: judge", unit="sample")

    def done(item, judgement):
        cache.add(item.id, judgement=judgement)
        counts["judgements_new" if judgement["score"] is not None else "judgements_missing"] += 1
        if judgement["score"] is None:  # "round K: KIND: detail"
            counts[f"judgements_missing_{judgement['error'].split(': ', 2)[1]}"] += 1
        bar.update(1)

    judge.judge(task, work, done)
    bar.close()

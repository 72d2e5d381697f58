"""Scoring without a judge and per-task results: the judged part of a generation (``judged_text``), exact match
(``exact_match``), a judged or exact-matched task's result (``task_result``) and a medix task's result from the
training reward pool (``medix_result``)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medix_jax.evaluate.cache import Cache
from medix_jax.evaluate.tasks import Item, Task
from medix_jax.rewards.rules import (
    MEDIX_MODALITY_TAGS,
    BadSolution,
    answer_block,
    extract_answer,
    normalise_tags,
    parse_solution,
)


def normalise_answer(text: str) -> str:
    """For exact match: casefolded, whitespace collapsed, surrounding whitespace and trailing ``.`` stripped."""
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".").strip()


def exact_match(answer: str | None, reference: str, letter: str | None = None) -> float:
    """1.0 when ``answer`` equals ``reference`` after ``normalise_answer`` (or, given the MCQ option's ``letter``,
    is ``A``, ``A.``, ``(A)`` or ``A. reference``), else 0.0; no answer (None) is wrong."""
    if answer is None:
        return 0.0
    accepted = {normalise_answer(reference)}
    if letter:
        short = normalise_answer(letter)
        accepted |= {short, f"({short})", normalise_answer(f"{letter}. {reference}")}
    return float(normalise_answer(answer) in accepted)


def judged_text(generation: str) -> str:
    """What follows the last ``</think>`` or ``</thinking>`` (the whole text when there is none); when that holds an
    ``<answer>...</answer>`` (a model trained on the MediX format), the answer's text. Whitespace inside the tags is
    ignored, as the training rewards ignore it."""
    text = normalise_tags(generation)
    ends = [text.rfind(tag) + len(tag) for tag in ("</think>", "</thinking>") if tag in text]
    tail = text[max(ends):].strip() if ends else text.strip()
    answer = answer_block(tail)
    return tail if answer is None else answer


def task_result(task: Task, scores: list[float | None]) -> dict:
    """An mcq/open/report task's result; a sample without a score (None) counts as wrong, as the reference scores it
    (docs/reference.md#evaluation-protocol)."""
    judged = [s for s in scores if s is not None]
    return {"kind": task.kind, "samples": len(scores), "judged": len(judged), "missing": len(scores) - len(judged),
            "score": sum(judged) / len(scores) if scores else None}


def medix_result(task: Task, items: list[Item], generations: dict, pool, cache: Cache | None = None) -> dict:
    """A medix task's result: the pool's reward components for every generation in one ``score`` call, their
    composite and ``exact``, each a mean over all samples (a sample without a generation, or a missing (NaN)
    component, counts as 0 and as ``missing``); ``score`` = ``accuracy`` = ``llm`` when the pool has a judge, else
    ``exact``. With ``cache``, each generation's rewards (None where missing) and the pool's reasons for the missing
    ones (``RewardBatch.errors``) are written to it."""
    done = [it for it in items if generations.get(it.id) is not None]
    completions = [generations[it.id] for it in done]
    tags = getattr(getattr(pool, "cfg", None), "modality_tags", MEDIX_MODALITY_TAGS)
    try:
        truth = {it.id: parse_solution(it.reference, tags)[1] for it in items}
        batch = pool.score(completions, [it.reference for it in done]) if done else None
    except BadSolution as e:
        raise ValueError(f"task {task.name}: {e}") from e
    if batch is None:
        components = {name: np.zeros(0, np.float32) for name in getattr(pool, "active", ("format", "modality"))}
        composite = np.zeros(0, np.float32)
    else:
        components, composite = batch.components, batch.composite
    if cache is not None and batch is not None:
        errors = getattr(batch, "errors", None) or {}
        for k, it in enumerate(done):
            reward = {name: None if np.isnan(v[k]) else float(v[k]) for name, v in components.items()}
            reward["composite"] = float(composite[k])
            why = {name: e[k] for name, e in errors.items() if e[k] is not None}
            cache.add(it.id, reward={**reward, **({"errors": why} if why else {})})
    invalid = np.zeros(len(done), bool)
    for values in components.values():
        invalid |= np.isnan(values)
    n, judged = len(items), "llm" in components
    mean = lambda total: float(total) / n if n else None  # noqa: E731
    result: dict[str, Any] = {"kind": "medix", "scorer": "judge" if judged else "exact", "samples": n,
                              "scored": len(done) - int(invalid.sum()), "missing": n - len(done) + int(invalid.sum())}
    rules = [c for c in ("format", "modality") if c in components]
    result.update({name: mean(np.nansum(components[name])) for name in rules})
    result["exact"] = mean(sum(exact_match(extract_answer(c), truth[it.id])
                               for it, c in zip(done, completions, strict=True)))
    result.update({name: mean(np.nansum(values)) for name, values in components.items() if name not in rules})
    result["composite"] = mean(composite.sum())
    result["score"] = result["accuracy"] = result["llm" if judged else "exact"]
    return result

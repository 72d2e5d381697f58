"""Reference-based evaluation (docs/reference.md#evaluation-protocol): ``python -m medix_jax.evaluate`` (its
protocol is the docstring of ``evaluate/cli.py``) and ``python -m medix_jax.evaluate.fetch`` (the public datasets
into the registry's layout).

Modules: ``tasks`` (the registry, ``Task``, ``Item``, ``load_items``), ``generators`` (our sampler or an
OpenAI-compatible endpoint, greedy; ``make_generator`` from a ``--model``), ``judging`` (``EvalJudge``: three rounds
against the reference answer), ``scoring`` (exact match, task results, medix tasks through the reward pool),
``cache`` (per-task JSONL, so a run resumes), ``harness`` (``evaluate``: one model over the tasks), ``report``
(``results.md``, the side-by-side comparison), ``cli`` (the command line); for ``fetch``: ``hub`` (reading hub
downloads), ``sources`` (``SOURCES``: each task's datasets and record conversion) and ``validation``.

Python API (the training job evaluates its held-out split through the same code)::

    task = medix_task("heldout", data_dir, split="test", limit=256)
    generator = SamplerGenerator(model, tokenizer, max_tokens, mesh=mesh)   # greedy, under the model's mesh
    summary = evaluate([task], generator, judge=None, out=run_dir / "eval", pool=reward_pool)
    summary["tasks"]["heldout"]["score"]
"""

from medix_jax.evaluate.generators import SamplerGenerator
from medix_jax.evaluate.harness import evaluate
from medix_jax.evaluate.tasks import load_items, medix_task

__all__ = ["SamplerGenerator", "evaluate", "load_items", "medix_task"]

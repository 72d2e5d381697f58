"""Reference-based evaluation (docs/reference.md#evaluation-protocol):
``python -m medix_jax.evaluate --model (RUN_DIR|HF_DIR|openai:URL) [--model ...] [--tasks REGISTRY] [--judge URL]``.

0. **Data**: ``python -m medix_jax.evaluate.fetch --src DIR`` converts the public datasets, as their hubs distribute
   them, into the layout the registry expects and validates every record (``medix_jax/evaluate/fetch.py``).
1. **Tasks** come from a YAML registry (``configs/eval/tasks.yaml``: the 17 reference tasks): a local parquet or
   JSONL file (images inline bytes, ``{"bytes", "path"}`` structs or paths relative to the file) or a prepared tfds
   split (``path`` a data dir written by ``python -m medix_jax.data.prepare``, with ``split`` and/or ``dataset``,
   default ``test`` / ``medix_rl``; text fields come back as UTF-8 bytes and are decoded), a field mapping, an
   optional ``limit`` (the first N records) and a kind. ``--tasks`` is the registry file; a relative path that does
   not exist is looked up in the project the package ships with (so the default works from any directory):

   * ``mcq``: options appended to the question as "A. ...", the ground truth is the option *text*;
   * ``open``, ``report`` (a 0-5 rubric, judge only);
   * ``medix``: MediX-R1 data, ground truth ``"<TAG> answer"`` (fields default to question=problem,
     answer=solution, image=images, id=id), asked with ``MEDIX_PROMPT``; the answer is
     ``<TAG><thinking>...</thinking><answer>...</answer>``.
2. **Generation** is greedy: our sampler from a training run (its newest checkpoint, built from the config stored
   in it, with the run's own tokenizer) or an HF directory, or any OpenAI-compatible endpoint (``openai:URL``,
   ``--model-name``), so baselines go through the same harness. An endpoint is sent every sampling parameter
   explicitly (temperature 0, top_p 1, top_k -1, min_p 0, no repetition / presence / frequency penalty), so that a
   model's ``generation_config.json`` defaults, which vLLM applies to requests that leave them out, cannot make it
   sample. A training run is asked with the prompt it was trained with (its ``data.prompt``, the MediX format
   prompt unless the run changed it) and its image pixel bounds; otherwise each item carries its task kind's
   user-turn template (``MEDIX_PROMPT`` for medix, else ``<image>{question}``). ``--prompt`` overrides both for
   every task. The judged text is what follows the last ``</think>`` or ``</thinking>``; when that holds an
   ``<answer>...</answer>``, its content.
3. **Scoring.** The scorer of the run (``"scorer"`` in the results) is ``judge`` with ``--judge`` and ``exact``
   without one:

   * ``judge`` (mcq, open, report): the reward pool's judge transport (``rewards.judge.chat``: concurrency,
     retries); three rounds in one conversation (after each reply the judge is asked to re-evaluate); every reply
     must be a JSON object ``{"score": s}`` (retried once, else the round is missing). Decoding is constrained to
     that object by structured outputs (OpenAI ``response_format`` json_schema, enforced by vLLM) while the server
     takes them; the first request it rejects with a 4xx that succeeds without them switches them off for the rest
     of the run. Without them the object may also come in a markdown code fence or with text around it. Binary
     tasks: 2-of-3 majority; report tasks: the mean of the three 0-5 rubric scores, divided by 5
     (docs/reference.md#evaluation-protocol).
   * ``exact`` (mcq, open): the judged text equals the reference after ``normalise_answer`` (casefold, whitespace
     collapsed, surrounding whitespace and a trailing ``.`` stripped); an MCQ answer may also be the option's
     letter (``A``, ``A.``, ``(A)``, ``A. text``). A report task without a judge is an error.
   * ``medix`` tasks are scored with the training reward code, one ``RewardPool.score`` call per task: components
     ``format``, ``modality``, ``embed`` (when on) and ``llm`` (when the pool has a judge) and their ``composite``
     (the pool's, 0 for a sample with a missing component), plus ``exact``: ``extract_answer`` of the generation
     against the ground-truth answer, normalised as above. ``score`` (= ``accuracy``) is ``llm`` when there is a
     judge, else ``exact``. Rewards are recomputed from the cached generations on every run.
4. **Results**: per task, the score over *all* samples -- a sample without a judgement or reward (judge, reward or
   generation failed) counts as wrong, as the reference scores it -- and, beside it, how many are missing; overall:
   the unweighted mean over tasks. Written as ``results.json`` and ``results.md`` in ``--out``. Every generation and
   judgement is appended to ``--out/cache/TASK.jsonl`` as soon as it exists, so an interrupted run resumes without
   redoing finished samples, and missing judgements are judged again on the next run. A judgement that failed says
   why (``"round K: KIND: detail"``, KIND ``connection``, ``malformed`` or ``rejected``, counted apart as
   ``judgements_missing_KIND``); a medix sample's rewards and the pool's reasons for a missing one are cached too.
5. **Several models** (``--model`` repeated): each is evaluated into its own subdirectory of ``--out`` (named after
   the run, the HF directory or the served model), and one side-by-side table (rows: tasks and the overall mean;
   columns: models) is printed and written to ``--out/comparison.{md,json}``.
6. **Checks before work**: ``--out`` must be writable, every model is found (and loaded) before its ``run.json``
   is written (a wrong path does not tie ``--out`` to it), and a configured judge gets one probe request
   (``rewards.judge.check_judge``; ``--no-judge-check`` skips it): unreachable, the command stops with its URL and the
   error, exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from medix_jax import cli
from medix_jax.evaluate.generators import make_generator, model_kind, model_label
from medix_jax.evaluate.harness import check_scorable, evaluate
from medix_jax.evaluate.judging import EvalJudge
from medix_jax.evaluate.report import comparison, comparison_markdown, results_markdown
from medix_jax.evaluate.tasks import DEFAULT_PROMPT, DEFAULT_TASKS, load_tasks
from medix_jax.rewards.judge import JudgeConfig, JudgeUnreachable


def _models(specs: list[str], names: list[str] | None) -> list[tuple[str, str | None]]:
    """(spec, served name) per ``--model``: the ``--model-name`` values go, in order, to the ``openai:`` models."""
    names = list(names or [])
    endpoints = [s for s in specs if s.startswith("openai:")]
    if endpoints and names and len(names) != len(endpoints):
        raise ValueError(f"{len(endpoints)} openai: model(s) but {len(names)} --model-name value(s): give one "
                         "--model-name per openai: --model, in the same order")
    served = iter(names)
    return [(s, next(served, None) if s.startswith("openai:") else None) for s in specs]


def _labels(models: list[tuple[str, str | None]]) -> list[str]:
    """``model_label`` of each, made unique with ``-2``, ``-3``, ... suffixes."""
    labels: list[str] = []
    seen: Counter[str] = Counter()
    for spec, name in models:
        label = model_label(spec, name)
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels


def _check_out(out: Path, setting: dict, explicit_prompt: str | None) -> None:
    """A ValueError when ``out`` holds the results of another model or setting (its ``run.json``)."""
    previous = out / "run.json"
    before = json.loads(previous.read_text()) if previous.exists() else None
    if before and before.get("prompt") == DEFAULT_PROMPT and explicit_prompt is None:
        before["prompt"] = None  # written before per-kind templates: the same prompts for mcq/open/report
    if before is not None and before != setting:
        raise ValueError(f"{out} holds results of another model or setting ({previous}: model "
                         f"{before.get('model')!r}); use another --out")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m medix_jax.evaluate``."""
    parser = cli.parser("medix_jax.evaluate", __doc__)
    parser.add_argument("--model", action="append", required=True, metavar="RUN_DIR|HF_DIR|openai:URL",
                        help="the model to evaluate: a training run (its newest checkpoint; RUN_DIR/STEP for "
                             "another), an HF directory, or an OpenAI-compatible endpoint; repeat it to evaluate "
                             "several models side by side")
    parser.add_argument("--model-name", action="append", metavar="NAME",
                        help="the name the endpoint serves an openai:URL model under; one per openai: --model, in "
                             "the same order")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help="task registry (YAML); a relative path that does not exist here is taken from the "
                             "project the package ships with")
    parser.add_argument("--only", help="comma-separated task names to run (default: every task of the registry)")
    parser.add_argument("--data-root", help="directory the task paths are relative to (default: the registry's "
                                            "data_root, relative to the current directory)")
    parser.add_argument("--judge", help="judge base URL, e.g. http://127.0.0.1:8001/v1 (without one: exact match; "
                                        "report tasks need it)")
    parser.add_argument("--judge-model", default="Qwen/Qwen3-14B", help="the model name the judge server serves")
    parser.add_argument("--judge-check", action=argparse.BooleanOptionalAction, default=True,
                        help="send the judge one probe request at start-up and stop if it does not answer")
    parser.add_argument("--out", default="eval_results",
                        help="results directory (with several models: one subdirectory per model and the "
                             "comparison table)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="generation budget per sample (tokens)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples generated together")
    parser.add_argument("--prompt", help="user-turn template ({question}, <image>) for every task (default: a "
                                         "training run's own data.prompt; else MEDIX_PROMPT for medix tasks and "
                                         "<image>{question} for the others)")
    parser.add_argument("--vllm-params", action=argparse.BooleanOptionalAction, default=True,
                        help="send an openai: model vLLM's greedy top_k=-1, min_p=0, repetition_penalty=1 as well as "
                             "temperature 0, top_p 1 and zero penalties (--no-vllm-params: a server that rejects "
                             "unknown parameters)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                        help="let a thinking judge think (chat_template_kwargs.enable_thinking)")
    return parser


def main(argv=None) -> int:
    """``python -m medix_jax.evaluate``: 0, or 2 with a one-line error (module docstring, point 6)."""
    args = build_parser().parse_args(argv)
    try:
        tasks = load_tasks(args.tasks, args.data_root, args.only.split(",") if args.only else None)
        models = _models(args.model, args.model_name)
        for spec, name in models:  # every model found before any work
            model_kind(spec, name)
        judge = None if not args.judge else EvalJudge(JudgeConfig(url=args.judge, model=args.judge_model,
                                                                  enable_thinking=args.thinking))
        check_scorable(tasks, judge)  # before the model is loaded
        out = Path(args.out)
        cli.check_writable(out, "--out")
        labels = _labels(models)
        dirs = [out] if len(models) == 1 else [out / label for label in labels]
        specs = [{"model": spec, "model_name": name, "prompt": args.prompt, "max_tokens": args.max_tokens,
                  "judge_model": args.judge_model, "thinking": args.thinking} for spec, name in models]
        for directory, setting in zip(dirs, specs, strict=True):
            _check_out(directory, setting, args.prompt)
        if judge is not None and args.judge_check:
            judge.check()
        summaries = {}
        for (spec, name), label, directory, run in zip(models, labels, dirs, specs, strict=True):
            generator = make_generator(spec, name, args.max_tokens, args.prompt, args.vllm_params)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "run.json").write_text(json.dumps(run, indent=2))  # only once the model is loaded
            summary = summaries[label] = evaluate(tasks, generator, judge, directory, args.batch_size)
            print(("" if len(models) == 1 else f"{label} ({spec}):\n") + results_markdown(summary)
                  + f"\n{summary['counts']}\nresults: {directory / 'results.json'}", flush=True)
        if len(models) > 1:
            table = comparison(summaries, {label: {"model": spec, "model_name": name, "dir": str(d)}
                                           for label, (spec, name), d in zip(labels, models, dirs, strict=True)})
            (out / "comparison.json").write_text(json.dumps(table, indent=2))
            (out / "comparison.md").write_text(comparison_markdown(table))
            print("\n" + comparison_markdown(table) + f"side by side: {out / 'comparison.md'}")
    except (FileNotFoundError, ValueError, cli.Unwritable, JudgeUnreachable) as e:
        return cli.fail("evaluate", e)
    return 0

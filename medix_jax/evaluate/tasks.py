"""Evaluation tasks: the YAML registry (``configs/eval/tasks.yaml``), what a task is (``Task``) and its samples
(``Item``), read from a parquet / JSONL file or a prepared tfds split (``load_items``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

from medix_jax.data.prompts import MEDIX_PROMPT

DEFAULT_PROMPT = "<image>{question}"
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout the package ships with
DEFAULT_TASKS = "configs/eval/tasks.yaml"
KINDS = ("mcq", "open", "report", "medix")
MEDIX_FIELDS = {"question": "problem", "answer": "solution", "image": "images", "id": "id"}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # mcq | open | report | medix
    path: str  # a parquet / JSONL file, or (with ``split``) a tfds data dir
    fields: dict  # question, answer, and optionally options, image, id
    split: str | None = None  # set: ``path`` is a prepared tfds data dir, read with ``tfds.data_source``
    dataset: str = "medix_rl"  # the tfds dataset name under ``path``
    limit: int | None = None  # only the first ``limit`` records


@dataclasses.dataclass
class Item:
    id: str
    question: str  # as the model sees it (options appended for MCQ)
    reference: str  # medix: the ``"<TAG> answer"`` ground truth
    images: list[bytes]
    prompt: str = DEFAULT_PROMPT  # the user-turn template of the task's kind ({question}, <image>)
    letter: str | None = None  # MCQ: the right option's letter (also accepted by exact match)


def default_fields(kind: str) -> dict:
    """The field mapping a registry entry starts from: MediX's record fields for ``medix``, else question/answer."""
    return dict(MEDIX_FIELDS) if kind == "medix" else {"question": "question", "answer": "answer"}


def template(kind: str) -> str:
    """The user-turn template a task kind is asked with: ``MEDIX_PROMPT`` for medix, else ``<image>{question}``."""
    return MEDIX_PROMPT if kind == "medix" else DEFAULT_PROMPT


def medix_task(name: str, data_dir: str, split: str = "test", dataset: str = "medix_rl",
               limit: int | None = None) -> Task:
    """A ``medix`` task on a split prepared by ``python -m medix_jax.data.prepare`` (``data_dir``: its tfds data
    dir), optionally only its first ``limit`` records."""
    return _checked(Task(name, "medix", str(data_dir), default_fields("medix"), split, dataset, limit))


def _checked(task: Task) -> Task:
    """``task``, or a ValueError for an unknown kind or a bad ``limit``."""
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name}: kind must be one of {', '.join(KINDS)}, not {task.kind!r}")
    if task.limit is not None and (isinstance(task.limit, bool) or not isinstance(task.limit, int) or task.limit < 0):
        raise ValueError(f"task {task.name}: limit must be an integer >= 0, not {task.limit!r}")
    return task


def registry_path(path: str | Path = DEFAULT_TASKS) -> Path:
    """The task registry ``path``; a relative path that does not exist here is taken relative to the project the
    package ships with (``PROJECT_ROOT``), so ``configs/eval/tasks.yaml`` works from any directory. A
    ``FileNotFoundError`` naming both places when neither has it."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        if not path.is_file():
            raise FileNotFoundError(f"task registry {path} not found (give --tasks an existing YAML file)")
        return path
    shipped = PROJECT_ROOT / path
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"task registry {path} not found here ({Path.cwd()}) nor in {PROJECT_ROOT} (give --tasks "
                            f"an existing YAML file, e.g. {PROJECT_ROOT / DEFAULT_TASKS})")


def load_tasks(path: str | Path, data_root: str | Path | None = None, only: list[str] | None = None) -> list[Task]:
    """The registry's tasks (``only``: these names); paths relative to ``data_root`` (default: the registry's). An
    entry with ``split`` or ``dataset``, or whose path is a directory, is a prepared tfds split. ``path`` is found
    as ``registry_path`` finds it."""
    registry = yaml.safe_load(registry_path(path).read_text())
    root = Path(data_root or registry.get("data_root", "."))
    tasks = []
    for spec in registry["tasks"]:
        if only and spec["name"] not in only:
            continue
        file = Path(spec["path"])
        file = file if file.is_absolute() else root / file
        prepared = "split" in spec or "dataset" in spec or file.is_dir()
        tasks.append(_checked(Task(
            spec["name"], spec["kind"], str(file), {**default_fields(spec["kind"]), **spec.get("fields", {})},
            spec.get("split", "test") if prepared else None, spec.get("dataset", "medix_rl"), spec.get("limit"))))
    if only and {t.name for t in tasks} != set(only):
        raise ValueError(f"unknown tasks: {sorted(set(only) - {t.name for t in tasks})}")
    return tasks


def task_rows(task: Task) -> Iterator[dict]:
    """The task's records as dicts, the first ``task.limit`` of them when set."""
    path = Path(task.path)
    if task.split is not None:
        rows = _prepared_rows(task)
    elif not path.is_file():
        raise FileNotFoundError(f"task {task.name}: {path} not found")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = iter(pq.read_table(path).to_pylist())
    else:
        rows = _jsonl(path)
    return rows if task.limit is None else itertools.islice(rows, task.limit)


def _jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def _prepared_rows(task: Task) -> Iterator[dict]:
    """Records of a prepared tfds split; its text fields (UTF-8 bytes) decoded, the image field left as bytes."""
    import tensorflow_datasets as tfds

    if not (Path(task.path) / task.dataset).is_dir():
        raise FileNotFoundError(f"task {task.name}: no prepared dataset {task.dataset} in {task.path} (prepare one "
                                "with python -m medix_jax.data.prepare)")
    try:
        source = tfds.data_source(task.dataset, data_dir=task.path, split=task.split)
    except (KeyError, ValueError) as e:  # an unknown split
        raise ValueError(f"task {task.name}: {task.dataset} in {task.path} has no split {task.split!r}: {e}") from e
    image = task.fields.get("image")
    n = len(source) if task.limit is None else min(task.limit, len(source))
    for i in range(n):
        yield {k: v.decode("utf-8") if isinstance(v, bytes) and k != image else v for k, v in source[i].items()}


def read_image(entry, base: Path) -> bytes:
    """An image field's bytes: inline bytes, a ``{"bytes", "path"}`` struct, or a path (relative to ``base``)."""
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, bytes):
        return entry
    return (Path(entry) if Path(entry).is_absolute() else base / entry).read_bytes()


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def load_items(task: Task) -> list[Item]:
    """The task's samples; MCQ answers given as a letter or an index become the option text."""
    path, f = Path(task.path), task.fields
    items = []
    for i, row in enumerate(task_rows(task)):
        missing = [f[k] if k in f else k for k in ("question", "answer") + ("options",) * (task.kind == "mcq")
                   if f.get(k, k) not in row]
        if missing:  # a field mapping that does not fit the file
            raise ValueError(f"task {task.name}, row {i}: no column {', '.join(map(repr, missing))} (it has "
                             f"{', '.join(sorted(map(str, row)))}); fix the task's fields in the registry")
        question, answer, letter = str(row[f["question"]]), row[f["answer"]], None
        if task.kind == "mcq":
            options = row[f.get("options", "options")]
            options = list(options.values()) if isinstance(options, dict) else list(options)
            answer = option_text(answer, options, task.name, i)
            letter = LETTERS[options.index(answer)]
            question += "\n" + "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
        images = row.get(f["image"]) if "image" in f else None
        images = [] if images is None else list(images) if isinstance(images, (list, tuple, np.ndarray)) else [images]
        items.append(Item(str(row.get(f.get("id", "id"), i)), question, str(answer),
                          [read_image(e, path.parent) for e in images], template(task.kind), letter))
    return items


def option_text(answer, options: list, task: str, row: int) -> str:
    """The MCQ ground truth as option text: given as the text itself, a single letter, or an index."""
    if isinstance(answer, str) and answer.strip() in options:
        return answer.strip()
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:len(options)]:
        return options[LETTERS.index(answer.strip().upper())]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return options[answer]
    raise ValueError(f"task {task}, row {row}: answer {answer!r} is not an option, its letter or its index")

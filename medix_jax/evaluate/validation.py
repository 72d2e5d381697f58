"""Validation of a task's file against the registry's field mapping (``validate``): every mapped field present,
question and answer not empty, an MCQ answer that resolves to one of the options, every image fully decodable, ids
unique; then read back with ``load_items``."""

from __future__ import annotations

from pathlib import Path

from medix_jax.evaluate.tasks import Task, load_items, option_text, read_image, task_rows

MAX_PROBLEMS = 5  # problems listed per invalid task


def validate(task: Task, limit: int = MAX_PROBLEMS) -> tuple[int, list[str]]:
    """(records, problems) of a task's file against its field mapping: each problem ``"field F (column C), row R:
    what"``, at most ``limit`` listed (and a count of the rest). The evaluator then reads it with ``load_items``."""
    from medix_jax.data.image import BadImage, decode_image

    problems: list[str] = []
    more = 0
    f = task.fields
    seen: dict[str, int] = {}

    def problem(field: str, row: int, what: str) -> None:
        nonlocal more
        if len(problems) < limit:
            problems.append(f"field {field} (column {f.get(field, field)!r}), row {row}: {what}")
        else:
            more += 1

    n = 0
    try:
        rows = list(task_rows(task))
    except (OSError, ValueError) as e:
        return 0, [str(e)]
    base = Path(task.path).parent
    for i, row in enumerate(rows):
        n += 1
        for field in ("question", "answer"):
            value = row.get(f[field])
            if f[field] not in row:
                problem(field, i, f"missing (the record has {', '.join(sorted(row)) or 'no fields'})")
            elif value is None or not str(value).strip():
                problem(field, i, "empty")
        if task.kind == "mcq":
            column = f.get("options", "options")
            options = row.get(column)
            if isinstance(options, dict):
                options = list(options.values())
            if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(
                    isinstance(o, str) and o.strip() for o in options):
                problem("options", i, f"not a list of at least two option texts: {options!r:.80}")
            elif f["answer"] in row:
                try:
                    option_text(row[f["answer"]], list(options), task.name, i)
                except ValueError:
                    problem("answer", i, f"{row[f['answer']]!r:.60} is not one of the options, their letters or "
                                         "their indices")
        if "image" in f:
            entries = row.get(f["image"])
            if f["image"] not in row or entries is None:
                problem("image", i, "missing")
            else:
                for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
                    try:
                        decode_image(read_image(entry, base))
                    except (OSError, BadImage) as e:
                        problem("image", i, f"{entry if isinstance(entry, str) else 'inline image'}: {e}")
        if f.get("id", "id") in row:
            key = str(row[f.get("id", "id")])
            if key in seen:
                problem("id", i, f"{key!r} repeats row {seen[key]}")
            seen.setdefault(key, i)
    if not n:
        problems.append("no records")
    if more:
        problems.append(f"... and {more} more")
    if not problems:
        try:
            load_items(task)
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"load_items: {e}")
    return n, problems

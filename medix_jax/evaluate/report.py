"""The report of a run: ``results.md`` of one model (``results_markdown``), and several models side by side
(``comparison``, ``comparison_markdown``: ``comparison.{json,md}``)."""

from __future__ import annotations


def _percent(value: float | None) -> str:
    """A score in percent, one decimal; ``–`` for none."""
    return "–" if value is None else f"{100 * value:.1f}"


MEDIX_COLUMNS = ("format", "modality", "exact", "embed", "llm", "composite", "score")


def results_markdown(summary: dict) -> str:
    """``results.md``: every task's score; then, for medix tasks, their reward components (percentages)."""
    lines = ["| task | kind | score | missing / samples |", "|---|---|---:|---:|"]
    for name, r in summary["tasks"].items():
        lines.append(f"| {name} | {r['kind']} | {_percent(r['score'])} | {r['missing']} / {r['samples']} |")
    lines.append(f"| **overall (unweighted mean)** | | **{_percent(summary['overall'])}** | |")
    if summary.get("scorer", "judge") == "judge":
        lines.append("\nscore: over all samples, a missing judgement counting as wrong (it is judged again next run).")
    else:
        lines.append("\nscore: exact match (no judge) of the answer with the reference, over all samples, a missing "
                     "generation counting as wrong.")
    medix = {name: r for name, r in summary["tasks"].items() if r["kind"] == "medix"}
    if medix:
        lines += ["", "MediX tasks (the training reward pool; score: llm with a judge, else exact):", "",
                  "| task | " + " | ".join(MEDIX_COLUMNS) + " | missing / samples |",
                  "|---|" + "---:|" * (len(MEDIX_COLUMNS) + 1)]
        for name, r in medix.items():
            cells = " | ".join(_percent(r.get(c)) for c in MEDIX_COLUMNS)
            lines.append(f"| {name} | {cells} | {r['missing']} / {r['samples']} |")
    return "\n".join(lines) + "\n"


def comparison(summaries: dict[str, dict], models: dict[str, dict] | None = None) -> dict:
    """Several models' summaries side by side: ``{"models", "tasks": {task: {label: score}}, "missing": {task:
    {label: n}}, "overall": {label: mean}}`` (tasks in the order they were evaluated)."""
    tasks = list(dict.fromkeys(name for summary in summaries.values() for name in summary["tasks"]))
    return {"models": models or {label: {} for label in summaries},
            "tasks": {t: {label: s["tasks"].get(t, {}).get("score") for label, s in summaries.items()} for t in tasks},
            "missing": {t: {label: s["tasks"].get(t, {}).get("missing") for label, s in summaries.items()}
                        for t in tasks},
            "overall": {label: s["overall"] for label, s in summaries.items()}}


def comparison_markdown(table: dict) -> str:
    """``comparison.md``: rows are tasks and the overall mean, columns are models (scores in %, missing samples in
    brackets)."""
    labels = list(table["overall"])

    def cell(task, label):
        missing = table["missing"][task][label]
        return _percent(table["tasks"][task][label]) + (f" ({missing} missing)" if missing else "")

    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {task} | " + " | ".join(cell(task, label) for label in labels) + " |" for task in table["tasks"]]
    lines.append("| **overall (unweighted mean)** | " + " | ".join(f"**{_percent(table['overall'][label])}**"
                                                                   for label in labels) + " |")
    lines.append("\nscore: over all samples, a missing judgement or generation counting as wrong; each model's own "
                 "results are in its subdirectory.")
    return "\n".join(lines) + "\n"

"""The 17 evaluation tasks from the public datasets, as their hubs distribute them:
``python -m medix_jax.evaluate.fetch --src DIR [--out eval_data] [--tasks configs/eval/tasks.yaml] [--only a,b]``.

``--src`` is a directory of hub downloads, one per dataset repository, as
``hf download OWNER/NAME --repo-type dataset --local-dir DIR/OWNER/NAME`` leaves them (``DIR/NAME`` and a Hugging
Face cache, ``DIR/datasets--OWNER--NAME/snapshots/REV``, are found too). Nothing is downloaded here. For each task
of the registry, the first of its sources (``SOURCES``: repository, files, columns) that is present is read and
converted into the file the registry names under ``--out``: JSONL records ``{"id", "question", "answer"}``, plus
``"options"`` (a list; ``answer`` is the option's text) for multiple-choice tasks and ``"image"`` (a file under
``images/`` beside it, named by its content hash) for image tasks. The converted file is then validated against
the registry's field mapping -- every mapped field present, question and answer not empty, an MCQ answer that
resolves to one of the options, every image fully decodable, ids unique -- and read back with ``load_items``; a
file that fails is not written. Each task is reported as ``converted N records``, ``not found`` (where it was looked
for and where to get it) or ``invalid`` (the file, field, row and problem); the report is also written to
``--out/fetch_report.json``. ``--check`` validates the files already under ``--out`` without converting anything.
Exit status: 0, or 1 when a task is invalid.

MIMIC-CXR (the summarization and report-generation tasks) is credentialed PhysioNet data: it needs a PhysioNet
credentialed account and the MIMIC-CXR data use agreement; the reference's split (``sahalshajim/medix-eval-sets``,
config ``mimic_cxr``) names the MIMIC-CXR-JPG images by their PhysioNet URL, and they are read from ``--mimic-cxr``
(default: ``SRC/physionet.org/files/mimic-cxr-jpg/2.0.0``, where ``wget -r`` of PhysioNet puts them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from medix_jax import cli
from medix_jax.evaluate.hub import Images, SourceError, find_repo, get_command, read_records, source_files
from medix_jax.evaluate.sources import MIMIC_ACCESS, SOURCES, Context, Source, Spec
from medix_jax.evaluate.tasks import DEFAULT_TASKS, Task, load_tasks, registry_path
from medix_jax.evaluate.validation import validate


@dataclasses.dataclass
class Report:
    """What became of one task: its status, a one-line detail, and the converted file."""

    task: str
    status: str  # converted | not found | invalid | valid (--check)
    detail: str
    records: int = 0
    path: str | None = None
    source: str | None = None

    def line(self) -> str:
        """The line printed for the task."""
        return f"{self.task:<28} {self.status}: {self.detail}"


def _write(records: list[dict], path: Path) -> None:
    """``records`` as parquet or JSONL (by ``path``'s suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _pubmedqa_test_ids(src: Path, repo_dir: Path) -> set[str] | None:
    """PubMedQA's test PMIDs, from its GitHub ``test_ground_truth.json`` when it is somewhere under ``src``."""
    for candidate in [repo_dir / "data/test_ground_truth.json", repo_dir / "test_ground_truth.json",
                      src / "test_ground_truth.json",
                      *sorted(src.glob("*/test_ground_truth.json")), *sorted(src.glob("*/*/test_ground_truth.json")),
                      *sorted(src.glob("*/*/*/test_ground_truth.json"))]:
        if candidate.is_file():
            return {str(k) for k in json.loads(candidate.read_text())}
    return None


def convert_task(task: Task, spec: Spec, src: Path, mimic: Path | None = None) -> Report:
    """Convert the first present source of ``spec`` into ``task.path`` and validate it (module docstring)."""
    looked: list[Source] = []
    partial: list[str] = []
    for source in spec.sources:
        repo_dir = find_repo(src, source.repo)
        if repo_dir is None:
            if source.repo not in {s.repo for s in looked}:
                looked.append(source)
            continue
        files = source_files(repo_dir, source.patterns)
        if not files:
            partial.append(f"{repo_dir} has no {' or '.join(source.patterns[:3])}")
            continue
        return _convert(task, source, repo_dir, files, src, mimic)
    where = "; ".join(partial + [f"{s.repo} is not in {src} (get it: "
                                 f"{s.get.format(dir=src / s.repo) if s.get else get_command(s.repo, src)})"
                                 for s in looked])
    if spec.credentialed:
        where = f"{MIMIC_ACCESS}. {where}"
    return Report(task.name, "not found", where)


def _convert(task: Task, source: Source, repo_dir: Path, files: list[Path], src: Path, mimic: Path | None) -> Report:
    """Convert ``files`` of ``source`` into ``task.path`` (staged, validated, then moved into place)."""
    target = Path(task.path)
    containers = [repo_dir / c for c in source.images]
    if source.mimic_images:
        containers = [p for p in [mimic, src / "physionet.org/files/mimic-cxr-jpg/2.0.0", src / "mimic-cxr-jpg/2.0.0",
                                  src / "mimic-cxr-jpg"] if p is not None]
    images = Images(containers)
    image_dir = target.parent / "images"
    ctx = Context(images, image_dir, _pubmedqa_test_ids(src, repo_dir) if source.pubmedqa_test else None)
    shown = ", ".join(str(p.relative_to(repo_dir)) for p in files[:2]) + (" ..." if len(files) > 2 else "")
    where = f"{source.repo} ({shown})"
    try:
        records: list[dict] = []
        for file in files:
            rows = read_records(file)
            for i, row in enumerate(rows):
                missing = [c for c in source.columns if c not in row]
                if missing:
                    raise SourceError(f"{file}, row {i}: column {', '.join(map(repr, missing))} missing (the file has "
                                      f"{', '.join(sorted(map(str, row)))}; {source.repo} distributes "
                                      f"{', '.join(source.columns)})")
                try:
                    record = source.convert(row, len(records), ctx)
                except SourceError as e:
                    raise SourceError(f"{file}, {e}") from None
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise SourceError(f"{file}, row {i}: cannot be converted ({type(e).__name__}: {e})") from None
                if record is not None:
                    records.append(record)
    except SourceError as e:
        return Report(task.name, "invalid", str(e), source=source.repo)
    finally:
        images.close()
    staged = target.with_name(f"{target.stem}.partial{target.suffix}")
    _write(records, staged)
    n, problems = validate(dataclasses.replace(task, path=str(staged), limit=None))
    if problems:
        staged.unlink()
        return Report(task.name, "invalid", f"{where} -> {target}: " + "; ".join(problems), n, source=source.repo)
    staged.replace(target)
    return Report(task.name, "converted", f"{n} record{'s' * (n != 1)} from {where} -> {target}", n, str(target),
                  source.repo)


def check_task(task: Task) -> Report:
    """Validate a task's existing file (``--check``)."""
    if not Path(task.path).exists():
        spec = SOURCES.get(task.name)
        hint = f" (convert it: python -m medix_jax.evaluate.fetch --src DIR --only {task.name})" if spec else ""
        return Report(task.name, "not found", f"{task.path} does not exist{hint}")
    n, problems = validate(task)
    if problems:
        return Report(task.name, "invalid", f"{task.path}: " + "; ".join(problems), n)
    return Report(task.name, "valid", f"{n} record{'s' * (n != 1)} in {task.path}", n, task.path)


def fetch(src: str | Path | None, out: str | Path, tasks_file: str | Path = DEFAULT_TASKS,
          only: list[str] | None = None, mimic: str | Path | None = None, check: bool = False) -> list[Report]:
    """Convert (or with ``check``, validate) every task of the registry into ``out``; one ``Report`` per task,
    also written to ``out/fetch_report.json``."""
    tasks = load_tasks(tasks_file, out, only)
    reports = []
    for task in tasks:
        if check:
            reports.append(check_task(task))
        elif task.split is not None or task.kind == "medix":
            reports.append(Report(task.name, "not found", "a prepared MediX split: python -m medix_jax.data.prepare"))
        elif task.name not in SOURCES:
            reports.append(Report(task.name, "not found", "no known public source; put the file there yourself "
                                  f"({task.path}) and run --check"))
        elif src is None:
            raise ValueError("--src DIR is needed (the hub downloads), or --check to validate --out")
        else:
            reports.append(convert_task(task, SOURCES[task.name], Path(src), Path(mimic) if mimic else None))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "fetch_report.json").write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    return reports


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m medix_jax.evaluate.fetch``."""
    parser = cli.parser("medix_jax.evaluate.fetch", __doc__)
    parser.add_argument("--src", help="directory of the hub downloads (OWNER/NAME per dataset, or a Hugging Face "
                                      "cache); needed unless --check")
    parser.add_argument("--out", default="eval_data", help="where the converted tasks go: the registry's data_root")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="task registry (YAML) whose paths and field mappings "
                                                               "the files are converted to and validated against")
    parser.add_argument("--only", help="comma-separated task names (default: every task of the registry)")
    parser.add_argument("--mimic-cxr", help="local MIMIC-CXR-JPG 2.0.0 directory (the one holding files/p10/...) "
                                            "for the report-generation images (default: under --src)")
    parser.add_argument("--check", action="store_true", help="only validate the files already under --out")
    return parser


def main(argv=None) -> int:
    """``python -m medix_jax.evaluate.fetch``: 0, 1 when a task is invalid, 2 with a one-line error."""
    args = build_parser().parse_args(argv)
    try:
        if not args.check and not args.src:
            raise ValueError("--src DIR is needed (the hub downloads), or --check to validate --out")
        if args.src and not Path(args.src).is_dir():
            raise FileNotFoundError(f"--src {args.src} is not a directory (download the datasets there first, e.g. "
                                    f"{get_command('cais/mmlu', Path(args.src))})")
        registry_path(args.tasks)
        cli.check_writable(args.out, "--out")
        reports = fetch(args.src, args.out, args.tasks, args.only.split(",") if args.only else None, args.mimic_cxr,
                        args.check)
    except (FileNotFoundError, ValueError, cli.Unwritable) as e:
        return cli.fail("evaluate.fetch", e)
    for report in reports:
        print(report.line())
    counts = {s: sum(r.status == s for r in reports) for s in ("converted", "valid", "not found", "invalid")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; report: {Path(args.out) / 'fetch_report.json'}")
    return 1 if counts["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())

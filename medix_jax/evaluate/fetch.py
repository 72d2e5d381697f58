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

import csv
import dataclasses
import hashlib
import io
import json
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from medix_jax import cli
from medix_jax.evaluate import (
    DEFAULT_TASKS,
    LETTERS,
    Task,
    _image,
    _option_text,
    _rows,
    load_items,
    load_tasks,
    registry_path,
)

MEDIX_EVAL_SETS = "sahalshajim/medix-eval-sets"  # the reference's own copies (eval/tasks.yaml of MediX-R1)
MIMIC_ACCESS = ("credentialed PhysioNet data: a PhysioNet credentialed account and the MIMIC-CXR data use agreement "
                "(https://physionet.org/content/mimic-cxr-jpg/2.0.0/)")
SUMMARIZE = "Write a short summary of the following report.\n\nReport:\n{report}"  # the reference's task wording
REPORT = "Generate a detailed report based on the scan."
MAX_PROBLEMS = 5  # problems listed per invalid task


class SourceError(ValueError):
    """A source file that is not as its hub distributes it (a missing column, an unreadable file)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading what the hubs distribute


def read_records(path: Path) -> list[dict]:
    """The records of a parquet, JSONL, JSON (a list, ``{"data": [...]}`` or ``{key: record}``) or CSV file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text)))
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON lines under a .json name (as some hubs store them)
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return data["data"]
            if isinstance(data, dict):  # keyed by id (PubMedQA's own files)
                return [{"_key": k, **v} for k, v in data.items() if isinstance(v, dict)]
            return list(data)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:  # includes pyarrow's ArrowInvalid and json's errors
        raise SourceError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


class Images:
    """Image files referred to by name, looked up in directories and zip archives (as hubs ship image folders)."""

    def __init__(self, containers: list[Path]):
        self.dirs = [c for c in containers if c.is_dir()]
        self.zips = [c for c in containers if c.is_file() and zipfile.is_zipfile(c)]
        self._subdirs: dict[Path, list[Path]] = {}
        self._members: dict[Path, tuple[zipfile.ZipFile, dict[str, str]]] = {}

    def read(self, name: str) -> bytes | None:
        """The file ``name`` (a relative path) from the first container that has it: ``DIR/name``, ``DIR/*/name``,
        or a zip member ``name`` or ``.../name``; None when none has it."""
        name = name.strip().lstrip("/")
        for root in self.dirs:
            if root not in self._subdirs:
                self._subdirs[root] = [d for d in root.iterdir() if d.is_dir()]
            for candidate in [root / name] + [d / name for d in self._subdirs[root]]:
                if candidate.is_file():
                    return candidate.read_bytes()
        for archive in self.zips:
            if archive not in self._members:
                z = zipfile.ZipFile(archive)
                index: dict[str, str] = {}
                for member in z.namelist():
                    parts = member.split("/")
                    for k in range(len(parts)):  # every suffix, so "imgs/a/b.jpg" is found as "a/b.jpg"
                        index.setdefault("/".join(parts[k:]), member)
                self._members[archive] = (z, index)
            z, index = self._members[archive]
            if name in index:
                return z.read(index[name])
        return None

    def close(self) -> None:
        for z, _ in self._members.values():
            z.close()


@dataclasses.dataclass
class Context:
    """What a conversion needs besides the record: the source's images, where to write images, extra filters."""

    images: Images
    image_dir: Path  # images are written here, named by content hash, and referred to relative to its parent
    keep_ids: set[str] | None = None  # PubMedQA: the PMIDs of its test split, when the user has that list

    def save_image(self, data: bytes | None, what: str) -> str:
        """Write ``data`` to ``image_dir`` (content-addressed) and return the path the record refers to it by."""
        if not data:
            raise SourceError(f"{what}: no image data")
        from PIL import Image

        try:
            ext = (Image.open(io.BytesIO(data)).format or "img").lower().replace("jpeg", "jpg")
        except Exception:  # noqa: BLE001 -- kept as it is; validation names it as undecodable
            ext = "img"
        name = f"{hashlib.sha1(data).hexdigest()[:20]}.{ext}"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        target = self.image_dir / name
        if not target.exists():
            target.write_bytes(data)
        return f"{self.image_dir.name}/{name}"

    def image_of(self, entry, what: str) -> str:
        """A hub image column (``{"bytes", "path"}`` struct, bytes, or a file name in the source's images)."""
        if isinstance(entry, dict):
            data = entry.get("bytes")
            if not data and entry.get("path"):
                data = self.images.read(str(entry["path"]))
            return self.save_image(data, what)
        if isinstance(entry, (bytes, bytearray)):
            return self.save_image(bytes(entry), what)
        if isinstance(entry, str) and entry:
            data = self.images.read(entry)
            if data is None:
                raise SourceError(f"{what}: image {entry!r} is in none of {self.images_where()}")
            return self.save_image(data, what)
        raise SourceError(f"{what}: no image ({entry!r})")

    def images_where(self) -> str:
        places = [str(p) for p in self.images.dirs + self.images.zips]
        return ", ".join(places) or "(no image folder or zip found)"


Convert = Callable[[dict, int, Context], "dict | None"]


@dataclasses.dataclass(frozen=True)
class Source:
    """One hub dataset a task can be converted from."""

    repo: str  # hub id, OWNER/NAME
    patterns: tuple[str, ...]  # file globs in the repository, tried in order (the first that matches is read)
    columns: tuple[str, ...]  # what every record must have
    convert: Convert  # one record -> ours, or None when it is not part of the task (e.g. SLAKE's Chinese half)
    images: tuple[str, ...] = ()  # image folders / zips in the repository, for images given by file name
    note: str = ""  # what this copy is (the reference's split, all rows, ...)
    pubmedqa_test: bool = False  # keep PubMedQA's test PMIDs only, when its test_ground_truth.json is under SRC
    get: str = ""  # how to download it, when not ``hf download`` (``{dir}``: where it goes)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Where a task's data comes from: its sources (the first present one is used) and its access terms."""

    sources: tuple[Source, ...]
    access: str  # licence / access note
    credentialed: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Conversions (hub columns -> id / question / answer / options / image)


_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")


def _unprefixed(options: list[str]) -> list[str]:
    """Options written ``"A:text"`` / ``"A. text"`` / ``"(A) text"`` (each with its own letter) as plain text."""
    matches = [_PREFIX.match(o) for o in options]
    if options and all(m and m.group(1) == LETTERS[k] for k, m in enumerate(matches)):
        return [o[m.end():].strip() for o, m in zip(options, matches, strict=True)]
    return [o.strip() for o in options]


def _option_list(options) -> list[str]:
    """A hub options column (list, or ``{letter: text}`` with unused letters null) as a list of texts."""
    if isinstance(options, dict):
        options = [options[k] for k in sorted(options) if options[k] is not None]
    return _unprefixed([str(o) for o in options if o is not None])


def _answer(answer, options: list[str], letters: dict | None = None):
    """The answer as its option's text when it resolves (text, ``"B:text"``, letter, index; ``letters``: the hub's
    own letter -> text map), else as given (validation then reports it)."""
    if isinstance(answer, str):
        answer = answer.strip()
        if letters and answer in letters:
            return str(letters[answer]).strip()
        prefix = _PREFIX.match(answer)
        if answer not in options and prefix and answer[prefix.end():].strip() in options:
            answer = answer[prefix.end():].strip()
    try:
        return _option_text(answer, options, "", 0)
    except ValueError:
        return answer


def _mmlu(subject: str) -> Convert:
    def convert(row, i, ctx):
        if row.get("subject") not in (None, subject):  # the "all" file holds every subject
            return None
        options = _option_list(row["choices"])
        return {"id": f"{subject}-{i}", "question": row["question"], "options": options,
                "answer": _answer(row["answer"], options)}
    return convert


def _medmcqa(row, i, ctx):
    options = [row[k] for k in ("opa", "opb", "opc", "opd")]
    return {"id": str(row["id"]), "question": row["question"], "options": options,
            "answer": _answer(row["cop"], options)}


def _medqa(row, i, ctx):
    letters = {k: v for k, v in row["options"].items() if v is not None}
    options = _option_list(row["options"])
    return {"id": f"medqa-{i}", "question": row["question"], "options": options,
            "answer": _answer(row["answer_idx"], options, letters)}


def _medqa_hf(row, i, ctx):
    options = [row[f"ending{k}"] for k in range(4)]
    return {"id": str(row.get("id", f"medqa-{i}")), "question": row["sent1"], "options": options,
            "answer": _answer(row["label"], options)}


def _usmle_sa(row, i, ctx):
    letters = {k: v for k, v in row["options"].items() if v is not None}
    options = _option_list(row["options"])
    answer = row.get("answer_idx") or row["answer"]
    return {"id": f"usmle_sa-{i}", "question": row["question"], "options": options,
            "answer": _answer(answer, options, letters)}


YES_NO_MAYBE = ["yes", "no", "maybe"]


def _pubmedqa_question(contexts, labels, question: str) -> str:
    contexts = [contexts] if isinstance(contexts, str) else list(contexts or [])
    labels = list(labels or [])
    parts = [f"{labels[k].capitalize()}: {c}" if k < len(labels) and labels[k] else c for k, c in enumerate(contexts)]
    return "Context:\n" + "\n".join(parts) + f"\n\nQuestion:\n{question}"


def _pubmedqa(row, i, ctx):  # qiaojin/PubMedQA pqa_labeled
    pmid = str(row["pubid"])
    if ctx.keep_ids is not None and pmid not in ctx.keep_ids:
        return None
    context = row["context"] or {}
    return {"id": pmid, "question": _pubmedqa_question(context.get("contexts"), context.get("labels"), row["question"]),
            "options": YES_NO_MAYBE, "answer": _answer(str(row["final_decision"]).strip().lower(), YES_NO_MAYBE),
            "long_answer": row.get("long_answer")}


def _pubmedqa_upper(row, i, ctx):  # the reference's split and PubMedQA's own JSON: QUESTION, CONTEXTS, LABELS
    if ctx.keep_ids is not None and str(row.get("_key")) not in ctx.keep_ids:
        return None
    return {"id": str(row.get("_key", row.get("pubid", f"pubmedqa-{i}"))),
            "question": _pubmedqa_question(row["CONTEXTS"], row.get("LABELS"), row["QUESTION"]),
            "options": YES_NO_MAYBE, "answer": _answer(str(row["final_decision"]).strip().lower(), YES_NO_MAYBE),
            "long_answer": row.get("LONG_ANSWER")}


def _mimic_image(url: str) -> str:
    """A MIMIC-CXR-JPG image's path inside the dataset (``files/p1x/...jpg``) from its PhysioNet URL or path."""
    match = re.search(r"(files/p\d+/.*)$", str(url))
    return match.group(1) if match else str(url)


def _summarization(row, i, ctx):
    return {"id": f"mimic_sum-{i}", "question": SUMMARIZE.format(report=str(row["report"]).strip()),
            "answer": row["summary"]}


def _report_generation(row, i, ctx):
    return {"id": f"mimic_rg-{i}", "question": REPORT, "answer": row["report"],
            "image": ctx.image_of(_mimic_image(row["image"]), f"row {i}")}


def _slake(row, i, ctx):
    if row.get("q_lang", "en") != "en":
        return None
    return {"id": str(row.get("qid", i)), "question": row["question"], "answer": str(row["answer"]),
            "image": ctx.image_of(str(row["img_name"]), f"row {i}")}


def _vqa(prefix: str) -> Convert:
    def convert(row, i, ctx):
        return {"id": f"{prefix}-{i}", "question": row["question"], "answer": str(row["answer"]),
                "image": ctx.image_of(row["image"], f"row {i}")}
    return convert


def _pmc_vqa(row, i, ctx):  # xmcmic/PMC-VQA: Figure_path, Question, Choice A-D ("A:text"), Answer_label
    options = _option_list([row[f"Choice {c}"] for c in "ABCD" if row.get(f"Choice {c}")])
    return {"id": f"pmc_vqa-{i}", "question": str(row["Question"]).strip(), "options": options,
            "answer": _answer(str(row["Answer_label"]).strip(), options),
            "image": ctx.image_of(str(row["Figure_path"]), f"row {i}")}


def _pmc_vqa_reference(row, i, ctx):
    options = _option_list(row["choices"])
    return {"id": f"pmc_vqa-{i}", "question": row["question"], "options": options,
            "answer": _answer(row["answer"], options), "image": ctx.image_of(row["image"], f"row {i}")}


def _pmc_vqa_hard(row, i, ctx):
    return {"id": f"pmc_vqa_hard-{i}", "question": row["question"], "answer": str(row["answer"]),
            "image": ctx.image_of(row["image"], f"row {i}")}


def _config_files(config: str) -> tuple[str, ...]:
    """Where a config's test split lies in a hub repository (the layouts ``push_to_hub`` and the parquet converter
    write)."""
    return (f"{config}/test-*.parquet", f"{config}/*test*.parquet", f"{config}/test/*.parquet",
            f"data/{config}/test-*.parquet", f"{config}/*test*.jsonl", f"{config}/*test*.json")


def _mmlu_spec(subject: str) -> Spec:
    files = (f"{subject}/test-*.parquet", f"{subject}/*test*.parquet", f"{subject}/test/*.parquet",
             "all/test-*.parquet", "all/*test*.parquet")
    columns = ("question", "choices", "answer")
    return Spec((Source("cais/mmlu", files, columns, _mmlu(subject), note="the test split"),
                 Source("hails/mmlu_no_train", files, columns, _mmlu(subject),
                        note="the reference's copy, test split")),
                "MIT")


_MIMIC_FILES = _config_files("mimic_cxr") + ("mimic_cxr/*.parquet", "mimic_cxr/*.jsonl", "mimic_cxr/*.csv")

SOURCES: dict[str, Spec] = {
    **{f"mmlu_{s}": _mmlu_spec(s) for s in ("clinical_knowledge", "college_biology", "college_medicine",
                                             "medical_genetics", "professional_medicine", "anatomy")},
    "medmcqa": Spec((Source("openlifescienceai/medmcqa", ("data/validation-*.parquet", "validation/*.parquet"),
                            ("id", "question", "opa", "opb", "opc", "opd", "cop"), _medmcqa,
                            note="the validation split, cop = index of the right option"),),
                    "Apache-2.0"),
    "medqa_4options": Spec((
        Source("GBaker/MedQA-USMLE-4-options", ("phrases_no_exclude_test.jsonl", "test.jsonl", "*test*.jsonl"),
               ("question", "options", "answer_idx"), _medqa, note="the test split (1,273 questions)"),
        Source("GBaker/MedQA-USMLE-4-options-hf", ("test.json", "*test*.json", "data/test-*.parquet"),
               ("sent1", "ending0", "ending1", "ending2", "ending3", "label"), _medqa_hf,
               note="the reference's copy, test split")), "CC-BY-4.0 (the -hf copy: CC-BY-SA-4.0)"),
    "usmle_self_assessment": Spec((Source("HuggingSara/usmle_self_assessment", ("data/train-*.parquet",),
                                          ("question", "options", "answer"), _usmle_sa,
                                          note="its one split (325 questions, up to 9 options)"),),
                                  "no licence stated on the card"),
    "pubmedqa": Spec((
        Source(MEDIX_EVAL_SETS, _config_files("pubmedqa"), ("QUESTION", "CONTEXTS", "final_decision"),
               _pubmedqa_upper, note="the reference's split"),
        Source("qiaojin/PubMedQA", ("pqa_labeled/train-*.parquet",), ("pubid", "question", "context",
                                                                       "final_decision"), _pubmedqa,
               note="pqa_labeled: its 500 test questions when SRC holds PubMedQA's test_ground_truth.json, else "
                    "all 1,000", pubmedqa_test=True),
        Source("pubmedqa/pubmedqa", ("data/ori_pqal.json",), ("QUESTION", "CONTEXTS", "final_decision"),
               _pubmedqa_upper, note="PubMedQA's GitHub repository: the 500 PMIDs of data/test_ground_truth.json",
               pubmedqa_test=True, get="git clone https://github.com/pubmedqa/pubmedqa {dir}")), "MIT"),
    "mimic_cxr_summarization": Spec((Source(MEDIX_EVAL_SETS, _MIMIC_FILES, ("report", "summary"), _summarization,
                                            note="the reference's split (config mimic_cxr)"),),
                                    MIMIC_ACCESS, credentialed=True),
    "slake": Spec((Source("BoKelvin/SLAKE", ("test.json",), ("img_name", "question", "answer"), _slake,
                          images=("imgs", "imgs.zip", "."), note="test.json, English questions; images imgs.zip"),),
                  "see the card (SLAKE: www.med-vqa.com/slake)"),
    "vqa_rad": Spec((Source("flaviagiammarino/vqa-rad", ("data/test-*.parquet",), ("image", "question", "answer"),
                            _vqa("vqa_rad"), note="the test split (451 questions)"),), "CC0-1.0"),
    "pathvqa": Spec((Source("flaviagiammarino/path-vqa", ("data/test-*.parquet",), ("image", "question", "answer"),
                            _vqa("pathvqa"), note="the test split"),), "see the card"),
    "pmc_vqa": Spec((
        Source(MEDIX_EVAL_SETS, _config_files("pmc_vqa"), ("question", "answer", "choices", "image"),
               _pmc_vqa_reference, note="the reference's split"),
        Source("xmcmic/PMC-VQA", ("test_clean.csv",), ("Figure_path", "Question", "Choice A", "Choice B",
                                                         "Answer_label"), _pmc_vqa,
               images=("images", "images.zip", "images_2.zip", "."), note="test_clean.csv (2,000), images.zip")),
        "see the card"),
    "pmc_vqa_hard": Spec((Source(MEDIX_EVAL_SETS, _config_files("pmc_vqa_hard"), ("question", "answer", "image"),
                                 _pmc_vqa_hard, note="the reference's split; open-ended (no options)"),),
                         "see the card; published only in the reference's eval sets"),
    "mimic_cxr_report_generation": Spec((Source(MEDIX_EVAL_SETS, _MIMIC_FILES, ("report", "image"),
                                                _report_generation,
                                                note="the reference's split (config mimic_cxr); images: "
                                                     "MIMIC-CXR-JPG"),),
                                        MIMIC_ACCESS, credentialed=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Finding, converting, validating


def find_repo(src: Path, repo: str) -> Path | None:
    """A hub repository's download under ``src``: ``OWNER/NAME``, ``NAME``, ``OWNER--NAME`` or a Hugging Face
    cache's newest snapshot."""
    owner, name = repo.split("/")
    for candidate in (src / owner / name, src / name, src / f"{owner}--{name}"):
        if candidate.is_dir():
            return candidate
    snapshots = sorted((src / f"datasets--{owner}--{name}" / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def source_files(repo_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files of the first pattern that matches anything (shards in name order)."""
    for pattern in patterns:
        files = sorted(p for p in repo_dir.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _get_command(repo: str, src: Path) -> str:
    return f"hf download {repo} --repo-type dataset --local-dir {src / repo}"


@dataclasses.dataclass
class Report:
    task: str
    status: str  # converted | not found | invalid | valid (--check)
    detail: str
    records: int = 0
    path: str | None = None
    source: str | None = None

    def line(self) -> str:
        return f"{self.task:<28} {self.status}: {self.detail}"


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
        rows = list(_rows(task))
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
                    _option_text(row[f["answer"]], list(options), task.name, i)
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
                        decode_image(_image(entry, base))
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


def _write(records: list[dict], path: Path) -> None:
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
    looked, partial = [], []
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
                                 f"{s.get.format(dir=src / s.repo) if s.get else _get_command(s.repo, src)})"
                                 for s in looked])
    if spec.credentialed:
        where = f"{MIMIC_ACCESS}. {where}"
    return Report(task.name, "not found", where)


def _convert(task: Task, source: Source, repo_dir: Path, files: list[Path], src: Path, mimic: Path | None) -> Report:
    target = Path(task.path)
    containers = [repo_dir / c for c in source.images]
    if source.convert is _report_generation:
        containers = [p for p in [mimic, src / "physionet.org/files/mimic-cxr-jpg/2.0.0", src / "mimic-cxr-jpg/2.0.0",
                                  src / "mimic-cxr-jpg"] if p is not None]
    images = Images(containers)
    image_dir = target.parent / "images"
    ctx = Context(images, image_dir, _pubmedqa_test_ids(src, repo_dir) if source.pubmedqa_test else None)
    shown = ", ".join(str(p.relative_to(repo_dir)) for p in files[:2]) + (" ..." if len(files) > 2 else "")
    where = f"{source.repo} ({shown})"
    try:
        records = []
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
        else:
            reports.append(convert_task(task, SOURCES[task.name], Path(src), Path(mimic) if mimic else None))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "fetch_report.json").write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    return reports


def build_parser():
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
    args = build_parser().parse_args(argv)
    try:
        if not args.check and not args.src:
            raise ValueError("--src DIR is needed (the hub downloads), or --check to validate --out")
        if args.src and not Path(args.src).is_dir():
            raise FileNotFoundError(f"--src {args.src} is not a directory (download the datasets there first, e.g. "
                                    f"{_get_command('cais/mmlu', Path(args.src))})")
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

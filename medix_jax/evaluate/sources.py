"""Where each of the 17 evaluation tasks comes from (``SOURCES``: task name -> ``Spec``): the public hub datasets it
can be converted from, in order of preference, with their files and columns, and the conversion of one hub record
into ours (``{"id", "question", "answer"}``, plus ``"options"`` for mcq and ``"image"`` for image tasks)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path

from medix_jax.evaluate.hub import Images, SourceError
from medix_jax.evaluate.tasks import LETTERS, option_text

MEDIX_EVAL_SETS = "sahalshajim/medix-eval-sets"  # the reference's own copies (eval/tasks.yaml of MediX-R1)
MIMIC_ACCESS = ("credentialed PhysioNet data: a PhysioNet credentialed account and the MIMIC-CXR data use agreement "
                "(https://physionet.org/content/mimic-cxr-jpg/2.0.0/)")
SUMMARIZE = "Write a short summary of the following report.\n\nReport:\n{report}"  # the reference's task wording
REPORT_GENERATION = "Generate a detailed report based on the scan."


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
        """Where images are looked up, for an error message."""
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
    mimic_images: bool = False  # images are MIMIC-CXR-JPG files, read from --mimic-cxr (else under SRC)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Where a task's data comes from: its sources (the first present one is used) and its access terms."""

    sources: tuple[Source, ...]
    access: str  # licence / access note
    credentialed: bool = False


_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")


def _unprefixed(options: list[str]) -> list[str]:
    """Options written ``"A:text"`` / ``"A. text"`` / ``"(A) text"`` (each with its own letter) as plain text."""
    ends = []
    for k, option in enumerate(options):
        match = _PREFIX.match(option)
        if match is None or match.group(1) != LETTERS[k]:
            return [o.strip() for o in options]
        ends.append(match.end())
    return [o[end:].strip() for o, end in zip(options, ends, strict=True)]


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
        return option_text(answer, options, "", 0)
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
    return {"id": f"mimic_rg-{i}", "question": REPORT_GENERATION, "answer": row["report"],
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
                                                     "MIMIC-CXR-JPG", mimic_images=True),),
                                        MIMIC_ACCESS, credentialed=True),
}

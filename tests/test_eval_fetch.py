"""python -m medix_jax.evaluate.fetch: tiny copies of every hub layout the 17 tasks come from (same repositories, file
names and columns as the hubs distribute them, a few rows each) are converted into what configs/eval/tasks.yaml
expects, validated, and read by load_tasks / load_items; wrong columns, bad answers and broken images are reported
by task, file, field and row; absent datasets say where to get them."""

import io
import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medix_jax.evaluate.fetch import SOURCES, build_parser, fetch, main
from medix_jax.evaluate.harness import evaluate
from medix_jax.evaluate.tasks import load_items, load_tasks

SUBJECTS = ("clinical_knowledge", "college_biology", "college_medicine", "medical_genetics", "professional_medicine")


def image_bytes(colour, fmt="PNG", size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hub_copies(src):
    """Every source, as ``hf download OWNER/NAME --repo-type dataset --local-dir SRC/OWNER/NAME`` leaves it."""
    for s in SUBJECTS:  # cais/mmlu: one folder per subject
        parquet(src / "cais/mmlu" / s / "test-00000-of-00001.parquet", [
            {"question": f"{s} question {i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(3)])
    parquet(src / "hails/mmlu_no_train/all/test-00000-of-00001.parquet", [  # anatomy only here, in the "all" file
        {"question": f"anatomy {i}?", "subject": "anatomy", "choices": ["Femur", "Tibia"], "answer": 1}
        for i in range(2)
    ] + [{"question": "other?", "subject": "astronomy", "choices": ["a", "b"], "answer": 0}])
    parquet(src / "openlifescienceai/medmcqa/data/validation-00000-of-00001.parquet", [
        {"id": f"mc{i}", "question": f"Drug of choice {i}?", "opa": "A drug", "opb": "B drug", "opc": "C drug",
         "opd": "D drug", "cop": 2, "choice_type": "single", "exp": "because", "subject_name": "Pharm",
         "topic_name": None} for i in range(3)])
    jsonl(src / "GBaker/MedQA-USMLE-4-options/phrases_no_exclude_test.jsonl", [
        {"question": f"A patient {i}...", "answer": "Aspirin", "options": {"A": "Heparin", "B": "Aspirin",
                                                                           "C": "Warfarin", "D": "Statin"},
         "meta_info": "step1", "answer_idx": "B", "metamap_phrases": ["patient"]} for i in range(2)])
    letters = "ABCDEFGHI"
    parquet(src / "HuggingSara/usmle_self_assessment/data/train-00000-of-00001-153a9808c885c380.parquet", [
        {"options": {k: (f"opt {k}" if k in "ABCDE" else None) for k in letters}, "answer": "opt C",
         "question": "Which one?", "answer_idx": "C"},
        {"options": {k: (f"o{k}" if k in "ABC" else None) for k in letters}, "answer": "oA", "question": "And?",
         "answer_idx": "A"}])
    parquet(src / "qiaojin/PubMedQA/pqa_labeled/train-00000-of-00001.parquet", [
        {"pubid": 100 + i, "question": f"Does X{i} help?",
         "context": {"contexts": ["We studied X.", "X helped."], "labels": ["METHODS", "RESULTS"],
                     "meshes": ["Humans"], "reasoning_required_pred": ["yes"], "reasoning_free_pred": ["yes"]},
         "long_answer": "X helps.", "final_decision": ["yes", "no", "maybe"][i]} for i in range(3)])
    (src / "pubmedqa/data").mkdir(parents=True)  # PubMedQA's GitHub test split: two of the three PMIDs
    (src / "pubmedqa/data/test_ground_truth.json").write_text(json.dumps({"100": "yes", "102": "maybe"}))
    mimic = src / "physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/p10000032/s50414267"
    mimic.mkdir(parents=True)
    (mimic / "02aa804e.jpg").write_bytes(image_bytes("gray", "JPEG"))
    parquet(src / "sahalshajim/medix-eval-sets/mimic_cxr/test-00000-of-00001.parquet", [
        {"report": "FINDINGS: clear lungs. IMPRESSION: normal.", "summary": "Normal chest.",
         "image": "https://physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/p10000032/s50414267/02aa804e.jpg"}])
    parquet(src / "sahalshajim/medix-eval-sets/pmc_vqa_hard/test-00000-of-00001.parquet", [
        {"question": "What is shown?", "answer": "a cyst", "image": {"bytes": image_bytes("red"), "path": "a.png"}}])
    slake = src / "BoKelvin/SLAKE"
    slake.mkdir(parents=True)
    (slake / "test.json").write_text(json.dumps([
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver", "q_lang": "en",
         "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ",
         "triple": ["vhead", "_", "_"], "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "哪个器官?", "answer": "肝", "q_lang": "zh",
         "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ",
         "triple": ["vhead", "_", "_"], "qid": 12},
        {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Is it normal?", "answer": "Yes", "q_lang": "en",
         "location": "Chest", "modality": "X-Ray", "answer_type": "CLOSED", "base_type": "vqa",
         "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 13}]))
    with zipfile.ZipFile(slake / "imgs.zip", "w") as z:
        z.writestr("imgs/xmlab1/source.jpg", image_bytes("blue", "JPEG"))
        z.writestr("imgs/xmlab2/source.jpg", image_bytes("green", "JPEG"))
    parquet(src / "flaviagiammarino/vqa-rad/data/test-00000-of-00001-e5bc3d208bb4deeb.parquet", [
        {"image": {"bytes": image_bytes((i * 40, 0, 0)), "path": None}, "question": f"q{i}?", "answer": "yes"}
        for i in range(3)])
    for k in range(2):  # two shards
        parquet(src / f"flaviagiammarino/path-vqa/data/test-0000{k}-of-00002-abc{k}.parquet", [
            {"image": {"bytes": image_bytes((0, 50 * k + i, 0), "JPEG"), "path": None}, "question": f"p{k}{i}?",
             "answer": "no"} for i in range(2)])
    pmc = src / "xmcmic/PMC-VQA"
    pmc.mkdir(parents=True)
    (pmc / "test_clean.csv").write_text(
        "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        "PMC1_F1.jpg,What is the uptake pattern?,Focal uptake pattern, A:Diffuse uptake pattern, B:Focal uptake "
        "pattern, C:No uptake pattern, D:Cannot determine,B\n"
        "PMC2_F3.jpg,Which modality?,CT,A:CT,B:MRI,C:X-ray,D:PET,A\n")
    with zipfile.ZipFile(pmc / "images.zip", "w") as z:
        z.writestr("images/PMC1_F1.jpg", image_bytes("white", "JPEG"))
        z.writestr("images/PMC2_F3.jpg", image_bytes("black", "JPEG"))
    return src


EXPECTED = {  # records per task from hub_copies
    **{f"mmlu_{s}": 3 for s in SUBJECTS}, "mmlu_anatomy": 2, "medmcqa": 3, "medqa_4options": 2,
    "usmle_self_assessment": 2, "pubmedqa": 2, "mimic_cxr_summarization": 1, "slake": 2, "vqa_rad": 3, "pathvqa": 4,
    "pmc_vqa": 2, "pmc_vqa_hard": 1, "mimic_cxr_report_generation": 1}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    src = hub_copies(root / "src")
    reports = fetch(src, root / "eval_data")
    return root, src, reports


def test_every_task_has_a_source_and_every_hub_layout_converts(fetched):
    root, _, reports = fetched
    out = root / "eval_data"
    assert set(SOURCES) == {t.name for t in load_tasks("configs/eval/tasks.yaml")}
    assert {r.task: (r.status, r.records) for r in reports} == {t: ("converted", n) for t, n in EXPECTED.items()}, \
        [r.line() for r in reports if r.status != "converted"]
    assert json.loads((out / "fetch_report.json").read_text())[0]["status"] == "converted"
    tasks = {t.name: t for t in load_tasks("configs/eval/tasks.yaml", data_root=out)}
    items = {name: load_items(task) for name, task in tasks.items()}
    assert {name: len(v) for name, v in items.items()} == EXPECTED

    assert [it.reference for it in items["mmlu_clinical_knowledge"]] == ["w", "x", "y"]  # index -> option text
    assert items["mmlu_anatomy"][0].reference == "Tibia" and items["mmlu_anatomy"][0].letter == "B"
    assert items["medmcqa"][0].reference == "C drug" and items["medmcqa"][0].question.endswith("D. D drug")
    assert items["medqa_4options"][0].reference == "Aspirin" and items["medqa_4options"][0].letter == "B"
    usmle = items["usmle_self_assessment"]
    assert usmle[0].reference == "opt C" and usmle[0].question.endswith("E. opt E") and "F." not in usmle[0].question
    assert usmle[1].reference == "oA"
    pubmed = items["pubmedqa"]  # only the test PMIDs; context in the question, yes/no/maybe the options
    assert [it.id for it in pubmed] == ["100", "102"] and [it.reference for it in pubmed] == ["yes", "maybe"]
    assert pubmed[0].question.startswith("Context:\nMethods: We studied X.\nResults: X helped.\n\nQuestion:\nDoes X0")
    assert pubmed[0].question.endswith("A. yes\nB. no\nC. maybe")
    summary = items["mimic_cxr_summarization"][0]
    assert "FINDINGS: clear lungs" in summary.question and summary.reference == "Normal chest." and not summary.images
    slake = items["slake"]  # English questions only, each with its image from imgs.zip
    assert [it.id for it in slake] == ["11", "13"] and slake[0].reference == "Liver"
    assert Image.open(io.BytesIO(slake[0].images[0])).getpixel((0, 0))[2] > 200  # the blue one
    pmc = items["pmc_vqa"]  # "A:text" choices as plain text, the answer label resolved
    assert pmc[0].reference == "Focal uptake pattern" and pmc[0].question.endswith("D. Cannot determine")
    assert pmc[1].reference == "CT" and pmc[1].letter == "A"
    assert items["pmc_vqa_hard"][0].reference == "a cyst" and tasks["pmc_vqa_hard"].kind == "open"
    for name in ("slake", "vqa_rad", "pathvqa", "pmc_vqa", "pmc_vqa_hard", "mimic_cxr_report_generation"):
        assert all(len(it.images) == 1 and Image.open(io.BytesIO(it.images[0])).size == (32, 24) for it in items[name])
    assert items["mimic_cxr_report_generation"][0].reference.startswith("FINDINGS")
    record = json.loads((out / "vqa_rad/test.jsonl").read_text().splitlines()[0])
    assert set(record) == {"id", "question", "answer", "image"} and (out / "vqa_rad" / record["image"]).is_file()


def test_the_converted_tasks_run_through_the_evaluation(fetched, tmp_path):
    root, _, _ = fetched

    class Oracle:  # answers each item with its reference
        def generate(self, items):
            return [f"<think>sure</think>{it.reference}" for it in items]

    tasks = load_tasks("configs/eval/tasks.yaml", data_root=root / "eval_data", only=["medmcqa", "slake", "pmc_vqa"])
    summary = evaluate(tasks, Oracle(), None, tmp_path)
    assert summary["overall"] == 1.0 and summary["counts"]["generations_new"] == 3 + 2 + 2


def test_a_wrong_column_a_bad_answer_and_a_broken_image_are_reported(tmp_path, capsys):
    src = hub_copies(tmp_path / "src")
    parquet(src / "openlifescienceai/medmcqa/data/validation-00000-of-00001.parquet", [  # "cop" renamed
        {"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "answer": 1}])
    parquet(src / "cais/mmlu/college_biology/test-00000-of-00001.parquet", [  # answer index out of range
        {"question": "ok?", "subject": "college_biology", "choices": ["a", "b"], "answer": 0},
        {"question": "bad?", "subject": "college_biology", "choices": ["a", "b"], "answer": 7}])
    parquet(src / "flaviagiammarino/vqa-rad/data/test-00000-of-00001-e5bc3d208bb4deeb.parquet", [
        {"image": {"bytes": image_bytes("red"), "path": None}, "question": "q0?", "answer": "yes"},
        {"image": {"bytes": image_bytes("red")[:40], "path": None}, "question": "q1?", "answer": "yes"}])  # cut
    out = tmp_path / "eval_data"
    only = "medmcqa,mmlu_college_biology,vqa_rad,medqa_4options"
    assert main(["--src", str(src), "--out", str(out), "--only", only]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[:-1]}
    assert "invalid" in lines["medmcqa"] and "column 'cop' missing" in lines["medmcqa"] and "row 0" in lines["medmcqa"]
    assert "validation-00000-of-00001.parquet" in lines["medmcqa"]
    assert "invalid" in lines["mmlu_college_biology"] and "field answer (column 'answer'), row 1: 7 is not one of " \
        "the options" in lines["mmlu_college_biology"]
    assert "invalid" in lines["vqa_rad"] and "field image (column 'image'), row 1:" in lines["vqa_rad"]
    assert "converted: 2 records" in lines["medqa_4options"]
    assert not (out / "medmcqa").exists() and not (out / "vqa_rad/test.jsonl").exists()  # nothing half-valid written
    assert (out / "medqa/test.jsonl").is_file()


def test_absent_datasets_say_where_to_get_them_and_check_validates_what_is_there(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "eval_data"
    src.mkdir()
    reports = {r.task: r for r in fetch(src, out)}
    assert all(r.status == "not found" for r in reports.values())
    assert f"hf download flaviagiammarino/vqa-rad --repo-type dataset --local-dir {src}/flaviagiammarino/vqa-rad" \
        in reports["vqa_rad"].detail
    assert "hails/mmlu_no_train" in reports["mmlu_anatomy"].detail and "cais/mmlu" in reports["mmlu_anatomy"].detail
    for name in ("mimic_cxr_summarization", "mimic_cxr_report_generation"):
        assert "credentialed PhysioNet" in reports[name].detail and "data use agreement" in reports[name].detail

    # --check: what a user put there by hand is validated against the mapping, nothing converted.
    (out / "medqa").mkdir(parents=True)
    (out / "medqa/test.jsonl").write_text(json.dumps({"id": "1", "question": "q", "options": ["a", "b"],
                                                      "answer": "c"}) + "\n")
    assert main(["--check", "--out", str(out), "--only", "medqa_4options,medmcqa"]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[:-1]}
    assert "invalid" in lines["medqa_4options"] and "'c' is not one of the options" in lines["medqa_4options"]
    assert "not found" in lines["medmcqa"] and "--only medmcqa" in lines["medmcqa"]
    assert main(["--out", str(out)]) == 2  # neither --src nor --check
    assert "--src" in capsys.readouterr().err


def test_fetch_flags_have_help_and_the_usage_names_the_module():
    parser = build_parser()
    assert all(a.help for a in parser._actions)
    text = parser.format_help()
    assert text.startswith("usage: python -m medix_jax.evaluate.fetch ") and "``" not in text


def test_a_hugging_face_cache_and_pubmedqa_s_own_repository_are_sources_too(tmp_path):
    src, out = tmp_path / "src", tmp_path / "eval_data"
    parquet(src / "datasets--flaviagiammarino--vqa-rad/snapshots/0123abc/data/test-00000-of-00001-e5bc.parquet", [
        {"image": {"bytes": image_bytes("red"), "path": None}, "question": "q?", "answer": "yes"}])
    repo = src / "pubmedqa/data"  # git clone https://github.com/pubmedqa/pubmedqa SRC/pubmedqa
    repo.mkdir(parents=True)
    record = {"QUESTION": "Does Y help?", "CONTEXTS": ["Y was given."], "LABELS": ["METHODS"], "MESHES": [],
              "YEAR": "2001", "reasoning_required_pred": "no", "reasoning_free_pred": "no", "final_decision": "no",
              "LONG_ANSWER": "It does not."}
    (repo / "ori_pqal.json").write_text(json.dumps({"21": record, "22": {**record, "final_decision": "yes"}}))
    (repo / "test_ground_truth.json").write_text(json.dumps({"22": "yes"}))
    reports = {r.task: r for r in fetch(src, out, only=["vqa_rad", "pubmedqa"])}
    assert reports["vqa_rad"].status == "converted" and reports["vqa_rad"].records == 1
    assert reports["pubmedqa"].status == "converted" and reports["pubmedqa"].source == "pubmedqa/pubmedqa"
    [item] = load_items(load_tasks("configs/eval/tasks.yaml", data_root=out, only=["pubmedqa"])[0])
    assert (item.id, item.reference) == ("22", "yes") and "Methods: Y was given." in item.question


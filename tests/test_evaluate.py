"""python -m medix_jax.evaluate: MCQ / open / image+text / report task sets in the real file formats, MediX tasks on
a prepared tfds split scored by the training reward pool, our sampler on a tiny model (also sharded on a mesh) and an
OpenAI-compatible endpoint as generators, a real local judge server or exact match without one; resume, faults."""

import dataclasses
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from medix_jax import parallel
from medix_jax.data.prepare import prepare
from medix_jax.data.prompts import MEDIX_PROMPT, token_ids
from medix_jax.data.synthetic import draw_example, png_bytes, write_synthetic
from medix_jax.data.tokenizer import train_tokenizer
from medix_jax.evaluate.cli import main
from medix_jax.evaluate.generators import OpenAIGenerator, SamplerGenerator, make_generator
from medix_jax.evaluate.harness import evaluate
from medix_jax.evaluate.judging import EvalJudge, parse_score
from medix_jax.evaluate.scoring import exact_match
from medix_jax.evaluate.tasks import DEFAULT_PROMPT, Task, load_items, load_tasks, medix_task
from medix_jax.models.qwen_vl import init_model
from medix_jax.models.qwen_vl.families import preset
from medix_jax.models.qwen_vl.hf_io import load_hf, save_hf
from medix_jax.rewards.judge import JudgeConfig
from medix_jax.rewards.pool import RewardPool, RewardsConfig
from medix_jax.rewards.rules import MEDIX_MODALITY_TAGS, parse_solution
from tests.support.judge_server import JudgeServer


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    mcq = [{"id": f"m{i}", "question": f"Which organ filters blood? ({i})", "choices": ["Heart", "Kidney", "Lung"],
            "answer": "B"} for i in range(3)]
    mcq.append({"id": "m3", "question": "Pick the bone.", "choices": ["Femur", "Liver"], "answer": "Femur"})
    pq.write_table(pa.Table.from_pylist(mcq), root / "mcq.parquet")
    with (root / "open.jsonl").open("w") as f:
        for i in range(3):
            row = {"id": f"o{i}", "question": f"Name the finding ({i}).", "answer": "pneumothorax"}
            f.write(json.dumps(row) + "\n")
    (root / "img").mkdir()
    with (root / "vqa.jsonl").open("w") as f:
        for i, shape in enumerate(["circle", "square"]):
            (root / "img" / f"{i}.png").write_bytes(png_bytes(draw_example("<X_RAY>", shape, (64, 48),
                                                                           random.Random(i))))
            f.write(json.dumps({"qid": i, "q": "What shape is shown?", "a": shape, "img": f"img/{i}.png"}) + "\n")
    with (root / "report.jsonl").open("w") as f:
        f.write(json.dumps({"id": "r0", "question": "Write the impression.", "answer": "No acute findings."}) + "\n")
    spec = {"data_root": str(root), "tasks": [
        {"name": "mcq", "kind": "mcq", "path": "mcq.parquet", "fields": {"options": "choices"}},
        {"name": "open", "kind": "open", "path": "open.jsonl"},
        {"name": "vqa", "kind": "open", "path": "vqa.jsonl",
         "fields": {"question": "q", "answer": "a", "image": "img", "id": "qid"}},
        {"name": "report", "kind": "report", "path": "report.jsonl"},
    ]}
    (root / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return root / "tasks.yaml"


def test_mcq_ground_truth_is_the_option_text(registry, tmp_path):
    index = tmp_path / "index.jsonl"  # MedMCQA-style: the answer is the option's index
    index.write_text(json.dumps({"question": "q", "opts": {"a": "Aorta", "b": "Vena cava"}, "cop": 1}) + "\n")
    task = Task("idx", "mcq", str(index), {"question": "question", "answer": "cop", "options": "opts"})
    assert load_items(task)[0].reference == "Vena cava"
    for bad in ("", "BC", 7, True):  # not an option, a letter or an index: an error, never option A
        index.write_text(json.dumps({"question": "q", "opts": ["Aorta", "Vena cava"], "cop": bad}) + "\n")
        with pytest.raises(ValueError, match="is not an option"):
            load_items(task)
    tasks = load_tasks(registry)
    items = load_items(tasks[0])
    assert items[0].reference == "Kidney" and items[3].reference == "Femur"
    assert items[0].question.endswith("A. Heart\nB. Kidney\nC. Lung")
    vqa = load_items(tasks[2])
    assert [it.id for it in vqa] == ["0", "1"] and len(vqa[0].images) == 1
    with pytest.raises(ValueError, match="unknown tasks"):
        load_tasks(registry, only=["nope"])


def test_end_to_end_through_an_openai_endpoint_with_resume_and_outage(registry, tmp_path):
    tasks = load_tasks(registry)
    total = sum(len(load_items(t)) for t in tasks)
    with JudgeServer(default="echo") as model_server, JudgeServer(default="500") as judge_server:
        generator = OpenAIGenerator(model_server.url, "echo", max_tokens=64)
        down = EvalJudge(JudgeConfig(url=judge_server.url, model="judge", max_retries=1, backoff_s=0.01))
        first = evaluate(tasks, generator, down, tmp_path)  # the judge is down: generations kept, nothing scored
        assert first["counts"] == {"generations_new": total, "judgements_missing": total,
                                   "judgements_missing_connection": total}
        lines = [json.loads(x) for x in (tmp_path / "cache" / "mcq.jsonl").read_text().splitlines()]
        reasons = [r["judgement"]["error"] for r in lines if "judgement" in r]
        assert reasons and all(r.startswith("round 1: connection: InternalServerError") for r in reasons)
        assert all(r["missing"] == r["samples"] and r["score"] == 0.0 for r in first["tasks"].values())
        assert any(m["content"][0]["type"] == "image_url" for m in
                   (r["messages"][0] for r in model_server.requests) if isinstance(m["content"], list))
        judge_server.default = "score"
        second = evaluate(tasks, generator, down, tmp_path)
        assert second["counts"] == {"generations_reused": total, "judgements_new": total}
        assert len(judge_server.requests) - 2 * total == 3 * total  # 3 rounds each (the outage made 2 tries)
        seen = len(model_server.requests), len(judge_server.requests)
        third = evaluate(tasks, generator, down, tmp_path)
        assert third["counts"] == {"generations_reused": total, "judgements_reused": total}
        assert (len(model_server.requests), len(judge_server.requests)) == seen  # nothing redone
    scores = {name: r["score"] for name, r in second["tasks"].items()}
    assert scores == {"mcq": 1.0, "open": 0.0, "vqa": 0.0, "report": 0.0}  # echo repeats the options, not answers
    assert second["overall"] == 0.25
    table = (tmp_path / "results.md").read_text()
    assert "| mcq | mcq | 100.0 | 0 / 4 |" in table and "**25.0**" in table


def test_malformed_judge_json_is_retried_then_reported_per_sample(registry, tmp_path):
    tasks = load_tasks(registry, only=["report"])  # one sample: the script below hits it alone
    with JudgeServer(default="echo") as model_server, \
            JudgeServer(default="score", script=["badjson", "badjson", "badjson"]) as judge_server:
        judge = EvalJudge(JudgeConfig(url=judge_server.url, model="judge"))
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        first = evaluate(tasks, generator, judge, tmp_path)  # round 1: invalid twice -> the sample is missing
        assert first["tasks"]["report"]["missing"] == 1 and judge.stats["eval_invalid_replies"] == 2
        assert first["counts"]["judgements_missing_malformed"] == 1 and "judgements_missing_connection" not in \
            first["counts"]
        lines = [json.loads(x) for x in (tmp_path / "cache" / "report.jsonl").read_text().splitlines()]
        assert lines[-1]["judgement"] == {"score": None, "rounds": [], "error": 'round 1: malformed: no single '
                                          '{"score": 0..5} object in the reply, twice: \'Score: 1\''}
        second = evaluate(tasks, generator, judge, tmp_path)  # one more invalid reply, retried, then judged
        assert second["tasks"]["report"] == {"kind": "report", "samples": 1, "judged": 1, "missing": 0, "score": 0.0}
        assert judge.stats["eval_invalid_replies"] == 3


def says(text):
    """A judge server mode: always this reply."""
    return lambda body: text


def test_report_rubric_is_the_mean_of_the_three_rounds(registry, tmp_path):
    # docs/reference.md#evaluation-protocol: 0-5 rubric / 5; rounds 5, 4, 0: 3/5, not median 4/5
    tasks = load_tasks(registry, only=["report"])
    with JudgeServer(default="echo") as model_server, \
            JudgeServer(script=[says(json.dumps({"score": s})) for s in (5, 4, 0)]) as judge_server:
        summary = evaluate(tasks, OpenAIGenerator(model_server.url, "echo", 64),
                           EvalJudge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
    assert summary["tasks"]["report"]["score"] == pytest.approx(0.6) and summary["overall"] == pytest.approx(0.6)
    lines = [json.loads(x) for x in (tmp_path / "cache" / "report.jsonl").read_text().splitlines()]
    assert lines[-1]["judgement"]["rounds"] == [5, 4, 0]


def test_a_missing_judgement_counts_as_wrong_and_is_reported(registry, tmp_path):
    tasks = load_tasks(registry, only=["mcq"])

    def unsure(body):  # never a valid reply about one sample (m3): it has no judgement
        return "Score: 1" if "Pick the bone" in body["messages"][0]["content"] else '{"score": 1}'

    with JudgeServer(default="echo") as model_server, JudgeServer(default=unsure) as judge_server:
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        first = evaluate(tasks, generator, EvalJudge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
        assert first["tasks"]["mcq"] == {"kind": "mcq", "samples": 4, "judged": 3, "missing": 1, "score": 0.75}
        assert first["overall"] == 0.75 and "| mcq | mcq | 75.0 | 1 / 4 |" in (tmp_path / "results.md").read_text()
        judge_server.default = "score"  # the missing one is judged again on the next run, the others are kept
        second = evaluate(tasks, generator, EvalJudge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
    assert second["tasks"]["mcq"]["score"] == 1.0 and second["tasks"]["mcq"]["missing"] == 0
    assert second["counts"] == {"generations_reused": 4, "judgements_reused": 3, "judgements_new": 1}


def test_a_json_object_in_a_code_fence_or_with_text_around_it_is_a_score():
    assert parse_score('```json\n{"score": 1}\n```', 1) == 1
    assert parse_score('The answer matches.\n{"score": 1}', 1) == 1 and parse_score('{"score": 4}', 5) == 4
    assert parse_score('```json\n{"score": 0}\n``` so {"score": 0}', 1) == 0
    for bad in ('{"score": 1} or {"score": 0}', '{"score": 2}', '{"score": true}', '{"score": 1, "why": "x"}',
                "Score: 1", "", None):
        assert parse_score(bad, 1) is None


def test_structured_outputs_when_the_judge_takes_them_else_a_fenced_reply(registry, tmp_path):
    tasks = load_tasks(registry, only=["mcq", "report"])  # 5 samples, 3 rounds each
    fenced = says('Verdict:\n```json\n{"score": 1}\n```')
    with JudgeServer(default="echo") as model_server, JudgeServer(default="score") as judge_server:
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        taken = evaluate(tasks, generator, EvalJudge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path / "a")
        formats = [r.get("response_format") for r in judge_server.requests]
        assert len(formats) == 15 and all(f and f["type"] == "json_schema" for f in formats)
        assert {tuple(f["json_schema"]["schema"]["properties"]["score"]["enum"]) for f in formats} == \
            {(0, 1), (0, 1, 2, 3, 4, 5)}
        assert taken["tasks"]["mcq"]["score"] == 1.0
        with JudgeServer(default=fenced, reject_response_format=True) as plain:
            judge = EvalJudge(JudgeConfig(url=plain.url, model="judge"))
            summary = evaluate(tasks, generator, judge, tmp_path / "b")
    assert {n: (r["score"], r["missing"]) for n, r in summary["tasks"].items()} == {"mcq": (1.0, 0), "report": (0.2, 0)}
    assert sum("response_format" in r for r in plain.requests) == 1  # found out once in the run, not per request
    assert len(plain.requests) == 1 + 15 and not judge.structured
    assert judge.stats["judge_error_BadRequestError"] == 1 and judge.stats["eval_structured_outputs_rejected"] == 1


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """An HF directory of a tiny random Qwen2.5-VL with a tokenizer trained on the prompts."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer([MEDIX_PROMPT] * 4 + ["Which organ filters blood? Kidney"] * 4, root / "tok")
    cfg = dataclasses.replace(preset("tiny"), tokens=token_ids(tokenizer))
    save_hf(init_model(cfg, 0), root / "hf", base_dir=root / "tok")
    return root / "hf"


def test_our_sampler_on_a_tiny_hf_model_and_the_cli(registry, tiny_hf, tmp_path):
    generator = make_generator(str(tiny_hf), None, max_tokens=6)
    items = load_items(load_tasks(registry, only=["vqa"])[0])
    broken = dataclasses.replace(items[0], id="broken", images=[b"not an image"])
    texts = generator.generate([items[0], broken, items[1]])
    assert isinstance(texts[0], str) and texts[1] is None and isinstance(texts[2], str)  # one bad sample, no crash
    with JudgeServer(default="score") as judge_server:
        args = ["--model", str(tiny_hf), "--tasks", str(registry), "--judge", judge_server.url,
                "--out", str(tmp_path / "out"), "--max-tokens", "6", "--only", "vqa,mcq", "--no-thinking"]
        assert main(args) == 0
        summary = json.loads((tmp_path / "out" / "results.json").read_text())
        assert set(summary["tasks"]) == {"vqa", "mcq"} and summary["counts"]["judgements_new"] == 6
        assert not judge_server.requests[0]["chat_template_kwargs"]["enable_thinking"]
        assert main([*args[:-1], "--thinking", "--max-tokens", "6"]) == 2  # another setting: refuses the same --out


class InterruptedAfter:
    """A generator that is interrupted (Ctrl-C) after ``n`` batches."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def generate(self, items):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.inner.generate(items)


def test_an_interrupted_run_resumes_without_redoing_finished_samples(registry, tmp_path):
    tasks = load_tasks(registry, only=["mcq"])
    with JudgeServer(default="echo") as model_server, JudgeServer(default="score") as judge_server:
        judge = EvalJudge(JudgeConfig(url=judge_server.url, model="judge"))
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        with pytest.raises(KeyboardInterrupt):
            evaluate(tasks, InterruptedAfter(generator, 1), judge, tmp_path, batch_size=2)
        assert len(model_server.requests) == 2  # one batch of two was generated before the interruption
        summary = evaluate(tasks, generator, judge, tmp_path, batch_size=2)
    assert summary["counts"] == {"generations_reused": 2, "generations_new": 2, "judgements_new": 4}
    assert len(model_server.requests) == 4 and summary["tasks"]["mcq"]["score"] == 1.0


@pytest.mark.slow
def test_a_training_run_is_evaluated_from_its_newest_checkpoint(trained_run, registry, tmp_path):
    generator = make_generator(str(trained_run), None, max_tokens=4)
    assert generator.model.config.tokens.image_token_id < 512  # the run's tokenizer ids, not the preset's
    with JudgeServer(default="score") as judge_server:
        judge = EvalJudge(JudgeConfig(url=judge_server.url, model="judge"))
        summary = evaluate(load_tasks(registry, only=["vqa"]), generator, judge, tmp_path)
    assert summary["tasks"]["vqa"]["judged"] == 2 and summary["counts"]["generations_new"] == 2


# ----------------------------------------------------------------------------------------------------------------
# MediX tasks, exact match without a judge


@pytest.fixture(scope="module")
def medix_data(tmp_path_factory):
    """A prepared synthetic MediX dataset (tfds data dir): 8 train, 12 test records."""
    root = tmp_path_factory.mktemp("medix")
    prepare(write_synthetic(root / "src", "parquet", train=8, test=12), root / "data")
    return root / "data"


# What each pattern of hand-written completion scores: (format, modality, exact); pattern 4 is a failed generation.
PATTERNS = {0: (1, 1, 1), 1: (1, 0, 1), 2: (1, 1, 0), 3: (0, 0, 0), 4: (0, 0, 0)}


def medix_completion(item) -> str | None:
    """Pattern ``k % 5`` for the ``k``-th test record: right (answer in another case, spaced, with a full stop),
    wrong modality, wrong answer, unformatted (no tags), no generation."""
    tag, answer = parse_solution(item.reference)
    other = next(t for t in MEDIX_MODALITY_TAGS if t != tag)
    return [f"{tag}<thinking>The shape is plain.</thinking> <answer> {answer.upper()}. </answer>\n",
            f"{other}<thinking>The shape is plain.</thinking><answer>{answer}</answer>",
            f"{tag}<thinking>Hard to say.</thinking><answer>banana</answer>",
            f"The answer is {answer}.",
            None][int(item.id[-6:]) % 5]


class Scripted:
    """A generator answering with ``medix_completion``; it records the templates it was asked with."""

    def __init__(self, answer=medix_completion):
        self.answer, self.prompts, self.calls = answer, [], 0

    def generate(self, items):
        self.calls += 1
        self.prompts += [it.prompt for it in items]
        return [self.answer(it) for it in items]


def test_a_medix_split_is_scored_without_a_judge_by_the_training_rewards(medix_data, tmp_path):
    registry = tmp_path / "tasks.yaml"
    registry.write_text(yaml.safe_dump({"tasks": [
        {"name": "heldout", "kind": "medix", "path": str(medix_data), "split": "test", "dataset": "medix_rl"}]}))
    [task] = load_tasks(registry)
    assert task == medix_task("heldout", str(medix_data))
    items = load_items(task)
    assert len(items) == 12 and len(load_items(medix_task("h", str(medix_data), limit=5))) == 5
    assert items[0].id == "synthetic-test-000000" and parse_solution(items[0].reference)
    assert items[0].question and isinstance(items[0].images[0], bytes) and items[0].images[0][:4] == b"\x89PNG"

    generator = Scripted()
    summary = evaluate([task], generator, None, tmp_path / "out")  # pool built here: format, modality, embed
    assert set(generator.prompts) == {MEDIX_PROMPT}
    result, n = summary["tasks"]["heldout"], len(items)
    expected = [PATTERNS[k % 5] for k in range(n)]
    assert result["format"] == pytest.approx(sum(e[0] for e in expected) / n) == pytest.approx(8 / 12)
    assert result["modality"] == pytest.approx(sum(e[1] for e in expected) / n) == pytest.approx(5 / 12)
    assert result["exact"] == pytest.approx(sum(e[2] for e in expected) / n) == pytest.approx(6 / 12)
    texts = [medix_completion(it) for it in items]
    pool = RewardPool(RewardsConfig(judge=JudgeConfig()))
    try:
        batch = pool.score([t for t in texts if t], [it.reference for it, t in zip(items, texts, strict=True) if t])
    finally:
        pool.close()
    assert result["embed"] == pytest.approx(batch.components["embed"].sum() / n)
    assert result["composite"] == pytest.approx(batch.composite.sum() / n)
    assert result["score"] == result["accuracy"] == result["exact"] and "llm" not in result
    assert (result["kind"], result["scorer"], summary["scorer"]) == ("medix", "exact", "exact")
    assert (result["samples"], result["scored"], result["missing"]) == (12, 10, 2)  # 2 generations failed
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| task | format | modality | exact | embed | llm | composite | score | missing / samples |" in table
    assert f"| heldout | 66.7 | 41.7 | 50.0 | {100 * result['embed']:.1f} | – | {100 * result['composite']:.1f} " \
           "| 50.0 | 2 / 12 |" in table

    # The training job's own pool (here: no embedding); the cached generations are scored again, the failed retried.
    own = RewardPool(RewardsConfig(embedding_on=False))
    try:
        again = evaluate([task], generator, None, tmp_path / "out", pool=own)
    finally:
        own.close()
    assert again["counts"] == {"generations_reused": 10, "generations_failed": 2}
    assert "embed" not in again["tasks"]["heldout"] and again["tasks"]["heldout"]["exact"] == result["exact"]
    assert again["tasks"]["heldout"]["composite"] == pytest.approx((0.1 * 8 + 0.045 * 5) / 12)


def test_a_medix_split_with_a_judge_scores_by_the_llm_reward(medix_data, tmp_path):
    task = medix_task("heldout", str(medix_data))
    with JudgeServer(default="judge") as judge_server:  # YES when the answer equals the truth (case-insensitive)
        judge = EvalJudge(JudgeConfig(url=judge_server.url, model="judge"))
        summary = evaluate([task], Scripted(), judge, tmp_path)
        asked = [r["messages"][-1]["content"] for r in judge_server.requests]
    result = summary["tasks"]["heldout"]
    # As the reference: " SQUARE. " is asked as "SQUARE" (stripped, full stop removed): YES; "banana": NO; the
    # unformatted generation is asked on its whole text: NO; the exact answers are YES without a request.
    assert result["llm"] == pytest.approx(6 / 12) and result["exact"] == pytest.approx(6 / 12)
    assert result["score"] == result["accuracy"] == result["llm"] and result["scorer"] == summary["scorer"] == "judge"
    assert len(asked) == 3 + 2 + 2 and any("banana" in a for a in asked)
    assert result["missing"] == 2 and "embed" in result
    assert f"| {100 * result['llm']:.1f} | {100 * result['composite']:.1f} | 50.0 | 2 / 12 |" in \
        (tmp_path / "results.md").read_text()


def test_open_and_mcq_without_a_judge_are_scored_by_exact_match(registry, tmp_path):
    answers = {"m0": "B", "m1": "(b).", "m2": "<think>It is the kidney.</think>\n Kidney ", "m3": "B. Liver",
               "o0": "Pneumothorax.", "o1": "a pneumothorax", "o2": None, "0": "A. circle", "1": "square"}
    generator = Scripted(lambda item: answers[item.id])
    summary = evaluate(load_tasks(registry, only=["mcq", "open", "vqa"]), generator, None, tmp_path)
    assert set(generator.prompts) == {DEFAULT_PROMPT} and summary["scorer"] == "exact"
    assert summary["tasks"]["mcq"] == {"kind": "mcq", "samples": 4, "judged": 4, "missing": 0, "score": 0.75}
    assert summary["tasks"]["open"] == {"kind": "open", "samples": 3, "judged": 2, "missing": 1, "score": 1 / 3}
    assert summary["tasks"]["vqa"]["score"] == 0.5  # no letters for an open task
    assert "exact match" in (tmp_path / "results.md").read_text()
    for form in ("A", "a", "A.", "(A)", " (a) ", "A. Heart", "heart", "HEART."):
        assert exact_match(form, "Heart", "A") == 1.0
    for form in ("B", "AB", "A Heart", "", None):
        assert exact_match(form, "Heart", "A") == 0.0
    assert exact_match("A", "a") == 1.0 and exact_match("A.", "Heart") == 0.0

    with pytest.raises(ValueError, match="report.*needs --judge"):  # refused before anything is generated
        evaluate(load_tasks(registry, only=["open", "report"]), generator, None, tmp_path / "report")
    assert generator.calls == 3


def test_the_cli_without_a_judge_on_mixed_kinds(registry, medix_data, tiny_hf, tmp_path, capsys):
    spec = yaml.safe_load(registry.read_text())
    spec["tasks"].append({"name": "heldout", "kind": "medix", "path": str(medix_data), "split": "test", "limit": 3})
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(spec))
    args = ["--model", str(tiny_hf), "--tasks", str(tasks), "--out", str(tmp_path / "out"), "--max-tokens", "4"]
    assert main([*args, "--only", "mcq,heldout"]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["scorer"] == "exact" and summary["counts"]["generations_new"] == 4 + 3
    assert summary["tasks"]["mcq"]["judged"] == 4 and summary["tasks"]["heldout"]["samples"] == 3
    assert "| heldout | " in (tmp_path / "out" / "results.md").read_text().split("MediX tasks")[1]
    assert main([*args, "--only", "report"]) == 2 and "report" in capsys.readouterr().err

    # Each item is asked with its kind's template (MEDIX_PROMPT is far longer), unless --prompt overrides it.
    generator = make_generator(str(tiny_hf), None, max_tokens=4)
    medix_item = load_items(medix_task("h", str(medix_data), limit=1))[0]
    plain = dataclasses.replace(medix_item, prompt=DEFAULT_PROMPT)
    assert len(generator.prepare(medix_item)[0]) > len(generator.prepare(plain)[0]) + 50
    assert OpenAIGenerator("http://x", "m", 4).message(medix_item)["content"][0]["text"].startswith("You are a")
    forced = OpenAIGenerator("http://x", "m", 4, prompt=DEFAULT_PROMPT).message(medix_item)["content"]
    assert forced[0]["type"] == "image_url" and forced[1]["text"] == medix_item.question


def test_the_sampler_generates_under_a_mesh_as_without_one(registry, tiny_hf):
    """A sharded model generates the same greedy text on a data x fsdp x tensor mesh; 3 prompts are padded to 4."""
    items = load_items(load_tasks(registry, only=["vqa"])[0]) + load_items(load_tasks(registry, only=["open"])[0])[:1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_hf(tiny_hf, tokens=token_ids(tokenizer), mesh=mesh)
    generator = SamplerGenerator(sharded, tokenizer, 4, mesh=mesh)
    assert generator.rows_multiple() == 4 and generator.sampler.mesh is mesh
    texts = generator.generate(items)
    assert texts == make_generator(str(tiny_hf), None, max_tokens=4).generate(items)
    assert all(isinstance(t, str) for t in texts)


# ----------------------------------------------------------------------------------------------------------------
# The command line: greedy baselines, the registry from anywhere, checks before work, several models (issue 16)


def test_an_openai_model_is_sent_every_greedy_sampling_parameter(registry):
    """vLLM fills what a request leaves out from the model's generation_config.json (repetition penalty, top-k), so
    every sampling parameter goes out explicitly; the real server receives them in the request body."""
    items = load_items(load_tasks(registry, only=["open"])[0])[:1]
    with JudgeServer(default="echo") as server:
        assert OpenAIGenerator(server.url, "m", 8).generate(items) == [items[0].question]
        [full] = server.requests
        assert {k: full.get(k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                         "presence_penalty", "frequency_penalty", "max_tokens")} == {
            "temperature": 0, "top_p": 1, "top_k": -1, "min_p": 0, "repetition_penalty": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "max_tokens": 8}
        assert OpenAIGenerator(server.url, "m", 8, vllm_params=False).generate(items) == [items[0].question]
        plain = server.requests[1]
    assert (plain["temperature"], plain["top_p"], plain["presence_penalty"], plain["frequency_penalty"]) == (0, 1, 0, 0)
    assert not {"top_k", "min_p", "repetition_penalty"} & set(plain)


REFERENCE_TASKS = {  # docs/reference.md#evaluation-protocol: the 17 tasks
    "mmlu_clinical_knowledge", "mmlu_college_biology", "mmlu_college_medicine", "mmlu_medical_genetics",
    "mmlu_professional_medicine", "mmlu_anatomy", "medmcqa", "medqa_4options", "usmle_self_assessment", "pubmedqa",
    "mimic_cxr_summarization", "slake", "vqa_rad", "pathvqa", "pmc_vqa", "pmc_vqa_hard", "mimic_cxr_report_generation"}


def test_the_task_registry_is_found_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the registry the package ships with is used
    tasks = load_tasks("configs/eval/tasks.yaml")
    assert {t.name for t in tasks} == REFERENCE_TASKS and len(tasks) == 17
    assert all(t.path.startswith("eval_data/") for t in tasks)  # data stays relative to where the user runs
    assert main(["--model", "openai:http://127.0.0.1:9/v1", "--model-name", "m", "--tasks", "configs/nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "configs/nope.yaml" in err and "--tasks" in err and "Traceback" not in err


def test_a_missing_model_says_what_to_do_and_does_not_tie_out_to_it(registry, tiny_hf, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--tasks", str(registry), "--only", "mcq", "--out", str(out), "--max-tokens", "4"]
    for wrong in (tmp_path / "no_such_run", tmp_path):  # absent; present but neither a run nor an HF directory
        assert main(["--model", str(wrong), *base]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(wrong) in err and "python -m medix_jax.export" in err
        assert "Traceback" not in err and not (out / "run.json").exists()
    assert main(["--model", str(tiny_hf), *base]) == 0  # the right model in the same --out
    assert json.loads((out / "run.json").read_text())["model"] == str(tiny_hf)


def test_an_unwritable_out_is_one_line_before_any_work(registry, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with JudgeServer(default="echo") as model_server:
        args = ["--model", f"openai:{model_server.url}", "--model-name", "echo", "--tasks", str(registry),
                "--only", "open", "--out", str(blocker / "out")]
        assert main(args) == 2
        assert not model_server.requests  # nothing generated
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and str(blocker / "out") in err


def test_the_judge_is_probed_at_start_up(registry, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with JudgeServer(default="echo") as model_server, JudgeServer(default="score") as judge_server:
        model = ["--model", f"openai:{model_server.url}", "--model-name", "echo", "--tasks", str(registry),
                 "--only", "open"]
        assert main([*model, "--judge", dead, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and dead in err and "connection" in err and "--no-judge-check" in err
        assert not model_server.requests and not (tmp_path / "a" / "run.json").exists()  # stopped before work

        assert main([*model, "--judge", judge_server.url, "--out", str(tmp_path / "b")]) == 0
        probe, *rest = judge_server.requests
        assert "Which organ filters the blood?" in probe["messages"][0]["content"] and len(rest) == 3 * 3
        judge_server.requests.clear()
        assert main([*model, "--judge", judge_server.url, "--out", str(tmp_path / "c"), "--no-judge-check"]) == 0
        assert len(judge_server.requests) == 3 * 3  # no probe


def test_several_models_are_evaluated_side_by_side(registry, tmp_path, capsys):
    def knows(body):  # a "model" that knows the kidney: answers B to the MCQs, else echoes
        return "B" if "filters blood" in body["messages"][-1]["content"][0]["text"] else "no idea"

    with JudgeServer(default="echo") as echo, JudgeServer(default=knows) as expert:
        assert main(["--model", f"openai:{echo.url}", "--model-name", "/models/Echo-1B", "--model",
                     f"openai:{expert.url}", "--model-name", "expert", "--tasks", str(registry), "--only", "mcq,open",
                     "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for label in ("Echo-1B", "expert"):
        summary = json.loads((tmp_path / label / "results.json").read_text())
        assert set(summary["tasks"]) == {"mcq", "open"}
        assert json.loads((tmp_path / label / "run.json").read_text())["model_name"] in ("/models/Echo-1B", "expert")
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["tasks"]["mcq"] == {"Echo-1B": 0.0, "expert": 0.75}  # exact match; m3's answer is not B
    assert table["overall"] == {"Echo-1B": 0.0, "expert": 0.375}
    assert table["models"]["expert"]["dir"] == str(tmp_path / "expert")
    md = (tmp_path / "comparison.md").read_text()
    assert md.startswith("| task | Echo-1B | expert |") and "| mcq | 0.0 | 75.0 |" in md
    assert "| **overall (unweighted mean)** | **0.0** | **37.5** |" in md and md in printed
    assert main(["--model", f"openai:{echo.url}", "--model", "openai:http://x", "--model-name", "a", "--model-name",
                 "b", "--model-name", "c", "--tasks", str(registry), "--out", str(tmp_path / "n")]) == 2


def test_a_medix_generation_is_judged_by_its_answer():
    from medix_jax.evaluate.scoring import judged_text

    text = "<X_RAY>< thinking >The kidney filters.</thinking>\n< answer > Kidney </answer>"
    assert judged_text(text) == "Kidney" and exact_match(judged_text(text), "Kidney") == 1.0
    assert judged_text("<think>hm</think> The kidney.") == "The kidney."
    assert judged_text("<answer>a</answer> then <think>x</think> b") == "b"


def test_medix_rewards_and_their_missing_reasons_are_cached_per_sample(medix_data, tmp_path):
    task = medix_task("heldout", str(medix_data), limit=3)
    with JudgeServer(default="500") as judge_server:
        judge = EvalJudge(JudgeConfig(url=judge_server.url, model="judge", max_retries=0))
        # Answers that differ from the truth, so the judge is asked (and fails) for each.
        summary = evaluate([task], Scripted(lambda it: f"{parse_solution(it.reference)[0]}<thinking>t</thinking>"
                                                       "<answer>banana</answer>"), judge, tmp_path)
    assert summary["tasks"]["heldout"]["missing"] == 3
    rewards = [json.loads(x)["reward"] for x in (tmp_path / "cache" / "heldout.jsonl").read_text().splitlines()
               if "reward" in json.loads(x)]
    assert len(rewards) == 3 and all(r["llm"] is None and r["format"] == 1.0 for r in rewards)
    assert all(r["errors"]["llm"].startswith("connection: InternalServerError") for r in rewards)


def test_every_flag_has_help_and_the_usage_names_the_module(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m medix_jax.evaluate ") and "``" not in help_text
    assert "(default: configs/eval/tasks.yaml)" in help_text and "--no-judge-check" in help_text
    from medix_jax.evaluate.cli import build_parser

    parser = build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_a_training_run_is_asked_with_its_own_prompt_and_config_wherever_it_lies(trained_run, medix_data, tmp_path):
    """The checkpoint's own config (model, data.prompt, pixel bounds) and the run's tokenizer, found relative to the
    run: a copied run whose config.yaml was later changed still evaluates as it was trained."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    (moved / "config.yaml").write_text("model: {preset: qwen2_5_vl_3b}\n")  # e.g. a failed resume with another model
    generator = make_generator(str(moved), None, max_tokens=4)
    assert generator.model.config.text.hidden_size < 512 and generator.model.config.tokens.image_token_id < 512
    assert generator.prompt == "<image>{question}" and (generator.min_pixels, generator.max_pixels) == (3136, 12544)
    medix_item = load_items(medix_task("h", str(medix_data), limit=1))[0]  # asked with MEDIX_PROMPT elsewhere
    assert len(generator.prepare(medix_item)[0]) == len(generator.prepare(
        dataclasses.replace(medix_item, prompt="<image>{question}"))[0])
    assert make_generator(str(moved), None, 4, prompt=MEDIX_PROMPT).prompt == MEDIX_PROMPT  # --prompt still wins
    step = make_generator(str(moved / "1"), None, max_tokens=4)  # one step of the run
    from medix_jax.evaluate.generators import model_label

    assert step.prompt == "<image>{question}" and model_label(str(moved / "1")) == "moved-step1"

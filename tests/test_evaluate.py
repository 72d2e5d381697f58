"""python -m medix_jax.evaluate: MCQ / open / image+text / report task sets in the real file formats, our sampler on
a tiny model and an OpenAI-compatible endpoint as generators, a real local judge server; resume, faults."""

import dataclasses
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from medix_jax.data.prompts import MEDIX_PROMPT, token_ids
from medix_jax.data.synthetic import draw_example, png_bytes
from medix_jax.data.tokenizer import train_tokenizer
from medix_jax.evaluate import (
    Judge,
    OpenAIGenerator,
    Task,
    evaluate,
    load_items,
    load_tasks,
    main,
    make_generator,
    parse_score,
)
from medix_jax.models.qwen2_5_vl import init_model
from medix_jax.models.qwen2_5_vl.config import preset
from medix_jax.models.qwen2_5_vl.hf_io import save_hf
from medix_jax.rewards.judge import JudgeConfig
from tests.judge_server import JudgeServer


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
        down = Judge(JudgeConfig(url=judge_server.url, model="judge", max_retries=1, backoff_s=0.01))
        first = evaluate(tasks, generator, down, tmp_path)  # the judge is down: generations kept, nothing scored
        assert first["counts"] == {"generations_new": total, "judgements_missing": total}
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
        judge = Judge(JudgeConfig(url=judge_server.url, model="judge"))
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        first = evaluate(tasks, generator, judge, tmp_path)  # round 1: invalid twice -> the sample is missing
        assert first["tasks"]["report"]["missing"] == 1 and judge.stats["eval_invalid_replies"] == 2
        lines = [json.loads(x) for x in (tmp_path / "cache" / "report.jsonl").read_text().splitlines()]
        assert lines[-1]["judgement"] == {"score": None, "rounds": [], "error": "round 1: no valid judgement"}
        second = evaluate(tasks, generator, judge, tmp_path)  # one more invalid reply, retried, then judged
        assert second["tasks"]["report"] == {"kind": "report", "samples": 1, "judged": 1, "missing": 0, "score": 0.0}
        assert judge.stats["eval_invalid_replies"] == 3


def says(text):
    """A judge server mode: always this reply."""
    return lambda body: text


def test_report_rubric_is_the_mean_of_the_three_rounds(registry, tmp_path):
    tasks = load_tasks(registry, only=["report"])  # REFERENCE §1: 0-5 rubric / 5; rounds 5, 4, 0: 3/5, not median 4/5
    with JudgeServer(default="echo") as model_server, \
            JudgeServer(script=[says(json.dumps({"score": s})) for s in (5, 4, 0)]) as judge_server:
        summary = evaluate(tasks, OpenAIGenerator(model_server.url, "echo", 64),
                           Judge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
    assert summary["tasks"]["report"]["score"] == pytest.approx(0.6) and summary["overall"] == pytest.approx(0.6)
    lines = [json.loads(x) for x in (tmp_path / "cache" / "report.jsonl").read_text().splitlines()]
    assert lines[-1]["judgement"]["rounds"] == [5, 4, 0]


def test_a_missing_judgement_counts_as_wrong_and_is_reported(registry, tmp_path):
    tasks = load_tasks(registry, only=["mcq"])

    def unsure(body):  # never a valid reply about one sample (m3): it has no judgement
        return "Score: 1" if "Pick the bone" in body["messages"][0]["content"] else '{"score": 1}'

    with JudgeServer(default="echo") as model_server, JudgeServer(default=unsure) as judge_server:
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        first = evaluate(tasks, generator, Judge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
        assert first["tasks"]["mcq"] == {"kind": "mcq", "samples": 4, "judged": 3, "missing": 1, "score": 0.75}
        assert first["overall"] == 0.75 and "| mcq | mcq | 75.0 | 1 / 4 |" in (tmp_path / "results.md").read_text()
        judge_server.default = "score"  # the missing one is judged again on the next run, the others are kept
        second = evaluate(tasks, generator, Judge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path)
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
        taken = evaluate(tasks, generator, Judge(JudgeConfig(url=judge_server.url, model="judge")), tmp_path / "a")
        formats = [r.get("response_format") for r in judge_server.requests]
        assert len(formats) == 15 and all(f and f["type"] == "json_schema" for f in formats)
        assert {tuple(f["json_schema"]["schema"]["properties"]["score"]["enum"]) for f in formats} == \
            {(0, 1), (0, 1, 2, 3, 4, 5)}
        assert taken["tasks"]["mcq"]["score"] == 1.0
        with JudgeServer(default=fenced, reject_response_format=True) as plain:
            judge = Judge(JudgeConfig(url=plain.url, model="judge"))
            summary = evaluate(tasks, generator, judge, tmp_path / "b")
    assert {n: (r["score"], r["missing"]) for n, r in summary["tasks"].items()} == {"mcq": (1.0, 0), "report": (0.2, 0)}
    assert sum("response_format" in r for r in plain.requests) == 1  # found out once in the run, not per request
    assert len(plain.requests) == 1 + 15 and not judge.structured
    assert judge.stats["judge_error_BadRequestError"] == 1 and judge.stats["eval_structured_outputs_rejected"] == 1


def test_our_sampler_on_a_tiny_hf_model_and_the_cli(registry, tmp_path):
    tokenizer = train_tokenizer([MEDIX_PROMPT] * 4 + ["Which organ filters blood? Kidney"] * 4, tmp_path / "tok")
    cfg = dataclasses.replace(preset("tiny"), tokens=token_ids(tokenizer))
    save_hf(init_model(cfg, 0), tmp_path / "hf", base_dir=tmp_path / "tok")
    generator = make_generator(str(tmp_path / "hf"), None, max_tokens=6)
    items = load_items(load_tasks(registry, only=["vqa"])[0])
    broken = dataclasses.replace(items[0], id="broken", images=[b"not an image"])
    texts = generator.generate([items[0], broken, items[1]])
    assert isinstance(texts[0], str) and texts[1] is None and isinstance(texts[2], str)  # one bad sample, no crash
    with JudgeServer(default="score") as judge_server:
        args = ["--model", str(tmp_path / "hf"), "--tasks", str(registry), "--judge", judge_server.url,
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
        judge = Judge(JudgeConfig(url=judge_server.url, model="judge"))
        generator = OpenAIGenerator(model_server.url, "echo", 64)
        with pytest.raises(KeyboardInterrupt):
            evaluate(tasks, InterruptedAfter(generator, 1), judge, tmp_path, batch_size=2)
        assert len(model_server.requests) == 2  # one batch of two was generated before the interruption
        summary = evaluate(tasks, generator, judge, tmp_path, batch_size=2)
    assert summary["counts"] == {"generations_reused": 2, "generations_new": 2, "judgements_new": 4}
    assert len(model_server.requests) == 4 and summary["tasks"]["mcq"]["score"] == 1.0


def test_a_training_run_is_evaluated_from_its_newest_checkpoint(trained_run, registry, tmp_path):
    generator = make_generator(str(trained_run), None, max_tokens=4)
    assert generator.model.config.tokens.image_token_id < 512  # the run's tokenizer ids, not the preset's
    with JudgeServer(default="score") as judge_server:
        judge = Judge(JudgeConfig(url=judge_server.url, model="judge"))
        summary = evaluate(load_tasks(registry, only=["vqa"]), generator, judge, tmp_path)
    assert summary["tasks"]["vqa"]["judged"] == 2 and summary["counts"]["generations_new"] == 2

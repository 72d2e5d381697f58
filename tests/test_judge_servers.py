"""The judge client against a real OpenAI-compatible server: `transformers serve` with a tiny random chat model."""

import time

import openai
import pytest

from medix_jax.rewards.judge import JudgeClient, JudgeConfig
from medix_jax.rewards.pool import RewardPool, RewardsConfig
from tests.support.tiny_chat import ServedModel, make_tiny_chat_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))
    with ServedModel(model_dir) as server:
        yield server, model_dir


def test_transformers_serve_replies_reach_the_judge(served):
    server, model_dir = served
    reply = openai.OpenAI(base_url=server.url, api_key="unused").chat.completions.create(
        model=str(model_dir), messages=[{"role": "user", "content": "Predicted: a\nGround Truth: b"}],
        max_tokens=4, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    # A random model does not answer YES/NO: each pair is asked twice (one retry), then counted missing.
    judge = JudgeClient(JudgeConfig(url=server.url, model=str(model_dir), structured_outputs=False, backoff_s=0.05))
    scores = judge.score([("hepatic cyst", "cyst of the liver"), ("pneumonia", "fracture"), ("same", "same")])
    assert scores == [None, None, 1.0]
    assert judge.stats["judge_calls"] == 4 and judge.stats["judge_invalid_replies"] == 4
    assert judge.stats["judge_missing"] == 2 and judge.stats["judge_exact_match"] == 1


@pytest.fixture(scope="module")
def vllm_served(tmp_path_factory):
    model_dir = make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_vllm"))
    with ServedModel(model_dir, kind="vllm") as server:
        yield server, model_dir


@pytest.mark.slow
def test_vllm_structured_outputs_give_only_yes_or_no(vllm_served):
    server, model_dir = vllm_served
    judge = JudgeClient(JudgeConfig(url=server.url, model=str(model_dir), backoff_s=0.05))
    pairs = [(f"finding number {i}", f"diagnosis {i % 7}") for i in range(40)]
    scores = judge.score(pairs)
    assert all(s in (0.0, 1.0) for s in scores), scores  # a random model, constrained to the two words
    assert judge.stats["judge_invalid_replies"] == 0 and judge.stats["judge_missing"] == 0
    assert judge.stats["judge_calls"] == 40


def test_server_killed_mid_batch_is_missing_and_counted(tmp_path):
    model_dir = make_tiny_chat_model(tmp_path / "tiny_chat_killed")
    with ServedModel(model_dir) as server:
        pool = RewardPool(RewardsConfig(
            judge=JudgeConfig(url=server.url, model=str(model_dir), structured_outputs=False, max_concurrency=2,
                              backoff_s=0.05, max_retries=2, timeout_s=5.0),
            embedding_on=False, deadline_s=60.0))
        completions = [f"<CT_SCAN><thinking>t</thinking><answer>answer {i}</answer>" for i in range(200)]
        future = pool.submit(completions, ["<CT_SCAN> truth"] * 200)
        time.sleep(1.0)
        server.kill()
        batch = future.result(timeout=90)  # never raises into the trainer
        pool.close()
    assert not batch.valid.any()  # nothing judged validly: the random model's replies are invalid, then it died
    assert batch.metrics["reward_llm_missing"] == 200
    assert pool.judge.stats["judge_error_APIConnectionError"] > 0

"""The judge client against a real OpenAI-compatible server: `transformers serve` with a tiny random chat model."""

import openai
import pytest

from medix_jax.rewards.judge import JudgeClient, JudgeConfig
from tests.tiny_chat import ServedModel, make_tiny_chat_model


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

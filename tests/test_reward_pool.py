"""Reward pool: composite with the reference weights, missing masks, deadlines, embeddings, futures."""

import time
from pathlib import Path

import numpy as np
import pytest

from medix_jax.rewards.embedding import EmbeddingConfig, EmbeddingScorer
from medix_jax.rewards.judge import JudgeConfig
from medix_jax.rewards.pool import RewardPool, RewardsConfig, judge_warning
from tests.support.judge_server import JudgeServer

FAST = dict(backoff_s=0.01, timeout_s=2.0, max_retries=1)


@pytest.fixture(scope="module")
def embedder():
    return EmbeddingScorer(EmbeddingConfig())


def test_embedding_orders_paraphrases_above_unrelated(embedder):
    cos = embedder.cosine([("hepatic cyst", "a cyst in the liver"), ("hepatic cyst", "fractured femur"),
                           ("pneumonia in the left lower lobe", "left lower lobe pneumonia"),
                           ("pneumonia in the left lower lobe", "normal fundus photograph")])
    assert cos[0] > cos[1] and cos[2] > cos[3]
    assert cos[0] >= 0.8 and cos[1] < 0.5


def completion(tag, answer):
    return f"{tag}<thinking>reasoning</thinking><answer>{answer}</answer>"


def test_composite_uses_the_reference_weights():
    with JudgeServer() as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, **FAST)))
        batch = pool.submit(
            [completion("<CT_SCAN>", "hepatic cyst."),  # all four components (full stops stripped: exact)
             completion("<MRI_SCAN>", "hepatic cyst"),  # wrong modality
             "I cannot tell",  # no tags: no format, no position for the modality; judged on the whole text
             completion("<CT_SCAN>", "fractured femur")],  # wrong answer
            ["<CT_SCAN> hepatic cyst"] * 4).result()
        pool.close()
    np.testing.assert_allclose(batch.components["llm"], [1, 1, 0, 0])
    np.testing.assert_allclose(batch.components["embed"], [1, 1, 0, 0])
    np.testing.assert_allclose(batch.components["modality"], [1, 0, 0, 1])
    np.testing.assert_allclose(batch.components["format"], [1, 1, 0, 1])
    np.testing.assert_allclose(batch.composite, [1.0, 1.0 - 0.045, 0.0, 0.045 + 0.1], atol=1e-6)
    assert batch.valid.all() and batch.metrics["reward_invalid"] == 0
    assert batch.metrics["reward_exact_match"] == 2 and batch.metrics["judge_calls"] == 2
    assert [m["messages"][0]["content"].split("Predicted:")[1] for m in server.requests] == [
        "I cannot tell\nGround Truth:hepatic cyst\n", "fractured femur\nGround Truth:hepatic cyst\n"]
    assert batch.metrics["judge_latency_p50"] > 0 and batch.metrics["judge_yes_low_similarity"] == 0


def test_judge_outage_marks_samples_missing_not_zero():
    with JudgeServer(default="500") as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, **FAST), embedding_on=False))
        batch = pool.score([completion("<CT_SCAN>", "cyst"), "..."], ["<CT_SCAN> tumour"] * 2)
        pool.close()
    assert np.isnan(batch.components["llm"][0]) and batch.components["llm"][1] == 0.0
    assert list(batch.valid) == [False, True] and batch.composite[0] == 0.0
    assert batch.metrics["reward_llm_missing"] == 1 and batch.metrics["reward_invalid"] == 1
    assert batch.metrics["reward_llm_missing_connection"] == 1 and batch.metrics["reward_llm_missing_malformed"] == 0
    assert batch.errors["llm"][0].startswith("connection: InternalServerError: Error code: 500")
    assert batch.errors["llm"][1] is None  # an empty answer: scored 0 without a call, not missing


def test_a_bug_in_a_component_reaches_the_trainer_not_missing():
    # A TypeError from our code (here: a judge model given as a Path, which cannot go into the request's JSON) is
    # raised out of the batch's future; only transport failures and the deadline make a sample missing.
    with JudgeServer() as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, model=Path("/models/judge"), **FAST),
                                        embedding_on=False))
        with pytest.raises(TypeError, match="not JSON serializable"):
            pool.submit([completion("<CT_SCAN>", "cyst")], ["<CT_SCAN> tumour"]).result()
        pool.close()
    assert server.requests == []


def test_a_hanging_judge_is_cut_at_the_deadline():
    with JudgeServer(default="hang", hang_s=5.0) as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, timeout_s=30, max_retries=0),
                                        embedding_on=False, deadline_s=1.0))
        batch = pool.score([completion("<CT_SCAN>", "a")], ["<CT_SCAN> b"])
        assert batch.metrics["reward_seconds"] < 5.0  # returned at the deadline, not when the judge answered
        assert not batch.valid[0] and batch.components["format"][0] == 1.0
        assert batch.metrics["reward_llm_missing_deadline"] == 1 and batch.errors["llm"][0].startswith("deadline: ")
        pool.close()


def test_a_hung_batch_keeps_its_answered_verdicts_and_does_not_block_the_next():
    with JudgeServer(script=["hang"], default="judge", hang_s=6.0) as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, timeout_s=30, max_retries=0),
                                        embedding_on=False, deadline_s=1.5))
        first = pool.submit([completion("<CT_SCAN>", "a"), completion("<CT_SCAN>", "b")],
                            ["<CT_SCAN> c", "<CT_SCAN> d"]).result()
        start = time.perf_counter()
        second = pool.submit([completion("<CT_SCAN>", "e")], ["<CT_SCAN> f"]).result()
        waited = time.perf_counter() - start
        pool.close()
    assert sorted(np.isnan(first.components["llm"]).tolist()) == [False, True]  # one hung, one answered NO
    assert first.metrics["judge_cancelled"] == 1
    assert second.valid.all() and second.components["llm"][0] == 0.0
    assert waited < 1.5  # the hung request was cancelled at the first batch's deadline, not left holding the worker


def test_judge_off_composite_and_active_components(embedder):
    pool = RewardPool(RewardsConfig(embedding_on=True))
    assert pool.active == ["format", "modality", "embed"]
    batch = pool.score([completion("<X_RAY>", "left pneumothorax")], ["<X_RAY> pneumothorax on the left"])
    assert "llm" not in batch.components and batch.valid.all()
    assert batch.composite[0] == pytest.approx(0.1 + 0.045 + 0.3375 * batch.components["embed"][0])
    pool.close()


def test_bad_ground_truth_is_an_error_not_a_zero():
    pool = RewardPool(RewardsConfig(embedding_on=False))
    with pytest.raises(ValueError, match="modality tag"):
        pool.score([completion("<CT_SCAN>", "x")], ["no tag here"])
    pool.close()


def unsure_or_dropped(body):
    """A judge whose connection drops on answers saying "dropped" and that is unsure of answers saying "unsure"."""
    prompt = body["messages"][-1]["content"]
    if "dropped" in prompt:
        raise ConnectionAbortedError("scripted: the connection drops without a reply")
    return "Maybe" if "unsure" in prompt else "NO"


def test_missing_judge_rewards_are_counted_by_reason_and_carry_it_per_sample():
    with JudgeServer(default=unsure_or_dropped) as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, **FAST), embedding_on=False))
        batch = pool.score([completion("<CT_SCAN>", "cyst"), completion("<CT_SCAN>", "tumour"),
                            completion("<CT_SCAN>", "unsure"), completion("<CT_SCAN>", "dropped"),
                            completion("<CT_SCAN>", "dropped too"), "no answer"], ["<CT_SCAN> cyst"] * 6)
        pool.close()
    llm, errors = batch.components["llm"], batch.errors["llm"]
    np.testing.assert_array_equal(llm, [1, 0, np.nan, np.nan, np.nan, 0])  # missing is NaN, never 0
    assert list(batch.valid) == [True, True, False, False, False, True] and not batch.composite[2:5].any()
    assert errors[:2] == [None, None] and errors[5] is None
    assert errors[2] == "malformed: the reply is neither YES nor NO: 'Maybe'"
    assert all(e.startswith("connection: APIConnectionError: Connection error (") for e in errors[3:5])
    m = batch.metrics
    counts = [m[f"reward_llm_missing{kind}"] for kind in ("", "_connection", "_malformed", "_rejected", "_deadline")]
    assert counts == [3, 2, 1, 0, 0] and m["reward_samples"] == 6


def test_judge_warning_is_one_line_past_the_share():
    cfg = RewardsConfig(judge=JudgeConfig(url="http://127.0.0.1:8001/v1"))
    assert cfg.judge_warn_share == 0.25
    metrics = {"reward_samples": 40.0, "reward_llm_missing": 14.0, "reward_llm_missing_connection": 12.0,
               "reward_llm_missing_malformed": 2.0, "reward_llm_missing_rejected": 0.0,
               "reward_llm_missing_deadline": 0.0}
    errors = ([None] * 26 + ["connection: APIConnectionError: Connection error (ConnectionRefusedError: x)"] * 11
              + ["connection: APITimeoutError: Request timed out"]
              + ["malformed: the reply is neither YES nor NO: 'Maybe'"] * 2)  # the most frequent reason is named
    assert judge_warning(metrics, 7, cfg, errors) == (
        "judge: 14 of 40 samples of step 7 have no judge reward (12 connection errors: APIConnectionError: "
        "Connection error (ConnectionRefusedError: x); 2 malformed replies: the reply is neither YES nor NO: "
        "'Maybe') -- http://127.0.0.1:8001/v1")
    assert judge_warning(dict(metrics, reward_llm_missing=9.0), 7, cfg) is None  # 9 of 40: under a quarter
    assert judge_warning({"reward_samples": 40.0, "reward_llm_missing": 0.0}, 7, cfg) is None
    assert judge_warning({"reward_samples": 8.0}, 1, cfg) is None  # no judge: nothing to warn about
    line = judge_warning(metrics, 3, None)  # a reward object without the pool's config: defaults, no URL
    assert line.startswith("judge: 14 of 40 samples of step 3") and line.endswith("-- judge URL unknown")

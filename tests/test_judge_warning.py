"""A training step in which a large share of the samples lost their judge reward logs one warning line (real judge
server on 127.0.0.1, the real reward pool, the real trainer)."""

import re

import numpy as np

from medix_jax.rewards.judge import JudgeConfig
from medix_jax.rewards.pool import RewardPool, RewardsConfig
from tests.support.judge_server import JudgeServer
from tests.test_train import make_trainer, shared_run  # noqa: F401 (a fixture)


class AnsweringPool(RewardPool):
    """The real pool; each decoded completion of the random policy (which writes no tags) is made the answer of a
    well-formed MediX completion first, so that the judge is asked about every sample."""

    def score(self, completions, solutions):
        return super().score([f"<CT_SCAN><thinking>t</thinking><answer>{re.sub('</?(thinking|answer)>', '', c)}"
                              "</answer>" for c in completions], solutions)


def test_a_step_that_lost_its_judge_rewards_logs_one_warning_line(shared_run, capsys):  # noqa: F811
    with JudgeServer(default="500") as server:
        pool = AnsweringPool(RewardsConfig(judge=JudgeConfig(url=server.url, model="judge", max_retries=3,
                                                             backoff_s=0.01), embedding_on=False))
        trainer = make_trainer(shared_run, pool, rollout_batches=2)  # two scored batches in the step, one line
        capsys.readouterr()
        bad = trainer.step()  # every judge request answered 500
        out = capsys.readouterr()
        server.default = "judge"
        good = trainer.step()
        pool.close()
    after = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("judge:")]
    assert len(lines) == 1, out
    n = bad["reward_samples"]
    assert n == 2 * 4 * 8 and bad["reward_llm_missing"] == bad["reward_llm_missing_connection"] > 0.25 * n
    assert lines == [f"judge: {bad['reward_llm_missing']:.0f} of {n:.0f} samples of step 1 have no judge reward "
                     f"({bad['reward_llm_missing_connection']:.0f} connection errors: InternalServerError: Error code: "
                     f"500 - scripted failure) -- {server.url}"]
    assert good["reward_llm_missing"] == 0 and np.isfinite(good["reward_composite_mean"]), {
        k: v for k, v in good.items() if "missing" in k or k.startswith("judge")}  # the kinds, if it ever fails
    assert "judge:" not in after.out + after.err

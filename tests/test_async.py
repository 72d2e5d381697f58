"""Rollouts ahead of the update (``rollout.staleness``, rl/ahead.py) and the rollout correction (eq. 7 of
rl/grpo.py) in the trainer: which policy samples each batch, the batches trained on after a resume, kill -9 during
an asynchronous run, and the correction's weights with a bf16 sampler."""

import dataclasses
import signal
import time

import jax
import numpy as np
import pytest
from flax import nnx

from medix_jax.rl.policy import recomputes_old_logprobs
from tests.support.letter_reward import LetterReward
from tests.test_train import final_state, make_trainer, metric_lines, shared_run, train_cli  # noqa: F401 (fixture)


def probe(params) -> np.ndarray:
    """A copy of one weight that every update moves (the last layer's output projection)."""
    leaves = [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(params)]
    return max(leaves, key=lambda a: (a.ndim == 2, a.size)).copy()


def trace(trainer, steps: int) -> tuple[list, list, list, list]:
    """Run ``steps`` steps of ``trainer``: (the probe of the policy at each step's start, the probe of the policy
    that sampled each batch in the order sampled, the prompt ids each update trained on, each step's metrics)."""
    sampled, trained, policies, metrics = [], [], [], []
    generate, run = trainer.sampler.generate, trainer.updater.run

    def sample(model, prompts, key):
        sampled.append(probe(nnx.state(model, nnx.Param)))
        return generate(model, prompts, key)

    def update(params, opt_state, ref, groups):
        trained.append([grp.example["id"] for grp in groups])
        return run(params, opt_state, ref, groups)

    trainer.sampler.generate, trainer.updater.run = sample, update
    for _ in range(steps):
        policies.append(probe(trainer.params))
        metrics.append(trainer.step())
    trainer.close()
    return policies, sampled, trained, metrics


def test_staleness_1_samples_each_batch_with_the_policy_one_update_old(shared_run):  # noqa: F811
    """Step n trains on the batch the policy of step n - 1 sampled (steps 0 and 1: the first policy), the same
    prompts in the same order as the synchronous trainer, and logs the lag."""
    policies, sampled, trained, metrics = trace(make_trainer(shared_run, LetterReward(),
                                                             rollout_changes={"staleness": 1}), 4)
    assert [m["policy_lag"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert all(not np.array_equal(a, b) for a, b in zip(policies, policies[1:], strict=False))  # every update moved it
    expected = [policies[0], policies[0], policies[1], policies[2], policies[3]]  # batch 4: in flight at the end
    assert len(sampled) in (4, 5)
    assert all(np.array_equal(a, b) for a, b in zip(sampled, expected[:len(sampled)], strict=True))
    _, _, in_step, sync = trace(make_trainer(shared_run, LetterReward()), 4)
    assert trained == in_step and "policy_lag" not in sync[0]
    assert np.isfinite([m["loss"] for m in metrics]).all() and metrics[-1]["rollout_wait_seconds"] >= 0


def test_staleness_0_is_the_synchronous_step(shared_run):  # noqa: F811
    """``rollout.staleness: 0`` is today's trainer: no thread, the same metrics and parameters bit for bit."""
    default, zero = make_trainer(shared_run, LetterReward()), make_trainer(shared_run, LetterReward(),
                                                                          rollout_changes={"staleness": 0})
    assert zero.ahead is None
    for _ in range(2):
        a, b = default.step(), zero.step()
        assert {k: v for k, v in a.items() if "seconds" not in k and k != "tokens_per_second"} == \
            {k: v for k, v in b.items() if "seconds" not in k and k != "tokens_per_second"}
    a, b = jax.tree.leaves(default.params), jax.tree.leaves(zero.params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_resumed_asynchronous_run_trains_on_each_batch_once(shared_run):  # noqa: F811
    """A checkpoint after step 2 holds the data position after batch 2 (the batch in flight is redone): resumed
    there, steps 2-4 train on the prompts the uninterrupted run trained on at steps 2-4 -- none twice, none
    skipped."""
    ahead = {"staleness": 1}
    _, _, straight, _ = trace(make_trainer(shared_run, LetterReward(), rollout_changes=ahead), 5)
    first = make_trainer(shared_run, LetterReward(), rollout_changes=ahead)
    first.step(), first.step()
    position, params, opt_state = first.data_state(), first.params, first.opt_state
    first.close()
    resumed = make_trainer(shared_run, LetterReward(), rollout_changes=ahead)
    resumed.data.set_state(position)
    resumed.params, resumed.opt_state, resumed.step_count = params, opt_state, 2
    _, _, after, metrics = trace(resumed, 3)
    assert after == straight[2:] and metrics[0]["policy_lag"] == 0.0


@pytest.mark.slow
def test_kill_9_during_an_asynchronous_run_then_resume(tmp_path):
    """Killed after its second checkpoint: the resumed run completes, each step's metrics once, and the steps
    before the kill are those of the uninterrupted run (the schedule does not depend on timing)."""
    straight, killed, cache = tmp_path / "straight", tmp_path / "killed", tmp_path / "xla-cache"
    out, _ = train_cli(straight, 5, cache, "rollout.staleness=1").communicate(timeout=600)
    assert (straight / "checkpoints" / "5").is_dir(), out
    victim = train_cli(killed, 5, cache, "rollout.staleness=1")
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "2").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    saved = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved < 5
    out, _ = train_cli(killed, 5, cache, "rollout.staleness=1").communicate(timeout=600)
    assert "resumed at step" in out, out
    lines = metric_lines(killed)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5] and (killed / "checkpoints" / "5").is_dir()
    assert lines[:saved] == metric_lines(straight)[:saved]
    assert final_state(killed, 5).keys() == final_state(straight, 5).keys()


def test_rollout_correction_with_a_bf16_sampler_logs_its_weights_and_changes_the_loss(shared_run):  # noqa: F811
    """A float32 trainer sampling from bf16 weights: ``loss.rollout_correction`` weighs each token by the trainer's
    old over the sampler's probability (eq. 7; the weights themselves are checked by hand in test_grpo.py), so the
    same groups give another loss than without it, and the weights' statistics are logged."""
    cfg, _, _ = shared_run
    bf16 = {"weights_dtype": "bfloat16"}
    plain = make_trainer(shared_run, LetterReward(), rollout_changes=bf16)
    corrected = make_trainer(shared_run, LetterReward(), rollout_changes=bf16,
                             loss=dataclasses.replace(cfg.train.loss, rollout_correction="token_truncate"))
    groups, _ = plain.collect(jax.random.PRNGKey(0))
    _, _, before = plain.updater.run(plain.params, plain.opt_state, None, groups)
    _, _, after = corrected.updater.run(corrected.params, corrected.opt_state, None, groups)
    assert "correction_weight" not in before and before["logprob_mismatch_max"] > 0
    assert 0.9 < after["correction_weight"] < 1.1 and after["correction_weight"] != 1.0
    assert 1.0 < after["correction_weight_max"] <= 2.0 and 0.0 < after["correction_ess"] <= 1.0
    assert 0.0 <= after["correction_cut"] < 0.05
    assert after["loss"] != pytest.approx(before["loss"], rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="recompute_old_logprobs"):
        recomputes_old_logprobs(False, plain.model_cfg, None, "sequence_mask")

"""GRPO / DAPO / GSPO loss terms against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medix_jax.rl.grpo import LossConfig, entropy, group_advantages, policy_loss, token_entropy, totals


def test_group_advantages_unbiased_std_invalid_and_singletons():
    rewards = [1.0, 0.0, 0.5, 0.5, 2.0, 9.0, 7.0, 3.0]
    valid = [True, True, True, True, True, False, True, False]
    adv = np.asarray(group_advantages(rewards, valid, 4))
    # group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0 + 0) / 3)
    std = math.sqrt(0.5 / 3)
    np.testing.assert_allclose(adv[:4], [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0, 0], rtol=1e-6)
    # group 2: valid rewards 2 and 7 -> mean 4.5, std sqrt(12.5); invalid samples get 0
    np.testing.assert_allclose(adv[4:], [-2.5 / (math.sqrt(12.5) + 1e-6), 0, 2.5 / (math.sqrt(12.5) + 1e-6), 0],
                               rtol=1e-6)
    np.testing.assert_allclose(group_advantages([3.0, 1.0], [True, True], 2, scale_by_std=False), [1.0, -1.0])
    np.testing.assert_array_equal(group_advantages([3.0, 1.0], [True, False], 2), [0.0, 0.0])  # no baseline
    np.testing.assert_array_equal(group_advantages([1.0, 1.0], [True, True], 2), [0.0, 0.0])  # all equal


def one_token(ratio, advantage, cfg, ref=None):
    logp = jnp.log(jnp.array([[ratio]], jnp.float32))
    ref_logp = None if ref is None else jnp.log(jnp.array([[ref]], jnp.float32))
    mask = jnp.ones((1, 1), bool)
    return policy_loss(logp, jnp.zeros((1, 1)), jnp.array([advantage]), mask, cfg, totals(mask), ref_logp)


@pytest.mark.parametrize("ratio, advantage, expected, clipped", [
    (1.1, 2.0, -2.2, 0.0),  # inside the band
    (1.5, 2.0, -2.6, 1.0),  # A > 0: capped at 1 + eps_high = 1.3
    (0.5, 2.0, -1.0, 0.0),  # A > 0, low ratio: the unclipped term is the minimum
    (0.5, -2.0, 1.6, 1.0),  # A < 0: floored at 1 - eps_low = 0.8
    (2.0, -1.0, 2.0, 0.0),  # A < 0, high ratio: unclipped
    (5.0, -1.0, 3.0, 0.0),  # dual clip: -C A = 3 caps the loss 5
])
def test_clipped_surrogate_with_clip_higher_and_dual_clip(ratio, advantage, expected, clipped):
    loss, metrics = one_token(ratio, advantage, LossConfig(clip_low=0.2, clip_high=0.3, dual_clip=3.0))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["clip_fraction"]) == clipped


def test_without_dual_clip_the_loss_is_unbounded():
    loss, _ = one_token(5.0, -1.0, LossConfig(dual_clip=None))
    assert float(loss) == pytest.approx(5.0, rel=1e-5)


def test_k3_kl_term():
    cfg = LossConfig(kl_coef=0.1)
    loss, metrics = one_token(1.0, 0.0, cfg, ref=2.0)  # logp = 0, ref = log 2
    k3 = 2.0 - math.log(2.0) - 1.0
    assert float(metrics["kl"]) == pytest.approx(k3, rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * k3, rel=1e-5)
    _, same = one_token(1.5, 0.0, cfg, ref=1.5)
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-7)


def test_aggregations_and_masking():
    logp = jnp.log(jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    old = jnp.zeros((2, 3))
    adv = jnp.array([1.0, 3.0])
    mask = jnp.array([[True, False, False], [True, True, True]])
    tok, _ = policy_loss(logp, old, adv, mask, LossConfig(aggregation="token_mean"), totals(mask))
    seq, _ = policy_loss(logp, old, adv, mask, LossConfig(aggregation="seq_mean"), totals(mask))
    assert float(tok) == pytest.approx(-(1 + 3 * 3) / 4)  # every token counts once
    assert float(seq) == pytest.approx(-(1 + 3) / 2)  # every sequence counts once
    # masked tokens (and a fully masked, invalid sample) contribute nothing, whatever their values
    garbage = logp.at[0, 1:].set(50.0)
    tok2, _ = policy_loss(garbage, old, adv, mask, LossConfig(aggregation="token_mean"), totals(mask))
    assert float(tok2) == float(tok)
    invalid = jnp.array([[False] * 3, [True] * 3])
    a, _ = policy_loss(garbage.at[0].set(9.0), old, adv, invalid, LossConfig(), totals(invalid))
    b, _ = policy_loss(logp[1:], old[1:], adv[1:], invalid[1:], LossConfig(), totals(invalid[1:]))
    assert float(a) == pytest.approx(float(b))


def test_micro_batches_sum_to_the_full_batch_loss():
    key = jax.random.PRNGKey(0)
    logp = -jax.random.uniform(key, (6, 5))
    old = logp + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (6, 5))
    adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.3, 0.0])
    mask = jnp.arange(5)[None] < jnp.array([5, 2, 4, 1, 3, 5])[:, None]
    for agg in ("token_mean", "seq_mean"):
        cfg = LossConfig(aggregation=agg)
        full, _ = policy_loss(logp, old, adv, mask, cfg, totals(mask))
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], cfg, totals(mask))[0]
                    for i in range(0, 6, 2))
        assert float(parts) == pytest.approx(float(full), rel=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    old = jnp.array([[-1.2, -1.9, -3.3]])
    mask = jnp.ones((1, 3), bool)
    cfg = LossConfig(sequence_ratio=True, clip_low=10.0, clip_high=10.0, dual_clip=None)

    def loss(lp):
        return policy_loss(lp, old, jnp.array([1.0]), mask, cfg, totals(mask))[0]

    s = math.exp(((-1.0 + 1.2) + (-2.0 + 1.9) + (-3.0 + 3.3)) / 3)
    assert float(loss(logp)) == pytest.approx(-s, rel=1e-5)  # every token carries the sequence ratio
    grad = jax.grad(loss)(logp)
    np.testing.assert_allclose(grad, [[-s / 3] * 3], rtol=1e-5)  # d(-mean_t s * pi_t/sg(pi_t))/dlogp_t
    # token-level ratios would give different per-token gradients
    token = LossConfig(clip_low=10.0, clip_high=10.0, dual_clip=None)
    g_tok = jax.grad(lambda lp: policy_loss(lp, old, jnp.array([1.0]), mask, token, totals(mask))[0])(logp)
    assert not np.allclose(g_tok, grad)


def test_entropy_of_uniform_logits():
    logits = jnp.zeros((2, 3, 8))
    mask = jnp.array([[True, True, False], [True, False, False]])
    assert float(entropy(token_entropy(logits), mask, totals(mask))) == pytest.approx(math.log(8), rel=1e-6)


@pytest.mark.parametrize("gap", [-200.0, 0.0, 200.0])
@pytest.mark.parametrize("masked", [False, True])
def test_k3_kl_gradient_is_finite_for_any_gap(gap, masked):
    """``ref - logp`` is clamped to [-20, 20] before the exponential (the reference's ``low_var_kl``), and masked
    positions (padding, where logp may be -120) never reach it: no inf, no NaN gradient."""
    mask = jnp.array([[True, not masked]])
    ref = jnp.array([[-1.0, -1.0 + gap]])

    def loss(logp):
        return policy_loss(logp, logp, jnp.array([1.0]), mask, LossConfig(kl_coef=0.01), totals(mask), ref)[0]

    logp = jnp.array([[-1.0, -1.0]])
    value, grad = jax.value_and_grad(loss)(logp)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all(), (value, grad)


def corrected(mode, old, sampler, advantages, mask, kl_ref=None):
    """(loss, metrics, gradient wrt logp) at logp = old (ratio 1: no clipping), token mean, rollout correction
    ``mode``."""
    cfg = LossConfig(aggregation="token_mean", rollout_correction=mode, correction_cap=2.0,
                     kl_coef=0.0 if kl_ref is None else 0.5)
    old, sampler, mask = jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask)

    def loss(lp):
        return policy_loss(lp, old, jnp.asarray(advantages), mask, cfg, totals(mask), kl_ref, sampler)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(old)
    return float(value), metrics, np.asarray(grad)


def test_rollout_correction_weights_by_hand():
    """Eq. 7 on a hand-computed case: a sampler that gave the tokens log-probs off the trainer's by known amounts."""
    old = [[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]]
    delta = np.array([[0.3, -0.4, 1.2], [0.2, 0.3, 0.0]])  # old - mu; token (0, 2): exp(1.2) = 3.32 > C = 2
    sampler = np.asarray(old) - delta
    adv, mask = [1.0, -2.0], [[True, True, True], [True, True, False]]
    n = 5  # tokens under the mask
    plain, _, _ = corrected("none", old, sampler, adv, mask)
    assert plain == pytest.approx(-(3 * 1.0 + 2 * -2.0) / n, rel=1e-6)  # every weight 1

    w = np.minimum(np.exp(delta), 2.0)  # token_truncate
    value, metrics, grad = corrected("token_truncate", old, sampler, adv, mask)
    expected = -(w[0].sum() * 1.0 + w[1, :2].sum() * -2.0) / n
    assert value == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(grad, -w * np.array(adv)[:, None] * np.asarray(mask) / n, rtol=1e-5)
    assert float(metrics["correction_weight"]) == pytest.approx((w[0].sum() + w[1, :2].sum()) / n, rel=1e-6)
    assert float(metrics["correction_weight_max"]) == pytest.approx(2.0)
    assert float(metrics["correction_cut"]) == pytest.approx(1 / n)

    # sequence_mask: rho_0 = exp(1.1) = 3.0 > 2: the whole first sample masked; rho_1 = exp(0.5) kept, on each token
    value, metrics, grad = corrected("sequence_mask", old, sampler, adv, mask)
    rho = math.exp(0.5)
    assert value == pytest.approx(-(2 * rho * -2.0) / n, rel=1e-6)
    np.testing.assert_allclose(grad[0], 0.0)
    np.testing.assert_allclose(grad[1], [2 * rho / n, 2 * rho / n, 0.0], rtol=1e-5)
    assert float(metrics["correction_cut"]) == pytest.approx(3 / n)
    assert float(metrics["correction_weight"]) == pytest.approx(2 * rho / n, rel=1e-6)


def test_rollout_correction_leaves_the_kl_term_alone_and_needs_the_sampler():
    old = jnp.array([[-1.0, -2.0]])
    mask = jnp.ones((1, 2), bool)
    ref = old + 0.5
    kl_only = [corrected(mode, old, old - 3.0, [0.0], mask, kl_ref=ref)[0] for mode in ("none", "token_truncate",
                                                                                          "sequence_mask")]
    assert kl_only[0] > 0 and kl_only[1] == pytest.approx(kl_only[0]) and kl_only[2] == pytest.approx(kl_only[0])
    with pytest.raises(ValueError, match="sampler"):
        policy_loss(old, old, jnp.ones(1), mask, LossConfig(rollout_correction="token_truncate"), totals(mask))
    with pytest.raises(ValueError, match="correction_cap"):
        LossConfig(correction_cap=1.0)

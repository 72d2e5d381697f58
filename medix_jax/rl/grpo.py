"""The GRPO objective and its DAPO / GSPO variants, in float32: every equation the trainer optimises is here.

Notation: G rollouts per prompt, rewards ``r``, per-token log-probabilities under the policy being trained
(``logp``), the policy the step started from (``old``: the sampler's, or the trainer's forward of the same weights
where they differ -- ``rl/update.py``), the sampler (``mu``) and a frozen reference (``ref``); ``mask`` marks
completion tokens of valid samples. Settings of the reference runs: docs/reference.md#reference-rl-settings.

1. Group advantage (GRPO):  ``A_i = (r_i - mean_g r) / (std_g r + eps)``, unbiased std over the group's valid
   samples (``scale_by_std=False``: ``A_i = r_i - mean_g r``, Dr.GRPO). A group with fewer than two valid samples
   has no baseline: its advantages are 0.
2. Importance ratio per token: ``rho_t = exp(logp_t - old_t)``. GSPO-token (Zheng et al. 2025, eq. 14): the
   sequence ratio ``s_i = exp(mean_t (logp_t - old_t))`` enters each token as ``sg[s_i] * pi_t / sg[pi_t]`` -- the
   value is the sequence ratio, the gradient flows per token.
3. Clipped surrogate with separate bounds (DAPO clip-higher): ``L_t = -min(rho_t A, clip(rho_t, 1 - eps_low,
   1 + eps_high) A)``; dual clip (Ye et al. 2020) for ``A < 0``: ``L_t = min(L_t, -C A)``.
4. KL to the reference as a loss term, low-variance k3 estimator (Schulman 2020) as the reference's
   ``low_var_kl``: ``d_t = clip(ref_t - logp_t, -20, 20)``, ``k3_t = clip(exp(d_t) - d_t - 1, -10, 10)``;
   ``L_t += beta * k3_t``. Positions outside ``mask`` use ``d_t = 0`` (their log-probs may be -inf-like padding,
   whose exponential would turn the gradient into NaN even though the loss masks them).
5. Aggregation: ``token_mean`` (DAPO) ``sum_{i,t} L / sum_{i,t} mask``; ``seq_mean`` (GRPO, GSPO)
   ``mean_i (sum_t L / |o_i|)``. Both take their denominators from the whole mini-batch (``Totals``), so gradient
   accumulation over micro-batches gives exactly the full-batch gradient.
6. Supervised cold start (``rl/sft.py``): token-level negative log-likelihood of target completions,
   ``L = -sum_{i,t} m_{i,t} log pi(y_{i,t} | x_i, y_{i,<t}) / sum_{i,t} m_{i,t}``, ``m`` marking completion tokens
   only (the prompt and its images are context), the denominator the whole mini-batch's (``Totals``).
7. Rollout correction (``rollout_correction``): the sampler's log-probabilities ``mu`` may differ from ``old`` (a
   bf16 sampler and a float32 trainer, another kernel, or a policy some updates old). The surrogate of eq. 3 (not
   the KL term) is weighted per token by ``w``, computed outside the gradient from ``delta_t = old_t - mu_t``:
   ``token_truncate`` (truncated importance sampling, Yao et al. 2025 "Your efficient RL framework secretly brings
   you off-policy RL training"): ``w_t = min(exp(delta_t), C)``; ``sequence_mask`` (masked importance sampling at
   the sequence level, Liu et al. 2025 "When speed kills stability"): ``rho_i = exp(sum_t delta_t)``, ``w_{i,t} =
   rho_i`` where ``rho_i <= C`` and 0 (the sample masked; it still counts in eq. 5's denominators) where not. ``C``
   is ``correction_cap``; ``none``: w = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Aggregation = Literal["token_mean", "seq_mean"]
Correction = Literal["none", "token_truncate", "sequence_mask"]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.3  # DAPO clip-higher: 0.28; GSPO: 3e-4 / 4e-4
    dual_clip: float | None = 3.0  # C; None switches it off
    aggregation: Aggregation = "seq_mean"  # token_mean for DAPO
    sequence_ratio: bool = False  # GSPO-token
    kl_coef: float = 0.0  # beta; the reference GRPO run uses 1e-2 (k3)
    scale_by_std: bool = True
    eps: float = 1e-6
    rollout_correction: Correction = "none"  # eq. 7
    correction_cap: float = 2.0  # C of eq. 7 (Yao et al.'s)

    def __post_init__(self):
        if self.clip_low <= 0 or self.clip_high <= 0 or self.kl_coef < 0:
            raise ValueError(f"invalid loss settings {self}")
        if self.correction_cap <= 1:
            raise ValueError(f"train.loss.correction_cap must be > 1, got {self.correction_cap}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")


def group_advantages(rewards, valid, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """Eq. 1 over consecutive groups of ``group_size``; invalid samples get 0 and do not enter the statistics."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    v = jnp.asarray(valid, bool).reshape(-1, group_size)
    n = v.sum(1, keepdims=True)
    mean = jnp.where(v, r, 0.0).sum(1, keepdims=True) / jnp.maximum(n, 1)
    var = jnp.where(v, (r - mean) ** 2, 0.0).sum(1, keepdims=True) / jnp.maximum(n - 1, 1)
    centred = r - mean
    advantages = centred / (jnp.sqrt(var) + eps) if scale_by_std else centred
    return jnp.where(v & (n >= 2), advantages, 0.0).reshape(-1)


class Totals(NamedTuple):
    """Mini-batch denominators for eq. 5 (so micro-batches sum to the full-batch loss)."""

    tokens: jax.Array  # sum of mask over the mini-batch
    sequences: jax.Array  # valid samples in the mini-batch


def totals(mask) -> Totals:
    mask = jnp.asarray(mask, bool)
    return Totals(jnp.maximum(mask.sum(), 1).astype(jnp.float32),
                  jnp.maximum(mask.any(1).sum(), 1).astype(jnp.float32))


def correction_weights(old_logp, sampler_logp, mask, mode: Correction, cap: float) -> tuple[jax.Array, jax.Array]:
    """Eq. 7: (weights ``w`` ``[N, T]``, 0 outside ``mask``; a boolean ``[N, T]`` of the tokens it truncated or
    masked) of ``old_logp`` over ``sampler_logp`` (``[N, T]``)."""
    delta = jnp.where(mask, old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32), 0.0)
    if mode == "token_truncate":
        cut = delta > jnp.log(cap)
        weights = jnp.exp(jnp.minimum(delta, jnp.log(cap)))
    elif mode == "sequence_mask":  # in log space: exp(sum_t delta_t) overflows on long completions
        log_rho = delta.sum(1, keepdims=True)
        cut = jnp.broadcast_to(log_rho > jnp.log(cap), delta.shape)
        weights = jnp.where(cut, 0.0, jnp.exp(jnp.minimum(log_rho, jnp.log(cap))))
    else:
        cut, weights = jnp.zeros(delta.shape, bool), jnp.ones_like(delta)
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0)), cut & mask


def policy_loss(logp, old_logp, advantages, mask, cfg: LossConfig, denominators: Totals,
                ref_logp=None, sampler_logp=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eqs. 2-5 and 7. ``logp``/``old_logp``/``ref_logp``/``sampler_logp`` (``mu``, needed by a
    ``rollout_correction`` other than none)/``mask``: ``[N, T]``; ``advantages``: ``[N]``."""
    logp, old_logp = logp.astype(jnp.float32), old_logp.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    lengths = jnp.maximum(m.sum(1), 1.0)
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    drift = jnp.abs(log_ratio)  # |logp - old| per token (on the first pass: the sampler-vs-trainer mismatch)
    if cfg.sequence_ratio:  # eq. 2, GSPO-token
        seq_log_ratio = log_ratio.sum(1, keepdims=True) / lengths[:, None]
        log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp)
    ratio = jnp.exp(log_ratio)
    a = advantages.astype(jnp.float32)[:, None]
    unclipped = -ratio * a
    clipped = -jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * a
    loss = jnp.maximum(unclipped, clipped)  # eq. 3: -min(rho A, clip(rho) A)
    if cfg.dual_clip is not None:
        loss = jnp.where(a < 0, jnp.minimum(loss, -cfg.dual_clip * a), loss)
    weights, cut = jnp.ones_like(loss), jnp.zeros(loss.shape, bool)
    if cfg.rollout_correction != "none":  # eq. 7
        if sampler_logp is None:
            raise ValueError(f"rollout_correction {cfg.rollout_correction!r} needs the sampler's log-probabilities")
        weights, cut = correction_weights(old_logp, sampler_logp, mask, cfg.rollout_correction, cfg.correction_cap)
        loss = loss * weights
    kl = jnp.zeros_like(loss)
    if ref_logp is not None:  # eq. 4
        diff = jnp.clip(jnp.where(mask, ref_logp.astype(jnp.float32) - logp, 0.0), -20.0, 20.0)
        kl = jnp.clip(jnp.exp(diff) - diff - 1.0, -10.0, 10.0)
        loss = loss + cfg.kl_coef * kl
    if cfg.aggregation == "token_mean":  # eq. 5
        total = (loss * m).sum() / denominators.tokens
    else:
        total = ((loss * m).sum(1) / lengths).sum() / denominators.sequences
    per_token = lambda x: (x * m).sum() / denominators.tokens  # noqa: E731
    metrics = {
        "clip_fraction": per_token((clipped > unclipped).astype(jnp.float32)),
        "ratio_mean": per_token(ratio),
        "kl": per_token(kl),
        "logprob_diff": per_token(drift),
        "logprob_diff_max": jnp.max(drift),
    }
    if cfg.rollout_correction != "none":  # the effective sample size is mean(w)^2 / mean(w^2) (rl/update.py)
        metrics.update(correction_weight=per_token(weights), correction_weight_sq=per_token(weights**2),
                       correction_weight_max=jnp.max(jnp.where(mask, weights, 0.0)),
                       correction_cut=per_token(cut.astype(jnp.float32)))
    return total, metrics


def sft_loss(logp, mask, denominators: Totals) -> jax.Array:
    """Eq. 6: ``-sum(logp * mask) / denominators.tokens``; ``logp``, ``mask``: ``[N, T]``."""
    return -(jnp.where(mask, logp.astype(jnp.float32), 0.0)).sum() / denominators.tokens


def token_entropy(logits) -> jax.Array:
    """Per-token entropy ``-sum_v p log p`` ``[...]`` of float logits ``[..., V]`` (computed in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def entropy(h, mask, denominators: Totals) -> jax.Array:
    """Mean token entropy over the mini-batch's tokens, ``sum(h * mask) / denominators.tokens``, of per-token
    entropies ``h`` ``[N, T]`` (``token_entropy``; the trainer computes them chunk by chunk)."""
    return (jnp.asarray(h, jnp.float32) * mask).sum() / denominators.tokens

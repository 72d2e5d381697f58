"""The policy's training state around its parameters: the optimizer (clipped AdamW), the shardings of its state,
one optimizer update, and the rollout copy of the weights in another dtype (``rollout.weights_dtype``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from medix_jax.generate.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6  # docs/reference.md#reference-rl-settings: AdamW 1e-6 constant, wd 0.01, clip 1.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    warmup_steps: int = 0  # optimizer updates
    schedule: Literal["constant", "cosine"] = "constant"
    # Adam's two moments are stored in this dtype (their arithmetic is float32). "bfloat16" with
    # model.param_dtype: bfloat16 is EasyR1's adamw_bf16, which the reference's 30B run trains with
    # (docs/reference.md#reference-run-scripts).
    state_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"optim.state_dtype must be float32 or bfloat16, not {self.state_dtype!r}")


def make_optimizer(cfg: OptimConfig, total_updates: int, param_dtype="float32") -> optax.GradientTransformation:
    """Clipped AdamW (decoupled weight decay), its moments stored in ``cfg.state_dtype``; parameters stored in less
    than float32 (``param_dtype``, model.param_dtype) take their updates by Kahan summation."""
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(total_updates, cfg.warmup_steps + 1))
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                   optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    adamw = optax.adamw(lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay)
    steps = [optax.clip_by_global_norm(cfg.grad_clip), stored_in(adamw, jnp.dtype(cfg.state_dtype))]
    if jnp.finfo(param_dtype).bits < 32:
        steps.append(kahan_summation())
    return optax.chain(*steps)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``inner`` with its floating-point state stored in ``dtype`` and its arithmetic (gradients, parameters, state)
    in float32: Adam's moments in bfloat16 halve their memory without bfloat16 arithmetic."""

    def init(params):
        return _cast(inner.init(_cast(params, jnp.float32)), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(_cast(updates, jnp.float32), _cast(state, jnp.float32),
                                      None if params is None else _cast(params, jnp.float32))
        return updates, _cast(state, dtype)

    return optax.GradientTransformation(init, update)


class KahanState(NamedTuple):
    compensation: optax.Params  # per parameter stored in less than float32: what its rounding has lost so far


def kahan_summation() -> optax.GradientTransformation:
    """Compensated updates for parameters stored in less than float32 (as EasyR1's adamw_bf16, AnyPrecisionAdamW
    with Kahan summation): a bfloat16 weight near 1 cannot take a step below 2^-9, so at a learning rate of 1e-6
    every plain update would round away. The part of each update the parameter's rounding loses is kept in a
    buffer of the parameter's dtype and added to the next update. Float32 parameters' updates pass unchanged."""

    def low(p):
        return jnp.issubdtype(p.dtype, jnp.floating) and jnp.finfo(p.dtype).bits < 32

    def init(params):
        return KahanState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("kahan_summation needs the parameters")

        def one(u, c, p):
            if not low(p):
                return u, c
            total = c.astype(jnp.float32) + u.astype(jnp.float32)
            applied = (p.astype(jnp.float32) + total).astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32)
            return applied, (total - applied).astype(c.dtype)  # p + applied, added in float32, is exact

        pairs = jax.tree.map(one, updates, state.compensation, params)
        outer = jax.tree.structure(updates)
        applied, compensation = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
        return applied, KahanState(compensation)

    return optax.GradientTransformation(init, update)


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings of ``tx``'s state: Adam's moments like their parameters, scalars (the step count) replicated."""
    return optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), jax.tree.map(lambda a: a.sharding, params),
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def apply_updates(tx: optax.GradientTransformation, params, opt_state, grads):
    """One optimizer update: (new parameters, new state, global gradient norm)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def optimizer_programs(tx: optax.GradientTransformation, params, mesh):
    """(jitted ``tx.init``, jitted ``apply_updates(params, state, grads) -> (params, state, grad norm)``) over
    ``params`` (arrays or abstract ``ShapeDtypeStruct``s with shardings), with explicit shardings for the whole
    training state: Adam's moments like their parameters, scalars replicated on the mesh, kept by every update -- so
    a restored checkpoint lands where it was. Parameters and state are donated."""
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    opt_shardings = optimizer_shardings(tx, params, mesh)
    init = jax.jit(tx.init, out_shardings=opt_shardings)
    apply = jax.jit(functools.partial(apply_updates, tx), donate_argnums=(0, 1),
                    out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())))
    return init, apply


def rollout_dtype(params, rollout: SamplingConfig):
    """The dtype of the sampler's copy of the parameters (``rollout.weights_dtype``), or None: no copy (unset, or
    the parameters are already stored in it)."""
    cast = None if rollout.weights_dtype is None else jnp.dtype(rollout.weights_dtype)
    floats = [a.dtype for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    return None if cast is None or all(d == cast for d in floats) else cast


def cast_floats(params, dtype):
    """``params`` with every floating-point leaf cast to ``dtype`` (the rollout copy; None: unchanged)."""
    return params if dtype is None else _cast(params, dtype)


def recomputes_old_logprobs(setting: bool | None, model_cfg, cast, correction: str = "none",
                            staleness: int = 0) -> bool:
    """Whether the old log-probabilities are recomputed by the trainer's forward: ``setting``
    (``train.recompute_old_logprobs``), or by default whenever the sampler's differ from it by more than rounding
    (bf16 compute, or rollouts from a ``cast`` copy of the weights), a ``correction`` (``loss.rollout_correction``)
    weighs the one by the other, or the sampler ran an older policy (``rollout.staleness``) -- the last two cannot do
    without recomputing: a ``ValueError``."""
    needs = [f"train.loss.rollout_correction {correction!r}"] * (correction != "none") + \
        [f"rollout.staleness {staleness}"] * (staleness > 0)
    if setting is False and needs:
        raise ValueError(f"{' and '.join(needs)} need the old log-probabilities of the policy being updated: set "
                         "train.recompute_old_logprobs true (or leave it unset)")
    if setting is not None:
        return setting
    return model_cfg.dtype != "float32" or cast is not None or bool(needs)

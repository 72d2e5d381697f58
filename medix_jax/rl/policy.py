"""The policy's training state around its parameters: the optimizer (clipped AdamW), the shardings of its state,
one optimizer update, and the rollout copy of the weights in another dtype (``rollout.weights_dtype``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

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


def make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(total_updates, cfg.warmup_steps + 1))
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                   optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay))


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
    if dtype is None:
        return params
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def recomputes_old_logprobs(setting: bool | None, model_cfg, cast) -> bool:
    """Whether the old log-probabilities are recomputed by the trainer's forward: ``setting``
    (``train.recompute_old_logprobs``), or by default whenever the sampler's differ from it by more than rounding
    (bf16 compute, or rollouts from a ``cast`` copy of the weights)."""
    if setting is not None:
        return setting
    return model_cfg.dtype != "float32" or cast is not None

"""Building blocks shared by the vision tower and the decoder.

Every parameter is an ``nnx.Param`` carrying ``axes`` metadata: one logical axis name per dimension (``None`` for
a dimension that is never sharded). ``medix_jax.parallel`` maps logical names to mesh axes with one rules table.

Dtype policy: parameters are stored in ``param_dtype``; matmuls run in ``dtype``; RMSNorm statistics, rotary
embeddings and the attention softmax are computed in float32 (as transformers does for Qwen2.5-VL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax.parallel import constrain

Axes = tuple[str | None, ...]
# An array on the host (numpy, as the input builders make it) or on devices (jax): jnp operations take either.
AnyArray = jax.Array | np.ndarray


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel`` of shape ``(in, *out)`` (HF ``nn.Linear.weight`` transposed)."""

    def __init__(self, d_in: int, d_out: int | tuple[int, ...], axes: Axes, *, bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        out = (d_out,) if isinstance(d_out, int) else tuple(d_out)
        self.dtype = dtype
        self.kernel = param(rngs, nnx.initializers.normal(0.02), (d_in, *out), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, out, param_dtype, axes[1:]) if bias else None

    def __call__(self, x: AnyArray) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=((x.ndim - 1,), (0,)))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (vocab, dim), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: AnyArray) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the statistics in float32 (Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the statistics in float32 (``nn.LayerNorm``; the
    Qwen3-VL vision tower)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``; the vision tower uses biases, the decoder does not. The wide activation
    is pinned to ``act_axes`` (its logical axes; ``parallel.constrain``)."""

    def __init__(self, dim: int, hidden: int, axes: tuple[str, str], act_axes: Axes, *, bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act_axes = act_axes
        self.gate_proj = Dense(dim, hidden, axes, **kw)
        self.up_proj = Dense(dim, hidden, axes, **kw)
        self.down_proj = Dense(hidden, dim, axes[::-1], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), self.act_axes))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` in float32; ``x`` is ``[..., T, H, D]`` and cos/sin ``[..., T, D]``."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def stack_layers(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """``n`` layers built by ``make(rngs)`` with their parameters stacked on a leading ``layers`` axis.

    The stacked module is applied with ``run_layers(..., scan=True)`` (``nnx.scan``): one compiled layer body
    instead of ``n`` unrolled copies, which keeps compile time flat in depth for the large presets.
    """

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=n)
    def create(rngs):
        return make(rngs)

    layers = create(rngs)
    for _, var in nnx.to_flat_state(nnx.state(layers, nnx.Param)):
        var.set_metadata("axes", ("layers", *var.get_metadata()["axes"]))
    return layers


def run_layers(layers, x, per_layer: tuple, shared: tuple, *, scan: bool, remat: bool):
    """``x = layer_i(x, *per_layer[i], *shared)`` for every layer, unrolled (a list) or scanned (stacked).

    ``x`` is the carry: an array, or any pytree (the decoder carries ``(hidden, kv_cache)``).

    ``per_layer`` holds arrays with one row per layer (e.g. which vision blocks attend globally); ``remat``
    recomputes each layer's activations in the backward pass instead of storing them.
    """

    def body(x, layer, *args):
        return layer(x, *args)

    if remat:
        body = nnx.remat(body)
    if scan:
        in_axes = (nnx.Carry, 0) + (0,) * len(per_layer) + (None,) * len(shared)
        return nnx.scan(body, in_axes=in_axes, out_axes=nnx.Carry)(x, layers, *per_layer, *shared)
    for i, layer in enumerate(layers):
        x = body(x, layer, *(a[i] for a in per_layer), *shared)
    return x

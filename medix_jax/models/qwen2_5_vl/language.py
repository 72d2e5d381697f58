"""Qwen2 decoder with grouped-query attention and M-RoPE (transformers ``Qwen2_5_VLTextModel``).

Layer: ``h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))``,
``y = h + down(silu(gate(n2(h))) * up(n2(h)))``; q/k/v projections have biases, o_proj and the MLP do not.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from medix_jax.models.qwen2_5_vl.config import TextConfig
from medix_jax.models.qwen2_5_vl.layers import (
    Dense,
    Embed,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    attention,
    run_layers,
    stack_layers,
)


class KVCache(NamedTuple):
    """Keys and values of every layer, ``[layers, batch, length, kv_heads, head_dim]``, preallocated.

    Kept stacked (also for unrolled layers) so that each layer writes its slice in place with
    ``dynamic_update_slice``; a decode loop donates it between steps.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, layer, index, k, v) -> "KVCache":
        """Store ``k, v`` ``[batch, steps, kv_heads, head_dim]`` of ``layer`` at positions ``index...``."""
        at = (layer, 0, index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at))

    def read(self, layer) -> tuple[jax.Array, jax.Array]:
        return (jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = Dense(cfg.hidden_size, cfg.num_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, cfg.hidden_size, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, layer, index):
        """Without a cache, ``mask`` is ``[B, S, S]``; with one, this step's keys/values are written at
        ``index`` and the queries attend over the whole cache (``mask`` ``[B, S, cache length]``)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache = cache.write(layer, index, k, v)
            k, v = cache.read(layer)
        return self.o_proj(attention(q, k, v, mask).reshape(b, s, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=False, **kw)

    def __call__(self, carry, layer, cos, sin, mask, index):
        x, cache = carry
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (HF on-disk prefix ``model.``)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool, scan: bool, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat, self.scan, self.num_layers = remat, scan, cfg.num_layers
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw, rngs=rngs)
        make = lambda r: DecoderLayer(cfg, **kw, rngs=r)  # noqa: E731
        self.layers = (stack_layers(make, cfg.num_layers, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.num_layers)]))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, index=0) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states (and the updated cache) for input embeddings ``x`` ``[B, S, hidden]``."""
        layer_ids = jnp.arange(self.num_layers)
        x, cache = run_layers(self.layers, (x, cache), (layer_ids,), (cos, sin, mask, index),
                              scan=self.scan, remat=self.remat)
        return self.norm(x), cache

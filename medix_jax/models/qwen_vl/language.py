"""Qwen2 / Qwen3 decoder with grouped-query attention and M-RoPE (transformers ``Qwen2_5_VLTextModel``,
``Qwen3VLTextModel``, ``Qwen3VLMoeTextModel``).

Layer: ``h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))``,
``y = h + down(silu(gate(n2(h))) * up(n2(h)))``. Qwen2: q/k/v projections have biases, o_proj and the MLP do not.
Qwen3: no biases, and q and k are RMS-normalised per head before the rotary (``qk_norm``); the MoE variant replaces
the MLP by a mixture of experts (``models.moe``). Qwen3-VL's DeepStack adds vision features of intermediate tower
blocks to the outputs of the first layers at the image positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from medix_jax.models import (
    attention,
    moe,  # a module, not its names: moe itself imports layers from this package
)
from medix_jax.models.qwen_vl.config import TextConfig
from medix_jax.models.qwen_vl.layers import (
    AnyArray,
    Dense,
    Embed,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    run_layers,
    stack_layers,
)
from medix_jax.parallel import constrain

HIDDEN = ("batch", "length", "act_embed")  # logical axes of activations (parallel.constrain)
HEADS = ("batch", "length", "act_heads", None)
KV_HEADS = ("batch", "length", "act_kv_heads", None)


class Segments(NamedTuple):
    """Who attends to whom, as ids instead of a ``[B, T, S]`` mask: query t attends key s iff their ids are equal
    and s <= t (+ the cache index when decoding). Real tokens are 1 and padding 0 (padding attends padding only,
    never read)."""

    q: AnyArray  # [B, T] int32
    kv: AnyArray  # [B, S] int32: the step's own tokens, or the whole cache when decoding


class KVCache(NamedTuple):
    """Keys and values of every layer, ``[layers, batch, length, kv_heads, head_dim]``, preallocated.

    Kept stacked (also for unrolled layers) so that each layer writes its slice in place with
    ``dynamic_update_slice``; a decode loop donates it between steps.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, layer, index, k, v) -> KVCache:
        """Store ``k, v`` ``[batch, steps, kv_heads, head_dim]`` of ``layer`` at positions ``index...`` (a scalar),
        or one step per row at that row's own position (``index`` ``[batch]``: continuous batching)."""
        if jnp.ndim(index) == 1:
            rows = jnp.arange(k.shape[0])
            return KVCache(self.k.at[layer, rows, index].set(k[:, 0].astype(self.k.dtype)),
                           self.v.at[layer, rows, index].set(v[:, 0].astype(self.v.dtype)))
        at = (layer, 0, index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at))

    def read(self, layer) -> tuple[jax.Array, jax.Array]:
        return (jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, implementation: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.implementation = implementation
        self.q_proj = Dense(cfg.hidden_size, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, cfg.hidden_size, ("heads", "embed"), bias=False, **kw)
        norm = (lambda: RMSNorm(hd, cfg.rms_norm_eps, **kw)) if cfg.qk_norm else (lambda: None)
        self.q_norm, self.k_norm = nnx.data(norm()), nnx.data(norm())

    def __call__(self, x, cos, sin, segments: Segments, cache: KVCache | None, layer, index):
        """Causal attention of the step's tokens ``x`` ``[B, S, hidden]``. With a ``cache``, their keys/values are
        written at ``index``; the queries attend over the whole cache when ``segments.kv`` covers it (decode) and
        over the step's own keys otherwise (prefill: the prompt only, not the empty completion slots). A per-row
        ``index`` ``[B]`` (one token per row) attends over each row's first ``index + 1`` cache slots only."""
        b, s, _ = x.shape
        q = constrain(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), HEADS)
        k = constrain(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), KV_HEADS)
        v = constrain(self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), KV_HEADS)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (cfg.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        offset = 0
        if cache is not None:
            cache = cache.write(layer, index, k, v)
            if jnp.ndim(index) == 1:  # one step per row, each at its own length (continuous batching)
                out = attention.ragged_decode_attention(q, *cache.read(layer), segments.q, segments.kv, index + 1)
                return self.o_proj(constrain(out, HEADS).reshape(b, s, -1)), cache
            if segments.kv.shape[1] != s:
                k, v = cache.read(layer)
                offset = index
        out = attention.attention(q, k, v, segments.q, segments.kv, causal=True, q_offset=offset, contiguous=True,
                                  implementation=self.implementation)
        return self.o_proj(constrain(out, HEADS).reshape(b, s, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, implementation: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, implementation=implementation, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.moe = cfg.num_experts > 0
        self.mlp = (moe.MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.experts_per_token, **kw)
                    if self.moe else
                    SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), ("batch", "length", "act_mlp"),
                           bias=False, **kw))

    def __call__(self, carry, layer, cos, sin, segments, index, deepstack):
        """``carry`` = (hidden, KV cache or None, summed ``RouterStats`` or None); ``deepstack`` (or None): vision
        features ``[n, B, P, hidden]`` (zero off the image positions) added to the outputs of layers 0..n-1 over the
        first P positions."""
        x, cache, router = carry
        x = constrain(x, HIDDEN)  # every layer starts from the batch split over data x fsdp
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, segments, cache, layer, index)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if self.moe:
            h, stats = self.mlp(h, segments.q > 0)
            router = router + stats
        else:
            h = self.mlp(h)
        x = x + h
        if deepstack is not None:
            n, p = deepstack.shape[0], deepstack.shape[2]
            feature = jnp.where(layer < n, deepstack[jnp.minimum(layer, n - 1)], 0).astype(x.dtype)
            x = x.at[:, :p].add(feature)
        return x, cache, router


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (HF on-disk prefix ``model.``)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool, scan: bool, attention: str,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat, self.scan, self.num_layers, self.num_experts = remat, scan, cfg.num_layers, cfg.num_experts
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw, rngs=rngs)
        make = lambda r: DecoderLayer(cfg, **kw, implementation=attention, rngs=r)  # noqa: E731
        self.layers = (stack_layers(make, cfg.num_layers, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.num_layers)]))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw, rngs=rngs)

    def __call__(self, x, cos, sin, segments: Segments, cache: KVCache | None = None, index=0,
                 deepstack: jax.Array | None = None) -> tuple[jax.Array, KVCache | None, moe.RouterStats | None]:
        """Final-norm hidden states, the updated cache and the router statistics summed over the layers (None for
        a dense decoder) for input embeddings ``x`` ``[B, S, hidden]``."""
        layer_ids = jnp.arange(self.num_layers)
        router = moe.RouterStats.zeros(self.num_experts) if self.num_experts else None
        x, cache, router = run_layers(self.layers, (x, cache, router), (layer_ids,),
                                      (cos, sin, segments, index, deepstack), scan=self.scan, remat=self.remat)
        return constrain(self.norm(x), HIDDEN), cache, router

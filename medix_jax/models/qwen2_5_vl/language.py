"""Qwen2 decoder with grouped-query attention and M-RoPE (transformers ``Qwen2_5_VLTextModel``).

Layer: ``h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))``,
``y = h + down(silu(gate(n2(h))) * up(n2(h)))``; q/k/v projections have biases, o_proj and the MLP do not.
"""

from __future__ import annotations

import jax
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


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = Dense(cfg.hidden_size, cfg.num_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = Dense(cfg.hidden_size, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, cfg.hidden_size, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attention(q, k, v, mask).reshape(b, s, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (HF on-disk prefix ``model.``)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool, scan: bool, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat, self.scan = remat, scan
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw, rngs=rngs)
        make = lambda r: DecoderLayer(cfg, **kw, rngs=r)  # noqa: E731
        self.layers = (stack_layers(make, cfg.num_layers, rngs) if scan
                       else nnx.List([make(rngs) for _ in range(cfg.num_layers)]))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = run_layers(self.layers, x, (), (cos, sin, mask), scan=self.scan, remat=self.remat)
        return self.norm(x)

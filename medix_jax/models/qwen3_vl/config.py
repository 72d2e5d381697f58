"""Qwen3-VL presets and conversion from/to Hugging Face ``config.json`` (model types ``qwen3_vl``, ``qwen3_vl_moe``).

The architecture is described by the shared ``ModelConfig`` (``family`` = the HF model type): a Qwen3-VL vision
config has a learned position table and DeepStack indexes, a Qwen3 text config has ``qk_norm``, no q/k/v bias,
interleaved M-RoPE and, for the MoE, experts. Preset numbers are those of the released checkpoints' ``config.json``
(Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3-VL-8B-Instruct, Qwen/Qwen3-VL-30B-A3B-Thinking, as copied in public
repositories; see the note of issue 17). ``qwen3_vl_tiny`` / ``qwen3_vl_moe_tiny`` are random-weight test models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from medix_jax.models.qwen_vl.config import ModelConfig, TextConfig, TokenIds, VisionConfig

_QWEN3_TEXT: dict[str, Any] = dict(vocab_size=151936, rope_theta=5_000_000.0, mrope_section=(24, 20, 20),
                                   mrope_interleaved=True, qkv_bias=False, qk_norm=True, head_size=128,
                                   max_position_embeddings=262144)
_QWEN3_VISION: dict[str, Any] = dict(patch_size=16, num_position_embeddings=2304, fullatt_block_indexes=())
_VISION_27 = VisionConfig(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                          deepstack_visual_indexes=(8, 16, 24), **_QWEN3_VISION)

PRESETS: dict[str, ModelConfig] = {
    "qwen3_vl_2b": ModelConfig(
        family="qwen3_vl",
        vision=VisionConfig(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2048,
                            deepstack_visual_indexes=(5, 11, 17), **_QWEN3_VISION),
        text=TextConfig(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                        tie_word_embeddings=True, **_QWEN3_TEXT),
    ),
    "qwen3_vl_8b": ModelConfig(
        family="qwen3_vl",
        vision=_VISION_27,
        text=TextConfig(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                        **_QWEN3_TEXT),
    ),
    "qwen3_vl_30b_a3b": ModelConfig(
        family="qwen3_vl_moe",
        vision=dataclasses.replace(_VISION_27, out_hidden_size=2048),
        text=TextConfig(hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32, num_kv_heads=4,
                        num_experts=128, experts_per_token=8, moe_intermediate_size=768, **_QWEN3_TEXT),
    ),
}

_TINY_TOKENS = TokenIds(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
                        bos_token_id=506, eos_token_id=505, pad_token_id=506, stop_token_ids=(506,))
_TINY_VISION = VisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                            patch_size=16, num_position_embeddings=64, fullatt_block_indexes=(),
                            deepstack_visual_indexes=(0, 1))
_TINY_TEXT = TextConfig(vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, head_size=32, mrope_section=(6, 5, 5), mrope_interleaved=True,
                        qkv_bias=False, qk_norm=True, tie_word_embeddings=True, max_position_embeddings=4096)
PRESETS["qwen3_vl_tiny"] = ModelConfig(family="qwen3_vl", vision=_TINY_VISION, text=_TINY_TEXT, tokens=_TINY_TOKENS)
PRESETS["qwen3_vl_moe_tiny"] = ModelConfig(
    family="qwen3_vl_moe", vision=_TINY_VISION, tokens=_TINY_TOKENS,
    text=dataclasses.replace(_TINY_TEXT, num_experts=4, experts_per_token=2, moe_intermediate_size=32))


def text_and_vision_from_hf(d: dict[str, Any], t: dict[str, Any], v: dict[str, Any]) -> tuple[TextConfig,
                                                                                             VisionConfig]:
    """The Qwen3-VL(-MoE) ``TextConfig`` and ``VisionConfig`` of a ``config.json`` (``t``: its text keys, ``v``: its
    ``vision_config``). Layers that HF would make dense inside a MoE (``mlp_only_layers``, ``decoder_sparse_step``
    > 1) are refused: every layer here is of one kind."""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if t.get("mlp_only_layers") or t.get("decoder_sparse_step", 1) != 1:
        raise ValueError("mixture-of-experts configs with dense layers (mlp_only_layers, decoder_sparse_step) are "
                         "not supported")
    if t.get("attention_bias"):
        raise ValueError("Qwen3-VL with attention_bias is not supported")
    moe = d.get("model_type") == "qwen3_vl_moe"
    text = TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        intermediate_size=t["intermediate_size"], rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        max_position_embeddings=t.get("max_position_embeddings", 262144),
        head_size=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"], qkv_bias=False, qk_norm=True,
        num_experts=(t.get("num_experts") or t.get("num_local_experts") or 0) if moe else 0,
        experts_per_token=t.get("num_experts_per_tok", 0) if moe else 0,
        moe_intermediate_size=t.get("moe_intermediate_size", 0) if moe else 0,
    )
    vision = VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], out_hidden_size=v.get("out_hidden_size", text.hidden_size),
        patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
        fullatt_block_indexes=(),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"vision hidden_act {v['hidden_act']!r} is not supported (gelu_pytorch_tanh)")
    return text, vision


def model_config_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """Hub-style ``config.json`` (nested ``text_config`` / ``vision_config``, as the released checkpoints)."""
    t, v, ids = cfg.text, cfg.vision, cfg.tokens
    moe = cfg.family == "qwen3_vl_moe"
    text = {
        "model_type": f"{cfg.family}_text", "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta, "initializer_range": 0.02, "use_cache": True,
        "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                         "mrope_interleaved": t.mrope_interleaved},
        "tie_word_embeddings": t.tie_word_embeddings, "dtype": torch_dtype,
        "bos_token_id": ids.bos_token_id, "eos_token_id": ids.eos_token_id, "pad_token_id": ids.pad_token_id,
    }
    if moe:
        text.update(num_experts=t.num_experts, num_experts_per_tok=t.experts_per_token,
                    moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                    norm_topk_prob=True, router_aux_loss_coef=t.router_aux_loss_coef)
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "model_type": cfg.family,
        "image_token_id": ids.image_token_id, "video_token_id": ids.video_token_id,
        "vision_start_token_id": ids.vision_start_token_id, "vision_end_token_id": ids.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings, "dtype": torch_dtype,
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_vl_moe" if moe else "qwen3_vl", "hidden_act": "gelu_pytorch_tanh",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "in_channels": v.in_channels, "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "initializer_range": 0.02,
        },
    }
